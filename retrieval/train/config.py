"""The training config, composed of model, data, loss and schedule parts; saved as ``run_config.json``.

Importable without torch or Lightning (the CLI builds its choices from :data:`METRIC_LOSSES` here).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..errors import UserError
from ..model.config import ModelConfig

METRIC_LOSSES = ("multisimilarity", "subcenter_arcface", "none")
DEFAULT_METRIC_LOSS = "multisimilarity"
# The fine-tuning recipe for a pretrained backbone: the defaults whenever ``pretrained`` is given (each value
# measured on real photos, one change at a time; README's "Fine-tuning recipe" has the table). A value the user
# gives wins. Without ``pretrained`` (random init, the tiny test tower) the plain defaults below hold.
PRETRAINED_RECIPE = {
    "image_size": 224,         # +3 points over 160 px on real photos (the towers were trained at 224)
    "freeze_blocks": 2,        # stem + 2 stages frozen: 1.4x faster steps on CPU, and no loss of accuracy
    "lp_epochs": -1,           # auto: LP-FT at budgets of at most 2 epochs (grocery, 128 px, 2 epochs: fused +4.8
    # points [+3.1, +6.4] paired), off above (at 6-8 epochs it measured 0 to 2 points worse: little left to learn)
    "lr": 1e-3,
    "backbone_lr_mult": 1.0,   # the backbone at the full rate (x0.1 cost 8 points on a held-out real set)
    "m_per_class": 0,          # plain shuffled batches (m-per-class sampling cost the same run points too)
    "warmup_fraction": 0.1,
    "crop_min": 0.35,
    "colour_aug": 0.3,
    "embed_dim": 256,
    "batch_size": 64,
    "epochs": 8,
    "metric_loss": "subcenter_arcface",  # +1.3 points fused over MultiSimilarity at 224 px, 8 epochs (one run each)
}


@dataclass(frozen=True)
class ModelSettings:
    """The network to train; a resumed run must keep these."""

    backbone: str = ModelConfig.backbone  # the model config's own defaults, spelled once
    pretrained: str | None = None
    image_size: int = ModelConfig.image_size
    embed_dim: int = ModelConfig.embed_dim
    hier_heads: bool = False  # auxiliary level-1/level-2 heads
    pool: str = ModelConfig.pool  # "avg" or "gem"


@dataclass(frozen=True)
class DataSettings:
    """Batching, the validation split and sampling."""

    batch_size: int = 64
    val_fraction: float = 0.05
    seed: int = 0
    workers: int = 2
    m_per_class: int = 0  # > 0: batches of classes with m images each (positive pairs for the metric loss)
    crop_min: float = 0.8  # random resized crop keeps this share of the area at least
    colour_aug: float = 0.0  # brightness/contrast/saturation factors in [1 - j, 1 + j]


@dataclass(frozen=True)
class LossSettings:
    """Cross-entropy (label smoothing) + ``metric_weight`` x metric loss (+ ``aux_weight`` x level heads)."""

    metric_loss: str = DEFAULT_METRIC_LOSS
    metric_weight: float = 0.5
    label_smoothing: float = 0.1
    aux_weight: float = 0.5
    sampled_negatives: int = 0  # > 0: sampled softmax with this many negatives instead of full softmax
    ms_alpha: float = 2.0       # MultiSimilarity loss and miner
    ms_beta: float = 50.0
    ms_base: float = 0.5
    ms_epsilon: float = 0.1
    arcface_margin: float = 28.6  # SubCenterArcFace (degrees)
    arcface_scale: float = 30.0
    arcface_sub_centers: int = 3
    arcface_margin_min: float = 0.0  # > 0: class-size margins, from this (largest class) to arcface_margin (smallest)
    logit_adjust: float = 0.0  # > 0: logit-adjusted cross-entropy (Menon et al. 2021), logits + this x log(prior)


@dataclass(frozen=True)
class ScheduleSettings:
    """AdamW, linear warm-up then cosine decay; the backbone may learn slower than the new layers."""

    lr: float = 2e-3
    backbone_lr_mult: float = 1.0  # < 1 for a pretrained backbone (e.g. 0.1)
    weight_decay: float = 0.02
    warmup_fraction: float = 0.05
    min_lr_factor: float = 0.02
    epochs: int = 5
    max_steps: int = -1
    checkpoint_every_steps: int = 0  # > 0: also save last.ckpt every N steps (an epoch can be hours)
    lp_epochs: int = 0  # > 0: LP-FT, the new layers first fitted this many epochs on cached frozen features;
    # -1 (auto): LP-FT with AUTO_LP_EPOCHS when the fine-tuning budget is short (see lp_epochs_for), else off
    lp_max_images: int = 50_000  # images whose frozen features the LP step caches (a random sample of products)
    freeze_blocks: int = 0  # stem + this many backbone stages stay frozen (no backward through them)
    frozen_baseline: bool = True  # with a pretrained backbone, measure kNN and linear probe on frozen features first


SHORT_BUDGET_EPOCHS = 2.0  # at most this many passes over the training set: the head starts from the probe
AUTO_LP_EPOCHS = 30


def lp_epochs_for(s: ScheduleSettings, steps_per_epoch: int) -> int:
    """The LP step's epochs: the given ones, or with ``lp_epochs = -1`` LP-FT where the budget (epochs, or
    ``max_steps`` in passes of ``steps_per_epoch``) is at most :data:`SHORT_BUDGET_EPOCHS`: a short fine-tune
    cannot move a random head far past a probe, a long one can (where LP-FT measured worse)."""
    if s.lp_epochs >= 0:
        return s.lp_epochs
    budget = s.epochs if s.max_steps < 0 else s.max_steps / max(1, steps_per_epoch)
    return AUTO_LP_EPOCHS if budget <= SHORT_BUDGET_EPOCHS else 0


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``train`` needs; parts are frozen dataclasses. ``build(**flat)`` sets fields by name."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    devices: int | str | tuple[int, ...] = "auto"  # a count, "auto" or device indices (model.runtime.parse_devices)
    num_nodes: int = 1
    accelerator: str = "auto"
    precision: str = "auto"

    PARTS = ("model", "data", "loss", "schedule")

    def __post_init__(self) -> None:
        if self.loss.metric_loss not in METRIC_LOSSES:
            raise UserError(f"unknown metric loss {self.loss.metric_loss!r}; valid: {', '.join(METRIC_LOSSES)}")
        if self.schedule.lp_epochs < -1:
            raise UserError(f"lp_epochs must be -1 (auto), 0 (off) or a number of epochs, got "
                            f"{self.schedule.lp_epochs}")
        if not 0 <= self.loss.arcface_margin_min <= self.loss.arcface_margin:
            raise UserError(f"arcface_margin_min must be in [0, arcface_margin = {self.loss.arcface_margin}], got "
                            f"{self.loss.arcface_margin_min}")

    @classmethod
    def build(cls, **flat) -> "TrainConfig":
        """A config from flat field names (``image_size=32, lr=1e-3, ...``), each routed to its part; with
        ``pretrained`` set, :data:`PRETRAINED_RECIPE` fills every setting not given."""
        recipe = PRETRAINED_RECIPE if flat.get("pretrained") else {}
        return cls().with_values(**{**recipe, **flat})

    def with_values(self, **flat) -> "TrainConfig":
        """A copy with flat field names replaced in whichever part owns them."""
        parts = {p: {} for p in self.PARTS}
        top = {}
        owner = {f.name: p for p in self.PARTS for f in fields(getattr(self, p))}
        for k, v in flat.items():
            if k in owner:
                parts[owner[k]][k] = v
            elif k in {f.name for f in fields(self)} and k not in self.PARTS:
                top[k] = v
            else:
                raise TypeError(f"TrainConfig has no setting {k!r}")
        return replace(self, **{p: replace(getattr(self, p), **parts[p]) for p in self.PARTS}, **top)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def flat_defaults(cls) -> dict:
        """Every setting by its flat name (as :meth:`build` takes them) with its default."""
        c = cls()
        top = {f.name: getattr(c, f.name) for f in fields(c) if f.name not in cls.PARTS}
        return {**{k: v for p in cls.PARTS for k, v in vars(getattr(c, p)).items()}, **top}

    @classmethod
    def parse_setting(cls, pair: str) -> tuple[str, object]:
        """``"NAME=VALUE"`` (any setting, by its flat name) as ``(name, value)`` of the default's type; a
        one-line error naming the valid settings otherwise."""
        name, sep, text = pair.partition("=")
        defaults = cls.flat_defaults()
        name = name.strip().replace("-", "_")
        if not sep or name not in defaults:
            raise UserError(f"--set {pair!r}: expected NAME=VALUE with NAME one of {', '.join(sorted(defaults))}")
        kind = type(defaults[name])
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                return name, text.lower() in ("true", "1", "yes")
            return name, text if kind is str or defaults[name] is None else kind(text)
        except ValueError:
            raise UserError(f"--set {pair!r}: {name} takes a {kind.__name__}") from None

    @classmethod
    def from_dict(cls, d: dict, source: str | Path = "a run config") -> "TrainConfig":
        """The config saved by :meth:`to_dict`; a key no part knows (a foreign or damaged file) is refused in one
        line naming ``source`` and the keys."""
        kinds = {"model": ModelSettings, "data": DataSettings, "loss": LossSettings, "schedule": ScheduleSettings}
        if not isinstance(d, dict) or not all(isinstance(d.get(k, {}), dict) for k in kinds):
            raise UserError(f"{source}: damaged training settings (not an object of {', '.join(kinds)})")
        if "colour_jitter" in d.get("data", {}):  # a run saved before the augmentation was named colour_aug
            d = {**d, "data": {("colour_aug" if k == "colour_jitter" else k): v for k, v in d["data"].items()}}
        known = {f.name for f in fields(cls)}
        unknown = [k for k in d if k not in known] + [f"{p}.{k}" for p, kind in kinds.items()
                                                      for k in d.get(p, {}) if k not in {f.name for f in fields(kind)}]
        if unknown:
            raise UserError(f"{source}: unknown training setting(s) {', '.join(unknown)} (a run config of another "
                            "version, or edited by hand?)")
        return cls(**{k: (kinds[k](**v) if k in kinds else v) for k, v in d.items()})
