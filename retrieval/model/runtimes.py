"""The runtimes that can embed pictures, named once (no torch import: the CLI's --help reads it)."""
from __future__ import annotations

from ..errors import UserError

RUNTIMES = ("torch", "onnx", "onnx-int8")
# What an index manifest records and a query must match: embeddings of one precision family agree closely (torch
# and onnx are interchangeable); int8 ones only roughly (model.onnx_runtime holds the bounds).
PRECISION = {"torch": "fp32", "onnx": "fp32", "onnx-int8": "int8"}


def check_runtime(name: str | None, what: str = "runtime") -> str | None:
    """``name`` if it is one of :data:`RUNTIMES` (or None: the default); a one-line error naming them otherwise."""
    if name is not None and name not in RUNTIMES:
        raise UserError(f"unknown {what} {name!r}; valid runtimes are {', '.join(RUNTIMES)}")
    return name
