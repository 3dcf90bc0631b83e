"""Dynamic batching of similar-product queries (as Triton and TorchServe do): queries that arrive within a few
milliseconds of each other are embedded in one forward pass and searched in one FAISS call, on one worker
thread, so throughput grows with the number of requests in flight instead of staying flat."""
from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch

from ..infer.indexdir.bundle import IndexBundle
from ..infer.pipeline.embed import embed_images, shape_bucket
from ..infer.query import mirrored, picture_inputs


class Busy(RuntimeError):
    """The query queue is full: the server is at capacity (the HTTP answer is 503 with ``Retry-After``)."""

    retry_after = 1  # seconds


@dataclass
class _Job:
    bundle: IndexBundle
    k: int                                  # neighbours wanted; 0: embed only (the result is (vec, probs))
    pictures: list[bytes] | None = None     # the picture bytes of one query product, decoded on the batch thread
    names: list[str] | None = None
    position: int | None = None             # or an indexed product's position (its stored vector)
    future: Future = field(default_factory=Future)
    images: torch.Tensor | None = None      # [N, 3, S, S] uint8: the decoded pictures
    vec: np.ndarray | None = None           # [D]: the query's vector (stored, or embedded in the batch)
    probs: np.ndarray | None = None         # [C]: the head's probabilities (embedded queries only)

    @property
    def n_pictures(self) -> int:
        return len(self.pictures or ())


def compute_threads(cpus: int | None = None) -> int:
    """Give the network every core but one (the event loop and the decoders need one): on 2 cores, 16 picture
    queries in flight over 4,000 products went from 743 to 811 QPS. Returns the thread count set."""
    n = max(1, (cpus or os.cpu_count() or 1) - 1)
    torch.set_num_threads(n)
    return n


PARALLEL_SEARCH = 100_000  # queries x indexed vectors from which a batch's search uses every core


def search_threads(n_queries: int, n_vectors: int) -> int:
    """FAISS threads for one batch: one for a small search, where OpenMP threads would only spin on the core
    the event loop needs (2 cores, 4,000 products, 16 by-id queries in flight: 1,458 QPS with two threads, 2,438
    with one), every core for a large one (204,000 products: 265 -> 370 QPS with two)."""
    return (os.cpu_count() or 1) if n_queries * n_vectors >= PARALLEL_SEARCH else 1


def warm_up(bundle: IndexBundle, max_images: int) -> int:
    """On a GPU, run the network once at each padded batch size a query batch can take (``shape_bucket``), so
    that no early request waits for cuDNN to plan a new shape. Returns how many sizes were run (0 on a CPU)."""
    net = bundle.net
    if next(net.parameters()).device.type != "cuda":
        return 0
    sizes = sorted({shape_bucket(n) for n in range(1, max_images + 1)})
    s = net.cfg.image_size
    for n in sizes:
        embed_images(net, torch.zeros(n, 3, s, s, dtype=torch.uint8), torch.zeros(n, dtype=torch.long), 1,
                     mirrored(bundle))
    return len(sizes)


