"""Generated Cdiscount-like data: a 3-level hierarchy drawn into the images, skewed sizes, 1-4 images.

Level 1 sets the background colour, level 2 the shape, level 3 the shape's colour and count; each
product has its own position, size, tints of both colours and an identity tag, shared by all its images
(which differ by jitter, brightness, noise and an occasional mirror), so similar-product lookup can be scored.
Like the real catalogue, some products re-list an earlier item (same look, same category; half of them
with the very same picture bytes, as Cdiscount's 12.37M images hold only 7.77M distinct ones), and a wide
per-product colour jitter makes sibling level-3 categories hard to tell apart by the head alone.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import bson
import numpy as np
from tqdm import tqdm

from ..errors import UserError
from .categories import CategoryTable
from .images import encode_jpeg
from .synth_config import SynthConfig

log = logging.getLogger(__name__)

# Background (level-1) colours: a {40, 130, 220}^3 grid, >= 90 apart and >= 60 from every shape colour.
_BG = np.array([[220, 220, 130], [130, 220, 220], [220, 130, 220], [130, 130, 130], [40, 130, 130],
                [220, 130, 130], [130, 220, 130], [130, 130, 220], [220, 220, 40], [40, 40, 130],
                [130, 40, 40], [40, 220, 130]], dtype=np.float32)
_FG = np.array([[220, 30, 30], [30, 160, 40], [30, 60, 220], [240, 160, 0], [150, 0, 180], [0, 190, 200],
                [20, 20, 20], [255, 255, 255]], dtype=np.float32)
_SHAPES = ("disk", "square", "triangle", "ring", "cross", "hbars", "diamond", "vbars")
IMAGES_PER_PRODUCT_P = (0.62, 0.20, 0.10, 0.08)
KEEP_PICTURES = 8  # items per category whose picture bytes are kept for exact re-listings


def _hierarchy(n_cat: int) -> list[tuple[int, int, int]]:
    n1 = int(np.clip(round(n_cat ** (1 / 3)), 2, len(_BG)))
    n2 = int(np.clip(math.ceil(math.sqrt(n_cat / n1)), 1, len(_SHAPES)))
    n3 = math.ceil(n_cat / (n1 * n2))
    triples = [(a, b, c) for c in range(n3) for b in range(n2) for a in range(n1)]
    return sorted(triples[:n_cat])


def category_table(n_cat: int) -> tuple[CategoryTable, list[tuple[int, int, int]]]:
    """The generated category table and each category's (level1, level2, level3) visual codes."""
    codes = _hierarchy(n_cat)
    rows = []
    for k, (a, b, c) in enumerate(codes):
        cid = 1000000000 + 1000 * a + 50 * b + c + 7 * k
        rows.append((cid, f"GROUP {a} ", f"GROUP {a} - {_SHAPES[b % len(_SHAPES)].upper()}",
                     f"{_SHAPES[b % len(_SHAPES)]}, colour {c % len(_FG)} x{1 + c // len(_FG)}"))
    table = CategoryTable.from_rows(rows)
    order = {cid: code for (cid, *_), code in zip(rows, codes, strict=True)}
    return table, [order[cid] for cid in table.ids]


def tree_codes(table: CategoryTable) -> list[tuple[int, int, int]]:
    """Visual codes of a real tree: (level-1 index, level-2 index within its level 1, index within its level 2)."""
    l1, l2 = table.parents()
    seen_l2: dict[int, dict[int, int]] = {}
    seen_l3: dict[int, int] = {}
    codes = []
    for a, b2 in zip(l1.tolist(), l2.tolist(), strict=True):
        b = seen_l2.setdefault(a, {}).setdefault(b2, len(seen_l2[a]))
        c = seen_l3[b2] = seen_l3.get(b2, -1) + 1
        codes.append((a, b, c))
    return codes


def _palette(base: np.ndarray, i: int) -> np.ndarray:
    """Colour ``i``: from ``base`` while it lasts, then a fixed pseudo-random colour per index."""
    if i < len(base):
        return base[i]
    return np.random.default_rng(1_000_003 * len(base) + i).uniform(20, 235, 3).astype(np.float32)


