"""The run folder and every file in it, owned in one place (train writes it; serve reads it)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .durable import read_json, write_atomic, write_json
from .errors import UserError


@dataclass(frozen=True)
class Split:
    """Offset-table rows of the training and validation products, and what the split was made from."""

    train_rows: np.ndarray
    val_rows: np.ndarray
    fingerprint: str


@dataclass(frozen=True)
class RunDir:
    """``RUN/``: run_config.json, categories.json, split.npz, checkpoints/, model.pt, calibration.json,
    frozen_baseline.json, logs/ (and onnx/, the ONNX Runtime exports of model.pt)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config_file(self) -> Path:
        return self.path / "run_config.json"

    @property
    def categories_file(self) -> Path:
        return self.path / "categories.json"

    @property
    def split_file(self) -> Path:
        return self.path / "split.npz"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def model_file(self) -> Path:
        return self.path / "model.pt"

    @property
    def calibration_file(self) -> Path:
        return self.path / "calibration.json"

    @property
    def frozen_baseline_file(self) -> Path:
        return self.path / "frozen_baseline.json"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def model(self) -> Path:
        """The exported model file; an error says to train first."""
        if not self.model_file.exists():
            raise FileNotFoundError(f"{self.path}: no model.pt (not a finished run; run `train` first)")
        return self.model_file

    def read_config(self) -> dict:
        """``run_config.json`` (one line naming it when missing, damaged or foreign)."""
        return read_json(self.config_file, "run config", "not a run folder, or a damaged one: train again into a "
                         "new --out")

    def train_config(self):  # -> TrainConfig (train.config imports this module)
        """The run's training settings, checked (unknown keys refused naming the file)."""
        from .train.config import TrainConfig
        cfg = self.read_config()
        if "train" not in cfg:
            raise UserError(f"{self.config_file}: damaged run config (no training settings)")
        return TrainConfig.from_dict(cfg["train"], self.config_file)

    def write_config(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.config_file, config, indent=1)

    def read_split(self) -> Split | None:
        if not self.split_file.exists():
            return None
        with np.load(self.split_file) as z:
            return Split(z["train_rows"], z["val_rows"], str(z["fingerprint"]))

    def write_split(self, split: Split, product_ids: np.ndarray) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.split_file, lambda f: np.savez(
            f, train_rows=split.train_rows, val_rows=split.val_rows, fingerprint=split.fingerprint,
            train_ids=product_ids[split.train_rows], val_ids=product_ids[split.val_rows]))

    def split(self) -> Split:
        s = self.read_split()
        if s is None:
            raise FileNotFoundError(f"{self.split_file}: the run has no split (train first)")
        return s

    def read_calibration(self) -> dict | None:
        """The fusion ``evaluate`` chose (rule, alpha, k, tau, beta, head temperature, learnt weights) and its peer
        propagation settings, or None before any evaluate."""
        if not self.calibration_file.exists():
            return None
        return read_json(self.calibration_file, "calibration", "delete it or rerun evaluate")

    def write_calibration(self, calibration: dict) -> None:
        write_json(self.calibration_file, calibration)

    def read_frozen_baseline(self) -> dict | None:
        """Validation accuracy of the frozen backbone (kNN, linear probe) that ``train`` measures before
        fine-tuning (with or without LP-FT), or None."""
        if not self.frozen_baseline_file.exists():
            return None
        return read_json(self.frozen_baseline_file, "frozen baseline", "delete it (train measures it again)")

    def write_frozen_baseline(self, baseline: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.frozen_baseline_file, baseline)
