"""The LightningModule: cross-entropy + metric loss, product-level validation, optimiser and schedule."""
from __future__ import annotations

import math

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ..data.categories import CategoryTable
from ..data.datasets import ProductBatch
from ..model.network import EmbeddingNet, product_mean
from .config import TrainConfig
from .losses import MetricLoss, log_prior, sampled_softmax_loss


class RetrievalModule(pl.LightningModule):
    """Cross-entropy (label smoothing) + lambda x metric loss; validation per image and per product."""

    def __init__(self, net: EmbeddingNet, cfg: TrainConfig, categories: CategoryTable, run_info: dict,
                 class_counts: np.ndarray | None = None) -> None:
        super().__init__()
        self.net, self.cfg, self.categories, self.run_info = net, cfg, categories, run_info
        self.metric = MetricLoss(cfg.loss, net.cfg.n_classes, net.cfg.embed_dim, class_counts)
        adjust = None
        if cfg.loss.logit_adjust > 0:
            if class_counts is None:
                raise ValueError("the logit-adjusted loss needs the training products per class")
            adjust = log_prior(class_counts, cfg.loss.logit_adjust)
        self.register_buffer("adjust", adjust, persistent=False)  # [C] or None

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, y, y1, y2 = batch
        loss_cfg = self.cfg.loss
        f, z = self.net.neck(self.net.pooled(images))  # BN-neck: metric loss before batch norm, CE after
        emb = F.normalize(f.float(), dim=-1)
        if loss_cfg.sampled_negatives > 0:
            ce = sampled_softmax_loss(z, self.net.head, y, loss_cfg.sampled_negatives, loss_cfg.label_smoothing,
                                      self.adjust)
        else:
            logits = self.net.head(z).float()
            ce = F.cross_entropy(logits if self.adjust is None else logits + self.adjust, y,
                                 label_smoothing=loss_cfg.label_smoothing, ignore_index=-100)
        loss = ce + loss_cfg.metric_weight * self.metric(emb, y)
        for head, target in ((self.net.head_l1, y1), (self.net.head_l2, y2)):
            if head is not None:
                loss = loss + loss_cfg.aux_weight * F.cross_entropy(head(z).float(), target, ignore_index=-100)
        self.log_dict({"train/loss": loss, "train/ce": ce}, prog_bar=True, on_step=True, on_epoch=True,
                      batch_size=len(y))
        return loss

    def validation_step(self, batch: ProductBatch, batch_idx: int) -> None:
        if len(batch.images) == 0:
            return
        _, logits, _ = self.net(batch.images)
        probs = logits.float().softmax(-1)
        y_img = batch.labels[batch.owner]
        has = torch.bincount(batch.owner, minlength=len(batch.labels)) > 0
        prod = product_mean(probs, batch.owner, len(batch.labels))
        acc_img = (probs.argmax(-1) == y_img).float().mean()
        acc_prod = (prod.argmax(-1) == batch.labels)[has].float().mean()
        self.log("val/image_acc", acc_img, batch_size=len(y_img), sync_dist=True, prog_bar=True)
        self.log("val/product_acc", acc_prod, batch_size=int(has.sum()), sync_dist=True, prog_bar=True)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch.to(device) if isinstance(batch, ProductBatch) else super().transfer_batch_to_device(
            batch, device, dataloader_idx)

    def configure_optimizers(self):
        s = self.cfg.schedule
        backbone = [p for p in self.net.backbone.parameters() if p.requires_grad]  # frozen stages stay out
        in_backbone = {id(p) for p in self.net.backbone.parameters()}
        groups = [{"params": [p for p in self.parameters() if id(p) not in in_backbone], "lr": s.lr},
                  {"params": backbone, "lr": s.lr * s.backbone_lr_mult}]  # new layers learn at the full rate
        opt = torch.optim.AdamW(groups, lr=s.lr, weight_decay=s.weight_decay)
        total = max(2, int(self.trainer.estimated_stepping_batches))
        warm = max(1, int(total * s.warmup_fraction))

        def factor(step: int) -> float:  # linear warm-up, cosine decay; a resumed longer run just extends it
            if step < warm:
                return (step + 1) / warm
            cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
            return s.min_lr_factor + (1 - s.min_lr_factor) * cos

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["model_config"] = self.net.cfg.to_dict()
        checkpoint["categories"] = self.categories.to_dict()
        checkpoint["run_info"] = self.run_info
