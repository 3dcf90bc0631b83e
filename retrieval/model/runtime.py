"""Where and how the network runs: device choice, precision and autocast."""
from __future__ import annotations

import functools
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@functools.lru_cache(maxsize=1)
def auto_precision() -> str:
    """bf16 autocast where the device does bf16 fast (CUDA, or a CPU with AMX / AVX512-BF16), else fp32.

    Returned as a Lightning precision string: ``bf16-mixed``, ``16-mixed`` or ``32-true``.
    """
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return "bf16-mixed" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "32-true"


def best_device() -> torch.device:
    """The first GPU if there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_of(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


def autocast_for(device: torch.device):
    """bf16 autocast on devices where it is fast, else a no-op context."""
    if auto_precision() == "bf16-mixed" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def is_first_rank() -> bool:
    """False in a process that Lightning's launcher started as another rank (it must not discard or merge
    shared work); True in a plain process."""
    return all(os.environ.get(v, "0") == "0" for v in ("LOCAL_RANK", "NODE_RANK", "RANK"))


@dataclass(frozen=True)
class Devices:
    """Where serving work runs: Lightning's ``devices`` (a count or "auto"), ``num_nodes`` and ``accelerator``.
    The default, one device, runs in this process without Lightning."""

    devices: int | str = 1
    num_nodes: int = 1
    accelerator: str = "auto"

    @property
    def distributed(self) -> bool:
        return self.num_nodes > 1 or self.devices == "auto" or (isinstance(self.devices, int) and self.devices > 1)