def _mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if kind == "disk":
        return dy * dy + dx * dx < r * r
    if kind == "square":
        return (np.abs(dy) < r * 0.85) & (np.abs(dx) < r * 0.85)
    if kind == "triangle":
        return (dy < r * 0.8) & (dy > -r) & (np.abs(dx) < (dy + r) * 0.6)
    if kind == "ring":
        d2 = dy * dy + dx * dx
        return (d2 < r * r) & (d2 > (0.55 * r) ** 2)
    if kind == "cross":
        return ((np.abs(dy) < r * 0.3) & (np.abs(dx) < r)) | ((np.abs(dx) < r * 0.3) & (np.abs(dy) < r))
    if kind == "hbars":
        return (np.abs(dx) < r) & (np.abs(dy) < r) & ((dy / r * 2.5).astype(int) % 2 == 0)
    if kind == "diamond":
        return np.abs(dy) + np.abs(dx) < r * 1.1
    return (np.abs(dx) < r) & (np.abs(dy) < r) & ((dx / r * 2.5).astype(int) % 2 == 0)


def _render(code: tuple[int, int, int], ident: dict, s: int, rng: np.random.Generator) -> np.ndarray:
    a, b, c = code
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    jy, jx = rng.normal(0, 0.02 * s, 2)
    img = np.empty((s, s, 3), np.float32)
    img[:] = (_palette(_BG, a) + ident["bg_shift"]) * (1 - 0.15 * yy[..., None] / s)
    fg = np.clip((_FG[c % len(_FG)] if c < 2 * len(_FG) else _palette(_FG, c)) + ident["fg_shift"], 0, 255)
    shape = _SHAPES[b % len(_SHAPES)]
    cy, cx, r = ident["cy"] * s + jy, ident["cx"] * s + jx, ident["r"] * s
    if b >= len(_SHAPES):  # a level 1 with more than 8 level-2 children: the shape turned a quarter
        yy, xx = xx, yy
    img[_mask(shape, yy, xx, cy, cx, r)] = fg
    if c >= len(_FG):  # level-3 "count": a second, smaller copy of the shape
        img[_mask(shape, yy, xx, s - cy, s - cx, 0.45 * r)] = fg
    ty, tx = int(ident["ty"] * s + jy), int(ident["tx"] * s + jx)
    cell = max(1, s // 20)
    for (i, j), on in np.ndenumerate(ident["tag"]):
        if on:
            y0, x0 = max(0, ty + i * cell), max(0, tx + j * cell)
            img[y0:max(0, ty + (i + 1) * cell), x0:max(0, tx + (j + 1) * cell)] = ident["tag_rgb"]
    img *= rng.uniform(0.9, 1.1)
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    if rng.random() < 0.25:
        img = img[:, ::-1]
    return np.clip(img, 0, 255).astype(np.uint8)


def _identity(rng: np.random.Generator, colour_shift: float) -> dict:
    return {"cy": rng.uniform(0.38, 0.62), "cx": rng.uniform(0.38, 0.62), "r": rng.uniform(0.2, 0.3),
            "ty": rng.choice([0.04, 0.76]), "tx": rng.uniform(0.04, 0.76), "tag": rng.random((4, 4)) < 0.5,
            "tag_rgb": rng.uniform(0, 255, 3), "bg_shift": rng.uniform(-20, 20, 3),
            "fg_shift": rng.uniform(-colour_shift, colour_shift, 3)}


TAIL_EXPONENT = 2.0  # (rank + k0)^-2: Cdiscount-like, thousands of categories under 100 of 7M products


def _rank_weights(n_cat: int, largest_share: float | None) -> np.ndarray:
    """Category weights by rank ``[n_cat]``: Zipf 1/rank, or Zipf-Mandelbrot (rank + k0)^-2 with k0 set so the
    largest category holds ``largest_share`` of the total (at 5,270 categories and 0.011, about 2,800 categories
    fall under 100 of 7.07M products, as on Cdiscount)."""
    ranks = np.arange(1, n_cat + 1, dtype=np.float64)
    if largest_share is None:
        return 1.0 / ranks
    if largest_share <= 1.0 / n_cat:
        return np.ones(n_cat)
    lo, hi = 0.0, 1e7
    for _ in range(100):
        k0 = (lo + hi) / 2
        w = (ranks + k0) ** -TAIL_EXPONENT
        lo, hi = (k0, hi) if w[0] / w.sum() > largest_share else (lo, k0)
    return (ranks + lo) ** -TAIL_EXPONENT


def _sizes(n: int, n_cat: int, rng: np.random.Generator, largest_share: float | None = None) -> np.ndarray:
    """Products per category ``[n_cat]`` under :func:`_rank_weights`, at least 2 each where there are enough."""
    base = min(2, n // n_cat)
    w = _rank_weights(n_cat, largest_share)
    rng.shuffle(w)
    return base + rng.multinomial(n - base * n_cat, w / w.sum())


def make_data(out_dir: str | Path, cfg: SynthConfig, progress: bool = True, overwrite: bool = False
              ) -> dict[str, Path]:
    """Write train.bson, test.bson, test_labels.csv and category_names.csv into ``out_dir`` (refusing to
    replace existing files unless ``overwrite``). ``cfg.products`` training products, plus
    ``test_fraction`` x as many test products."""
    if cfg.products < 2 or cfg.categories < 1:
        raise UserError("need at least 2 products and 1 category")
    if cfg.largest_share is not None and not 0 < cfg.largest_share < 1:
        raise UserError(f"largest_share must lie in (0, 1), got {cfg.largest_share}")
    if cfg.image_size < 16:
        raise UserError("image size must be at least 16 pixels")
    out = Path(out_dir)
    paths = {k: out / k for k in ("train.bson", "test.bson", "test_labels.csv", "category_names.csv")}
    existing = [p.name for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    if cfg.categories_csv:
        table = CategoryTable.from_csv(cfg.categories_csv)
        codes = tree_codes(table)
    else:
        table, codes = category_table(cfg.categories)
    n_test = max(1, int(round(cfg.products * cfg.test_fraction)))
    n_all = cfg.products + n_test
    cats = np.repeat(np.arange(len(table)), _sizes(n_all, len(table), rng, cfg.largest_share))
    rng.shuffle(cats)
    ids = np.cumsum(rng.integers(1, 4, n_all))
    is_test = np.zeros(n_all, bool)
    is_test[rng.choice(n_all, n_test, replace=False)] = True
    n_imgs = rng.choice(4, n_all, p=IMAGES_PER_PRODUCT_P) + 1
    table.to_csv(paths["category_names.csv"])
    with open(paths["train.bson"], "wb") as ftr, open(paths["test.bson"], "wb") as fte, \
            open(paths["test_labels.csv"], "w", newline="") as flab:
        lab = csv.writer(flab)
        lab.writerow(["_id", "category_id"])
        seen: dict[int, list[dict]] = {}
        for i in tqdm(range(n_all), desc="generating products", disable=not progress):
            earlier = seen.setdefault(int(cats[i]), [])
            if earlier and rng.random() < cfg.relist_fraction:  # the same item, listed again
                ident = earlier[int(rng.integers(len(earlier)))]
                reuse = ident.get("pics", [])[:n_imgs[i]] if rng.random() < cfg.exact_relist else []
            else:
                ident, reuse = _identity(rng, cfg.colour_shift), []
                earlier.append(ident)
            pics = [{"picture": p} for p in reuse] + [
                {"picture": encode_jpeg(_render(codes[cats[i]], ident, cfg.image_size, rng), cfg.quality)}
                for _ in range(n_imgs[i] - len(reuse))]
            if "pics" not in ident and len(earlier) <= KEEP_PICTURES:  # bounded memory at any scale
                ident["pics"] = [p["picture"] for p in pics]
            cid = table.ids[cats[i]]
            if is_test[i]:
                fte.write(bson.encode({"_id": int(ids[i]), "imgs": pics}))
                lab.writerow([int(ids[i]), cid])
            else:
                ftr.write(bson.encode({"_id": int(ids[i]), "imgs": pics, "category_id": cid}))
    log.info("wrote %d train and %d test products to %s", n_all - n_test, n_test, out)
    return paths
