"""The long tail on generated data with Cdiscount's skew: accuracy by category size, with and without each lever.

make-data with ``--largest-share 0.011`` (a Zipf-Mandelbrot skew: the largest category 1.1% of the products, most
categories under 10), the tiny tower from scratch, then for each training variant (plain cross-entropy, and the
logit-adjusted loss of Menon et al. 2021) `evaluate` on the run's validation split and `predict` on test.bson with
the grid's prototype vote weight chosen on validation (GAMMAS) and off (gamma 0). The test set has the training skew.
Prints test accuracy overall and by the category's training products, each with a 95% Wilson interval, and the
paired difference of each variant against the plain one (95% paired bootstrap interval).
Usage: python bench/bench_tail_synth.py [--products 20000] [--categories 1000] [--epochs 5] [--workdir DIR]
       [--out FILE] [--quick]
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import harness
import numpy as np
from real_report import grid_gammas

import retrieval.infer.scoring.calibrate as calibrate_module
from retrieval.data.offsets import load_offsets
from retrieval.data.synth import SynthConfig, make_data
from retrieval.infer.evaluate import BUCKETS, evaluate
from retrieval.infer.indexdir.build import IndexSettings, build_index
from retrieval.infer.predict import PredictSettings, predict, read_submission
from retrieval.train.config import TrainConfig
from retrieval.train.run import train


def run_variant(work: Path, data: dict, name: str, a: argparse.Namespace, **recipe) -> dict[str, np.ndarray]:
    """Train one variant; evaluate (calibrates) then predict, without the prototype vote and with it chosen on
    validation: test predictions (category ids)."""
    run = work / name
    shutil.rmtree(run, ignore_errors=True)
    cfg = TrainConfig.build(image_size=a.image_size, embed_dim=128, epochs=a.epochs, batch_size=64,
                            val_fraction=0.1, **recipe)
    train(data["train.bson"], run, cfg, data["category_names.csv"], progress=False)
    build_index(data["train.bson"], run, work / f"{name}_idx_train", IndexSettings("train"))
    build_index(data["train.bson"], run, work / f"{name}_idx_all", IndexSettings("all"))
    out = {}
    for what, gammas in (("no prototype vote", (0.0,)), ("prototype vote", calibrate_module.GAMMAS)):
        with grid_gammas(gammas):
            m = evaluate(work / f"{name}_idx_train", out_dir=work / f"{name}_eval_{len(gammas)}")
            sub = work / f"{name}_{len(gammas)}.csv"
            predict(data["test.bson"], work / f"{name}_idx_all", sub, settings=PredictSettings(restart=True))
        out[f"{name}, {what} ({m['fusion']['chosen']}, gamma {m['calibration']['gamma']})"] = read_submission(sub)[1]
    return out


def main() -> None:
    ap = harness.parser(__doc__, workdir="bench_out/tail_synth")
    ap.add_argument("--products", type=int, default=20_000)
    ap.add_argument("--categories", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=64)
    a = harness.start(ap, quick={"products": 600, "categories": 40, "epochs": 1, "image_size": 32})
    work = Path(a.workdir)
    shutil.rmtree(work / "data", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work / "data", SynthConfig(a.products, a.categories, 0, a.image_size, colour_shift=75.0,
                                                largest_share=0.011))
    preds = {**run_variant(work, data, "plain", a), **run_variant(work, data, "logit-adjusted", a, logit_adjust=1.0)}
    ids, qy = read_submission(data["test_labels.csv"])
    train_ids, n = np.unique(load_offsets(data["train.bson"], progress=False)["category_id"], return_counts=True)
    size = dict(zip(train_ids.tolist(), n.tolist(), strict=True))
    counts = np.array([size.get(int(c), 0) for c in qy])
    print(f"## Generated data, {a.products:,} products in {a.categories:,} categories (largest share 0.011), "
          f"tiny tower @ {a.image_size} px, {a.epochs} epochs; {len(qy):,} test products\n")
    reference = preds[next(iter(preds))]
    rows = []
    for what, p in preds.items():
        ok = p == qy
        d = ok.astype(float) - (reference == qy)
        lo, hi = harness.paired_interval(d)
        rows.append((what, "all", len(qy), round(float(ok.mean()), 4), harness.interval(*harness.proportion(ok)[1:]),
                     f"{d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]"))
        for lo_n, hi_n, name in BUCKETS:
            m = (counts >= lo_n) & (counts < hi_n)
            if m.any():
                d = ok[m].astype(float) - (reference == qy)[m]
                lo, hi = harness.paired_interval(d)
                rows.append((what, name, int(m.sum()), round(float(ok[m].mean()), 4),
                             harness.interval(*harness.proportion(ok[m])[1:]),
                             f"{d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]"))
    if not np.array_equal(ids, load_offsets(data["test.bson"], progress=False)["product_id"]):
        raise SystemExit("test labels are not in test.bson order")
    harness.table(rows, ("variant (rule chosen on validation)", "training products in category", "test products",
                              "accuracy", "95% interval", "minus the first row, paired 95%"))


if __name__ == "__main__":
    main()
