"""Embedding across devices and nodes with Lightning (``Trainer.predict`` under DDP).

Work is cut into numbered parts (the same parts a one-process run writes, so resuming works per part).
Each rank embeds every ``world``-th unfinished part and hands each finished part to ``on_part`` on that
rank (a prediction-writer callback), which writes it; after a barrier, global rank 0 merges. With the
``ddp`` strategy Lightning starts the other local ranks by running the same command again, so everything
before :func:`embed_parts` runs on every rank: it must only read, or write what every rank writes alike.
Imported only when more than one device or node is asked for: serving stays free of Lightning.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Sampler

from ...data.datasets import ProductDataset, collate_products
from ...data.offsets import RecordReader
from ...model.network import EmbeddingNet
from .embed import ProductOutputs, batch_outputs

if TYPE_CHECKING:
    from .embed import LoaderSettings

log = logging.getLogger(__name__)
OnPart = Callable[[int, list[ProductOutputs]], None]


class PartBatches(Sampler):
    """Batches of dataset indices, at most ``size`` each, that never cross a part boundary (one empty batch
    when there is nothing to do)."""

    def __init__(self, part_sizes: list[int], size: int) -> None:
        self.part_sizes, self.size = part_sizes, max(1, size)

    def __iter__(self) -> Iterator[list[int]]:
        if not any(self.part_sizes):  # a rank with no work still runs one (empty) batch: DDP needs every rank
            yield []
        start = 0
        for n in self.part_sizes:
            for lo in range(0, n, self.size):
                yield list(range(start + lo, start + min(n, lo + self.size)))
            start += n

    def __len__(self) -> int:
        return max(1, sum((n + self.size - 1) // self.size for n in self.part_sizes))


class _Embedder(pl.LightningModule):
    """Wraps the network for ``Trainer.predict``; each rank's loader holds only its own parts."""

    def __init__(self, net: EmbeddingNet, reader: RecordReader, parts: list[tuple[int, np.ndarray]],
                 batch_images: int, workers: int, mirror: bool, keep_probs: bool) -> None:
        super().__init__()
        self.net, self.reader, self.parts = net, reader, parts
        self.batch_images, self.workers, self.mirror, self.keep_probs = batch_images, workers, mirror, keep_probs
        self.mine: list[tuple[int, np.ndarray]] = []

    def predict_dataloader(self) -> DataLoader:
        self.mine = self.parts[self.global_rank::self.trainer.world_size]
        rows = np.concatenate([r for _, r in self.mine]) if self.mine else np.zeros(0, np.int64)
        sampler = PartBatches([len(r) for _, r in self.mine], max(1, self.batch_images * 4 // 7))
        return DataLoader(ProductDataset(self.reader, rows, self.net.cfg.image_size), batch_sampler=sampler,
                          num_workers=self.workers, collate_fn=collate_products, persistent_workers=False,
                          pin_memory=torch.cuda.is_available())

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch  # embed_images moves the pictures itself

    def predict_step(self, batch, batch_idx: int) -> ProductOutputs:
        out = batch_outputs(self.net, batch, self.mirror)
        return out if self.keep_probs else replace(out, probs=np.zeros((len(out.rows), 0), np.float32))


class _PartWriter(BasePredictionWriter):
    """Collects a rank's batch outputs and hands over each part once all its products are in."""

    def __init__(self, on_part: OnPart) -> None:
        super().__init__(write_interval="batch")
        self.on_part, self.k, self.outs, self.filled = on_part, 0, [], 0

    def write_on_batch_end(self, trainer, pl_module: _Embedder, prediction: ProductOutputs, batch_indices, batch,
                           batch_idx: int, dataloader_idx: int = 0) -> None:
        if len(prediction.rows) == 0:  # the empty batch of a rank without parts
            return
        self.outs.append(prediction)
        self.filled += len(prediction.rows)
        part, rows = pl_module.mine[self.k]
        if self.filled == len(rows):
            self.on_part(part, self.outs)
            self.k, self.outs, self.filled = self.k + 1, [], 0


def embed_parts(net: EmbeddingNet, reader: RecordReader, parts: list[tuple[int, np.ndarray]], on_part: OnPart,
                loader: "LoaderSettings", mirror: bool = False, keep_probs: bool = True) -> bool:
    """Embed ``parts`` (part number, offset-table rows) over ``loader.where``; ``on_part(part, outputs)`` runs on the
    rank that embedded the part (head probabilities ``[P, C]`` only with ``keep_probs``), with ``loader``'s
    batch size, workers and devices. Returns True on global rank 0, after every rank has finished."""
    where, batch_images, workers = loader.where, loader.batch_size, loader.workers
    ddp = where.distributed
    trainer = pl.Trainer(accelerator=where.accelerator, devices=where.for_lightning, num_nodes=where.num_nodes,
                         strategy="ddp" if ddp else "auto", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=True, use_distributed_sampler=False,
                         callbacks=[_PartWriter(on_part)], precision="32-true")
    net.eval()
    trainer.predict(_Embedder(net, reader, parts, batch_images, workers, mirror, keep_probs),
                    return_predictions=False)
    trainer.strategy.barrier("parts written")
    log.info("rank %d of %d: embedded %d parts", trainer.global_rank, trainer.world_size,
             len(parts[trainer.global_rank::trainer.world_size]))
    return trainer.is_global_zero
