"""Metric-learning losses by name (pytorch-metric-learning) and sampled softmax for large heads."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from torch import nn

from .config import LossSettings


class MetricLoss(nn.Module):
    """``loss(embeddings [B, D], labels [B]) -> scalar``; rows with label < 0 are ignored."""

    def __init__(self, cfg: LossSettings, n_classes: int, dim: int) -> None:
        super().__init__()
        self.name, self.miner, self.loss = cfg.metric_loss, None, None
        if cfg.metric_loss == "multisimilarity":
            self.loss = losses.MultiSimilarityLoss(alpha=cfg.ms_alpha, beta=cfg.ms_beta, base=cfg.ms_base)
            self.miner = miners.MultiSimilarityMiner(epsilon=cfg.ms_epsilon)
        elif cfg.metric_loss == "subcenter_arcface":
            self.loss = losses.SubCenterArcFaceLoss(num_classes=n_classes, embedding_size=dim,
                                                   margin=cfg.arcface_margin, scale=cfg.arcface_scale,
                                                   sub_centers=cfg.arcface_sub_centers)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        keep = labels >= 0
        if self.loss is None or keep.sum() < 2:
            return emb.sum() * 0.0
        emb, labels = emb[keep].float(), labels[keep]
        pairs = self.miner(emb, labels) if self.miner is not None else None
        return self.loss(emb, labels, pairs) if pairs is not None else self.loss(emb, labels)


def sampled_softmax_loss(z: torch.Tensor, head: nn.Linear, labels: torch.Tensor, n_negatives: int,
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the batch's classes plus ``n_negatives`` uniformly sampled ones.

    ``z [B, D]`` features, ``labels [B]`` (< 0 ignored). Cost is O(B x (classes in batch + negatives)).
    """
    keep = labels >= 0
    z, labels = z[keep], labels[keep]
    n_classes = head.out_features
    neg = torch.randint(0, n_classes, (n_negatives,), device=labels.device)
    sel = torch.unique(torch.cat([labels, neg]))  # sorted
    logits = F.linear(z, head.weight[sel], head.bias[sel])
    return F.cross_entropy(logits.float(), torch.searchsorted(sel, labels), label_smoothing=label_smoothing)
