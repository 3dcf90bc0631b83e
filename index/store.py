"""A FAISS index over unit vectors (inner product = cosine), with per-vector labels and saved search settings."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from .ivf import choose_factory, train_ivf, training_rows  # noqa: F401 (choose_factory: re-exported)
from .rows import drop_removed, recall_at_k, rerank

log = logging.getLogger(__name__)
EXACT_SUBSET_MAX = 200_000  # restricted searches over at most this many vectors are exact
REFINE_FACTOR = 4  # a coded index with exact vectors at hand returns this many times k, re-ranked exactly
TUNED_K = 10  # the k a search depth is tuned at (recall@10): a smaller k still re-ranks REFINE_FACTOR x TUNED_K
SEARCH_DEPTHS = sorted({int(round(2 ** (i / 2))) for i in range(31)})  # tune tries nprobe 1, 2, 3, 4, 6, 8, ...
CODES_ALONE_NPROBE = 64  # the widest search a coded index's codes alone are tuned to before re-ranking is used
OVERFETCH_MAX = 1024  # a batch over a Flat index with up to this many removed asks k + removed and drops them (exact,
# on FAISS's BLAS path); past it, a few more than the removed share predicts, and searches again, skipping them
# inside FAISS (a selector), only the rows left short
OVERFETCH_SPARE = 8
BLAS_ROWS = 20  # FAISS's Flat search uses BLAS from this many queries (distance_compute_blas_threshold)


class VectorIndex:
    """Vectors are found by position (0..n-1); ``labels[pos]`` is each vector's class (-1 = none)."""

    def __init__(self, index: faiss.Index, labels: np.ndarray | None = None, factory: str = "Flat",
                 nprobe: int | None = None, ef_search: int | None = None, rerank: bool = True) -> None:
        self.faiss_index, self.factory = index, factory
        self.labels = np.zeros(0, np.int64) if labels is None else np.asarray(labels, np.int64)
        self.nprobe, self.ef_search = nprobe, ef_search
        self.refine: Callable[[np.ndarray], np.ndarray] | None = None  # exact vectors of positions (see search)
        self.rerank = rerank  # whether a coded index uses ``refine`` (tune turns it off where codes suffice)
        self.removed = np.zeros(0, np.int64)  # sorted positions never returned (a generation's deletion set)
        self._live_params = None  # search parameters that skip the removed positions (set by view)
        self._batch_flat = False  # whether a batch of queries runs on BLAS (a Flat index; set by view)
        self._apply()

    def view(self, labels: np.ndarray, removed: np.ndarray) -> "VectorIndex":
        """This index (the same FAISS object, never copied) with other ``labels [n]`` and the sorted positions
        ``removed [R]`` left out of every search: a generation's view of an immutable segment."""
        v = VectorIndex(self.faiss_index, labels, self.factory, self.nprobe, self.ef_search, self.rerank)
        if len(v.labels) != len(self):
            raise ValueError(f"{len(v.labels)} labels for {len(self)} vectors")
        v.refine, v.removed = self.refine, np.unique(np.asarray(removed, np.int64))
        if len(v.removed):  # built here, before any reader thread can search it (never lazily, under a race)
            live = np.ones(len(v), bool)
            live[v.removed] = False
            v._live_bits = np.packbits(live, bitorder="little")  # kept: the selector reads this memory
            v._live_sel = faiss.IDSelectorBitmap(len(v._live_bits), faiss.swig_ptr(v._live_bits))  # length in bytes
            v._live_params = v._depth_params(v._live_sel)
            v._batch_flat = v.ivf is None and v.hnsw is None  # a batch over a Flat index is BLAS work
        return v

    @property
    def live_count(self) -> int:
        return len(self) - len(self.removed)

    @classmethod
    def create(cls, d: int, factory: str) -> "VectorIndex":
        """An empty index (inner-product metric) from a FAISS factory string."""
        try:
            index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"bad FAISS factory string {factory!r}: {e}") from None
        return cls(index, factory=factory)

    @property
    def ivf(self):
        try:
            return faiss.extract_index_ivf(self.faiss_index)
        except RuntimeError:
            return None

    @property
    def hnsw(self):
        base = faiss.downcast_index(self.faiss_index)
        return base.hnsw if hasattr(base, "hnsw") else None

    def _apply(self) -> None:
        if self.ivf is not None:
            self.nprobe = self.nprobe or min(self.ivf.nlist, 16)
            self.ivf.nprobe = self.nprobe
            q = faiss.downcast_index(self.ivf.quantizer)
            if isinstance(q, faiss.IndexHNSW):  # the coarse graph must find nprobe lists, and find them well
                q.hnsw.efSearch = max(32, 2 * self.nprobe)
        if self.hnsw is not None:
            self.ef_search = self.ef_search or 128
            self.hnsw.efSearch = self.ef_search

    def set_nprobe(self, nprobe: int) -> int:
        """Search ``nprobe`` IVF lists (at most all of them); returns the number set (1 without IVF)."""
        if self.ivf is None:
            return 1
        self.nprobe = max(1, min(int(nprobe), self.ivf.nlist))
        self._apply()
        return self.nprobe

    def __len__(self) -> int:
        return self.faiss_index.ntotal

    @property
    def dim(self) -> int:
        return self.faiss_index.d

    def train(self, sample: np.ndarray) -> None:
        """Train IVF/PQ parts on ``sample [N, d]`` (on GPU when faiss has one)."""
        if self.faiss_index.is_trained:
            return
        x = np.ascontiguousarray(sample, np.float32)
        ivf = self.ivf
        if ivf is not None and faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_all_gpus"):
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
        log.info("training %s on %d vectors", self.factory, len(x))
        train_ivf(self.faiss_index, x)

    def train_on_blocks(self, blocks, n: int, seed: int = 0) -> None:
        """Train on a uniform sample of :meth:`training_rows` of the ``n`` vectors given as blocks ``[n_i, d]``
        (memory-mapped ones are fine: each block is read once)."""
        if self.faiss_index.is_trained:
            return
        rng, share = np.random.default_rng(seed), min(1.0, self.training_rows(n) / max(n, 1))
        self.train(np.concatenate([np.asarray(b)[rng.random(len(b)) < share] for b in blocks]))

    def training_rows(self, n: int) -> int:
        """How many of ``n`` vectors to sample for :meth:`train` (all of them when it needs none)."""
        return 0 if self.faiss_index.is_trained else training_rows(self.faiss_index, n)

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        """Append ``vectors [N, d]`` with their ``labels [N]``; they get positions len..len+N-1."""
        x = np.ascontiguousarray(vectors, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"vectors must be [N, {self.dim}], got {list(x.shape)}")
        if len(labels) != len(x):
            raise ValueError("one label per vector")
        if not self.faiss_index.is_trained:
            self.train(x)
        self.faiss_index.add(x)
        self.labels = np.concatenate([self.labels, np.asarray(labels, np.int64)])

    def _params(self, allowed: np.ndarray | None):
        if allowed is None:
            return None
        sel = faiss.IDSelectorBatch(allowed.astype(np.int64))
        if self.ivf is not None:  # a restricted search scans every list (only the allowed ids are scored)
            return faiss.SearchParametersIVF(sel=sel, nprobe=self.ivf.nlist)
        if self.hnsw is not None:
            return faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.ef_search or 0, 512))
        return faiss.SearchParameters(sel=sel)

    def search(self, queries: np.ndarray, k: int, allowed_labels: list[int] | np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(similarities [Q, k], positions [Q, k])``; position -1 where fewer than k were found.

        ``allowed_labels`` restricts the search to vectors whose label is in the set.
        """
        q = np.ascontiguousarray(queries, np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got {list(q.shape)}")
        allowed = None
        if allowed_labels is not None:
            ok = np.isin(self.labels, np.asarray(allowed_labels, np.int64))
            ok[self.removed] = False
            allowed = np.flatnonzero(ok)
            if len(allowed) == 0:
                return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
            if len(allowed) <= EXACT_SUBSET_MAX:
                exact = self._search_subset(q, k, allowed)
                if exact is not None:
                    return exact
        params = self._params(allowed)
        if params is not None:
            return self.faiss_index.search(q, k, params=params)
        if not len(self.removed):
            return self._search(q, k)
        if not self._batch_flat or len(q) < BLAS_ROWS:
            # skipped inside FAISS: IVF lists and graphs are scanned one query at a time anyway, and a few queries
            # over a Flat index do not use BLAS
            return self._search(q, k, self._live_params)
        # a batch over a Flat index: a selector would leave FAISS's BLAS path, so ask for more and drop the removed
        # ones. With every removed one asked for, that is exact; else a row left with fewer than k is searched again
        # with the selector: the results are the selector's either way
        every = len(self.removed) <= OVERFETCH_MAX
        extra = len(self.removed) if every else OVERFETCH_SPARE + int(np.ceil(3 * k * len(self.removed) / len(self)))
        sims, pos = self._search(q, min(len(self), k + extra))
        full = (pos >= 0).all(1)  # the search was not exhausted: more live ones may lie beyond it
        sims, pos, live = drop_removed(sims, pos, self.removed, k)
        short = np.flatnonzero(full & (live < k)) if not every else np.zeros(0, np.int64)
        if len(short):
            sims[short], pos[short] = self._search(q[short], k, self._live_params)
        return sims, pos

    def _depth_params(self, sel):
        """Search parameters of this index's tuned depth, restricted to ``sel``."""
        if self.ivf is not None:
            return faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe)
        if self.hnsw is not None:
            return faiss.SearchParametersHNSW(sel=sel, efSearch=self.ef_search)
        return faiss.SearchParameters(sel=sel)

    def _search(self, q: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        """The plain search at the tuned depth (a coded index's shortlist re-ranked exactly with ``refine``)."""
        if self.refine is not None and self.rerank and self.coded and len(self):
            depth = REFINE_FACTOR * max(k, TUNED_K)  # never shallower than the shortlist the depth was tuned with
            return rerank(q, self.faiss_index.search(q, min(len(self), depth), params=params)[1], k, self.refine)
        return self.faiss_index.search(q, k, params=params)

    @property
    def coded(self) -> bool:
        """Whether the index holds lossy codes (SQ, PQ) rather than the vectors themselves."""
        return "SQ" in self.factory or "PQ" in self.factory

    def _search_subset(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Exact search among ``allowed`` positions (vectors as stored), or None if they can't be reconstructed."""
        try:
            if self.ivf is not None:
                self.ivf.make_direct_map()
            vecs = self.faiss_index.reconstruct_batch(allowed.astype(np.int64))
        except RuntimeError:
            return None
        scores = q @ vecs.T
        kk = min(k, len(allowed))
        top = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
        sims = np.full((len(q), k), -np.inf, np.float32)
        pos = np.full((len(q), k), -1, np.int64)
        sims[:, :kk] = np.take_along_axis(scores, top, axis=1)
        pos[:, :kk] = allowed[top]
        return sims, pos

    def tune(self, queries: np.ndarray, truth: np.ndarray, target: float = 0.95) -> float:
        """Smallest IVF ``nprobe`` (or HNSW ``efSearch``) whose recall@k against exact ``truth [Q, k]``
        (positions) reaches ``target`` (see :meth:`tune_to`). Returns the recall reached."""
        k = truth.shape[1]
        return self.tune_to(lambda: recall_at_k(self.search(queries, k)[1], truth, k), target, k=k)

    def tune_to(self, recall_now: Callable[[], float], target: float, limit: int = 1 << 15, k: int = 1) -> float:
        """The one recall tuner: the smallest search depth (IVF ``nprobe`` up to ``limit`` lists, or HNSW
        ``efSearch``, at least ``k``) at which ``recall_now()`` (a measure of the current search against exact
        answers) reaches ``target``. A coded index with ``refine`` tries its codes alone first (up to
        :data:`CODES_ALONE_NPROBE` lists) and re-ranks only where they fall short. Returns the recall reached."""
        if self.ivf is None and self.hnsw is None:
            return 1.0
        if self.coded and self.refine is not None:
            self.rerank = False
            recall = self._deepen(recall_now, target, min(limit, CODES_ALONE_NPROBE), k)
            if recall >= target:
                return recall
            self.rerank, self.nprobe = True, None
            self._apply()
        return self._deepen(recall_now, target, limit, k)

    def _deepen(self, recall_now: Callable[[], float], target: float, limit: int, k: int) -> float:
        recall = 0.0
        for v in SEARCH_DEPTHS:
            if self.ivf is not None:
                if v > min(self.ivf.nlist, limit):
                    break
                self.nprobe = v
            else:
                self.ef_search = max(k, v)
            self._apply()
            recall = recall_now()
            if recall >= target:
                break
        log.info("tuned %s%s: nprobe=%s efSearch=%s recall=%.3f", self.factory,
                 " (re-ranked)" if self.coded and self.rerank and self.refine else "", self.nprobe, self.ef_search,
                 recall)
        return recall

    def save(self, folder: str | Path) -> None:
        """``index.faiss`` (readable by FAISS tools), ``labels.npy`` and ``search.json``."""
        f = Path(folder)
        f.mkdir(parents=True, exist_ok=True)
        index = self.faiss_index
        if faiss.get_num_gpus() > 0 and hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(f / "index.faiss"))
        np.save(f / "labels.npy", self.labels)
        (f / "search.json").write_text(json.dumps({"factory": self.factory, "nprobe": self.nprobe,
                                                   "ef_search": self.ef_search, "rerank": self.rerank,
                                                   "count": len(self)}))

    @classmethod
    def load(cls, folder: str | Path, mmap: bool = False) -> "VectorIndex":
        """Read a saved index; ``mmap`` maps it read-only where the index type allows."""
        f = Path(folder)
        if not (f / "index.faiss").exists():
            raise FileNotFoundError(f"{f}: no index.faiss (not an index folder?)")
        meta = json.loads((f / "search.json").read_text())
        index = None
        if mmap:
            try:
                # IO_FLAG_MMAP maps IVF lists but reads a Flat index into memory; IO_FLAG_MMAP_IFC maps both
                flag = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)
                index = faiss.read_index(str(f / "index.faiss"), flag | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError:
                log.info("index type does not support mmap; reading it into memory")
        if index is None:
            index = faiss.read_index(str(f / "index.faiss"))
        labels = np.load(f / "labels.npy", mmap_mode="r" if mmap else None)
        if len(labels) != index.ntotal:
            raise ValueError(f"{f}: labels.npy has {len(labels)} entries for {index.ntotal} vectors")
        return cls(index, labels, meta["factory"], meta.get("nprobe"), meta.get("ef_search"), meta.get("rerank", True))
