"""The peer graph: each product's nearest other products among those scored together (a test file, a validation
split), searched exactly up to 20k products and approximately beyond, with the recall of the exact peers measured
on a sample and the search widened until it reaches the target."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from index import VectorIndex, choose_factory, exact_topk, mapped_rows, normalise_rows, take_rows, vote, vote_weights
from index.store import REFINE_FACTOR

from ...model.runtime import release_heap

log = logging.getLogger(__name__)
PEER_MEMORY = 512e6  # bytes the peer graph's search index may hold (past that, codes: half floats, then SQ8)
PEER_RECALL = 0.95  # recall of the exact peers an approximate graph search must reach on a sample
RECALL_SAMPLE = 1000  # products the recall is measured on
MAX_NPROBE = 512  # the widest search the tuning tries (a bound on the graph's cost)


@dataclass
class PeerGraph:
    """Each product's nearest other products, best first: ``pos [P, K]`` (-1 = none) and ``sims [P, K]``;
    ``cost``: how the graph was searched (index type, nprobe, recall of the exact peers on a sample, seconds,
    bytes of the index)."""

    pos: np.ndarray
    sims: np.ndarray
    cost: dict = field(default_factory=dict)

    def weights(self, tau: float, k: int | None = None) -> np.ndarray:
        """Weights ``[P, k]`` of the first ``k`` peers, ``exp(sim / tau)`` summing to 1 per product (all 0 for a
        product without peers)."""
        return normalise_rows(vote_weights(self.sims, self.pos, tau, k)[0])

    def links(self, tau: float, k: int) -> "PeerLinks":
        """What propagation needs of the graph, in half its size: the first ``k`` peers and their weights,
        computed in blocks of :data:`index.vote.CHUNK_ROWS` products."""
        n, kk = len(self.pos), min(k, self.pos.shape[1])
        w = np.empty((n, kk), np.float32)
        step = vote.CHUNK_ROWS
        for lo in range(0, n, step):
            sl = slice(lo, lo + step)
            w[sl] = PeerGraph(self.pos[sl], self.sims[sl]).weights(tau, kk)
        return PeerLinks(np.maximum(self.pos[:, :kk], 0), w)


@dataclass
class PeerLinks:
    """Each product's first peers ``pos [P, k]`` (0 where none: its weight is 0) and weights ``w [P, k]``
    (``exp(sim / tau)`` summing to 1 per product, all 0 for a product without peers)."""

    pos: np.ndarray
    w: np.ndarray


def _members(blocks: Sequence[np.ndarray], starts: np.ndarray, has_image: np.ndarray) -> Iterator[np.ndarray]:
    """The blocks' rows of products with an image, block by block (their order is the index's positions)."""
    for b, s in zip(blocks, starts, strict=False):
        own = has_image[s:s + len(b)]
        if own.any():
            yield np.asarray(b)[own]


def peer_recall(found: np.ndarray, truth: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Share of the exact ``k`` nearest other products (``truth [Q, >=k+1]`` positions, brute force) that a
    search found (``found [Q, >=k+1]``), for queries at positions ``queries [Q]``: each leaves itself out of both
    lists."""
    hits = 0
    for qi, f, t in zip(queries.tolist(), found.tolist(), truth.tolist(), strict=True):
        want = [p for p in t if p != qi][:k]
        hits += len(set(want) & {p for p in f if p != qi})
    return hits / max(1, len(queries) * k)


