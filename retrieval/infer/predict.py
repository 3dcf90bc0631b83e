"""Prediction: head probabilities fused with a kNN vote over the index, streamed into a Kaggle submission."""
from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from ..data.offsets import RecordReader, file_fingerprint, load_offsets
from ..durable import aside, place
from ..errors import UserError
from ..model.runtime import is_first_rank, release_heap
from ..model.runtimes import check_runtime
from .indexdir.bundle import IndexBundle, open_index
from .pipeline.embed import LoaderSettings, Timer
from .pipeline.parts import PartWork, numbered, run_parts
from .pipeline.store import PartStore
from .scoring.candidates import candidates_for
from .scoring.fused import FusedClassifier, FusionOverrides, load_fusion
from .scoring.peers import (
    PeerSettings,
    first_stage,
    load_peers,
    peer_graph,
    propagate,
    top_classes,
)

log = logging.getLogger(__name__)
SEARCH_BATCH = 2048  # faiss uses BLAS only for large query batches (~500+ at d=256)


@dataclass
class PredictReport:
    """What a prediction run did; ``computed`` products were predicted by this call (the rest resumed)."""

    products: int = 0
    computed: int = 0
    images: int = 0
    without_image: int = 0
    seconds: float = 0.0
    params: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    decode: str = ""

    @property
    def rate(self) -> float:
        """Products per second computed by this call."""
        return self.computed / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class ScoresOutput:
    """``--scores-out``: a JSON Lines file with each product's ``top`` categories and their scores."""

    path: Path
    top: int = 5

    def __post_init__(self) -> None:
        if self.top < 1:
            raise UserError(f"top must be at least 1, got {self.top}")


@dataclass(frozen=True)
class PredictSettings:
    """How a prediction runs: ``part_products`` per resumable part, ``restart`` (discard parts made with other
    settings), the ``runtime`` that embeds (default: the index's own), an optional ``scores`` output."""

    part_products: int = 20_000
    restart: bool = False
    runtime: str | None = None
    scores: ScoresOutput | None = None

    def __post_init__(self) -> None:
        if self.part_products < 1:
            raise UserError(f"part size must be at least 1, got {self.part_products}")
        check_runtime(self.runtime)


def predict(test_path: str | Path, index_dir: str | Path, out_csv: str | Path,
            fusion: FusionOverrides = FusionOverrides(), loader: LoaderSettings = LoaderSettings(),
            settings: PredictSettings = PredictSettings()) -> PredictReport | None:
    """Write ``_id,category_id`` for every product of ``test_path`` in file order.

    Work is saved per part of products in ``<out_csv>.parts/``; running again after an interruption
    resumes from the last finished part (``settings.restart`` discards parts made with other settings).
    Horizontal-flip TTA is used when the index was built with it. With ``loader.where`` over several devices/nodes,
    every rank predicts its share of the parts and rank 0 writes the submission (other ranks return None).
    """
    t_start = time.perf_counter()
    part_products, restart, runtime, scores = (settings.part_products, settings.restart, settings.runtime,
                                               settings.scores)
    top, scores_out = (scores.top, scores.path) if scores else (0, None)
    test_path, out_csv = Path(test_path), Path(out_csv)
    if not test_path.is_file():  # before the index is opened: the cheapest check first
        raise FileNotFoundError(f"{test_path}: no such BSON file")
    bundle = open_index(index_dir, mmap=True, runtime=runtime)
    bundle.refuse_runtime_on(loader.distributed)
    clf = load_fusion(bundle.run, bundle.fallback_class, fusion)  # validates alpha, k, tau, beta
    peers = load_peers(bundle.run, fusion.peer_weight, off=fusion.grid_given)
    table = load_offsets(test_path)  # every option checked above: a file of hours is scanned only then
    net, cats = bundle.net, bundle.categories
    mirror = bundle.manifest.mirror
    reader = RecordReader(test_path, table)
    key = {"test": file_fingerprint(test_path), "model": bundle.manifest.model_sha256, "count": len(bundle.vectors),
           "generation": bundle.generation,  # a remove or relabel keeps the count: parts of another generation differ
           "params": clf.params(), "peers": peers.params(), "mirror": mirror, "top": top,
           "part_products": part_products, "runtime": bundle.runtime}
    store = PartStore(out_csv.with_name(out_csv.name + ".parts"), key, restart=restart and is_first_rank())
    default = clf.fallback
    ids_of = np.asarray(cats.ids, np.int64)
    report, timer = PredictReport(params={**clf.params(), "peers": peers.params()}), Timer()
    parts = numbered(np.arange(len(table)), part_products)
    report.computed = sum(len(r) for p, r in parts if not store.done(p))
    peers = replace(peers, keep=max(peers.keep, top))
    work = PartWork(lambda outs: _decide(bundle, clf, outs, peers, peers.keep, timer), group=SEARCH_BATCH, timer=timer,
                    desc="predict")
    stats = run_parts(net, mirror, reader, parts, store, work, loader)
    if stats is None:
        return None
    work = net = bundle = None  # the index, its duplicates and the model: not needed to propagate and write
    release_heap()
    n_parts = len(parts)
    t = time.perf_counter()
    n_written = _assemble(_with_peers(store, n_parts, peers, report.params, len(ids_of)),
                          table["product_id"], ids_of, out_csv, top, scores_out)
    timer.add("peers+write", t)
    if n_written != len(table):
        raise AssertionError(f"wrote {n_written} rows for {len(table)} products")
    shutil.rmtree(store.folder)
    report.products, report.images = len(table), int(table["n_images"].sum())
    report.without_image = stats.products_without_image
    report.stages, report.decode = timer.seconds, stats.summary()
    report.seconds = time.perf_counter() - t_start
    if report.without_image:
        log.warning("%d products had no decodable image and were given the most frequent category %d",
                    report.without_image, ids_of[default])
    log.info("predicted %d products in %.1f s; %s", len(table), report.seconds, stats.summary())
    return report


