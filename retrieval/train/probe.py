"""Linear probe, then fine-tune (LP-FT): the new layers learn on cached frozen features before the backbone moves.

Fine-tuning from a random head sends large, noisy gradients into a pretrained backbone and distorts its
features (Kumar et al., ICLR 2022). Here the pooled features of the frozen backbone are computed once for a
sample of training images (no augmentation), the neck and heads are fitted on them in seconds, and fine-tuning
starts from a head that is already as good as a linear probe. The same cached features give the two frozen
baselines a user compares the fine-tuned model with: a kNN and the probe itself, on validation products.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from index import knn_vote

from ..data.datasets import ProductDataset, product_loader
from ..data.offsets import RecordReader
from ..model.network import EmbeddingNet, product_mean
from ..model.runtime import autocast_for, device_of
from .config import LossSettings, TrainConfig
from .losses import MetricLoss, log_prior

log = logging.getLogger(__name__)
KNN_K, KNN_TAU = 20, 0.05  # the frozen kNN baseline's vote (DINO's recipe; fixed, not tuned)
BASELINE_EPOCHS = 30  # epochs of the linear probe reported as a baseline when LP-FT itself is off
PROBE_BATCH = 256  # cached features per step of the probe


@dataclass(frozen=True)
class FrozenBaseline:
    """Validation product accuracy of the frozen backbone: a cosine kNN over training products and the linear
    probe (the new layers fitted on frozen features); None without validation products."""

    knn: float | None
    linear_probe: float | None
    train_images: int
    val_products: int
    lp_epochs: int = 0  # the LP step kept in the model before fine-tuning (0: the probe was fitted for this only)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Features:
    """Pooled frozen features per image ``x [N, F]``, the image's class ``y [N]`` and product ``owner [N]``."""

    x: torch.Tensor
    y: torch.Tensor
    owner: torch.Tensor
    n_products: int


@torch.no_grad()
def frozen_features(net: EmbeddingNet, reader: RecordReader, rows: np.ndarray, labels: np.ndarray,
                    batch_images: int = 128, workers: int = 2) -> Features:
    """Pooled backbone features of every decodable image of ``rows`` (labels ``[len(rows)]``), no augmentation."""
    was_training = net.training
    net.eval()
    dev = device_of(net)
    xs, ys, owners, done = [], [], [], 0
    ds = ProductDataset(reader, rows, net.cfg.image_size, labels)
    for b in product_loader(ds, batch_images, workers):
        if len(b.images):
            with autocast_for(dev):
                xs.append(net.pooled(b.images.to(dev)).float().cpu())
            ys.append(b.labels[b.owner])
            owners.append(b.owner + done)
        done += len(b.rows)
    net.train(was_training)
    if not xs:
        return Features(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), done)
    return Features(torch.cat(xs), torch.cat(ys), torch.cat(owners), done)


