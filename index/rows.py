"""Rows of vectors and exact top-k, for the FAISS layer (numpy and faiss only): rows gathered from blocks or
memory-mapped files, a shortlist re-ranked exactly, exact top-k over blocks, recall@k, and results with removed
positions dropped."""
from __future__ import annotations

import mmap
from typing import Callable, Sequence

import faiss
import numpy as np


def take_rows(blocks: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (sorted positions counted on across blocks) of arrays given as blocks ``[n_i, D]``, read block
    by block (memory-mapped blocks are only touched where a row lies)."""
    rows = np.asarray(rows, np.int64)
    out, lo = [], 0
    for b in blocks:
        a, z = np.searchsorted(rows, [lo, lo + len(b)])
        if z > a:
            out.append(np.asarray(b[rows[a:z] - lo], np.float32))
        lo += len(b)
    got = sum(len(o) for o in out)
    if got != len(rows):
        raise IndexError(f"{len(rows) - got} of {len(rows)} rows are not in blocks of {lo} rows (or not sorted)")
    if not out:
        return np.zeros((0, blocks[0].shape[1] if len(blocks) else 0), np.float32)
    return np.concatenate(out)


def release_pages(arrays: Sequence[np.ndarray]) -> None:
    """Drop the pages of memory-mapped arrays (``np.memmap``) from this process: they stay in the page cache,
    read again at the next touch, but no longer count in the process's resident memory. Random reads over
    gigabytes of stored embeddings (re-ranking, peers) would otherwise leave them all resident."""
    for a in arrays:
        m = getattr(a, "_mmap", None)
        if m is not None and hasattr(mmap, "MADV_DONTNEED"):
            m.madvise(mmap.MADV_DONTNEED)


def mapped_rows(maps: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """:func:`take_rows` of memory-mapped blocks, their pages then released (:func:`release_pages`): the
    exact vectors a coded index's shortlist is re-ranked with, read at random over the whole catalogue."""
    out = take_rows(maps, rows)
    release_pages(maps)
    return out


RERANK_BYTES = 64 << 20  # candidate vectors gathered at once by rerank (queries are taken in chunks)


def rerank(queries: np.ndarray, shortlist: np.ndarray, k: int, fetch: Callable[[np.ndarray], np.ndarray]
           ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each query's ``shortlist [Q, M]`` (positions, -1 = none) by exact inner product with
    ``queries [Q, D]``; ``fetch(sorted unique positions [U])`` gives their vectors ``[U, D]``. Returns
    ``(sims [Q, k], positions [Q, k])``, -1 padded. Queries go in chunks of about :data:`RERANK_BYTES`."""
    if shortlist.shape[1] < k:
        shortlist = np.pad(shortlist, ((0, 0), (0, k - shortlist.shape[1])), constant_values=-1)
    q, m = shortlist.shape
    step = max(1, RERANK_BYTES // max(1, m * queries.shape[1] * 4))
    sims, pos = np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64)
    for lo in range(0, q, step):
        sl = shortlist[lo:lo + step]
        uniq = np.unique(sl[sl >= 0])
        if not len(uniq):
            continue
        vecs = np.asarray(fetch(uniq), np.float32)
        at = np.searchsorted(uniq, np.maximum(sl, 0)).clip(0, len(uniq) - 1)
        s = np.where(sl >= 0, np.einsum("qd,qmd->qm", queries[lo:lo + step], vecs[at]), -np.inf).astype(np.float32)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        sims[lo:lo + step], pos[lo:lo + step] = np.take_along_axis(s, order, 1), np.take_along_axis(sl, order, 1)
    return sims, pos


def exact_topk(queries: np.ndarray, parts, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of ``queries [Q, d]`` over vectors given as an iterable of ``[n_i, d]`` blocks
    (positions count on across blocks), in bounded memory."""
    q = np.ascontiguousarray(queries, np.float32)
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_p = np.full((len(q), k), -1, np.int64)
    start = 0
    for block in parts:
        flat = faiss.IndexFlatIP(q.shape[1])
        flat.add(np.ascontiguousarray(block, np.float32))
        s, p = flat.search(q, min(k, len(block)))
        s_all = np.concatenate([best_s, s], 1)
        p_all = np.concatenate([best_p, np.where(p >= 0, p + start, -1)], 1)
        order = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s, best_p = np.take_along_axis(s_all, order, 1), np.take_along_axis(p_all, order, 1)
        start += len(block)
    return best_s, best_p


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the true top-k ids found in the approximate top-k (both ``[Q, >=k]``)."""
    hits = sum(len(set(f[:k]) & set(t[:k])) for f, t in zip(found.tolist(), truth.tolist(), strict=True))
    return hits / (len(truth) * k)


def drop_removed(sims: np.ndarray, pos: np.ndarray, removed: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``k`` results per row that are not in sorted ``removed``, -1 padded; and how many each row kept.
    Also the one way a query product is left out of its own results (``removed`` = its position)."""
    at = np.minimum(np.searchsorted(removed, pos), max(len(removed) - 1, 0))  # sorted: a binary search per result
    gone = (pos < 0) | ((removed[at] == pos) if len(removed) else False)
    order = np.argsort(gone, axis=1, kind="stable")[:, :k]
    sims, pos, gone = (np.take_along_axis(a, order, 1) for a in (sims, pos, gone))
    sims, pos = np.where(gone, -np.inf, sims).astype(np.float32), np.where(gone, -1, pos)
    if pos.shape[1] < k:
        sims = np.pad(sims, ((0, 0), (0, k - pos.shape[1])), constant_values=-np.inf)
        pos = np.pad(pos, ((0, 0), (0, k - pos.shape[1])), constant_values=-1)
    return sims, pos, (pos >= 0).sum(1)
