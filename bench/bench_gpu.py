"""Throughput at Cdiscount resolution (180 px) on the machine's accelerator, per backbone: the training loader, a
training step (bf16 autocast and channels_last where CUDA is), the model's forward alone, embedding end to end
(build-index: read, decode, model, write) and predict end to end; then the implied time of one epoch over the
12.37M training images and of predicting the 3,095,080 test images.

Each end-to-end figure is also given as a ratio to the forward-only rate measured in the same run.
Usage: python bench/bench_gpu.py [--backbones efficientnet_lite0 efficientnet_lite2] [--products 6000]
       [--workers N] [--workdir bench_out/gpu] [--quick]
(--quick: Lite0 alone on 40 generated 64 px products, a few steps: a smoke run that is quick on a CPU too)
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import harness
import torch

from retrieval.data.synth import SynthConfig, make_data
from retrieval.infer.indexdir.build import IndexSettings, build_index
from retrieval.infer.indexdir.bundle import open_index
from retrieval.infer.pipeline.embed import LoaderSettings
from retrieval.infer.predict import PredictSettings, predict
from retrieval.model.config import ModelConfig
from retrieval.model.network import EmbeddingNet
from retrieval.model.runtime import autocast_for, best_device
from retrieval.rundir import RunDir
from retrieval.train.config import DataSettings, TrainConfig
from retrieval.train.datamodule import CdiscountDataModule
from retrieval.train.module import RetrievalModule
from retrieval.train.run import train

TRAIN_IMAGES, TEST_IMAGES = 12_371_293, 3_095_080


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def loader_rate(data: Path, run: Path, size: int, batch: int, workers: int, n_batches: int
                ) -> tuple[float, list, object]:
    """Images/s of the training loader (read, decode, augment, collate); also one batch to train on and the
    category table."""
    dm = CdiscountDataModule(str(data / "train.bson"), str(data / "category_names.csv"),
                             DataSettings(batch_size=batch, val_fraction=0.0, workers=workers), RunDir(run), size)
    it = iter(dm.train_dataloader())
    first = next(it)  # the workers are up
    t, seen = time.perf_counter(), 0
    for _ in range(n_batches):
        try:
            seen += len(next(it)[1])
        except StopIteration:
            it = iter(dm.train_dataloader())
    return seen / (time.perf_counter() - t), first, dm.categories


def step_rate(backbone: str, size: int, batch: list, categories, steps: int) -> float:
    """Images/s of forward + backward + AdamW step of the whole network on one batch held on the device."""
    dev = best_device()
    cfg = TrainConfig.build(backbone=backbone, image_size=size, embed_dim=256, metric_loss="subcenter_arcface")
    net = EmbeddingNet(ModelConfig(backbone, None, size, 256, len(categories)))
    mod = RetrievalModule(net.to(memory_format=torch.channels_last), cfg, categories, {}).to(dev)
    mod.log_dict = lambda *a, **k: None
    opt = torch.optim.AdamW(mod.parameters(), 1e-3)
    b = [x.to(dev, non_blocking=True) for x in batch]
    for i in range(steps + 3):
        if i == 3:
            _sync(dev)
            t = time.perf_counter()
        with autocast_for(dev):
            loss = mod.training_step(b, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(dev)
    return steps * len(b[1]) / (time.perf_counter() - t)


def forward_rate(net, size: int, batch: int, reps: int) -> float:
    """Images/s of the model's embedding forward alone, uint8 images already on the device."""
    dev = next(net.parameters()).device
    x = torch.randint(0, 255, (batch, 3, size, size), dtype=torch.uint8, device=dev)
    with torch.inference_mode(), autocast_for(dev):
        for i in range(reps + 2):
            if i == 2:
                _sync(dev)
                t = time.perf_counter()
            net(x)
    _sync(dev)
    return reps * batch / (time.perf_counter() - t)


def one_backbone(work: Path, data: Path, backbone: str, a: argparse.Namespace, batch0: list, categories) -> list:
    size = a.image_size
    step = step_rate(backbone, size, batch0, categories, a.steps)
    run = work / f"run_{backbone}"
    shutil.rmtree(run, ignore_errors=True)
    train(data / "train.bson", run, TrainConfig.build(backbone=backbone, image_size=size, embed_dim=256, max_steps=2,
                                                      batch_size=16, val_fraction=0.0, workers=0),
          data / "category_names.csv", progress=False)
    loader = LoaderSettings(batch_size=a.batch, workers=a.workers)
    index = work / f"index_{backbone}"
    shutil.rmtree(index, ignore_errors=True)
    man = build_index(data / "train.bson", run, index, IndexSettings("all"), loader)
    net = open_index(index).net
    fwd = forward_rate(net, size, a.batch, a.steps)
    embed_e2e = man.embedding["images"] / man.embedding["seconds"]
    rep = predict(data / "test.bson", index, work / f"pred_{backbone}.csv", loader=loader,
                  settings=PredictSettings(restart=True))
    pred_e2e = rep.images / rep.seconds
    return [(backbone, "train step (fwd+bwd+AdamW, batch %d)" % len(batch0[1]), step, "",
             f"{TRAIN_IMAGES / step / 3600:.2f} h per epoch"),
            (backbone, "model forward only, embedding (batch %d)" % a.batch, fwd, "1.00x", ""),
            (backbone, "embed end to end (build-index)", embed_e2e, f"{embed_e2e / fwd:.2f}x", ""),
            (backbone, "predict end to end (whole command)", pred_e2e, f"{pred_e2e / fwd:.2f}x",
             f"{TEST_IMAGES / pred_e2e / 3600:.2f} h for test.bson")]


def main() -> None:
    ap = harness.parser(__doc__, workdir="bench_out/gpu")
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2"])
    ap.add_argument("--products", type=int, default=6000)
    ap.add_argument("--image-size", type=int, default=180, help="Cdiscount's pictures are 180 px")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="timed train steps and forward batches")
    ap.add_argument("--loader-batches", type=int, default=40)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    a = harness.start(ap, quick={"backbones": ["efficientnet_lite0"], "products": 40, "image_size": 64, "batch": 16,
                                 "steps": 2, "loader_batches": 2, "workers": 1})
    work = Path(a.workdir)
    data = work / f"data{a.image_size}"
    if not (data / "train.bson").exists():
        t = time.perf_counter()
        make_data(data, SynthConfig(a.products, 200, seed=0, image_size=a.image_size, test_fraction=0.5),
                  progress=False)
        print(f"generated {a.products:,} products at {a.image_size} px in {time.perf_counter() - t:.0f} s")
    dev = best_device()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    lr, batch0, cats = loader_rate(data, work / "loader_run", a.image_size, a.batch, a.workers, a.loader_batches)
    rows = []
    for backbone in a.backbones:
        rows += one_backbone(work, data, backbone, a, batch0, cats)
    precision = "bf16" if dev.type == "cuda" else "auto"
    print(f"\n## Throughput at {a.image_size} px on {name} ({a.workers} loader workers, precision {precision})\n")
    harness.table([("any", f"training loader (read, decode, augment; {a.workers} workers)", f"{lr:,.0f}", "",
                  f"{TRAIN_IMAGES / lr / 3600:.2f} h per epoch if the loader were the limit")]
                + [(b, what, f"{r:,.0f}", ratio, note) for b, what, r, ratio, note in rows],
                ("backbone", "what", "img/s", "vs forward only", "implied"))


if __name__ == "__main__":
    main()
