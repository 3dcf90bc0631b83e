"""The generated data set's settings (no heavy imports: the CLI reads its defaults)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SynthConfig:
    """What ``make-data`` generates."""

    products: int = 2000
    categories: int = 40
    seed: int = 0
    image_size: int = 180
    test_fraction: float = 0.2
    quality: int = 90
    relist_fraction: float = 0.25  # share of products that re-list an earlier product of their category
    exact_relist: float = 0.5      # share of re-listings that reuse the earlier listing's picture bytes
    colour_shift: float = 45.0    # per-product shift of the shape colour (level-3 cue); larger is harder
    categories_csv: str | None = None  # draw the tree from this category_names.csv (all its rows) instead
    largest_share: float | None = None  # skew: share of the largest category (default: Zipf 1/rank)