class QueryBatcher:
    """``submit(bundle, k, pictures=... | position=...)`` -> a future of ``(sims [k], positions [k])``, batched
    with whatever other queries are waiting when the worker picks up the next batch (continuous batching: no wait
    at low load; under load, requests queue while a batch runs and go together), plus those arriving within
    ``max_wait`` seconds; at most ``max_batch`` queries and ``max_pictures`` pictures a batch (a query with more
    goes alone). ``embed(bundle, pictures)`` -> a future of ``(vec [D], probs [C])``, batched the same way.
    At most ``max_queued`` queries wait: past that, ``submit`` raises :class:`Busy` at once. Every picture is
    decoded here, on ``decoders`` threads, so decoding memory is bounded whatever the load. Queries against
    different generations of the index are never mixed."""

    def __init__(self, max_batch: int = 32, max_wait: float = 0.0, max_pictures: int = 64, max_queued: int = 32,
                 decoders: int | None = None) -> None:
        self.max_batch, self.max_wait, self.max_pictures = max_batch, max_wait, max_pictures
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=max_queued)
        self._decoders = ThreadPoolExecutor(decoders or min(4, os.cpu_count() or 1), thread_name_prefix="query-decode")
        self._held: _Job | None = None  # taken from the queue, but over the picture cap of the batch then
        threading.Thread(target=self._run, name="query-batcher", daemon=True).start()

    def submit(self, bundle: IndexBundle, k: int, pictures: list[bytes] | None = None,
               names: list[str] | None = None, position: int | None = None) -> Future:
        """Queue one query (a product's picture bytes, or an indexed product's ``position``); the future gives
        ``(sims [k], positions [k])`` or raises the query's own error (a picture that does not decode fails its
        query only). An asyncio handler awaits it without holding a thread. :class:`Busy` if the queue is full."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        return self._put(_Job(bundle, k, pictures=pictures, names=names, position=position))

    def embed(self, bundle: IndexBundle, pictures: list[bytes], names: list[str] | None = None) -> Future:
        """Queue one product's pictures for embedding only: the future gives ``(vec [D], probs [C])``."""
        return self._put(_Job(bundle, 0, pictures=pictures, names=names))

    def _put(self, job: _Job) -> Future:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self._queue.maxsize} queries are waiting; try again shortly") from None
        return job.future

    def _next_batch(self) -> list[_Job]:
        """The next batch: the job held over (or the next to arrive), then whatever waits, within the caps."""
        first, self._held = self._held or self._queue.get(), None
        batch, pictures = [first], first.n_pictures
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if pictures + job.n_pictures > self.max_pictures:
                self._held = job  # first of the next batch
                break
            batch.append(job)
            pictures += job.n_pictures
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            for bundle in {id(j.bundle): j.bundle for j in batch}.values():
                self._process(bundle, [j for j in batch if j.bundle is bundle])

    def _inputs(self, bundle: IndexBundle, jobs: list[_Job]) -> list[_Job]:
        """Decode pictures (on the decode threads: the decoders release the GIL) and read stored vectors; a job
        that fails gets its error now and is left out of the batch."""
        def prepare(j: _Job) -> bool:
            try:
                if j.pictures is not None:
                    j.images = picture_inputs(bundle, j.pictures, j.names)
                elif j.position is not None:
                    j.vec = bundle.vector(j.position)
                return True
            except BaseException as e:
                j.future.set_exception(e)
                return False
        decoding = sum(j.pictures is not None for j in jobs) > 1
        ready = self._decoders.map(prepare, jobs) if decoding else map(prepare, jobs)
        return [j for j, ok in zip(jobs, ready, strict=True) if ok]

    def _process(self, bundle: IndexBundle, jobs: list[_Job]) -> None:
        jobs = self._inputs(bundle, jobs)
        try:
            with_pictures = [j for j in jobs if j.images is not None]
            if with_pictures:  # one forward over every picture of every query product
                x = torch.cat([j.images for j in with_pictures])
                owner = torch.cat([torch.full((len(j.images),), i, dtype=torch.long)
                                   for i, j in enumerate(with_pictures)])
                emb, probs = embed_images(bundle.net, x, owner, len(with_pictures), mirrored(bundle))
                for j, v, p in zip(with_pictures, emb.cpu().numpy(), probs.cpu().numpy(), strict=True):
                    j.vec, j.probs, j.images = v, p, None  # the decoded pictures are not needed past the forward
            for j in jobs:
                if j.k == 0:
                    j.future.set_result((j.vec, j.probs))
            searched = [j for j in jobs if j.k > 0]
            if searched:
                faiss.omp_set_num_threads(search_threads(len(searched), len(bundle.vectors)))  # this thread's
                sims, pos = bundle.vectors.search(np.stack([j.vec for j in searched]).astype(np.float32),
                                                  max(j.k for j in searched))  # one FAISS call
                for i, j in enumerate(searched):
                    j.future.set_result((sims[i, :j.k], pos[i, :j.k]))
        except BaseException as e:  # every waiting request hears of it
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
