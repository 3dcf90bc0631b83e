"""A long-tailed copy of the Grocery Store set, for measuring the tail on real photos (bench_real.py reads it with
GROCERY_DIR=OUT).

Every grocery class has 16-70 training products, so its by-size table has one bucket. Here a random third of the
classes (seeded) keeps only 1-9 training products each (drawn uniformly), a random third keeps 10-15, the rest keep
all; val.bson keeps each product of a class with the class's kept share of train.bson (so validation has the
training skew, as a run's own split would), and test.bson is copied whole (so each size bucket has hundreds of test
products; bench_real also reports accuracy re-weighted to the training skew).
Usage: python bench/grocery_tail.py OUT [--seed 0]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import harness
import numpy as np

from retrieval.data.offsets import load_offsets

SOURCE = Path(os.environ.get("GROCERY_SOURCE") or harness.SHARED_DATA / "grocery")


def copy_records(src: Path, dst: Path, keep: np.ndarray) -> int:
    """Copy the records ``keep`` (bool ``[N]``) of ``src`` byte for byte into ``dst``, in file order."""
    table = load_offsets(src, progress=False)
    with open(src, "rb") as f, open(dst, "wb") as out:
        for off, length in zip(table["offset"][keep], table["length"][keep], strict=True):
            f.seek(int(off))
            out.write(f.read(int(length)))
    return int(keep.sum())


def sample(out: Path, n_classes: int, per_class: dict[str, int], seed: int = 0, source: Path | None = None) -> Path:
    """A small copy of the grocery set in ``out`` for a bench's ``--quick`` run: ``n_classes`` classes drawn at random
    (seeded) among those every split of ``per_class`` holds, and at most ``per_class[split]`` products of each in
    each split (records copied byte for byte, in file order); returns ``out``."""
    source = source or SOURCE
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cats = {s: load_offsets(source / f"{s}.bson", progress=False)["category_id"] for s in per_class}
    common = sorted(set.intersection(*(set(c.tolist()) for c in cats.values())))
    chosen = rng.choice(common, min(n_classes, len(common)), replace=False)
    for split, n in per_class.items():
        keep = np.zeros(len(cats[split]), bool)
        for c in chosen:
            rows = np.flatnonzero(cats[split] == c)
            keep[rng.choice(rows, min(n, len(rows)), replace=False)] = True
        copy_records(source / f"{split}.bson", out / f"{split}.bson", keep)
    return out


def sizes_for(classes: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Training products each class keeps ``[C]``: a third 1-9, a third 10-15, a third all."""
    order = rng.permutation(len(classes))
    keep = counts.copy()
    third = len(classes) // 3
    keep[order[:third]] = rng.integers(1, 10, third)
    keep[order[third:2 * third]] = np.minimum(counts[order[third:2 * third]], rng.integers(10, 16, third))
    return keep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    train = load_offsets(SOURCE / "train.bson", progress=False)["category_id"]
    classes, counts = np.unique(train, return_counts=True)
    keep_n = sizes_for(classes, counts, rng)
    keep = np.zeros(len(train), bool)
    for c, k in zip(classes, keep_n, strict=True):
        keep[rng.choice(np.flatnonzero(train == c), k, replace=False)] = True
    n_train = copy_records(SOURCE / "train.bson", out / "train.bson", keep)
    val = load_offsets(SOURCE / "val.bson", progress=False)["category_id"]
    share = dict(zip(classes.tolist(), (keep_n / counts).tolist(), strict=True))
    vkeep = rng.random(len(val)) < np.array([share.get(int(c), 0.0) for c in val])
    n_val = copy_records(SOURCE / "val.bson", out / "val.bson", vkeep)
    test = out / "test.bson"
    test.unlink(missing_ok=True)
    test.symlink_to((SOURCE / "test.bson").resolve())
    print(f"{out}: train {n_train:,} products ({(keep_n < 10).sum()} classes with 1-9), val {n_val:,}, test whole")


if __name__ == "__main__":
    main()
