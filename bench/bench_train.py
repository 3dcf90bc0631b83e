"""Training benchmark: data-loader vs training-step throughput; accuracy of a short tiny-tower run; options.

    python bench/bench_train.py [--workdir bench_out/train] [--epochs 6] [--throughput-only] [--quick]
"""
from __future__ import annotations

import csv
import os
import shutil
import time
from pathlib import Path

import harness
import torch

from retrieval.data.synth import SynthConfig, make_data
from retrieval.model.config import ModelConfig
from retrieval.model.network import EmbeddingNet
from retrieval.model.runtime import autocast_for
from retrieval.rundir import RunDir
from retrieval.train.config import DataSettings, TrainConfig
from retrieval.train.datamodule import CdiscountDataModule
from retrieval.train.module import RetrievalModule
from retrieval.train.run import train


def loader_vs_step(data: Path, run: Path, backbone: str, size: int, batch: int, n_batches: int) -> tuple:
    dm = CdiscountDataModule(str(data / "train.bson"), str(data / "category_names.csv"),
                             DataSettings(batch_size=batch, val_fraction=0.1, workers=2), RunDir(run), size)
    dl = dm.train_dataloader()
    it = iter(dl)
    next(it)  # start the workers
    t = time.perf_counter()
    for _ in range(n_batches):
        b = next(it)
    loader = n_batches * batch / (time.perf_counter() - t)
    cfg = TrainConfig.build(backbone=backbone, image_size=size, embed_dim=256)
    net = EmbeddingNet(ModelConfig(backbone, None, size, 256, len(dm.categories))).to(memory_format=torch.channels_last)
    mod = RetrievalModule(net, cfg, dm.categories, {})
    mod.log_dict = lambda *a, **k: None
    opt = torch.optim.AdamW(mod.parameters(), 1e-3)
    steps = 3 if backbone != "tiny" else 20
    for i in range(steps + 1):
        if i == 1:
            t = time.perf_counter()
        with autocast_for(torch.device("cpu")):
            loss = mod.training_step(b, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    step = steps * batch / (time.perf_counter() - t)
    return loader, step


def val_curve(run: Path) -> list[float]:
    with open(run / "logs" / "metrics.csv") as f:
        return [float(r["val/product_acc"]) for r in csv.DictReader(f) if r.get("val/product_acc")]


def main() -> None:
    ap = harness.parser(__doc__, workdir="bench_out/train")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--throughput-only", action="store_true", help="loader vs step only")
    ap.add_argument("--products", type=int, default=4000, help="generated products at 64 px")
    ap.add_argument("--big-products", type=int, default=600, help="generated products at 180 px")
    ap.add_argument("--batches", type=int, nargs=2, default=[30, 6], help="loader batches timed: tiny, convnext")
    a = harness.start(ap, quick={"throughput_only": True, "products": 400, "big_products": 60, "batches": [5, 2]})
    work = Path(a.workdir)
    small, big, hard = work / "data64", work / "data180", work / "data64_hard"
    if not (small / "train.bson").exists():
        make_data(small, SynthConfig(a.products, 40, 0, 64), progress=False)
    if not (hard / "train.bson").exists() and not a.throughput_only:
        make_data(hard, SynthConfig(a.products, 200, 0, 64, colour_shift=75.0), progress=False)
    if not (big / "train.bson").exists():
        make_data(big, SynthConfig(a.big_products, 40, 0, 180), progress=False)
    print(f"## Loader vs training step ({os.cpu_count()} cores, 2 loader workers, bf16 where the CPU has it)\n")
    rows = []
    for backbone, size, data, batch, nb in (("tiny", 64, small, 64, a.batches[0]),
                                            ("convnext_tiny", 180, big, 32, a.batches[1])):
        ld, st = loader_vs_step(data, work / f"probe_{backbone}", backbone, size, batch, nb)
        rows.append((f"{backbone} @ {size}px", f"{ld:,.0f}", f"{st:,.1f}", f"{ld / st:.1f}x", ">= 5x",
                     "ok" if ld / st >= 5 else "MISS"))
    harness.table(rows, ("backbone", "loader img/s", "train step img/s", "loader / step", "goal", ""))
    if a.throughput_only:
        return

    print(f"\n## Tiny tower, {a.products:,} products, 40 categories, 64 px: the goal run ({a.epochs} epochs)\n")
    goal = run_variant(work, small, "default settings", {}, a.epochs)
    ok = float(goal[4]) >= 0.9 and float(goal[1]) <= 600
    harness.table([goal + ("ok" if ok else "MISS",)],
                ("variant", "train s", "val product acc, epoch 1", "last epoch", "best", "goal >= 0.90 in <= 600 s"))
    print(f"\n## Options on a harder set: {a.products:,} products, 200 categories, colour jitter 75 ({a.epochs} "
          "epochs each)\n")
    rows = [run_variant(work, hard, name, kw, a.epochs) for name, kw in (
        ("default (MultiSimilarity, full softmax)", {}),
        ("+ level-1/level-2 auxiliary heads", {"hier_heads": True}),
        ("sampled softmax, 32 negatives", {"sampled_negatives": 32}),
        ("SubCenterArcFace instead of MultiSimilarity", {"metric_loss": "subcenter_arcface"}),
        ("no metric loss", {"metric_loss": "none"}))]
    harness.table(rows, ("variant", "train s", "val product acc, epoch 1", "last epoch", "best"))


def run_variant(work: Path, data: Path, name: str, kw: dict, epochs: int) -> tuple:
    run = work / f"run_{data.name}_{abs(hash(name)) % 10 ** 8}"
    shutil.rmtree(run, ignore_errors=True)
    t = time.perf_counter()
    train(data / "train.bson", run,
          TrainConfig.build(image_size=64, embed_dim=128, epochs=epochs, val_fraction=0.1, **kw),
          data / "category_names.csv", progress=False)
    sec = time.perf_counter() - t
    curve = val_curve(run)
    return (name, f"{sec:.0f}", f"{curve[0]:.3f}", f"{curve[-1]:.3f}", f"{max(curve):.3f}")


if __name__ == "__main__":
    main()
