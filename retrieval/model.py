"""The network: an open_clip image tower -> projection -> L2-normalised embedding, plus classification heads."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from .categories import CategoryTable

log = logging.getLogger(__name__)

open_clip.add_model_config(Path(__file__).with_name("model_configs"))
BACKBONES = ("tiny", "RN50", "RN101", "convnext_tiny", "convnext_small", "convnext_base")


def list_backbones() -> list[str]:
    """Backbone names :func:`create_backbone` accepts."""
    return list(BACKBONES)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; saved in every checkpoint."""

    backbone: str = "tiny"
    pretrained: str | None = None
    image_size: int = 64
    embed_dim: int = 512
    n_classes: int = 0
    n_level1: int = 0  # > 0 adds an auxiliary level-1 head
    n_level2: int = 0  # > 0 adds an auxiliary level-2 head
    mean: tuple[float, float, float] = field(default=tuple(OPENAI_DATASET_MEAN))
    std: tuple[float, float, float] = field(default=tuple(OPENAI_DATASET_STD))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


class _QuietOpenClip(logging.Filter):
    """Drops open_clip's chatter (logged on the root logger) while a tower is built without weights,
    e.g. "No pretrained weights loaded", which is misleading when a checkpoint's weights follow."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("open_clip" in record.pathname and record.levelno <= logging.WARNING)


def create_backbone(name: str, pretrained: str | None = None, image_size: int = 224
                    ) -> tuple[nn.Module, int, tuple, tuple]:
    """An open_clip image tower by name: ``(module, output dim, mean, std)``.

    ``pretrained`` is an open_clip tag (needs the network) or a local weights file.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")
    if image_size < 16:
        raise ValueError(f"image size {image_size} is too small (minimum 16)")
    quiet = _QuietOpenClip()
    if not pretrained:
        logging.getLogger().addFilter(quiet)
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None, force_image_size=image_size)
    except Exception as e:
        if not pretrained:
            raise
        tags = [t for m, t in open_clip.list_pretrained() if m == name]
        raise RuntimeError(
            f"could not load weights {pretrained!r} for backbone {name} ({type(e).__name__}: {e}). Known tags for "
            f"{name}: {', '.join(tags) or 'none'}. Without network access, download the weights file elsewhere and "
            f"pass its path: --pretrained /path/to/open_clip_{name}.bin") from e
    finally:
        logging.getLogger().removeFilter(quiet)
    visual = model.visual
    dim = int(open_clip.get_model_config(name)["embed_dim"])
    mean = tuple(getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN)
    std = tuple(getattr(visual, "image_std", None) or OPENAI_DATASET_STD)
    del model.transformer  # the text tower is not used
    return visual, dim, mean, std


class EmbeddingNet(nn.Module):
    """uint8 images ``[B, 3, H, W]`` -> (embedding ``[B, D]`` unit-norm, logits ``[B, C]``, aux logits)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.n_classes < 1:
            raise ValueError("the model needs at least one class")
        self.backbone, feat_dim, mean, std = create_backbone(cfg.backbone, cfg.pretrained, cfg.image_size)
        self.cfg = cfg if cfg.pretrained is None else replace(cfg, mean=mean, std=std)
        self.proj = nn.Sequential(nn.Linear(feat_dim, cfg.embed_dim), nn.BatchNorm1d(cfg.embed_dim))
        self.head = nn.Linear(cfg.embed_dim, cfg.n_classes)
        self.head_l1 = nn.Linear(cfg.embed_dim, cfg.n_level1) if cfg.n_level1 else None
        self.head_l2 = nn.Linear(cfg.embed_dim, cfg.n_level2) if cfg.n_level2 else None
        self.register_buffer("mean", torch.tensor(self.cfg.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(self.cfg.std).view(1, 3, 1, 1) * 255, persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` -> float normalised, channels_last."""
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-normalisation projected features ``[B, D]``."""
        return self.proj(self.backbone(self.normalise(images)).float())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        z = self.features(images)
        aux = {}
        if self.head_l1 is not None:
            aux["level1"] = self.head_l1(z)
        if self.head_l2 is not None:
            aux["level2"] = self.head_l2(z)
        return F.normalize(z.float(), dim=-1), self.head(z), aux


def net_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> tuple[EmbeddingNet, CategoryTable, dict]:
    """Rebuild the network from an already loaded checkpoint dict (see :func:`load_checkpoint`)."""
    if "model_config" not in ckpt or "categories" not in ckpt:
        raise ValueError(f"{source}: not a checkpoint of this project (no model_config/categories)")
    cfg = replace(ModelConfig.from_dict(ckpt["model_config"]), pretrained=None)
    net = EmbeddingNet(cfg)
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    net.eval().to(memory_format=torch.channels_last)
    return net, CategoryTable.from_dict(ckpt["categories"]), ckpt.get("run_info", {})


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> dict:
    """The raw checkpoint dict written by training."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such checkpoint")
    return torch.load(p, map_location=map_location, weights_only=False)


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[EmbeddingNet, CategoryTable, dict]:
    """Rebuild the network from a checkpoint written by training (no Lightning needed).

    Returns the network in eval mode, the category table and the checkpoint's extra metadata.
    """
    return net_from_checkpoint(read_checkpoint(path, map_location), str(path))
