"""Where and how the network runs: device choice, precision and autocast."""
from __future__ import annotations

import functools
from contextlib import nullcontext
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
