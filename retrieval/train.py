"""Training with PyTorch Lightning: the LightningModule, the run folder, checkpoints and resume."""
from __future__ import annotations

import functools
import json
import math
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from .offsets import file_fingerprint
from .categories import CategoryTable
from .dataset import CdiscountDataModule, DataConfig, ProductBatch, product_mean
from .losses import DEFAULT_METRIC_LOSS, MetricLoss, sampled_softmax_loss
from .model import EmbeddingNet, ModelConfig, list_backbones

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; saved as ``run_config.json`` in the run folder."""

    backbone: str = "tiny"
    pretrained: str | None = None
    image_size: int = 64
    embed_dim: int = 512
    metric_loss: str = DEFAULT_METRIC_LOSS
    metric_weight: float = 0.5
    label_smoothing: float = 0.1
    hier_heads: bool = False
    sampled_negatives: int = 0  # > 0: sampled softmax with this many negatives instead of full softmax
    lr: float = 2e-3
    weight_decay: float = 0.02
    epochs: int = 5
    max_steps: int = -1
    batch_size: int = 64
    val_fraction: float = 0.05
    seed: int = 0
    workers: int = 2
    devices: int | str = "auto"
    num_nodes: int = 1
    accelerator: str = "auto"
    precision: str = "auto"


@functools.lru_cache(maxsize=1)
def auto_precision() -> str:
    """bf16 autocast where the device does bf16 fast (CUDA, or a CPU with AMX / AVX512-BF16), else fp32."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return "bf16-mixed" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "32-true"


class RetrievalModule(pl.LightningModule):
    """Cross-entropy (label smoothing) + lambda x metric loss; validation per image and per product."""

    def __init__(self, net: EmbeddingNet, cfg: TrainConfig, categories: CategoryTable, run_info: dict) -> None:
        super().__init__()
        self.net, self.cfg, self.categories, self.run_info = net, cfg, categories, run_info
        self.metric = MetricLoss(cfg.metric_loss, net.cfg.n_classes, net.cfg.embed_dim)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, y, y1, y2 = batch
        z = self.net.features(images)
        emb = F.normalize(z.float(), dim=-1)
        if self.cfg.sampled_negatives > 0:
            ce = sampled_softmax_loss(z, self.net.head, y, self.cfg.sampled_negatives, self.cfg.label_smoothing)
        else:
            ce = F.cross_entropy(self.net.head(z).float(), y, label_smoothing=self.cfg.label_smoothing,
                                 ignore_index=-100)
        loss = ce + self.cfg.metric_weight * self.metric(emb, y)
        for head, target in ((self.net.head_l1, y1), (self.net.head_l2, y2)):
            if head is not None:
                loss = loss + 0.5 * F.cross_entropy(head(z).float(), target, ignore_index=-100)
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
        opt = torch.optim.AdamW(self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        total = max(2, int(self.trainer.estimated_stepping_batches))
        warm = max(1, total // 20)

        def factor(step: int) -> float:  # linear warm-up, cosine decay; a resumed longer run just extends it
            if step < warm:
                return (step + 1) / warm
            return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["model_config"] = self.net.cfg.to_dict()
        checkpoint["categories"] = self.categories.to_dict()
        checkpoint["run_info"] = self.run_info


def _run_paths(run_dir: Path) -> dict[str, Path]:
    return {"config": run_dir / "run_config.json", "ckpt_dir": run_dir / "checkpoints",
            "last": run_dir / "checkpoints" / "last.ckpt", "best": run_dir / "checkpoints" / "best.ckpt"}


def best_checkpoint(run_dir: str | Path) -> Path:
    """The best checkpoint of a run (the last one where no validation ran)."""
    paths = _run_paths(Path(run_dir))
    for p in (paths["best"], paths["last"]):
        if p.exists():
            return p
    raise FileNotFoundError(f"{run_dir}: no checkpoint (checkpoints/best.ckpt or last.ckpt); train first")


@dataclass(frozen=True)
class TrainResult:
    """Where training left its checkpoints, and the trained module (as in ``last``)."""

    best: Path
    last: Path
    module: RetrievalModule


def train(train_path: str | Path, run_dir: str | Path, cfg: TrainConfig, categories_csv: str | Path | None = None,
          resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or resume) a run in ``run_dir``."""
    run_dir, train_path = Path(run_dir), Path(train_path)
    paths = _run_paths(run_dir)
    if cfg.backbone not in list_backbones():
        raise ValueError(f"unknown backbone {cfg.backbone!r}; valid backbones: {', '.join(list_backbones())}")
    if not train_path.is_file():
        raise FileNotFoundError(f"{train_path}: no such training file")
    if resume:
        if not paths["last"].exists():
            raise FileNotFoundError(f"{paths['last']}: nothing to resume from")
        saved = json.loads(paths["config"].read_text())
        cfg = replace(TrainConfig(**saved["train"]), epochs=cfg.epochs, max_steps=cfg.max_steps,
                      devices=cfg.devices, num_nodes=cfg.num_nodes, workers=cfg.workers)
        categories_csv = saved["categories_csv"]
    elif paths["last"].exists():
        raise FileExistsError(f"{run_dir} already holds a trained run; pass --resume or choose another --out")
    pl.seed_everything(cfg.seed, workers=True)
    dcfg = DataConfig(str(train_path), str(categories_csv) if categories_csv else None, cfg.val_fraction, cfg.seed,
                      cfg.batch_size, cfg.workers, cfg.hier_heads)
    dm = CdiscountDataModule(dcfg, run_dir, cfg.image_size)
    cats = dm.categories
    mcfg = ModelConfig(cfg.backbone, cfg.pretrained, cfg.image_size, cfg.embed_dim, len(cats),
                       cats.n_level1 if cfg.hier_heads else 0, cats.n_level2 if cfg.hier_heads else 0)
    net = EmbeddingNet(replace(mcfg, pretrained=None) if resume else mcfg).to(memory_format=torch.channels_last)
    run_info = {"train_file": file_fingerprint(train_path), "train_path": str(train_path.resolve()),
                "run_dir": str(run_dir.resolve())}
    module = RetrievalModule(net, cfg, cats, run_info)
    paths["config"].write_text(json.dumps({"train": asdict(cfg), "categories_csv": dcfg.categories_csv,
                                           "train_path": str(train_path.resolve())}, indent=1))
    cats.save(run_dir / "categories.json")
    has_val = len(dm.val_rows) > 0
    callbacks = [ModelCheckpoint(dirpath=paths["ckpt_dir"], filename="last", monitor=None, save_top_k=1,
                                 enable_version_counter=False)]  # always the newest state, for --resume
    if has_val:
        callbacks.append(ModelCheckpoint(dirpath=paths["ckpt_dir"], filename="best", monitor="val/product_acc",
                                         mode="max", save_top_k=1, enable_version_counter=False))
    trainer = pl.Trainer(
        default_root_dir=run_dir, max_epochs=cfg.epochs if cfg.max_steps < 0 else -1, max_steps=cfg.max_steps,
        accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
        strategy="ddp" if (cfg.num_nodes > 1 or (isinstance(cfg.devices, int) and cfg.devices > 1)) else "auto",
        precision=auto_precision() if cfg.precision == "auto" else cfg.precision,
        callbacks=callbacks, logger=CSVLogger(run_dir, name="logs", version=""), log_every_n_steps=10,
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm, ckpt_path=str(paths["last"]) if resume else None)
    best = best_checkpoint(run_dir)
    log.info("training done: best checkpoint %s", best)
    return TrainResult(best, paths["last"], module)
