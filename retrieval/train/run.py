"""Training a run: resolve the config (new or resumed), fit with Lightning (DDP when asked), export model.pt."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from ..data.offsets import file_fingerprint
from ..errors import UserError
from ..model.config import ModelConfig
from ..model.export import save_model_file
from ..model.network import EmbeddingNet
from ..model.registry import backbone_spec
from ..model.runtime import auto_precision, is_ddp, is_first_rank, lightning_devices
from ..rundir import RunDir
from .config import TrainConfig, lp_epochs_for
from .datamodule import CdiscountDataModule
from .module import RetrievalModule
from .probe import FrozenBaseline, linear_probe_warm_start

log = logging.getLogger(__name__)
RESUMABLE = ("epochs", "max_steps", "devices", "num_nodes", "workers", "checkpoint_every_steps")


@dataclass(frozen=True)
class TrainResult:
    """Where training left its files, the best validation product accuracy (None without validation)."""

    model_file: Path
    best: Path
    last: Path
    best_val_accuracy: float | None
    unlabelled: int
    module: RetrievalModule
    frozen: FrozenBaseline | None = None  # the frozen backbone's validation accuracy (pretrained runs)


def resolve_config(run_dir: str | Path, resume: bool, **given) -> TrainConfig:
    """The config for a new run (defaults + ``given``) or a resumed one (the saved config; only
    :data:`RESUMABLE` settings may change, any other given setting that differs is refused)."""
    if not resume:
        return TrainConfig.build(**given)
    run = RunDir(Path(run_dir))
    saved = run.train_config()
    flat = {k: v for part in TrainConfig.PARTS for k, v in getattr(saved, part).__dict__.items()}
    flat.update({k: getattr(saved, k) for k in ("devices", "num_nodes", "accelerator", "precision")})
    changed = {k: (flat[k], v) for k, v in given.items() if k not in RESUMABLE and k in flat and flat[k] != v}
    if changed:
        what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise UserError(f"{run.path}: cannot resume with other settings ({what}); resume without them, "
                        "or train into a new --out")
    return saved.with_values(**{k: v for k, v in given.items() if k in RESUMABLE})


def _checkpoint_callbacks(run: RunDir, cfg: TrainConfig, has_val: bool) -> list[ModelCheckpoint]:
    every = cfg.schedule.checkpoint_every_steps
    cbs = [ModelCheckpoint(dirpath=run.checkpoints, filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)]  # the newest state at each epoch end, for --resume
    if every > 0:  # and within an epoch, every N optimizer steps
        cbs.append(ModelCheckpoint(dirpath=run.checkpoints, filename="last", monitor=None, save_top_k=1,
                                   every_n_train_steps=every, save_on_train_epoch_end=False,
                                   enable_version_counter=False))
    if has_val:
        cbs.append(ModelCheckpoint(dirpath=run.checkpoints, filename="best", monitor="val/product_acc", mode="max",
                                   save_top_k=1, enable_version_counter=False))
    return cbs


def _export(run: RunDir, module: RetrievalModule, checkpoint: Path) -> Path:
    """Write ``model.pt`` (config + categories + weights only) from a Lightning checkpoint."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    module.net.load_state_dict({k[len("net."):]: v for k, v in state.items() if k.startswith("net.")})
    return save_model_file(run.model_file, module.net, module.categories, module.run_info)


