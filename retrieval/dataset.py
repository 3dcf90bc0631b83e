"""Datasets over the offset table (random access in DataLoader workers), the product split, the DataModule."""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .offsets import RecordReader, file_fingerprint, load_offsets
from .categories import CategoryTable
from .images import ImageDecodeError, decode_image

log = logging.getLogger(__name__)


def to_model_input(rgb: np.ndarray, size: int, train: bool) -> torch.Tensor:
    """RGB ``[H, W, 3]`` uint8 -> ``[3, size, size]`` uint8; train mode: mild random resized crop + h-flip.

    Crop and resize are one Pillow call (bilinear, antialiased when shrinking). Randomness comes from
    Python's ``random``, which PyTorch reseeds in every DataLoader worker (and which costs nanoseconds,
    where building a numpy Generator per sample cost more than the decode).
    """
    h, w = rgb.shape[:2]
    box = (0, 0, w, h)
    if train:
        scale, ratio = random.uniform(0.8, 1.0), math.exp(random.uniform(math.log(0.9), math.log(1.1)))
        ch = min(h, int(round(math.sqrt(scale * h * w / ratio))))
        cw = min(w, int(round(math.sqrt(scale * h * w * ratio))))
        top, left = random.randint(0, h - ch), random.randint(0, w - cw)
        box = (left, top, left + cw, top + ch)
    if box != (0, 0, size, size) or (h, w) != (size, size):
        rgb = np.array(Image.fromarray(rgb).resize((size, size), Image.BILINEAR, box=box))
    if train and random.random() < 0.5:
        rgb = rgb[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


class ImageDataset(Dataset):
    """Training samples: one image each, labelled with its product's class (-100 if undecodable)."""

    def __init__(self, reader: RecordReader, rows: np.ndarray, labels: np.ndarray, size: int,
                 level1: np.ndarray | None = None, level2: np.ndarray | None = None) -> None:
        n = reader.table["n_images"][rows].astype(np.int64)
        self.reader, self.size = reader, size
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
        return to_model_input(rgb, self.size, train=True), y, l1, l2


@dataclass
class ProductBatch:
    """A batch of whole products: ``images [N, 3, S, S]`` uint8, ``owner [N]`` -> product position in batch."""

    images: torch.Tensor
    owner: torch.Tensor
    rows: torch.Tensor       # [P] rows of the offset table
    labels: torch.Tensor     # [P] class index, -1 if unknown
    failed: torch.Tensor     # [P] undecodable images per product

    def to(self, device) -> "ProductBatch":
        return ProductBatch(self.images.to(device, non_blocking=True), self.owner.to(device), self.rows,
                            self.labels.to(device), self.failed)


def product_mean(values: torch.Tensor, owner: torch.Tensor, n_products: int) -> torch.Tensor:
    """Per-image ``values [N, K]`` -> per-product means ``[P, K]`` (``owner [N]``; zeros for imageless products)."""
    counts = torch.bincount(owner, minlength=n_products).clamp(min=1).unsqueeze(1)
    return torch.zeros(n_products, values.shape[1], device=values.device, dtype=values.dtype).index_add_(
        0, owner, values) / counts


class ProductDataset(Dataset):
    """Whole products (all decodable images, resized), for validation, embedding and prediction."""

    def __init__(self, reader: RecordReader, rows: np.ndarray, size: int, labels: np.ndarray | None = None) -> None:
        self.reader, self.rows, self.size = reader, np.asarray(rows, np.int64), size
        self.labels = labels if labels is not None else np.full(len(self.rows), -1, np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int, int, int]:
        prod = self.reader.read(int(self.rows[i]))
        imgs, failed = [], 0
        for j, pic in enumerate(prod.images):
            try:
                imgs.append(to_model_input(decode_image(pic, min_size=self.size), self.size, train=False))
            except ImageDecodeError as e:
                failed += 1
                log.warning("%s, product _id %d, image %d skipped: %s", self.reader.path, prod.product_id, j, e)
        return imgs, int(self.rows[i]), int(self.labels[i]), failed


def collate_products(items: list) -> ProductBatch:
    imgs = [im for it in items for im in it[0]]
    owner = torch.tensor([k for k, it in enumerate(items) for _ in it[0]], dtype=torch.long)
    size = items[0][0][0].shape[-1] if imgs else 1
    images = torch.stack(imgs) if imgs else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return ProductBatch(images, owner, torch.tensor([it[1] for it in items]), torch.tensor([it[2] for it in items]),
                        torch.tensor([it[3] for it in items]))


def product_loader(dataset: ProductDataset, batch_images: int, workers: int, shuffle: bool = False) -> DataLoader:
    """Batches of about ``batch_images`` images (products average ~1.75 images)."""
    return DataLoader(dataset, batch_size=max(1, batch_images * 4 // 7), shuffle=shuffle, num_workers=workers,
                      collate_fn=collate_products, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())


# ---- the split ------------------------------------------------------------------------------------

def make_split(labels: np.ndarray, val_fraction: float, seed: int, min_per_class: int = 5) -> np.ndarray:
    """Boolean ``[N]`` mask of validation products: stratified by class for classes with at least
    ``min_per_class`` products (smaller classes stay in training), deterministic by seed."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val fraction must be in [0, 1), got {val_fraction}")
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


@dataclass(frozen=True)
class DataConfig:
    """Where training data comes from and how it is split and loaded."""

    train_path: str
    categories_csv: str | None = None
    val_fraction: float = 0.05
    seed: int = 0
    batch_size: int = 64
    workers: int = 2
    hier: bool = False


class CdiscountDataModule(pl.LightningDataModule):
    """Reads the offset table, the category table and the product split (saved in ``run_dir``)."""

    def __init__(self, cfg: DataConfig, run_dir: str | Path, image_size: int) -> None:
        super().__init__()
        self.cfg, self.run_dir, self.image_size = cfg, Path(run_dir), image_size
        self.table = load_offsets(cfg.train_path)
        if len(self.table) == 0:
            raise ValueError(f"{cfg.train_path}: empty training set (no products)")
        labelled = self.table["category_id"] >= 0
        if not labelled.any():
            raise ValueError(f"{cfg.train_path}: no product has a category_id (is this a test file?)")
        self.categories = (CategoryTable.from_csv(cfg.categories_csv) if cfg.categories_csv
                           else CategoryTable.from_ids(self.table["category_id"]))
        self.labelled_rows = np.flatnonzero(labelled)
        self.labels = self.categories.encode(self.table["category_id"][labelled], self.table["product_id"][labelled],
                                             source=cfg.train_path)
        if int(self.table["n_images"][self.labelled_rows].sum()) == 0:
            raise ValueError(f"{cfg.train_path}: empty training set (no images)")
        self.train_rows, self.val_rows = self._split()
        self.reader = RecordReader(cfg.train_path, self.table)

    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        path = self.run_dir / "split.npz"
        fp = json.dumps({**file_fingerprint(self.cfg.train_path), "val_fraction": self.cfg.val_fraction,
                         "seed": self.cfg.seed})
        if path.exists():
            z = np.load(path)
            if str(z["fingerprint"]) == fp:
                return z["train_rows"], z["val_rows"]
            log.warning("%s was made for other data or settings; making a new split", path)
        val = make_split(self.labels, self.cfg.val_fraction, self.cfg.seed)
        train_rows, val_rows = self.labelled_rows[~val], self.labelled_rows[val]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        np.savez(path, train_rows=train_rows, val_rows=val_rows, fingerprint=fp,
                 train_ids=self.table["product_id"][train_rows], val_ids=self.table["product_id"][val_rows])
        return train_rows, val_rows

    def class_of(self, rows: np.ndarray) -> np.ndarray:
        return self.categories.encode(self.table["category_id"][rows])

    def train_dataloader(self) -> DataLoader:
        l1, l2 = self.categories.parents() if self.cfg.hier else (None, None)
        ds = ImageDataset(self.reader, self.train_rows, self.class_of(self.train_rows), self.image_size, l1, l2)
        return DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=True, num_workers=self.cfg.workers,
                          drop_last=len(ds) > self.cfg.batch_size, persistent_workers=self.cfg.workers > 0,
                          pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader | list:
        if len(self.val_rows) == 0:
            return []
        ds = ProductDataset(self.reader, self.val_rows, self.image_size, self.class_of(self.val_rows))
        return product_loader(ds, self.cfg.batch_size, self.cfg.workers)
