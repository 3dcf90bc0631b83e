"""Product embeddings and head probabilities, streamed in batches; chunked on-disk stores that resume."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..data.datasets import ProductBatch, ProductDataset, product_loader
from ..data.offsets import RecordReader
from ..errors import UserError
from ..model.network import EmbeddingNet, product_mean
from ..model.runtime import autocast_for, device_of

log = logging.getLogger(__name__)


@dataclass
class ProductOutputs:
    """Per-product outputs of one batch: ``emb [P, D]`` unit-norm (zeros if no image), ``probs [P, C]``."""

    rows: np.ndarray
    emb: np.ndarray
    probs: np.ndarray
    n_images: np.ndarray
    failed: np.ndarray
    image_pred: np.ndarray  # [N] head argmax per image
    image_owner: np.ndarray  # [N] product index (in this batch) of each image
    image_hash: np.ndarray  # [N] int64 picture_hash of each image's bytes


@dataclass
class Timer:
    """Seconds spent per stage (wall clock, main process)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, t0: float) -> float:
        t = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + t - t0
        return t


def shape_bucket(n: int) -> int:
    """The batch size ``n`` images are padded to on a GPU: a power of two up to 64, then a multiple of 64.

    cuDNN plans every convolution afresh for each new input shape (about a second for a whole network), and
    product batches hold a different number of images each time; a handful of buckets bounds that cost."""
    return 1 << max(n - 1, 0).bit_length() if n <= 64 else -(-n // 64) * 64


@torch.no_grad()
def embed_images(net: EmbeddingNet, images: torch.Tensor, owner: torch.Tensor, n_products: int,
                 tta_flip: bool = False, per_image: bool = False, pad: bool | None = None):
    """uint8 ``images [N, 3, S, S]`` of ``n_products`` -> (``emb [P, D]``, ``probs [P, C]``) product means
    (and, with ``per_image``, the head's argmax ``[N]`` per image). ``pad`` (default: on CUDA) runs the network
    on :func:`shape_bucket` images, zero images after the real ones (eval mode: they change nothing)."""
    dev = device_of(net)
    n = len(images)
    x = images.to(dev, non_blocking=True)
    padded = shape_bucket(n) if (dev.type == "cuda" if pad is None else pad) else n
    if padded > n:
        x = torch.cat([x, x.new_zeros((padded - n, *x.shape[1:]))])
    owner = owner.to(dev)
    with autocast_for(dev):
        m = len(x)
        emb, logits, _ = net(torch.cat([x, x.flip(-1)]) if tta_flip else x)  # one forward for both views
        probs = logits.float().softmax(-1)
        if tta_flip:
            emb, probs = emb[:m] + emb[m:], (probs[:m] + probs[m:]) / 2
    emb, probs = emb[:n], probs[:n]
    p_emb = product_mean(F.normalize(emb.float(), dim=-1), owner, n_products)
    p_probs = product_mean(probs, owner, n_products)
    if per_image:
        return F.normalize(p_emb, dim=-1), p_probs, probs.argmax(-1)
    return F.normalize(p_emb, dim=-1), p_probs


def embed_products(net: EmbeddingNet, reader: RecordReader, rows: np.ndarray, batch_images: int = 128,
                   workers: int = 2, tta_flip: bool = False, timer: Timer | None = None) -> Iterator[ProductOutputs]:
    """Stream ``rows`` (offset-table rows, in order) through the network, a batch of products at a time."""
    net.eval()
    loader = product_loader(ProductDataset(reader, rows, net.cfg.image_size), batch_images, workers)
    t = time.perf_counter()
    for b in loader:
        if timer:
            t = timer.add("read+decode", t)
        out = batch_outputs(net, b, tta_flip)
        if timer:
            t = timer.add("model", t)
        yield out
        t = time.perf_counter()


def batch_outputs(net: EmbeddingNet, b: ProductBatch, tta_flip: bool = False) -> ProductOutputs:
    """The network's per-product outputs for one loader batch (products without a picture get zeros; decode
    counts travel in ``n_images`` and ``failed``, which every stored part keeps)."""
    n = len(b.rows)
    n_img = torch.bincount(b.owner, minlength=n).numpy()
    if len(b.images):
        emb, probs, img_pred = embed_images(net, b.images, b.owner, n, tta_flip, per_image=True)
        emb, probs, img_pred = emb.cpu().numpy(), probs.cpu().numpy(), img_pred.cpu().numpy()
    else:
        emb = np.zeros((n, net.cfg.embed_dim), np.float32)
        probs = np.zeros((n, net.cfg.n_classes), np.float32)
        img_pred = np.zeros(0, np.int64)
    return ProductOutputs(b.rows.numpy(), emb, probs, n_img, b.failed.numpy(), img_pred, b.owner.numpy(),
                          b.hashes.numpy())


def _differences(old: dict, new: dict) -> str:
    """The settings that differ between two store keys, in words."""
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b)
            diffs += [f"{k}.{d}" for d in inner.split("; ")] if inner else []
        elif a != b:
            diffs.append(f"{k} {a} -> {b}")
    return "; ".join(diffs)