def train(train_path: str | Path, run_dir: str | Path, cfg: TrainConfig, categories_csv: str | Path | None = None,
          resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or resume) a run in ``run_dir``; ends by exporting ``run_dir/model.pt`` from the best checkpoint."""
    run, train_path = RunDir(Path(run_dir)), Path(train_path)
    m = cfg.model
    backbone_spec(m.backbone)
    if not train_path.is_file():
        raise FileNotFoundError(f"{train_path}: no such training file")
    if resume:
        if not run.last_checkpoint.exists():
            raise FileNotFoundError(f"{run.last_checkpoint}: nothing to resume from")
        saved = run.read_config()
        if run.train_config().model != m:
            raise UserError(f"{run.path}: cannot resume with other model settings than the run was started with")
        categories_csv = saved["categories_csv"]
    elif run.last_checkpoint.exists():
        raise FileExistsError(f"{run.path} already holds a trained run; pass --resume or choose another --out")
    pl.seed_everything(cfg.data.seed, workers=True, verbose=False)
    dm = CdiscountDataModule(str(train_path), str(categories_csv) if categories_csv else None, cfg.data, run,
                             m.image_size, m.hier_heads)
    cats = dm.categories
    mcfg = ModelConfig(m.backbone, None if resume else m.pretrained, m.image_size, m.embed_dim, len(cats),
                       cats.n_level1 if m.hier_heads else 0, cats.n_level2 if m.hier_heads else 0, pool=m.pool)
    net = EmbeddingNet(mcfg).to(memory_format=torch.channels_last)
    run_info = {"train_file": file_fingerprint(train_path), "train_path": str(train_path.resolve()),
                "run_dir": str(run.path.resolve())}
    s = cfg.schedule
    frozen = None
    steps_per_epoch = max(1, len(dm.train_dataloader()))
    lp_epochs = lp_epochs_for(s, steps_per_epoch)
    if not resume and m.pretrained and (lp_epochs > 0 or s.frozen_baseline):
        frozen = _lp_step(net, dm, cfg, lp_epochs)
        if is_first_rank():
            run.write_frozen_baseline(frozen.to_dict())
    if s.freeze_blocks:
        log.info("backbone stem + %d stages frozen (%d tensors)", s.freeze_blocks, net.freeze_blocks(s.freeze_blocks))
    classes = dm.class_of(dm.train_rows)
    counts = np.bincount(classes[classes >= 0], minlength=len(cats))  # training products per class
    module = RetrievalModule(net, cfg, cats, run_info, counts)
    if is_first_rank():  # the other ranks Lightning starts run this function again: they only read
        run.write_config({"train": cfg.to_dict(), "categories_csv": str(categories_csv) if categories_csv else None,
                          "train_path": str(train_path.resolve())})
        cats.save(run.categories_file)
    has_val = len(dm.val_rows) > 0
    # with --max-steps, an epoch limit that is never the one reached (a resumed run may restart its epoch)
    epochs = s.epochs if s.max_steps < 0 else math.ceil(s.max_steps / steps_per_epoch) + 1
    # "auto" is left to Lightning's own strategy choice (one process here, DDP over several GPUs)
    ddp = cfg.devices != "auto" and is_ddp(cfg.devices, cfg.num_nodes) or cfg.num_nodes > 1
    trainer = pl.Trainer(
        default_root_dir=run.path, max_epochs=epochs, max_steps=s.max_steps,
        accelerator=cfg.accelerator, devices=lightning_devices(cfg.devices, cfg.accelerator), num_nodes=cfg.num_nodes,
        strategy="ddp" if ddp else "auto",
        precision=auto_precision() if cfg.precision == "auto" else cfg.precision,
        callbacks=_checkpoint_callbacks(run, cfg, has_val), logger=CSVLogger(run.path, name="logs", version=""),
        log_every_n_steps=10, enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=cfg.data.m_per_class == 0)
    trainer.fit(module, datamodule=dm, ckpt_path=str(run.last_checkpoint) if resume else None)
    best = run.best_checkpoint if run.best_checkpoint.exists() else run.last_checkpoint
    best_acc = None
    for cb in trainer.checkpoint_callbacks:
        if cb.monitor and cb.best_model_score is not None:
            best_acc = float(cb.best_model_score)
    if trainer.is_global_zero:
        _export(run, module, best)
    log.info("training done: model %s (from %s)", run.model_file, best)
    return TrainResult(run.model_file, best, run.last_checkpoint, best_acc, dm.unlabelled, module, frozen)


def _lp_step(net: EmbeddingNet, dm: CdiscountDataModule, cfg: TrainConfig, lp_epochs: int) -> FrozenBaseline:
    """The frozen baselines (and LP-FT's first step, ``lp_epochs`` > 0) on this rank's device; every rank
    computes the same."""
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    net.to(dev)
    try:
        return linear_probe_warm_start(net, dm.reader, (dm.train_rows, dm.class_of(dm.train_rows)),
                                       (dm.val_rows, dm.class_of(dm.val_rows)), cfg, lp_epochs)
    finally:
        net.to("cpu")
