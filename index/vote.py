"""The kNN vote's one home (numpy only): neighbour weights, class shares, dense votes and the row normaliser
every distribution here uses. The fusion rule that consumes them is
``retrieval.infer.scoring.fused.FusedClassifier``."""
from __future__ import annotations

import numpy as np


def vote_weights(sims: np.ndarray, labels: np.ndarray, tau: float, k: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``exp((sim - best) / tau)`` ``[Q, k]`` of the first ``k`` neighbours (0 where a neighbour is
    missing: label -1, or FAISS's -FLT_MAX / -inf padding), and those neighbours' labels ``[Q, k]``."""
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    sims, labels = np.asarray(sims, np.float32)[:, :k], np.asarray(labels, np.int64)[:, :k]
    valid = (labels >= 0) & np.isfinite(sims) & (sims > -1e30)
    top = np.where(valid, sims, -np.inf).max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    w = np.where(valid, np.exp((np.where(valid, sims, top) - top) / tau), 0.0)  # masked before exp: no overflow
    return w.astype(np.float32), labels


def normalise_rows(v: np.ndarray) -> np.ndarray:
    """``v [R, M]`` divided by its row sums (float32); a row summing to 0 stays all zero."""
    v = np.asarray(v)
    total = v.sum(axis=1, keepdims=True)
    return np.divide(v, total, out=np.zeros(v.shape, np.result_type(v.dtype, np.float32)), where=total > 0
                     ).astype(np.float32, copy=False)


def class_shares(classes: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Share ``[P, W]`` of each class in ``classes [P, W]`` among a row's weighted ``labels [P, K]``
    (``weights [P, K]``; label -1 counts for nothing); all zero for a row whose weights sum to 0."""
    w = np.where(labels >= 0, weights, 0.0).astype(np.float32)
    hits = np.einsum("pwk,pk->pw", (classes[:, :, None] == labels[:, None, :]).astype(np.float32), w)
    total = w.sum(1, keepdims=True)
    return np.divide(hits, total, out=np.zeros(hits.shape, np.float32), where=total > 0)


def knn_vote(sims: np.ndarray, labels: np.ndarray, n_classes: int, tau: float = 0.07,
             k: int | None = None) -> np.ndarray:
    """Category distribution ``[Q, C]`` from neighbours ``sims [Q, K]`` / ``labels [Q, K]`` (class index, -1 = none).

    Weights are ``exp(sim / tau)`` over the first ``k`` neighbours, normalised per query; a query with no
    neighbour gets an all-zero row.
    """
    w, labels = vote_weights(sims, labels, tau, k)
    valid = w > 0  # missing neighbours weigh 0 (an underflowed weight would add 0 anyway)
    out = np.zeros((len(w), n_classes), np.float32)
    rows = np.repeat(np.arange(len(w)), w.shape[1])
    np.add.at(out, (rows[valid.ravel()], labels.ravel()[valid.ravel()]), w.ravel()[valid.ravel()])
    return normalise_rows(out)



CHUNK_ROWS = 65_536  # rows of a (memory-mapped) block read into memory at a time


def chunked(blocks):
    """Blocks ``[n_i, D]`` cut into pieces of at most :data:`CHUNK_ROWS` rows (in order; views, not copies), so
    that a block of a whole catalogue is never read into memory at once."""
    for b in blocks:
        for lo in range(0, len(b), CHUNK_ROWS):
            yield b[lo:lo + CHUNK_ROWS]


def class_sums(blocks, labels: np.ndarray) -> np.ndarray:
    """Sum ``[C, D]`` (float64) of the vectors of each class, ``C = max(labels) + 1``, over vectors given as
    blocks ``[n_i, D]`` in position order with their ``labels [N]`` (-1: no class, left out). Read block by
    block: memory-mapped blocks are fine."""
    labels = np.asarray(labels, np.int64)
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    out, start = None, 0
    for b in chunked(blocks):
        b = np.asarray(b, np.float64)
        if out is None:
            out = np.zeros((n_classes, b.shape[1]), np.float64)
        lab = labels[start:start + len(b)]
        order = np.argsort(lab, kind="stable")
        order = order[lab[order] >= 0]
        if len(order):  # rows sorted by class, each class's run summed at once
            cls, first = np.unique(lab[order], return_index=True)
            out[cls] += np.add.reduceat(b[order], first, axis=0)
        start += len(b)
    if start != len(labels):
        raise ValueError(f"{start} vectors for {len(labels)} labels")
    return out if out is not None else np.zeros((n_classes, 0))


def prototypes(sums: np.ndarray) -> np.ndarray:
    """Unit class prototypes ``[C, D]`` (float32) from per-class sums (:func:`class_sums`): a class without
    vectors gets a zero row (similarity 0 to everything)."""
    norm = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.divide(sums, norm, out=np.zeros(sums.shape), where=norm > 0).astype(np.float32)
