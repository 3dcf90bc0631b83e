"""The one part driver: build-index, predict and evaluate embed numbered parts of products through it, in this
process or over several devices and nodes (Lightning DDP), and every part stores its own decode counts, so the
totals are the same whichever way (and however resumed) the parts were made."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from ...data.images import DecodeStats
from ...data.offsets import RecordReader
from .embed import LoaderSettings, ProductOutputs, Timer, embed_products
from .store import PartStore

COUNTS = ("n_images", "failed")  # arrays [P] every part keeps besides what its command keeps
Reduce = Callable[[list[ProductOutputs]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class PartWork:
    """What a command keeps of a part's products: ``reduce(outputs) -> arrays``, called on consecutive groups of
    ``group`` products or more (the last group of a part may be smaller; predict buffers its FAISS searches so),
    whose arrays are concatenated per part."""

    reduce: Reduce
    group: int = 1 << 62
    keep_probs: bool = True  # the head's probabilities [P, C] are needed by reduce
    desc: str = "embedding"
    timer: Timer | None = None  # seconds of reading and of the network, added up here (this process)


def reduce_groups(work: PartWork, outs, pool: ThreadPoolExecutor | None = None) -> dict[str, np.ndarray]:
    """``work.reduce`` over consecutive groups of ``outs``, concatenated. With ``pool`` (a GPU embeds), each
    group is reduced on the pool's thread while the next one is embedded: FAISS and numpy release the GIL, so
    the search overlaps the device's work (one group reduced, one waiting, at most)."""
    results: list = []
    pending, n = [], 0
    counts: dict[str, list[np.ndarray]] = {k: [] for k in COUNTS}

    def reduce(group: list) -> None:
        if pool is None:
            results.append(work.reduce(group))
            return
        if len(results) >= 2:
            results[-2].result()  # bounded: never more than two groups of outputs held for reduction
        results.append(pool.submit(work.reduce, group))

    for o in outs:
        if not work.keep_probs:  # the head's [P, C] probabilities are dropped as each batch arrives
            o = replace(o, probs=np.zeros((len(o.rows), 0), np.float32))
        pending.append(o)
        n += len(o.rows)
        counts["n_images"].append(o.n_images)
        counts["failed"].append(o.failed)
        if n >= work.group:
            reduce(pending)
            pending, n = [], 0
    if pending or not results:
        reduce(pending)
    results = [r.result() if isinstance(r, Future) else r for r in results]
    arrays = {k: np.concatenate([r[k] for r in results]) for k in results[0]}
    return {**arrays, **{k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in counts.items()}}


def _take(stream: Iterator[ProductOutputs], n: int) -> Iterator[ProductOutputs]:
    """The next batches of ``stream`` holding ``n`` products (batches never cross a part's end)."""
    got = 0
    while got < n:
        o = next(stream)
        got += len(o.rows)
        yield o
    if got != n:
        raise AssertionError(f"a batch crossed a part's end ({got} products for {n})")


def _on_gpu(net) -> bool:
    """Whether ``net`` runs on a CUDA device (an ONNX tower, with no parameters, runs on the CPU)."""
    try:
        return next(net.parameters()).device.type == "cuda"
    except (AttributeError, StopIteration):
        return False


def decode_counts(store: PartStore, parts: list[int]) -> DecodeStats:
    """Decode counts summed over the stored ``parts``."""
    stats = DecodeStats()
    for p in parts:
        z = store.read(p, COUNTS)
        stats.decoded += int(z["n_images"].sum())
        stats.failed += int(z["failed"].sum())
        stats.products_without_image += int((z["n_images"] == 0).sum())
    return stats


def run_parts(net, mirror: bool, reader: RecordReader, parts: list[tuple[int, np.ndarray]], store: PartStore,
              work: PartWork, loader: LoaderSettings) -> DecodeStats | None:
    """Embed every part ``(number, offset-table rows)`` not yet in ``store`` and write ``work``'s arrays plus
    :data:`COUNTS` for it. Returns the decode counts of all ``parts`` (resumed ones too), or None on a rank
    other than 0 of a distributed run (rank 0 returns once every rank has written its parts)."""
    todo = [(p, r) for p, r in parts if not store.done(p)]
    if loader.distributed:
        from .distributed import embed_parts
        if not embed_parts(net, reader, todo, lambda p, outs: store.write(p, **reduce_groups(work, outs)),
                           loader, mirror, keep_probs=work.keep_probs):
            return None
    else:
        total = sum(len(r) for _, r in parts)
        bar = tqdm(total=total, initial=total - sum(len(r) for _, r in todo), unit="products", desc=work.desc)
        pool = ThreadPoolExecutor(1, thread_name_prefix="reduce") if _on_gpu(net) else None
        # one loader for all the parts: its workers decode ahead across a part's end (no restart per part)
        stream = embed_products(net, reader, np.concatenate([r for _, r in todo]) if todo else np.zeros(0, np.int64),
                                loader, mirror, timer=work.timer,
                                bounds=np.cumsum([len(r) for _, r in todo]))
        try:
            for p, rows in todo:
                store.write(p, **reduce_groups(work, _take(stream, len(rows)), pool))
                bar.update(len(rows))
        finally:
            if pool is not None:
                pool.shutdown()
        bar.close()
    return decode_counts(store, [p for p, _ in parts])


def numbered(rows: np.ndarray, size: int, first: int = 0) -> list[tuple[int, np.ndarray]]:
    """``rows`` cut into parts of ``size`` products, numbered from ``first``."""
    return [(first + i, rows[lo:lo + size]) for i, lo in enumerate(range(0, len(rows), size))]

