"""The exported model file: model config + category table + weights, loadable with ``weights_only=True``.

``train`` writes it next to its Lightning checkpoints; build-index, predict and similar read only this file
(no optimizer state, no pickled objects), hashing its bytes once as they are read.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.categories import CategoryTable
from ..durable import write_atomic
from ..errors import UserError
from .config import ModelConfig
from .network import EmbeddingNet

FORMAT = "cdiscount-model"
VERSION = 1


@dataclass
class LoadedModel:
    """A network rebuilt from a model file, with its category table, metadata and the file's sha256."""

    net: EmbeddingNet
    categories: CategoryTable
    info: dict
    sha256: str
    path: Path


def save_model_file(path: str | Path, net: EmbeddingNet, categories: CategoryTable, info: dict | None = None) -> Path:
    """Write ``net``'s weights with its config and ``categories`` (atomically)."""
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, "model_config": net.cfg.to_dict(),
               "categories": categories.to_dict(), "info": dict(info or {}),
               "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
    return write_atomic(path, lambda f: torch.save(payload, f))


def net_from_state(model_config: dict, state: dict[str, torch.Tensor]) -> EmbeddingNet:
    """Rebuild the network (eval mode, channels_last) from a saved config dict and its weights."""
    cfg = ModelConfig.from_dict(model_config)
    net = EmbeddingNet(ModelConfig(**{**cfg.to_dict(), "pretrained": None}), keep_normalisation=True)
    net.load_state_dict(state)
    return net.eval().to(memory_format=torch.channels_last)


def load_model_file(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Read a model file once: hash its bytes, load them with ``weights_only=True``, rebuild the network."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such model file (train writes RUN/model.pt)")
    data = p.read_bytes()
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{p}: not a readable model file ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{p}: not a model file of this project")
    if payload.get("version") != VERSION:
        raise UserError(f"{p}: model file version {payload.get('version')}, this code reads version {VERSION}")
    net = net_from_state(payload["model_config"], payload["state_dict"]).to(device)
    return LoadedModel(net, CategoryTable.from_dict(payload["categories"]), payload.get("info", {}),
                       hashlib.sha256(data).hexdigest(), p)
