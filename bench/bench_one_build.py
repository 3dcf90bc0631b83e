"""One build against two: the real-data flow's wall time and how many products it embeds.

Two builds (the flow before one build): build-index --split train, evaluate (embeds the validation products), then
build-index --split all for predict (embeds every product again). One build: build-index (every product once, the
validation products a held-out segment with their head inputs), then evaluate from what it stored. Predict is the
same in both flows and is left out. Both flows run in this process on the same run, one after the other; products
embedded are counted where the part driver feeds the network. Printed: seconds per stage, products embedded per
product, the one-build time as a ratio of the two-build time (goal <= 0.6), and every evaluate figure of both flows
(they must agree: the same numbers).

Data: the grocery photos (../shared/data/grocery/train.bson, EfficientNet-Lite0 with ImageNet weights, a few
fine-tuning steps: the flow's cost, not its accuracy, is measured here) or ``--generate N`` products (the tiny test
tower at 32 px, as bench_scale runs it).
Usage: python bench/bench_one_build.py [--generate N] [--image-size 160] [--steps 30] [--workdir ...] [--quick]
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import harness
import numpy as np

import retrieval.infer.pipeline.parts as parts_mod
from retrieval.infer.evaluate import evaluate
from retrieval.infer.indexdir.build import IndexSettings, build_index
from retrieval.infer.pipeline.embed import LoaderSettings
from retrieval.rundir import RunDir
from retrieval.train.config import TrainConfig
from retrieval.train.run import train

GROCERY = harness.SHARED_DATA / "grocery"
SAME = ("products", "images", "head_accuracy", "knn_accuracy", "fused_accuracy", "fused_top5_accuracy",
        "fused_without_duplicates_accuracy", "duplicate_coverage", "image_accuracy")
EMBEDDED = {"products": 0}


def counting(real):
    """``embed_products`` that counts the products it embeds (every forward pass of the flows goes through it)."""
    def embed(net, reader, rows, *a, **k):
        EMBEDDED["products"] += len(rows)
        return real(net, reader, rows, *a, **k)
    return embed


def prepare(a, work: Path) -> tuple[Path, Path]:
    """``(training file, trained run)``."""
    if a.generate:
        from retrieval.data.synth import SynthConfig, make_data
        cats = min(5270, max(8, a.generate // 50))  # Cdiscount's 5,270 at most
        data = make_data(work / "data", SynthConfig(products=a.generate, categories=cats, seed=0, image_size=32),
                         progress=False)
        path, csv = data["train.bson"], data["category_names.csv"]
        cfg = TrainConfig.build(image_size=32, embed_dim=64, batch_size=128, max_steps=a.steps, val_fraction=0.1,
                                workers=a.workers, frozen_baseline=False)
    else:
        path, csv = GROCERY / "train.bson", None
        cfg = TrainConfig.build(backbone="efficientnet_lite0", pretrained="imagenet", image_size=a.image_size,
                                max_steps=a.steps, val_fraction=0.1, workers=a.workers, frozen_baseline=False,
                                lp_epochs=0)
    train(path, work / "run", cfg, csv, progress=False)
    return path, work / "run"


def timed(fn) -> tuple[float, int, object]:
    """``(seconds, products embedded, result)`` of ``fn()``."""
    before, t = EMBEDDED["products"], time.perf_counter()
    out = fn()
    return time.perf_counter() - t, EMBEDDED["products"] - before, out


def _short(cal: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in cal.items() if k != "weights")


def same_calibration(a: dict, b: dict) -> str:
    """"same" when every setting is equal and the learnt weights agree to 1e-4 (sums in another order)."""
    rest = {k: v for k, v in a.items() if k != "weights"} == {k: v for k, v in b.items() if k != "weights"}
    wa, wb = a.get("weights"), b.get("weights")
    close = (wa is None and wb is None) or (wa is not None and wb is not None and np.allclose(wa, wb, rtol=1e-4,
                                                                                             atol=1e-6))
    return "same" if rest and close else "DIFFERENT"


def flows(path: Path, run: Path, work: Path, loader: LoaderSettings) -> dict[str, list]:
    """Each flow's stages ``(name, call)``, writing under ``work``."""
    return {"two builds": [
        ("build-index --split train", lambda: build_index(path, run, work / "train", IndexSettings("train"), loader)),
        ("evaluate", lambda: evaluate(work / "train", out_dir=work / "eval_two", loader=loader)),
        ("build-index --split all", lambda: build_index(path, run, work / "all_old", IndexSettings("all"), loader))],
        "one build": [
        ("build-index", lambda: build_index(path, run, work / "one", IndexSettings(), loader)),
        ("evaluate", lambda: evaluate(work / "one", out_dir=work / "eval_one", loader=loader))]}


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--generate", type=int, default=0, help="generated products instead of the grocery photos")
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--steps", type=int, default=30, help="fine-tuning steps of the run both flows use")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, choices=(1, 2), help="1: two then one; 2: also one then two")
    a = harness.start(ap, quick={"generate": 300, "steps": 5, "workers": 0, "rounds": 1})
    work = a.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    path, run = prepare(a, work)
    parts_mod.embed_products = counting(parts_mod.embed_products)
    loader = LoaderSettings(workers=a.workers)
    n = len(RunDir(run).split().train_rows) + len(RunDir(run).split().val_rows)
    rows, metrics, totals = [], {}, {"two builds": [0.0, 0], "one build": [0.0, 0]}
    # the flows alternate (two, one, one, two): a machine that slows down or speeds up weighs on both alike
    for r, order in enumerate((("two builds", "one build"), ("one build", "two builds"))[:a.rounds]):
        for flow in order:
            stages = flows(path, run, work / f"r{r}", loader)[flow]
            secs = done = 0
            for name, fn in stages:
                s, e, out = timed(fn)
                secs, done = secs + s, done + e
                rows.append((r + 1, flow, name, round(s, 1), e))
                if name == "evaluate":
                    metrics.setdefault(flow, out)
            totals[flow][0] += secs
            totals[flow][1] += done
            rows.append((r + 1, flow, "**whole flow**", round(secs, 1), done))
    print(f"## {'generated, ' + format(a.generate, ',') + ' products' if a.generate else 'grocery photos'}: "
          f"{n:,} labelled products, {'tiny tower @ 32 px' if a.generate else f'Lite0 @ {a.image_size} px'}\n")
    harness.table(rows, ["round", "flow", "stage", "seconds", "products embedded"])
    (t2, e2), (t1, e1) = totals["two builds"], totals["one build"]
    runs = min(a.rounds, 2)
    print(f"\n    products embedded per labelled product: two builds {e2 / n / runs:.3f}, one build "
          f"{e1 / n / runs:.3f} (goal: exactly 1)")
    print(f"    whole flow, one build / two builds: {t1 / t2:.2f}x the time, summed over {runs} round(s) "
          "(goal <= 0.6x)\n")
    m2, m1 = metrics["two builds"], metrics["one build"]
    harness.table([(k, m2[k], m1[k], "same" if np.isclose(m2[k], m1[k], atol=1e-9) else "DIFFERENT") for k in SAME]
                  + [("calibration (rule, k, tau, temperature, weights)", _short(m2["calibration"]),
                      _short(m1["calibration"]), same_calibration(m2["calibration"], m1["calibration"]))],
                  ["evaluate figure", "two builds", "one build", ""])


if __name__ == "__main__":
    main()
