"""Metric-learning losses by name (pytorch-metric-learning) and sampled softmax for large heads."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from torch import nn

from .config import LossSettings


class ClassSizeSubCenterArcFace(losses.SubCenterArcFaceLoss):
    """SubCenterArcFace whose angular margin grows for rare classes (the dynamic margins of the Google Landmarks
    2020 winners): ``m_c`` is linear in ``n_c ** -0.25``, from ``margin_min`` for the largest training class to
    ``margin`` for the smallest (both in degrees)."""

    def __init__(self, counts: np.ndarray, margin_min: float, **kw) -> None:
        super().__init__(**kw)
        r = np.maximum(np.asarray(counts, np.float64), 1) ** -0.25
        t = (r - r.min()) / max(r.max() - r.min(), 1e-12)  # 0: largest class, 1: smallest
        lo = np.radians(margin_min)
        self.register_buffer("class_margin", torch.tensor(lo + t * (self.margin - lo), dtype=torch.float32),
                             persistent=False)
        self._m = None

    def compute_loss(self, embeddings, labels, *rest):
        self._m = self.class_margin.to(embeddings.device, embeddings.dtype)[labels]  # one per row, as targets are
        return super().compute_loss(embeddings, labels, *rest)

    def modify_cosine_of_target_classes(self, cosine_of_target_classes: torch.Tensor) -> torch.Tensor:
        m, angles = self._m, self.get_angles(cosine_of_target_classes)
        return torch.where(angles <= math.pi - m, torch.cos(angles + m), torch.cos(angles) - m * torch.sin(m))


class MetricLoss(nn.Module):
    """``loss(embeddings [B, D], labels [B]) -> scalar``; rows with label < 0 are ignored. ``class_counts [C]``
    (training products per class) is needed for class-size ArcFace margins."""

    def __init__(self, cfg: LossSettings, n_classes: int, dim: int, class_counts: np.ndarray | None = None) -> None:
        super().__init__()
        self.name, self.miner, self.loss = cfg.metric_loss, None, None
        if cfg.metric_loss == "multisimilarity":
            self.loss = losses.MultiSimilarityLoss(alpha=cfg.ms_alpha, beta=cfg.ms_beta, base=cfg.ms_base)
            self.miner = miners.MultiSimilarityMiner(epsilon=cfg.ms_epsilon)
        elif cfg.metric_loss == "subcenter_arcface":
            kw = dict(num_classes=n_classes, embedding_size=dim, margin=cfg.arcface_margin, scale=cfg.arcface_scale,
                      sub_centers=cfg.arcface_sub_centers)
            if cfg.arcface_margin_min > 0:
                if class_counts is None:
                    raise ValueError("class-size ArcFace margins need the training products per class")
                self.loss = ClassSizeSubCenterArcFace(class_counts, cfg.arcface_margin_min, **kw)
            else:
                self.loss = losses.SubCenterArcFaceLoss(**kw)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        keep = labels >= 0
        if self.loss is None or keep.sum() < 2:
            return emb.sum() * 0.0
        emb, labels = emb[keep].float(), labels[keep]
        pairs = self.miner(emb, labels) if self.miner is not None else None
        return self.loss(emb, labels, pairs) if pairs is not None else self.loss(emb, labels)


def log_prior(counts: np.ndarray, weight: float) -> torch.Tensor:
    """``weight x log(prior) [C]`` from training products per class ``counts [C]`` (a class without products counts
    as one): added to the logits in training, the logit-adjusted loss of Menon et al. (ICLR 2021) lets the head
    learn balanced scores, so a rare class is not outvoted by its prior."""
    c = np.maximum(np.asarray(counts, np.float64), 1.0)
    return torch.tensor(weight * np.log(c / c.sum()), dtype=torch.float32)


def sampled_softmax_loss(z: torch.Tensor, head: nn.Linear, labels: torch.Tensor, n_negatives: int,
                         label_smoothing: float = 0.0, adjust: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over the batch's classes plus ``n_negatives`` uniformly sampled ones.

    ``z [B, D]`` features, ``labels [B]`` (< 0 ignored), ``adjust [C]`` added to the logits.
    Cost is O(B x (classes in batch + negatives)).
    """
    keep = labels >= 0
    z, labels = z[keep], labels[keep]
    n_classes = head.out_features
    neg = torch.randint(0, n_classes, (n_negatives,), device=labels.device)
    sel = torch.unique(torch.cat([labels, neg]))  # sorted
    logits = F.linear(z, head.weight[sel], head.bias[sel])
    if adjust is not None:
        logits = logits + adjust[sel]
    return F.cross_entropy(logits.float(), torch.searchsorted(sel, labels), label_smoothing=label_smoothing)
