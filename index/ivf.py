"""Inverted-file layout: how many lists an index of ``n`` vectors gets, its coarse quantizer, and how it is trained.

A query's cost is the coarse search (which lists) plus the scan of ``nprobe`` lists. Lists of a fixed length
(:data:`LIST_LEN`) keep the scan flat as the catalogue grows; the coarse search over ``nlist`` centroids would
then grow with it, so past :data:`HNSW_COARSE_AT` lists the centroids are searched with an HNSW graph
(``IVF{n}_HNSW32``), and trained by two-level k-means (faiss.contrib), whose cost grows with
``sqrt(nlist)`` rather than ``nlist``."""
from __future__ import annotations

import logging
import math

import faiss
import numpy as np

log = logging.getLogger(__name__)
LIST_LEN = 256  # vectors per inverted list the layout aims at
HNSW_COARSE_AT = 2048  # from this many lists the centroids are found with an HNSW graph
TRAIN_PER_LIST = 40  # training vectors per list (k-means needs about 40 per centroid)
TRAIN_MIN, TRAIN_MAX = 200_000, 1_500_000  # bounds on the training sample
FLAT_BELOW = 20_000  # smaller indexes are exact


def n_lists(n: int) -> int:
    """Inverted lists for ``n`` vectors: about :data:`LIST_LEN` each, a multiple of 64, at least 64."""
    return max(64, int(round(n / LIST_LEN / 64)) * 64)


def choose_factory(n: int, d: int, memory_budget: float = 8e9) -> str:
    """A FAISS factory string for ``n`` vectors of dim ``d`` within ``memory_budget`` bytes.

    Exact Flat below 20k vectors; IVF-Flat while float vectors fit the budget; then IVF with half floats
    (SQfp16, 2x smaller, nearly lossless), with 8-bit codes (SQ8, 4x smaller), and OPQ + IVF + PQ for the
    largest. The coarse quantizer is HNSW from :data:`HNSW_COARSE_AT` lists. The coded types (SQ, PQ) may be
    re-ranked with the exact vectors where their owner keeps them (``VectorIndex.refine``)."""
    if n < FLAT_BELOW:
        return "Flat"
    nlist = n_lists(n)
    ivf = f"IVF{nlist}_HNSW32" if nlist >= HNSW_COARSE_AT else f"IVF{nlist}"
    for code, per_dim in ((",Flat", 4), (",SQfp16", 2), (",SQ8", 1)):
        if n * d * per_dim * 1.1 <= memory_budget:
            return ivf + code
    m = max(8, min(64, d // 8))
    return f"OPQ{m}_{m * 4},{ivf},PQ{m}"


def training_rows(index: faiss.Index, n: int) -> int:
    """How many of ``n`` vectors to train ``index``'s IVF part on (all of them without IVF)."""
    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return n
    return min(n, max(TRAIN_MIN, min(TRAIN_MAX, TRAIN_PER_LIST * nlist)))


def train_ivf(index: faiss.Index, x: np.ndarray, seed: int = 1234) -> None:
    """Train ``index`` on ``x [N, d]``. An HNSW coarse quantizer gets its centroids from two-level spherical
    k-means (``sqrt(nlist)`` clusters, then each split in proportion to its size); the rest of the index (SQ, PQ,
    OPQ) is then trained by FAISS as usual, which leaves centroids already in place untouched."""
    base = faiss.downcast_index(index)
    xt = x
    if isinstance(base, faiss.IndexPreTransform):  # OPQ: the rotation first, the IVF sees rotated vectors
        for i in range(base.chain.size()):
            vt = base.chain.at(i)
            vt.train(xt)
            xt = vt.apply(xt)
        base = faiss.downcast_index(base.index)
    ivf = faiss.extract_index_ivf(base) if not isinstance(base, faiss.IndexFlat) else None
    quantizer = faiss.downcast_index(ivf.quantizer) if ivf is not None else None
    if isinstance(quantizer, faiss.IndexHNSW) and quantizer.ntotal == 0:
        from faiss.contrib.clustering import two_level_clustering
        nc1 = max(1, int(math.sqrt(ivf.nlist)))
        log.info("two-level k-means: %d vectors into %d x ~%d lists", len(xt), nc1, ivf.nlist // nc1)
        cent, _ = two_level_clustering(np.ascontiguousarray(xt, np.float32), nc1, ivf.nlist, spherical=True,
                                       seed=seed, verbose=False)
        quantizer.add(np.ascontiguousarray(cent, np.float32))
    index.train(x)
