"""Product embeddings and head probabilities, streamed in batches; the loader settings that feed them."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ...data.datasets import ProductBatch, ProductDataset, product_loader
from ...data.offsets import RecordReader
from ...errors import UserError
from ...model.network import EmbeddingNet, product_mean
from ...model.runtime import Devices, autocast_for, device_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderSettings:
    """How products are fed to the network: images per batch, loader worker processes, and where to run
    (``None`` or one device: this process, without Lightning)."""

    batch_size: int = 256
    workers: int = 2
    where: Devices | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < 0:
            raise UserError(f"batch size must be at least 1 and workers at least 0, got {self.batch_size}, "
                            f"{self.workers}")

    @property
    def distributed(self) -> bool:
        return self.where is not None and self.where.distributed


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
    head_in: np.ndarray | None = None  # [N, V, D] what the head read per image and view (a HeadInputs network)

    @classmethod
    def concat(cls, outs: list["ProductOutputs"]) -> "ProductOutputs":
        """Several batches as one: arrays joined in order, image owners shifted to the joined products."""
        starts = np.cumsum([0] + [len(o.rows) for o in outs[:-1]])
        cat = lambda name: np.concatenate([getattr(o, name) for o in outs])  # noqa: E731
        return cls(cat("rows"), cat("emb"), cat("probs"), cat("n_images"), cat("failed"), cat("image_pred"),
                   np.concatenate([o.image_owner + s for o, s in zip(outs, starts, strict=True)]), cat("image_hash"),
                   cat("head_in") if all(o.head_in is not None for o in outs) else None)


class HeadInputs(torch.nn.Module):
    """``net`` that also returns what its head reads, per image (``aux["head_in"] [B, D]``), by the very
    arithmetic of :meth:`EmbeddingNet.forward`: products embedded through it can later be given their head's
    probabilities (:func:`head_outputs`) without a forward pass of the backbone."""

    def __init__(self, net: EmbeddingNet) -> None:
        super().__init__()
        if not hasattr(net, "features") or not hasattr(net, "head"):
            raise UserError("this runtime exposes no head inputs (only the torch runtime does)")
        self.net, self.cfg = net, net.cfg

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        z = self.net.features(images)
        return F.normalize(z.float(), dim=-1), self.net.head(z), {"head_in": z}


@torch.no_grad()
def head_outputs(net: EmbeddingNet, head_in: np.ndarray, owner: np.ndarray, n_products: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """From stored head inputs ``[N, V, D]`` (V = 2 with the mirror view) of pictures owned by products
    ``owner [N]``: the products' head probabilities ``[P, C]`` and each picture's argmax ``[N]``, as
    :func:`embed_images` computes them."""
    dev = device_of(net)
    z = torch.from_numpy(np.ascontiguousarray(head_in, np.float32)).to(dev)
    n, v = z.shape[:2]
    if n == 0:  # no decodable picture among these products: as embed_images leaves them, zeros
        return np.zeros((n_products, net.head.out_features), np.float32), np.zeros(0, np.int64)
    with autocast_for(dev):
        probs = net.head(z.transpose(0, 1).reshape(n * v, -1)).float().softmax(-1)  # views first, as embedded
        if v == 2:
            probs = (probs[:n] + probs[n:]) / 2
    p_probs = product_mean(probs, torch.from_numpy(np.asarray(owner, np.int64)).to(dev), n_products)
    return p_probs.cpu().numpy(), probs.argmax(-1).cpu().numpy()


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
                 mirror: bool = False, per_image: bool = False, pad: bool | None = None):
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
        emb, logits, aux = net(torch.cat([x, x.flip(-1)]) if mirror else x)  # one forward for both views
        probs = logits.float().softmax(-1)
        z = aux.get("head_in") if isinstance(aux, dict) else None
        if z is not None:  # [N, V, D]: each picture's views
            z = torch.stack([z[:m], z[m:]], 1) if mirror else z[:, None]
        if mirror:
            emb, probs = emb[:m] + emb[m:], (probs[:m] + probs[m:]) / 2
    emb, probs = emb[:n], probs[:n]
    p_emb = product_mean(F.normalize(emb.float(), dim=-1), owner, n_products)
    p_probs = product_mean(probs, owner, n_products)
    if per_image:
        return F.normalize(p_emb, dim=-1), p_probs, probs.argmax(-1), None if z is None else z[:n].float()
    return F.normalize(p_emb, dim=-1), p_probs


def embed_products(net: EmbeddingNet, reader: RecordReader, rows: np.ndarray,
                   loader: LoaderSettings = LoaderSettings(128), mirror: bool = False, timer: Timer | None = None,
                   bounds: np.ndarray | None = None) -> Iterator[ProductOutputs]:
    """Stream ``rows`` (offset-table rows, in order) through the network, a batch of products at a time; with
    ``bounds`` (cumulative ends of parts of ``rows``), no batch crosses a part's end."""
    net.eval()
    batches = product_loader(ProductDataset(reader, rows, net.cfg.image_size), loader.batch_size, loader.workers,
                             bounds=bounds)
    t = time.perf_counter()
    for b in batches:
        if timer:
            t = timer.add("read+decode", t)
        out = batch_outputs(net, b, mirror)
        if timer:
            t = timer.add("model", t)
        yield out
        t = time.perf_counter()


def batch_outputs(net: EmbeddingNet, b: ProductBatch, mirror: bool = False) -> ProductOutputs:
    """The network's per-product outputs for one loader batch (products without a picture get zeros; decode
    counts travel in ``n_images`` and ``failed``, which every stored part keeps)."""
    n = len(b.rows)
    n_img = torch.bincount(b.owner, minlength=n).numpy()
    if len(b.images):
        emb, probs, img_pred, z = embed_images(net, b.images, b.owner, n, mirror, per_image=True)
        emb, probs, img_pred = emb.cpu().numpy(), probs.cpu().numpy(), img_pred.cpu().numpy()
        z = None if z is None else z.cpu().numpy()
    else:
        emb = np.zeros((n, net.cfg.embed_dim), np.float32)
        probs = np.zeros((n, net.cfg.n_classes), np.float32)
        img_pred = np.zeros(0, np.int64)
        z = np.zeros((0, 1 + mirror, net.cfg.embed_dim), np.float32) if isinstance(net, HeadInputs) else None
    return ProductOutputs(b.rows.numpy(), emb, probs, n_img, b.failed.numpy(), img_pred, b.owner.numpy(),
                          b.hashes.numpy(), z)
