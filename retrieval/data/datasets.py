"""Datasets over the offset table (random access in DataLoader workers), product batches and the split."""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from .images import ImageDecodeError, decode_image, picture_hash
from .offsets import RecordReader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Augment:
    """Training augmentation: a random resized crop keeping ``crop_min``..1 of the area, a mirror, and (when
    ``colour`` > 0) brightness, contrast and saturation each scaled by a factor in [1 - colour, 1 + colour].
    The default is mild (catalogue pictures are centred, on white); real photos want more."""

    crop_min: float = 0.8
    colour: float = 0.0


def _colour_jitter(rgb: np.ndarray, amount: float) -> np.ndarray:
    x = rgb.astype(np.float32) * random.uniform(1 - amount, 1 + amount)
    mean = x.mean()
    x = (x - mean) * random.uniform(1 - amount, 1 + amount) + mean
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * random.uniform(1 - amount, 1 + amount) + grey
    return np.clip(x, 0, 255).astype(np.uint8)


def to_model_input(rgb: np.ndarray, size: int, train: bool, aug: Augment = Augment()) -> torch.Tensor:
    """RGB ``[H, W, 3]`` uint8 -> ``[3, size, size]`` uint8; train mode: random resized crop + h-flip (+ colour).

    Crop and resize are one Pillow call (bilinear, antialiased when shrinking). Randomness comes from
    Python's ``random``, which PyTorch reseeds in every DataLoader worker (and which costs nanoseconds,
    where building a numpy Generator per sample cost more than the decode).
    """
    h, w = rgb.shape[:2]
    box = (0, 0, w, h)
    if train:
        scale, ratio = random.uniform(aug.crop_min, 1.0), math.exp(random.uniform(math.log(0.9), math.log(1.1)))
        ch = min(h, int(round(math.sqrt(scale * h * w / ratio))))
        cw = min(w, int(round(math.sqrt(scale * h * w * ratio))))
        top, left = random.randint(0, h - ch), random.randint(0, w - cw)
        box = (left, top, left + cw, top + ch)
    if box != (0, 0, size, size) or (h, w) != (size, size):
        rgb = np.array(Image.fromarray(rgb).resize((size, size), Image.BILINEAR, box=box))
    if train and random.random() < 0.5:
        rgb = rgb[:, ::-1]
    if train and aug.colour > 0:
        rgb = _colour_jitter(rgb, aug.colour)
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


def picture_input(data: bytes, size: int) -> torch.Tensor:
    """The one path from picture bytes to the model's evaluation input ``[3, size, size]`` uint8: decoded with
    DCT down-scaling to at least ``size`` a side, then resized. Indexing, predict, evaluate, ``similar`` and
    HTTP uploads all use it, so one JPEG gives the same pixels, and the same vector, whichever way it came."""
    return to_model_input(decode_image(data, min_size=size), size, train=False)


class ImageDataset(Dataset):
    """Training samples: one image each, labelled with its product's class (-100 if undecodable)."""

    def __init__(self, reader: RecordReader, rows: np.ndarray, labels: np.ndarray, size: int,
                 level1: np.ndarray | None = None, level2: np.ndarray | None = None, aug: Augment = Augment()
                 ) -> None:
        n = reader.table["n_images"][rows].astype(np.int64)
        self.reader, self.size, self.aug = reader, size, aug
        self.rows = np.repeat(rows, n).astype(np.int64)
        self.img = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)).astype(np.int16)
        self.labels = np.repeat(labels, n)
        self.level1, self.level2 = level1, level2  # [C] parent class of each category, or None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, int]:
        prod = self.reader.read(int(self.rows[i]))
        y = int(self.labels[i])
        try:
            rgb = decode_image(prod.images[int(self.img[i])], min_size=self.size)
        except ImageDecodeError as e:
            log.debug("product %s image %d skipped: %s", prod.product_id, self.img[i], e)
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), -100, -100, -100
        l1 = int(self.level1[y]) if self.level1 is not None else 0
        l2 = int(self.level2[y]) if self.level2 is not None else 0
        return to_model_input(rgb, self.size, train=True, aug=self.aug), y, l1, l2


