"""Where and how the network runs: device choice, precision and autocast."""
from __future__ import annotations

import functools
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError


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


def parse_devices(text: str | int) -> int | str | tuple[int, ...]:
    """``--devices`` as a user writes it: a count (``"2"``), ``"auto"``, or device indices (``"0,1"``, ``"1,"``)."""
    if isinstance(text, int):
        return text
    t = str(text).strip()
    if t == "auto":
        return t
    if t.isdigit():
        return int(t)
    try:
        ids = tuple(int(x) for x in t.split(",") if x.strip())
    except ValueError:
        ids = ()
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise UserError(f"--devices {text!r}: give a count (2), auto, or a list of device indices (0,1)")
    return ids


def is_ddp(devices: int | str | tuple[int, ...] | list[int], num_nodes: int) -> bool:
    """Whether Lightning runs several processes: more than one node, "auto", a count over 1 or several indices."""
    return num_nodes > 1 or devices == "auto" or (isinstance(devices, int) and devices > 1) or \
        (isinstance(devices, (tuple, list)) and len(devices) > 1)


def lightning_devices(devices: int | str | tuple[int, ...] | list[int], accelerator: str) -> int | str | list[int]:
    """``devices`` as Lightning's Trainer takes them: indices name GPUs; on the CPU (which has no indices) a list
    means as many processes as it names."""
    if isinstance(devices, (tuple, list)):
        on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
        return len(devices) if on_cpu else list(devices)
    return devices


@dataclass(frozen=True)
class Devices:
    """Where inference runs: ``devices`` (a count, "auto" or indices, see :func:`parse_devices`), ``num_nodes``
    and ``accelerator``. The default, one device, runs in this process without Lightning."""

    devices: int | str | tuple[int, ...] = 1
    num_nodes: int = 1
    accelerator: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", parse_devices(self.devices))

    @property
    def distributed(self) -> bool:
        return is_ddp(self.devices, self.num_nodes)

    @property
    def for_lightning(self) -> int | str | list[int]:
        return lightning_devices(self.devices, self.accelerator)


def release_heap() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``): after a long phase of batches, the
    freed memory otherwise stays in this process's resident set through the next phase. A no-op elsewhere."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