def peer_graph(blocks: Sequence[np.ndarray], has_image: np.ndarray, k: int, memory_budget: float = PEER_MEMORY,
               target_recall: float = PEER_RECALL, seed: int = 0) -> PeerGraph:
    """The ``k`` nearest other products of every product, from unit embeddings given as blocks ``[n_i, D]`` in
    product order (memory-mapped arrays are fine: each block is read twice, to add and to search). Products
    without an image neither have nor are peers. Past 20k products the search is approximate (IVF, SQ8 when the
    vectors would pass ``memory_budget`` bytes), its ``nprobe`` raised until the exact peers of a sample of
    :data:`RECALL_SAMPLE` products are found at ``target_recall``; ``cost`` says what it took."""
    t0 = time.perf_counter()
    has_image = np.asarray(has_image, bool)
    member = np.flatnonzero(has_image)  # index position -> product
    pos = np.full((len(has_image), k), -1, np.int32)  # positions < 2^31: 4 bytes a peer
    sims = np.full((len(has_image), k), -np.inf, np.float32)
    if len(member) < 2 or not blocks:
        return PeerGraph(pos, sims, {"factory": "none", "recall": 1.0, "seconds": 0.0})
    d = blocks[0].shape[1]
    factory = choose_factory(len(member), d, memory_budget)
    if "PQ" in factory:  # PQ codes lose too much for peers: SQ8 (1 byte a dimension)
        factory = choose_factory(len(member), d, float("inf")).replace(",Flat", ",SQ8")
    index = VectorIndex.create(d, factory)
    starts = np.cumsum([0] + [len(b) for b in blocks])
    if starts[-1] != len(has_image):
        raise ValueError(f"{starts[-1]} embeddings for {len(has_image)} products")
    index.train_on_blocks(_members(blocks, starts, has_image), len(member), seed)  # IVF: a sample of all blocks
    for m in _members(blocks, starts, has_image):
        index.add(m, np.full(len(m), -1))
    release_heap()  # the inverted lists grew by doubling: the outgrown buffers go back to the system
    index.refine = lambda p: mapped_rows(blocks, member[p])  # codes: shortlists re-ranked from those rows alone
    search = index.search
    recall = 1.0
    if factory != "Flat":
        q = np.sort(np.random.default_rng(seed).choice(len(member), min(RECALL_SAMPLE, len(member)), replace=False))
        qv = take_rows(blocks, member[q])
        truth = exact_topk(qv, _members(blocks, starts, has_image), k + 1)[1]
        recall = index.tune_to(lambda: peer_recall(search(qv, k + 1)[1], truth, q, k), target_recall,
                               MAX_NPROBE, k + 1)
        if recall < target_recall:
            log.warning("peer graph: recall %.3f of the exact peers at nprobe %d (target %.2f)", recall,
                        index.nprobe, target_recall)
    kk = min(k + 1, len(member))
    for b, s in zip(blocks, starts, strict=False):
        own = has_image[s:s + len(b)]
        step = vote.CHUNK_ROWS
        for lo in range(0, len(b), step):
            sub = own[lo:lo + step]
            prods = np.flatnonzero(sub) + s + lo
            if not len(prods):
                continue
            sm, p = search(np.asarray(b[lo:lo + step])[sub], kk)
            found = np.where(p >= 0, member[np.maximum(p, 0)], -1)
            drop = found == prods[:, None]
            drop[:, -1] |= ~drop.any(1)  # self not among the results (approximate index): drop the farthest
            pos[prods, :kk - 1] = found[~drop].reshape(len(prods), kk - 1)
            sims[prods, :kk - 1] = sm[~drop].reshape(len(prods), kk - 1)
    sims[pos < 0] = -np.inf
    cost = {"factory": factory + (f", re-ranked x{REFINE_FACTOR}" if index.coded and index.rerank else ""),
            "nprobe": index.nprobe,
            "recall": round(recall, 4), "products": int(len(member)),
            "seconds": round(time.perf_counter() - t0, 2), "index_mb": round(_index_bytes(index) / 1e6, 1)}
    log.info("peer graph over %d products: %s, nprobe %s, recall of the exact %d peers %.3f (sample of %d), "
             "%.1f s, index %.0f MB", len(member), factory, index.nprobe, k, recall,
             min(RECALL_SAMPLE, len(member)), cost["seconds"], cost["index_mb"])
    index = search = None  # the lambdas above hold `search` in a cell: let go of it too
    release_heap()  # the lists' buffers sit amid the C heap: freed, they stay resident until trimmed
    return PeerGraph(pos, sims, cost)


def _index_bytes(index: VectorIndex) -> int:
    """Bytes the FAISS index's vectors take: codes plus, for IVF, one 8-byte id per vector."""
    ivf = index.ivf
    per = ivf.code_size + 8 if ivf is not None else index.faiss_index.sa_code_size()
    return int(len(index) * per)