def _decide(bundle: IndexBundle, clf: FusedClassifier, outs: list, peers: PeerSettings, keep: int, timer: Timer
            ) -> dict[str, np.ndarray]:
    """The fused distribution over each product's candidates, its ``keep`` likeliest (classes and probabilities
    ``[P, keep]``), for a list of embedded batches, with one search; with peer propagation on, the embeddings."""
    t = time.perf_counter()
    cands = candidates_for(bundle.vectors, bundle.duplicates, outs, clf.k,
                           bundle.prototypes if clf.uses_prototypes else None)
    t = timer.add("search", t)
    classes, probs = top_classes(*first_stage(clf, cands), keep)  # propagate keeps no more of a product's own
    out = {"classes": classes, "probs": probs}
    if peers.on:
        out["emb"] = np.concatenate([o.emb for o in outs])
    timer.add("fusion", t)
    return out


def _with_peers(store: PartStore, n_parts: int, peers: PeerSettings, params: dict, n_classes: int
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each part's final ``(classes [P, keep], probs [P, keep])``, best first: the fused distributions, smoothed
    over the products' peers in the whole file when peer propagation is on (the graph and the distributions of
    all products are held in memory, ``O(P * (k + keep))``; the embeddings and the first stage are memory-mapped).
    The graph's cost goes to ``params["peer_graph"]``."""
    if not peers.on:
        for part in range(n_parts):
            z = store.read(part, ("classes", "probs"))
            yield propagate(z["classes"], z["probs"], None, peers)
        return
    blocks = [np.load(PartStore.embeddings_file(store.folder, part), mmap_mode="r") for part in range(n_parts)]
    counts = [store.read(part, ("n_images",))["n_images"] for part in range(n_parts)]
    has_image = np.concatenate(counts) > 0
    log.info("peer propagation over %d products (mu %s, k %d)", len(has_image), peers.mu, peers.k)
    graph = peer_graph(blocks, has_image, peers.k)  # first: its search index is gone before the classes load
    params["peer_graph"] = graph.cost
    links = graph.links(peers.tau, peers.k)
    del graph
    sizes = [len(c) for c in counts]
    classes, probs = _first_stage_on_disk(store, sizes, peers.keep, n_classes)
    f_c, f_v = propagate(classes, probs, links, peers)
    del classes, probs, links
    lo = 0
    for n in sizes:
        yield f_c[lo:lo + n], f_v[lo:lo + n]
        lo += n


def _first_stage_on_disk(store: PartStore, sizes: list[int], keep: int, n_classes: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The parts' first-stage ``classes [P, keep]`` (int16 where the classes fit) and ``probs [P, keep]``
    (``sizes``: each part's products) copied part by part into two ``.npy`` files of the store and
    memory-mapped read-only (never the whole file in the heap)."""
    dtype = np.int16 if n_classes <= np.iinfo(np.int16).max else np.int32
    files = {k: store.folder / f"first_stage.{k}.npy" for k in ("classes", "probs")}
    out = {"classes": np.lib.format.open_memmap(files["classes"], "w+", dtype, (sum(sizes), keep)),
           "probs": np.lib.format.open_memmap(files["probs"], "w+", np.float32, (sum(sizes), keep))}
    lo = 0
    for part, n in enumerate(sizes):
        z = store.read(part, ("classes", "probs"))  # each part keeps exactly ``keep`` classes (top_classes)
        out["classes"][lo:lo + n] = z["classes"]
        out["probs"][lo:lo + n] = z["probs"]
        lo += n
    for a in out.values():
        a.flush()
    del out
    return np.load(files["classes"], mmap_mode="r"), np.load(files["probs"], mmap_mode="r")


def _assemble(decided: Iterator[tuple[np.ndarray, np.ndarray]], product_ids: np.ndarray, ids_of: np.ndarray,
              out_csv: Path, top: int, scores_out: str | Path | None) -> int:
    tmp = aside(out_csv)
    n = 0
    with open(tmp, "w", newline="") as f:
        f.write("_id,category_id\n")
        sf = open(scores_out, "w") if scores_out and top else None
        for classes, probs in decided:
            pid = product_ids[n:n + len(classes)]
            f.writelines(f"{i},{c}\n" for i, c in zip(pid.tolist(), ids_of[classes[:, 0]].tolist(), strict=True))
            if sf:
                for i, t, s in zip(pid.tolist(), classes[:, :top], probs[:, :top], strict=True):
                    sf.write(json.dumps({"_id": i, "top": [{"category_id": int(ids_of[c]), "score": round(float(v), 6)}
                                                            for c, v in zip(t, s, strict=True) if c >= 0]}) + "\n")
            n += len(classes)
        if sf:
            sf.close()
    place(tmp, out_csv)
    return n


def read_submission(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(_id, category_id)`` arrays of a submission or labels CSV, checking its header."""
    with open(path, newline="") as f:
        r = csv.reader(f)
        header = next(r, None)
        if header != ["_id", "category_id"]:
            raise UserError(f"{path}: header must be _id,category_id, got {header}")
        rows = np.array([(int(a), int(b)) for a, b in r], np.int64).reshape(-1, 2)
    return rows[:, 0], rows[:, 1]


def score_submission(submission: str | Path, labels: str | Path) -> float:
    """Product accuracy of a submission against a labels CSV with the same ids in the same order."""
    sid, scat = read_submission(submission)
    lid, lcat = read_submission(labels)
    if not np.array_equal(sid, lid):
        raise UserError(f"{submission} and {labels} list different product ids")
    return float((scat == lcat).mean())
