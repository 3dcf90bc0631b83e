"""Dynamic batching of similar-product queries (as Triton and TorchServe do): queries that arrive within a few
milliseconds of each other are embedded in one forward pass and searched in one FAISS call, on one worker
thread, so throughput grows with the number of requests in flight instead of staying flat."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..infer.embed import embed_images, shape_bucket
from ..infer.query import mirrored
from ..infer.bundle import IndexBundle


@dataclass
class _Job:
    bundle: IndexBundle
    k: int
    images: torch.Tensor | None = None  # [N, 3, S, S] uint8: the pictures of one query product
    vec: np.ndarray | None = None       # [D]: an indexed product's own vector
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[np.ndarray, np.ndarray] | None = None
    error: BaseException | None = None


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
                     tta_flip=mirrored(bundle))
    return len(sizes)


class QueryBatcher:
    """``search(bundle, k, images=... | vec=...) -> (sims [k], positions [k])``, batched with whatever other
    queries are waiting when the worker picks up the next batch (continuous batching: no wait at low load; under
    load, requests queue while a batch runs and go together), plus those arriving within ``max_wait`` seconds;
    at most ``max_batch`` a batch. Queries against different generations of the index are never mixed."""

    def __init__(self, max_batch: int = 32, max_wait: float = 0.0) -> None:
        self.max_batch, self.max_wait = max_batch, max_wait
        self._queue: queue.Queue[_Job] = queue.Queue()
        threading.Thread(target=self._run, name="query-batcher", daemon=True).start()

    def search(self, bundle: IndexBundle, k: int, images: torch.Tensor | None = None,
               vec: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        job = _Job(bundle, k, images, vec)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    batch.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            for bundle in {id(j.bundle): j.bundle for j in batch}.values():
                self._process(bundle, [j for j in batch if j.bundle is bundle])

    @staticmethod
    def _process(bundle: IndexBundle, jobs: list[_Job]) -> None:
        try:
            with_pictures = [j for j in jobs if j.images is not None]
            if with_pictures:  # one forward over every picture of every query product
                x = torch.cat([j.images for j in with_pictures])
                owner = torch.cat([torch.full((len(j.images),), i, dtype=torch.long)
                                   for i, j in enumerate(with_pictures)])
                emb, _ = embed_images(bundle.net, x, owner, len(with_pictures), tta_flip=mirrored(bundle))
                for j, v in zip(with_pictures, emb.cpu().numpy()):
                    j.vec = v
            sims, pos = bundle.vectors.search(np.stack([j.vec for j in jobs]).astype(np.float32),
                                            max(j.k for j in jobs))  # one FAISS call
            for i, j in enumerate(jobs):
                j.result = (sims[i, :j.k], pos[i, :j.k])
        except BaseException as e:  # every waiting request hears of it
            for j in jobs:
                j.error = e
        finally:
            for j in jobs:
                j.done.set()
