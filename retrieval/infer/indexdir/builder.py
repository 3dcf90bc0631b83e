"""The one segment builder: build-index, add-to-index and compaction all make a segment here. It chooses the
index type within a memory budget (or takes the one given), trains it on a sample, fills it block by block, tunes
its search depth to a recall@10 target against exact search (a coded index re-ranked with the stored embeddings,
as readers will), and seals the segment with its factory and measured recall recorded."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from index import VectorIndex, choose_factory, exact_topk, mapped_rows
from index.store import REFINE_FACTOR
from index.vote import CHUNK_ROWS, chunked

from ...errors import UserError
from .folder import IndexFolder
from .segments import SegmentData, write_segment

log = logging.getLogger(__name__)
TUNE_QUERIES = 1000  # stored vectors a segment's search depth is tuned on


@dataclass(frozen=True)
class SegmentSpec:
    """How a segment's index is made: ``factory`` ("auto": chosen by size within ``memory_budget`` bytes) and the
    recall@10 an approximate index is tuned to."""

    factory: str = "auto"
    memory_budget: float = 8e9
    target_recall: float = 0.95

    def __post_init__(self) -> None:
        if not self.memory_budget > 0 or not 0 < self.target_recall <= 1:
            raise UserError("index memory must be positive and the target recall in (0, 1]")
        if self.factory != "auto":
            check_factory(self.factory)

    def resolve(self, n: int, dim: int) -> str:
        return choose_factory(n, dim, self.memory_budget) if self.factory == "auto" else self.factory


def check_factory(factory: str, dim: int = 16) -> None:
    """Refuse a FAISS factory string FAISS cannot build (before any work is done)."""
    try:
        VectorIndex.create(dim, factory)
    except ValueError as e:
        raise UserError(f"--index-type {factory!r}: {e}") from None


def fill_and_tune(vi: VectorIndex, blocks: list[np.ndarray], labels: np.ndarray, target_recall: float) -> float:
    """Train (if needed) and fill ``vi`` from ``blocks [n_i, D]`` (memory-mapped ones are read once for the sample
    and once to add), then tune its depth on up to :data:`TUNE_QUERIES` of the vectors; returns recall@10."""
    n = sum(len(b) for b in blocks)
    vi.train_on_blocks(blocks, n)

    def added():  # each block is read once here (in pieces): added to the index, then scored exactly for tuning
        start = 0
        for b in tqdm(chunked(blocks), desc="adding to index", unit="pieces", total=sum(-(-len(b) // CHUNK_ROWS)
                                                                                        for b in blocks),
                      disable=n < 2 * CHUNK_ROWS):
            b = np.ascontiguousarray(b, np.float32)
            vi.add(b, labels[start:start + len(b)])
            start += len(b)
            yield b

    if vi.ivf is None and vi.hnsw is None:
        for _ in added():
            pass
        return 1.0
    q = np.asarray(blocks[0][:TUNE_QUERIES], np.float32)
    truth = exact_topk(q, added(), 10)[1]
    vi.refine = lambda pos: mapped_rows(blocks, pos)  # as the folder's readers will: codes re-ranked exactly
    recall = vi.tune(q, truth, target_recall)
    log.info("%s over %d products: recall@10 %.3f of the exact search (nprobe %s%s)", vi.factory, n, recall,
             vi.nprobe, f", shortlists of {REFINE_FACTOR}x re-ranked with the stored embeddings" if vi.coded else "")
    return recall


def build_segment(folder: IndexFolder, dim: int, spec: SegmentSpec, data: SegmentData) -> tuple[str, str, float]:
    """Make one sealed segment of ``data`` (its embeddings: ``.npy`` files ``[n_k, D]``, one per part, linked
    into the segment), its index chosen by ``spec``, trained, filled and tuned. Returns ``(segment id, factory,
    recall@10)``."""
    blocks = [np.load(f, mmap_mode="r") for f in data.embeddings]
    n = sum(len(b) for b in blocks)
    factory = spec.resolve(n, dim)
    vi = VectorIndex.create(dim, factory)
    recall = fill_and_tune(vi, blocks, np.asarray(data.labels, np.int64), spec.target_recall)
    vi.refine = None
    sid = write_segment(folder, vi, data, recall)
    return sid, factory, recall
