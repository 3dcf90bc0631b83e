"""The model config: everything needed to rebuild the network, saved in every checkpoint and model file."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .registry import CLIP_MEAN, CLIP_STD


@dataclass(frozen=True)
class ModelConfig:
    """Backbone, input size, embedding size and heads; ``mean``/``std`` are the backbone's normalisation."""

    backbone: str = "tiny"
    pretrained: str | None = None
    image_size: int = 64
    embed_dim: int = 512
    n_classes: int = 0
    n_level1: int = 0  # > 0 adds an auxiliary level-1 head
    n_level2: int = 0  # > 0 adds an auxiliary level-2 head
    pool: str = "avg"  # "avg" or "gem" (generalised mean, p learnt from 3; timm towers only)
    mean: tuple[float, float, float] = field(default=CLIP_MEAN)
    std: tuple[float, float, float] = field(default=CLIP_STD)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        d.setdefault("pool", "avg")  # model files written before pooling was a setting
        return cls(**d)

    def architecture(self) -> dict:
        """The settings that decide the weights' shapes (a resumed run must keep them)."""
        return {k: getattr(self, k) for k in ("backbone", "image_size", "embed_dim", "n_classes", "n_level1",
                                              "n_level2", "pool")}