class ChunkStore:
    """Numbered ``part_XXXXX.npz`` files written atomically; a run started again skips finished parts.

    ``key`` (the settings the parts depend on) is saved in ``store.json``. A store made with another key
    is refused with the differing settings named, or wiped first with ``restart``.
    """

    def __init__(self, folder: str | Path, key: dict, restart: bool = False) -> None:
        self.folder = Path(folder)
        meta = self.folder / "store.json"
        if meta.exists():
            old = json.loads(meta.read_text())
            if old != key:
                if not restart:
                    raise UserError(f"{self.folder} holds unfinished work made with other settings "
                                    f"({_differences(old, key)}); pass --restart to discard it, or choose another "
                                    "output")
                log.warning("discarding %s (made with other settings)", self.folder)
                shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not meta.exists():
            meta.write_text(json.dumps(key))

    @staticmethod
    def part_file(folder: Path, i: int | str) -> Path:
        """A numbered part (``part_00007.npz``) or one keyed by what it holds (``part_<key>.npz``)."""
        return Path(folder) / (f"part_{i:05d}.npz" if isinstance(i, int) else f"part_{i}.npz")

    def path(self, i: int | str) -> Path:
        return self.part_file(self.folder, i)

    def done(self, i: int | str) -> bool:
        return self.path(i).exists()

    @staticmethod
    def vectors_file(folder: Path, i: int | str) -> Path:
        """A part's embeddings ``[P, D]`` as a plain ``.npy`` beside it, for memory-mapped reads."""
        return ChunkStore.part_file(folder, i).with_suffix(".emb.npy")

    def write(self, i: int | str, **arrays: np.ndarray) -> None:
        """Written aside, fsynced, then renamed: a part file is whole or absent. An ``emb`` array is stored once,
        as :meth:`vectors_file` (memory-mappable), written before the part file that marks the part done."""
        if "emb" in arrays:
            emb = np.asarray(arrays.pop("emb"), np.float32)
            self._atomic(self.vectors_file(self.folder, i), lambda f: np.save(f, emb))
        self._atomic(self.path(i), lambda f: np.savez(f, **arrays))

    @staticmethod
    def _atomic(final: Path, write) -> None:
        tmp = final.with_name("." + final.name + ".tmp")
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def read(self, i: int | str, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Part ``i``'s arrays, ``emb`` included where the part has one (only ``keys``, when given: the others
        are not read)."""
        vectors = self.vectors_file(self.folder, i)
        with np.load(self.path(i)) as z:
            out = {k: z[k] for k in (keys if keys is not None else z.files) if k != "emb"}
        if (keys is None or "emb" in keys) and vectors.exists():
            out["emb"] = np.load(vectors)
        return out
