"""How many wrong labels `audit` finds: the grocery photos with 2% of the training labels flipped on purpose.

The flipped copy of train.bson is trained on (Lite0 with ImageNet weights, --image-size, --epochs, README's recipe
otherwise), indexed with every product (its wrong labels included, as a shop's catalogue would be), calibrated
by `evaluate` on val.bson, then audited; the top of the audit list (as many rows as labels were flipped) is scored
against the flips: precision and recall, with Wilson 95% intervals, and the recall of the whole list.
Usage: python bench/bench_audit.py [--flip 0.02] [--epochs 2] [--image-size 128] [--workdir bench_out/audit] [--quick]
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import bson
import harness
import numpy as np
from grocery_tail import sample

from retrieval.data.bsonio import iter_products
from retrieval.infer.audit import audit_index, write_audit
from retrieval.infer.evaluate import evaluate
from retrieval.infer.indexdir.build import IndexSettings, build_index
from retrieval.infer.pipeline.embed import LoaderSettings
from retrieval.train.config import TrainConfig
from retrieval.train.run import train

GROCERY = harness.SHARED_DATA / "grocery"


def flipped_copy(src: Path, dst: Path, share: float, seed: int) -> dict[int, tuple[int, int]]:
    """Write ``src`` to ``dst`` with ``share`` of the labels moved to another category seen in the file; returns
    ``{product id: (true category, written category)}``."""
    prods = list(iter_products(src))
    cats = sorted({p.category_id for p in prods})
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(len(prods), max(1, round(share * len(prods))), replace=False).tolist())
    flips = {}
    with open(dst, "wb") as f:
        for i, p in enumerate(prods):
            cat = p.category_id
            if i in chosen:
                cat = int(rng.choice([c for c in cats if c != p.category_id]))
                flips[p.product_id] = (p.category_id, cat)
            f.write(bson.encode({"_id": p.product_id, "category_id": cat,
                                 "imgs": [{"picture": pic} for pic in p.images]}))
    return flips


def main() -> None:
    ap = harness.parser(__doc__, workdir="bench_out/audit")
    ap.add_argument("--flip", type=float, default=0.02)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", type=int, default=0, help="> 0: a sample of this many grocery classes")
    a = harness.start(ap, quick={"epochs": 1, "image_size": 64, "classes": 12})
    shutil.rmtree(a.workdir, ignore_errors=True)
    a.workdir.mkdir(parents=True)
    grocery = GROCERY
    if a.classes:  # 20 training and 5 validation products of each sampled class
        grocery = sample(a.workdir / "grocery", a.classes, {"train": 20, "val": 5}, a.seed, GROCERY)
    data = a.workdir / "train_flipped.bson"
    flips = flipped_copy(grocery / "train.bson", data, a.flip, a.seed)
    t0 = time.perf_counter()
    cfg = TrainConfig.build(backbone="efficientnet_lite0", pretrained="imagenet", image_size=a.image_size,
                            epochs=a.epochs, val_fraction=0.0)
    train(data, a.workdir / "run", cfg, progress=False)
    t_train = time.perf_counter() - t0
    idx = a.workdir / "idx"
    build_index(data, a.workdir / "run", idx, IndexSettings("all"), LoaderSettings(workers=2))
    evaluate(idx, grocery / "val.bson", a.workdir / "eval", LoaderSettings(workers=2))
    t = time.perf_counter()
    suspects = audit_index(idx)
    t_audit = time.perf_counter() - t
    write_audit(idx, suspects, a.workdir / "audit.csv")
    n_flip, n_all = len(flips), sum(1 for _ in iter_products(data))
    top = suspects[:n_flip]
    hits = sum(s.product_id in flips for s in top)
    restored = sum(s.product_id in flips and s.suggested_id == flips[s.product_id][0] for s in top)
    whole = sum(s.product_id in flips for s in suspects)
    p_lo, p_hi = harness.wilson(hits, len(top))
    r_lo, r_hi = harness.wilson(hits, n_flip)
    harness.table([(f"{n_all:,}", n_flip, f"{len(suspects):,}", f"{hits / max(len(top), 1):.3f} [{p_lo:.3f}, "
                         f"{p_hi:.3f}]", f"{hits / n_flip:.3f} [{r_lo:.3f}, {r_hi:.3f}]", f"{restored}",
                         f"{whole / n_flip:.3f}", f"{t_train / 60:.1f}", f"{t_audit / 60:.1f}")],
                       ("training products", "labels flipped", "audit list", "precision of the top (flipped count)",
                        "recall of the top", "top suggests the true label", "recall of the whole list",
                        "training (min)", "audit (min)"))
    print(f"\nLite0 @ {a.image_size} px, {a.epochs} epochs, flip share {a.flip}, seed {a.seed}"
          + (f", {a.classes} grocery classes sampled" if a.classes else "") + "; intervals: 95% Wilson")


if __name__ == "__main__":
    main()