@dataclass
class ProductBatch:
    """A batch of whole products: ``images [N, 3, S, S]`` uint8, ``owner [N]`` -> product position in batch."""

    images: torch.Tensor
    owner: torch.Tensor
    rows: torch.Tensor       # [P] rows of the offset table
    labels: torch.Tensor     # [P] class index, -1 if unknown
    failed: torch.Tensor     # [P] undecodable images per product
    hashes: torch.Tensor     # [N] int64 picture_hash of each image's bytes

    def to(self, device) -> "ProductBatch":
        return ProductBatch(self.images.to(device, non_blocking=True), self.owner.to(device), self.rows,
                            self.labels.to(device), self.failed, self.hashes)


class ProductDataset(Dataset):
    """Whole products (all decodable images, resized), for validation, embedding and prediction."""

    def __init__(self, reader: RecordReader, rows: np.ndarray, size: int, labels: np.ndarray | None = None) -> None:
        self.reader, self.rows, self.size = reader, np.asarray(rows, np.int64), size
        self.labels = labels if labels is not None else np.full(len(self.rows), -1, np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int, int, int, list[int]]:
        """(decoded images, offset-table row, label, undecodable count, picture_hash of each decoded image)"""
        prod = self.reader.read(int(self.rows[i]))
        imgs, hashes, failed = [], [], 0
        for j, pic in enumerate(prod.images):
            try:
                imgs.append(picture_input(pic, self.size))
                hashes.append(picture_hash(pic))
            except ImageDecodeError as e:
                failed += 1
                log.warning("%s, product _id %d, image %d skipped: %s", self.reader.path, prod.product_id, j, e)
        return imgs, int(self.rows[i]), int(self.labels[i]), failed, hashes


def collate_products(items: list) -> ProductBatch:
    """Products ``(images, row, label, failed, hashes)`` -> one :class:`ProductBatch`; products may have no image."""
    imgs = [im for it in items for im in it[0]]
    owner = torch.tensor([k for k, it in enumerate(items) for _ in it[0]], dtype=torch.long)
    images = torch.stack(imgs) if imgs else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return ProductBatch(images, owner, torch.tensor([it[1] for it in items]), torch.tensor([it[2] for it in items]),
                        torch.tensor([it[3] for it in items]),
                        torch.tensor([h for it in items for h in it[4]], dtype=torch.int64))


def batches_within(bounds: np.ndarray, size: int) -> list[list[int]]:
    """Consecutive index batches of at most ``size`` products that never cross a boundary (``bounds``: the end of
    each part, cumulative), so that one loader can serve many parts."""
    out, lo = [], 0
    for hi in np.asarray(bounds, np.int64).tolist():
        out += [list(range(a, min(a + size, hi))) for a in range(lo, hi, size)]
        lo = hi
    return out


def product_loader(dataset: ProductDataset, batch_images: int, workers: int, shuffle: bool = False,
                   bounds: np.ndarray | None = None) -> DataLoader:
    """Batches of about ``batch_images`` images (products average ~1.75 images); with ``bounds`` (cumulative part
    ends), in order and never across a part's end."""
    size = max(1, batch_images * 4 // 7)
    common = dict(num_workers=workers, collate_fn=collate_products, persistent_workers=workers > 0,
                  pin_memory=torch.cuda.is_available())
    if bounds is not None:
        return DataLoader(dataset, batch_sampler=batches_within(bounds, size), **common)
    return DataLoader(dataset, batch_size=size, shuffle=shuffle, **common)


# ---- the split ------------------------------------------------------------------------------------

def make_split(labels: np.ndarray, val_fraction: float, seed: int, min_per_class: int = 5) -> np.ndarray:
    """Boolean ``[N]`` mask of validation products: stratified by class for classes with at least
    ``min_per_class`` products (smaller classes stay in training), deterministic by seed."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val = np.zeros(len(labels), bool)
    if val_fraction == 0:
        return val
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for members in np.split(order, bounds):
        if len(members) >= min_per_class:
            k = max(1, int(round(len(members) * val_fraction)))
            val[rng.choice(members, k, replace=False)] = True
    return val