def fit_new_layers(net: EmbeddingNet, feats: Features, loss_cfg: LossSettings, epochs: int, lr: float = 1e-3,
                   seed: int = 0, adjust: torch.Tensor | None = None) -> float:
    """Fit the neck and the class head on cached features (the backbone untouched): AdamW with cosine decay,
    cross-entropy (label smoothing) on the batch-normalised feature plus the metric loss before it.
    ``adjust [C]`` (the logit adjustment, as fine-tuning uses it) is added to the logits of the loss.
    Batches of :data:`PROBE_BATCH` features. Returns the last epoch's training accuracy."""
    dev, batch_size = device_of(net), PROBE_BATCH
    layers = [net.proj, net.head]
    params = [p for m in layers for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    metric = MetricLoss(loss_cfg, net.cfg.n_classes, net.cfg.embed_dim).to(dev)
    opt.add_param_group({"params": list(metric.parameters()), "lr": lr})
    n = len(feats.x)
    steps = max(1, epochs * math.ceil(n / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    g = torch.Generator().manual_seed(seed)
    for m in layers:
        m.train()
    correct = 0
    for _ in range(epochs):
        correct = 0
        for idx in torch.randperm(n, generator=g).split(batch_size):
            if len(idx) < 2:
                continue
            x, y = feats.x[idx].to(dev), feats.y[idx].to(dev)
            f, z = net.neck(x)
            logits = net.head(z).float()
            if adjust is not None:
                logits = logits + adjust.to(dev)
            loss = F.cross_entropy(logits, y, label_smoothing=loss_cfg.label_smoothing)
            loss = loss + loss_cfg.metric_weight * metric(F.normalize(f.float(), dim=-1), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == y).sum())
    acc = correct / max(1, n)
    log.info("linear probe: new layers fitted on %d cached frozen features, %d epochs (train accuracy %.3f)",
             n, epochs, acc)
    return acc


@torch.no_grad()
def frozen_baseline(net: EmbeddingNet, train: Features, val: Features, val_labels: np.ndarray,
                    adjust: torch.Tensor | None = None) -> FrozenBaseline:
    """kNN (k 20, tau 0.05, cosine over training products' mean features) and the fitted probe's head (mean
    of image probabilities, with the prior ``adjust [C]`` given back to a logit-adjusted head), as validation
    product accuracy on products that have a decodable image."""
    if val.n_products == 0 or len(val.x) == 0 or len(train.x) == 0:
        return FrozenBaseline(None, None, len(train.x), val.n_products)
    y = torch.as_tensor(val_labels)
    has = torch.bincount(val.owner, minlength=val.n_products) > 0
    tr = F.normalize(product_mean(F.normalize(train.x, dim=-1), train.owner, train.n_products), dim=-1)
    tr_y = torch.full((train.n_products,), -1, dtype=torch.long).index_copy_(0, train.owner, train.y)
    q = F.normalize(product_mean(F.normalize(val.x, dim=-1), val.owner, val.n_products), dim=-1)
    hits = 0
    for lo in range(0, len(q), 1024):  # blocks of queries: never a dense [val, train] matrix of the whole set
        sims, pos = (q[lo:lo + 1024] @ tr.T).topk(min(KNN_K, len(tr)), dim=1)
        votes = torch.from_numpy(knn_vote(sims.numpy(), tr_y[pos].numpy(), net.cfg.n_classes, KNN_TAU))
        hits += int(((votes.argmax(1) == y[lo:lo + 1024]) & has[lo:lo + 1024]).sum())
    knn = hits / max(1, int(has.sum()))
    was_training = net.training
    net.eval()
    dev = device_of(net)
    shift = 0.0 if adjust is None else adjust.to(dev)
    probs = torch.cat([(net.head(net.neck(x.to(dev))[1]).float() + shift).softmax(-1).cpu() for x in val.x.split(4096)])
    net.train(was_training)
    lp = float(((product_mean(probs, val.owner, val.n_products).argmax(1) == y) & has).sum()) / max(1, int(has.sum()))
    return FrozenBaseline(float(knn), lp, len(train.x), val.n_products)


def sample_rows(rows: np.ndarray, n_images: np.ndarray, max_images: int, seed: int) -> np.ndarray:
    """Rows of a random subset of products holding about ``max_images`` images (all when fewer), sorted."""
    if n_images.sum() <= max_images:
        return rows
    keep = max(1, int(len(rows) * max_images / max(1, int(n_images.sum()))))
    return np.sort(np.random.default_rng(seed).choice(rows, keep, replace=False))


def linear_probe_warm_start(net: EmbeddingNet, reader: RecordReader, train_split: tuple[np.ndarray, np.ndarray],
                            val_split: tuple[np.ndarray, np.ndarray], cfg: TrainConfig, lp_epochs: int
                            ) -> FrozenBaseline:
    """The frozen baselines (kNN and linear probe over the frozen features of at most ``lp_max_images`` training
    images; ``train_split`` and ``val_split``: ``(offset-table rows, classes)``) and, with ``lp_epochs`` > 0, the
    LP step of LP-FT: the fitted new layers stay in ``net``. With LP-FT off the probe is fitted for the report
    only and the new layers are put back as they were."""
    (train_rows, train_labels), (val_rows, val_labels) = train_split, val_split
    epochs, max_images = lp_epochs, cfg.schedule.lp_max_images
    loss_cfg, workers, seed = cfg.loss, cfg.data.workers, cfg.data.seed
    n_img = reader.table["n_images"]
    pick = sample_rows(np.arange(len(train_rows)), n_img[train_rows], max_images, seed)
    vpick = sample_rows(np.arange(len(val_rows)), n_img[val_rows], max(1, max_images // 4), seed)
    train = frozen_features(net, reader, train_rows[pick], train_labels[pick], workers=workers)
    val = frozen_features(net, reader, val_rows[vpick], val_labels[vpick], workers=workers)
    before = {k: v.clone() for k, v in net.proj.state_dict().items()}, \
        {k: v.clone() for k, v in net.head.state_dict().items()}
    adjust = None
    if loss_cfg.logit_adjust > 0:
        adjust = log_prior(np.bincount(train_labels[train_labels >= 0], minlength=net.cfg.n_classes),
                           loss_cfg.logit_adjust)
    fit_new_layers(net, train, loss_cfg, epochs or BASELINE_EPOCHS, seed=seed, adjust=adjust)
    base = replace(frozen_baseline(net, train, val, val_labels[vpick], adjust), lp_epochs=epochs)
    if not epochs:
        net.proj.load_state_dict(before[0])
        net.head.load_state_dict(before[1])
    if base.knn is not None:
        log.info("frozen backbone on %d validation products: kNN %.4f, linear probe %.4f", base.val_products,
                 base.knn, base.linear_probe)
    return base

