"""The Lightning DataModule: offset table, category table, the saved product split and the loaders."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ..data.categories import CategoryTable
from ..data.datasets import Augment, ImageDataset, ProductDataset, make_split, product_loader
from ..data.offsets import RecordReader, file_fingerprint, load_offsets
from ..errors import UserError
from ..model.runtime import is_first_rank
from ..rundir import RunDir, Split
from .config import DataSettings
from .sampler import MPerClassSampler

log = logging.getLogger(__name__)


class CdiscountDataModule(pl.LightningDataModule):
    """Reads ``train_path``'s offset table and categories; the product split is saved in the run folder."""

    def __init__(self, train_path: str, categories_csv: str | None, cfg: DataSettings, run: RunDir,
                 image_size: int, hier: bool = False) -> None:
        super().__init__()
        self.train_path, self.cfg, self.run, self.image_size, self.hier = train_path, cfg, run, image_size, hier
        self.table = load_offsets(train_path)
        if len(self.table) == 0:
            raise UserError(f"{train_path}: empty training set (no products)")
        labelled = self.table["category_id"] >= 0
        if not labelled.any():
            raise UserError(f"{train_path}: no product has a category_id (is this a test file?)")
        self.unlabelled = int((~labelled).sum())
        if self.unlabelled:
            log.warning("%s: %d of %d products have no category_id and are left out of training",
                        train_path, self.unlabelled, len(self.table))
        self.categories = (CategoryTable.from_csv(categories_csv) if categories_csv
                           else CategoryTable.from_ids(self.table["category_id"]))
        self.labelled_rows = np.flatnonzero(labelled)
        self.labels = self.categories.encode(self.table["category_id"][labelled], self.table["product_id"][labelled],
                                             source=train_path)
        if int(self.table["n_images"][self.labelled_rows].sum()) == 0:
            raise UserError(f"{train_path}: empty training set (no images)")
        self.train_rows, self.val_rows = self._split()
        self.reader = RecordReader(train_path, self.table)

    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        fp = json.dumps({**file_fingerprint(self.train_path), "val_fraction": self.cfg.val_fraction,
                         "seed": self.cfg.seed})
        saved = self.run.read_split()
        if saved is not None and saved.fingerprint == fp:
            return saved.train_rows, saved.val_rows
        if not is_first_rank():  # rank 0 writes the split before Lightning starts the other ranks
            raise UserError(f"{self.run.split_file}: no split for this data on a rank other than 0 "
                            "(was the run folder changed while training started?)")
        if saved is not None:
            log.warning("%s was made for other data or settings; making a new split", self.run.split_file)
        val = make_split(self.labels, self.cfg.val_fraction, self.cfg.seed)
        split = Split(self.labelled_rows[~val], self.labelled_rows[val], fp)
        self.run.write_split(split, self.table["product_id"])
        return split.train_rows, split.val_rows

    def class_of(self, rows: np.ndarray) -> np.ndarray:
        return self.categories.encode(self.table["category_id"][rows])

    def train_dataloader(self) -> DataLoader:
        l1, l2 = self.categories.parents() if self.hier else (None, None)
        ds = ImageDataset(self.reader, self.train_rows, self.class_of(self.train_rows), self.image_size, l1, l2,
                          Augment(self.cfg.crop_min, self.cfg.colour_aug))
        common = dict(num_workers=self.cfg.workers, persistent_workers=self.cfg.workers > 0,
                      pin_memory=torch.cuda.is_available())
        if self.cfg.m_per_class > 0:
            sampler = MPerClassSampler(ds.labels, self.cfg.m_per_class, self.cfg.seed)
            return DataLoader(ds, batch_size=self.cfg.batch_size, sampler=sampler,
                              drop_last=len(sampler) > self.cfg.batch_size, **common)
        return DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=True,
                          drop_last=len(ds) > self.cfg.batch_size, **common)

    def val_dataloader(self) -> DataLoader | list:
        if len(self.val_rows) == 0:
            return []
        ds = ProductDataset(self.reader, self.val_rows, self.image_size, self.class_of(self.val_rows))
        return product_loader(ds, self.cfg.batch_size, self.cfg.workers)
