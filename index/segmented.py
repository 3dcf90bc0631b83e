"""Search over several immutable :class:`~.store.VectorIndex` segments as one index: global positions (segment
offsets), merged top-k, and category filters cached once per opened set of segments (numpy and faiss only)."""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from .store import EXACT_SUBSET_MAX, VectorIndex

FILTER_CACHE_BYTES = 512 << 20  # vectors of filtered subsets kept for exact restricted searches


def merge_topk(sims: list[np.ndarray], positions: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of several ``(sims [Q, k_i], positions [Q, k_i])`` results (-1 positions are never
    chosen before a found one); ties keep the earlier result first. Returns ``[Q, k]`` arrays, -1 padded."""
    s = np.concatenate(sims, 1).astype(np.float32)
    p = np.concatenate(positions, 1).astype(np.int64)
    s = np.where(p >= 0, s, -np.inf)
    if s.shape[1] < k:
        pad = k - s.shape[1]
        s = np.concatenate([s, np.full((len(s), pad), -np.inf, np.float32)], 1)
        p = np.concatenate([p, np.full((len(p), pad), -1, np.int64)], 1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(p, order, 1)


class SegmentedIndex:
    """Segments ``parts`` searched as one index: segment ``i``'s vector ``j`` has position ``offsets[i] + j``;
    ``labels [N]`` are all segments' labels in position order. Nothing here changes a segment."""

    def __init__(self, parts: list[VectorIndex]) -> None:
        if not parts:
            raise ValueError("a segmented index needs at least one segment")
        self.parts = list(parts)
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)
        self.labels = np.concatenate([p.labels for p in self.parts]) if len(self.parts) > 1 else self.parts[0].labels
        self._cache: OrderedDict = OrderedDict()
        self._cache_bytes, self._lock = 0, threading.Lock()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        return self.parts[0].dim

    @property
    def factory(self) -> str:
        """The factory of the largest segment (the others are small additions)."""
        return max(self.parts, key=len).factory

    def locate(self, position: int) -> tuple[int, int]:
        """``(segment, position inside it)`` of a global position."""
        s = int(np.searchsorted(self.offsets, position, side="right")) - 1
        return s, int(position - self.offsets[s])

    def search(self, queries: np.ndarray, k: int, allowed_labels: list[int] | np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(similarities [Q, k], positions [Q, k])`` over every segment (-1: fewer found);
        ``allowed_labels`` restricts it to vectors with those labels (exact while the subset is small)."""
        q = np.ascontiguousarray(queries, np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got {list(q.shape)}")
        sims, pos = [], []
        for part, off in zip(self.parts, self.offsets[:-1], strict=True):
            if len(part) == 0 or len(part.removed) >= len(part):  # nothing left to find (a held-out segment)
                continue
            if allowed_labels is None:
                s, p = part.search(q, min(k, len(part)))
            else:
                s, p = self._filtered(part, q, k, allowed_labels)
            sims.append(s)
            pos.append(np.where(p >= 0, p + off, -1))
        if not sims:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        return merge_topk(sims, pos, k)

    def _subset(self, part: VectorIndex, labels: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
        """A segment's positions with one of ``labels`` and their vectors (None: too many, or not
        reconstructable), computed once per segment and label set while the cache budget holds."""
        key = (id(part), labels)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        ok = np.isin(part.labels, np.asarray(labels, np.int64))
        ok[part.removed] = False  # a generation's removed products are never found
        allowed = np.flatnonzero(ok)
        vecs = None
        if 0 < len(allowed) <= EXACT_SUBSET_MAX:
            try:
                if part.ivf is not None:
                    part.ivf.make_direct_map()
                vecs = part.faiss_index.reconstruct_batch(allowed.astype(np.int64))
            except RuntimeError:
                vecs = None
        entry = (allowed, vecs)
        size = allowed.nbytes + (vecs.nbytes if vecs is not None else 0)
        with self._lock:
            self._cache[key] = entry
            self._cache_bytes += size
            while self._cache_bytes > FILTER_CACHE_BYTES and len(self._cache) > 1:
                _, (a, v) = self._cache.popitem(last=False)
                self._cache_bytes -= a.nbytes + (v.nbytes if v is not None else 0)
        return entry

    def _filtered(self, part: VectorIndex, q: np.ndarray, k: int, allowed_labels) -> tuple[np.ndarray, np.ndarray]:
        labels = tuple(sorted(int(x) for x in np.atleast_1d(np.asarray(allowed_labels))))
        allowed, vecs = self._subset(part, labels)
        if len(allowed) == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        if vecs is None:
            return part.search(q, k, list(labels))
        scores = q @ vecs.T
        kk = min(k, len(allowed))
        top = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
        return np.take_along_axis(scores, top, 1), allowed[top]
