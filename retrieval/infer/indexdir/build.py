"""Index folders: build-index and add-to-index write them (``bundle`` opens them)."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from index import DuplicateTable

from ...data.images import DecodeStats
from ...data.offsets import RecordReader, file_fingerprint, load_offsets
from ...durable import fsync_path
from ...errors import UserError
from ...model.export import load_model_file
from ...model.onnx_runtime import load_runtime, runtime_fingerprint
from ...model.runtime import best_device, is_first_rank
from ...model.runtimes import check_runtime
from ...rundir import RunDir
from ..pipeline.embed import HeadInputs, LoaderSettings, ProductOutputs
from ..pipeline.parts import PartWork, numbered, run_parts
from ..pipeline.store import PartStore
from .builder import SegmentSpec, build_segment
from .bundle import IndexBundle, load_index_model, open_index, refuse_runtime_on  # noqa: F401 (re-exported: tests and the CLI import them here)
from .changes import after_commit, live_positions, with_changes
from .compact import commit_manifest
from .folder import IndexFolder
from .manifest import IndexManifest, Source
from .segments import SegmentData

log = logging.getLogger(__name__)


def _part_arrays(outs: list[ProductOutputs]) -> dict[str, np.ndarray]:
    """What an index part keeps of its products' outputs: rows, embeddings, picture hashes and their owners
    (never the head's probabilities ``[P, C]``); held-out products also what their head read per picture."""
    o = ProductOutputs.concat(outs)
    kept = {"rows": o.rows, "emb": o.emb, "img_hash": o.image_hash, "img_owner": o.image_owner}
    return kept if o.head_in is None else {**kept, "head_in": o.head_in}


def _embed_to_store(net, mirror: bool, reader: RecordReader, parts: list[tuple[int, np.ndarray]], store: PartStore,
                    loader: LoaderSettings, desc: str) -> tuple[DecodeStats, float] | None:
    """Embed ``parts`` into the store (over several devices/nodes when ``loader`` says so); returns the decode
    counts of all the parts and the seconds spent, or None on a rank other than 0 of a distributed run."""
    if len(parts) > sum(not store.done(p) for p, _ in parts) > 0:
        log.info("%d of %d parts already embedded; resuming", sum(store.done(p) for p, _ in parts), len(parts))
    t = time.perf_counter()
    stats = run_parts(net, mirror, reader, parts, store, PartWork(_part_arrays, keep_probs=False, desc=desc), loader)
    return None if stats is None else (stats, time.perf_counter() - t)


def _duplicates(store: PartStore, parts: list[tuple[int, int]], first_position: int) -> DuplicateTable:
    """Picture hashes of the stored parts, keyed to index positions from ``first_position``."""
    hashes, positions, start = [], [], first_position
    for p, n in parts:
        z = store.read(p, ("img_hash", "img_owner"))
        hashes.append(z["img_hash"])
        positions.append(z["img_owner"] + start)
        start += n
    return DuplicateTable(np.concatenate(hashes), np.concatenate(positions))


@dataclass(frozen=True)
class IndexSettings:
    """What ``build-index`` makes: ``split`` ("train": the run's training split, "all": every labelled product),
    the FAISS factory ("auto" chooses by size and ``memory_budget`` bytes), mirror (each picture averaged with its
    mirror image, then done by every query of the folder), products per embedded part, the recall@10 an
    approximate index is tuned to, and the runtime that embeds (torch, onnx, onnx-int8: model.onnx_runtime)."""

    split: str = "all"
    index_type: str = "auto"
    mirror: bool = False
    part_products: int = 50_000
    memory_budget: float = 8e9
    target_recall: float = 0.95
    runtime: str = "torch"

    def __post_init__(self) -> None:
        check_runtime(self.runtime)
        if self.split not in ("train", "all"):
            raise UserError(f"split must be 'train' or 'all', got {self.split!r}")
        if self.part_products < 1:
            raise UserError("part size must be at least 1")
        self.spec  # refuses a bad factory, budget or recall target before any work  # noqa: B018

    @property
    def spec(self) -> SegmentSpec:
        return SegmentSpec(self.index_type, self.memory_budget, self.target_recall)


def build_index(train_path: str | Path, run_dir: str | Path, out_dir: str | Path,
                settings: IndexSettings = IndexSettings(), loader: LoaderSettings = LoaderSettings(),
                restart: bool = False) -> IndexManifest | None:
    """Embed every product of ``settings.split``, build a FAISS index and commit it as ``out_dir``'s new
    generation. Re-running after an interruption resumes from the last part. With ``loader.where`` over several
    devices/nodes, every rank embeds its share and rank 0 builds the index (the other ranks return None)."""
    train_path, out, run = Path(train_path), IndexFolder(out_dir), RunDir(Path(run_dir))
    # rank 0 (or the one process) is the folder's writer; other ranks only write their embedded parts
    with out.writer() if is_first_rank() else nullcontext():
        return _build(train_path, run, out, settings, restart, loader)


def _build(train_path: Path, run: RunDir, out: IndexFolder, settings: IndexSettings, restart: bool,
           loader: LoaderSettings) -> IndexManifest | None:
    split, mirror, part_products = settings.split, settings.mirror, settings.part_products
    refuse_runtime_on(settings.runtime, loader.distributed)
    model = load_model_file(run.model(), best_device() if settings.runtime == "torch" else "cpu")
    net, cats = load_runtime(model, settings.runtime, run.path), model.categories
    table = load_offsets(train_path)
    fp = file_fingerprint(train_path)
    own_file = model.info.get("train_file") == fp
    held = np.zeros(0, np.int64)
    if split == "train":
        if not own_file:
            raise UserError(f"{train_path} is not the file run {run.path} was trained on "
                            f"({model.info.get('train_file')}); --split train needs the run's own training file")
        rows = run.split().train_rows
    else:
        rows = np.flatnonzero(table["category_id"] >= 0)
        if own_file:  # the run's validation products: a segment of their own, held out by evaluate
            held = np.intersect1d(run.split().val_rows, rows)
            rows = np.setdiff1d(rows, held)
    if len(rows) == 0:
        raise UserError(f"{train_path}: no labelled products to index")
    key = {"model_sha256": model.sha256, "data": fp, "split": split, "mirror": mirror, "part_products": part_products,
           "picture_hashes": True, "runtime": runtime_fingerprint(net), "held_out": len(held) > 0}
    # the parts go to the build's own work folder: no live generation reads it (its segments own their files)
    store = PartStore(out.build_parts, key, restart=restart and is_first_rank())
    parts = numbered(rows, part_products)
    held_parts = numbered(held, part_products, first=len(parts))
    head = _head_inputs(net) if len(held) else None
    reader = RecordReader(train_path, table)
    # every rank embeds its share of both groups (a rank other than 0 returns only after both)
    done = _embed_to_store(net, mirror, reader, parts, store, loader, "embedding")
    held_done = _embed_to_store(head or net, mirror, reader, held_parts, store, loader,
                                "embedding held-out products") if held_parts else (None, 0.0)
    if done is None or held_done is None:
        return None
    stats, embed_s = done
    if held_parts:
        stats.merge(held_done[0])
        embed_s += held_done[1]
    store.sync()
    segments, factory, recall = [], "", 1.0
    for group, with_head in ((parts, False), (held_parts, bool(held_parts) and head is not None)):
        if not group:
            continue
        sid, f, r = _segment(out, settings, table, cats, store, group, with_head)
        segments.append((sid, sum(len(g) for _, g in group)))
        if group is parts:
            factory, recall = f, r
    parts = [(p, len(r)) for p, r in parts + held_parts]
    manifest = IndexManifest(
        model_file=out.relative(model.path), model_sha256=model.sha256, run_dir=out.relative(run.path),
        backbone=net.cfg.backbone, image_size=net.cfg.image_size, dim=net.cfg.embed_dim, factory=factory,
        count=len(rows) + len(held), split=split, mirror=mirror, store_key=key, parts=tuple(parts),
        sources=(Source(out.relative(train_path), fp),), origin=str(out.path.resolve()), tuned_recall_at_10=recall,
        decode=stats.summary(), embedding={"seconds": round(embed_s, 3), "images": stats.decoded},
        runtime=runtime_fingerprint(net), segments=tuple(segments), index_memory=settings.memory_budget,
        target_recall=settings.target_recall, held_out=segments[1][0] if len(held) else None)
    _warn_dropped(out)
    commit_manifest(out, manifest)
    log.info("index of %d products (%s%s) written to %s; %s", manifest.count, factory,
             f"; {len(held)} validation products held out for evaluate" if len(held) else "", out.path,
             stats.summary())
    return manifest


def _row_arrays(table: np.ndarray, rows: np.ndarray, source: int) -> dict[str, np.ndarray]:
    """A segment's per-product arrays (:data:`~.segments.ARRAYS`) of offset-table ``rows`` of data file ``source``."""
    return {"product_ids": table["product_id"][rows], "category_ids": table["category_id"][rows],
            "offsets": table["offset"][rows], "lengths": table["length"][rows].astype(np.int64),
            "sources": np.full(len(rows), source, np.int32)}


def _head_inputs(net) -> HeadInputs | None:
    """``net`` keeping its head's inputs (the torch runtime), or None (another runtime: evaluate embeds the held-out
    products again)."""
    try:
        return HeadInputs(net)
    except UserError:
        log.warning("runtime %s keeps no head inputs: evaluate will embed the held-out products again",
                    type(net).__name__)
        return None


def _segment(out: IndexFolder, settings: IndexSettings, table: np.ndarray, cats, store: PartStore,
             parts: list[tuple[int, np.ndarray]], with_head: bool) -> tuple[str, str, float]:
    """One segment of the stored ``parts`` (offset-table rows of ``table``); ``with_head``: a held-out one whose
    parts hold their head inputs (linked into it)."""
    rows = np.concatenate([r for _, r in parts])
    arrays = _row_arrays(table, rows, 0)
    counted = [(p, len(r)) for p, r in parts]
    dim = np.load(store.embeddings_file(store.folder, parts[0][0]), mmap_mode="r").shape[1]
    return build_segment(out, dim, settings.spec, SegmentData(
        cats.encode(table["category_id"][rows]), arrays, _duplicates(store, counted, 0), counted,
        [store.embeddings_file(store.folder, p) for p, _ in parts],
        tuple(store.path(p) for p, _ in parts) if with_head else ()))


def _warn_dropped(out: IndexFolder) -> None:
    """Say which added products a rebuild leaves out (build-index indexes its data file only)."""
    try:
        old = IndexManifest.load(IndexFolder.manifest_file(out.generation())) if out.exists() else None
    except (OSError, UserError):
        return
    if old is not None and len(old.sources) > 1:
        added = old.count - old.segments[0][1] if old.segments else 0
        log.warning("%s: the new index replaces one holding %d products added since its build (from %s); they "
                    "are not in the rebuilt index: add those files again with add-to-index", out.path, added,
                    ", ".join(s.path for s in old.sources[1:]))


def add_to_index(index_dir: str | Path, new_path: str | Path, loader: LoaderSettings = LoaderSettings(),
                 on_commit: Callable[[str], None] | None = None, nets: dict | None = None,
                 replace: bool = False) -> tuple[int, list[int]]:
    """Embed the products of ``new_path`` and commit them as ONE new segment (a small index of them alone: the
    cost grows with what is added, not with the catalogue); returns (added, ids already indexed). ``replace``:
    a product already indexed gets the file's pictures and category (its old entry removed in the same commit;
    the returned list then names the replaced ones); else it is skipped. Holds the
    folder's writer lock: a second writer is refused. ``on_commit(generation)`` runs once the generation is
    committed; ``nets``: a cache of embedding runtimes kept by a caller that adds often (a server). An error
    after the commit (garbage collection, compaction, ``on_commit``) is logged: the add has succeeded."""
    folder = IndexFolder(index_dir)
    with folder.writer():
        added, already = _add(folder, Path(new_path), loader, nets if nets is not None else {}, replace)
        if added:
            after_commit(folder, on_commit)
        return added, already


def _writer_net(folder: IndexFolder, man: IndexManifest, nets: dict):
    """The runtime that embedded the index (loaded once per model and runtime into ``nets``)."""
    name = man.runtime.get("runtime", "torch")
    key = (man.model_sha256, name)
    if key not in nets:
        model = load_index_model(folder, man, best_device() if name == "torch" else "cpu")
        run = folder.resolve(man.run_dir, man.origin)
        nets[key] = (model, load_runtime(model, name, run))
    return nets[key]


def _add(folder: IndexFolder, new_path: Path, loader: LoaderSettings, nets: dict,
         replace: bool = False) -> tuple[int, list[int]]:
    man = IndexManifest.load(IndexFolder.manifest_file(folder.generation()))
    table = load_offsets(new_path)
    seg, local = live_positions(folder, man, table["product_id"])
    known = seg >= 0
    _, first = np.unique(table["product_id"], return_index=True)
    fresh = np.zeros(len(table), bool)
    fresh[first] = True
    rows = np.flatnonzero(fresh & (replace | ~known))
    dups = table["product_id"][known | ~fresh].tolist()
    if dups and not replace:
        log.warning("%d products of %s are already in the index and were skipped (e.g. %s)", len(dups), new_path,
                    dups[:5])
    if len(rows) == 0:
        return 0, dups
    model, net = _writer_net(folder, man, nets)
    cats = model.categories
    cat_ids = table["category_id"][rows]
    ok = np.isin(cat_ids, np.asarray(cats.ids))
    labels = np.full(len(rows), -1, np.int64)
    labels[ok] = cats.encode(cat_ids[ok])
    if (~ok).any():
        log.warning("%d new products have no known category: findable by `similar`, but they do not vote", (~ok).sum())
    fp = file_fingerprint(new_path)
    # a part is keyed by what it holds (the file's fingerprint and the rows), never by a counter: a part left by
    # an add that died before its commit is reused only for the very same products
    content = hashlib.sha1(json.dumps(fp, sort_keys=True).encode() + rows.astype(np.int64).tobytes()).hexdigest()
    name = f"add-{content[:20]}"
    store = PartStore(folder.add_parts(content[:20]), man.store_key)
    _embed_to_store(net, man.mirror, RecordReader(new_path, table), [(name, rows)], store, loader,
                    "embedding new products")
    parts = [(name, len(rows))]
    arrays = _row_arrays(table, rows, len(man.sources))
    # small: exact; compaction builds a bigger index from many
    sid, _, _ = build_segment(folder, man.dim, SegmentSpec("Flat"), SegmentData(
        labels, arrays, _duplicates(store, parts, 0), parts, [store.embeddings_file(store.folder, name)]))
    old = rows[known[rows]]  # replaced products: their old rows leave in the same commit
    if len(old):
        man = with_changes(folder, man, removed={man.segments[s][0]: local[old][seg[old] == s]
                                                 for s in np.unique(seg[old])})
    if new_path.resolve().is_relative_to(folder.path.resolve()):  # an upload: durable before CURRENT names it
        fsync_path(new_path)
        fsync_path(new_path.parent)
    commit_manifest(folder, man.with_segment(sid, parts, Source(folder.relative(new_path), fp)))
    return len(rows), dups
