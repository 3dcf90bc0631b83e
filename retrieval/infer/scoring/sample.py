"""The one cap on how many validation products a calibration step is fitted or scored on."""
from __future__ import annotations

import numpy as np

SAMPLE_CAP = 50_000  # validation products a fusion, its weights or the peer grid is fitted on (a random sample beyond)


def sample_rows(n: int, seed: int = 0, cap: int = SAMPLE_CAP) -> np.ndarray:
    """Sorted positions ``[min(n, cap)]`` of the ``n`` products calibrated on: all of them up to ``cap``, else a
    random sample (``seed``)."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))
