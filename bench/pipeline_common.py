"""A trained tiny-tower run on generated data, shared by the index, pipeline and serve benchmarks, and the
forward-only reference their end-to-end rates are compared with. Sizes come from each bench's options (its
``--quick`` sizes included): nothing here is global."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from retrieval.data.datasets import to_model_input
from retrieval.data.images import decode_image
from retrieval.data.offsets import RecordReader, load_offsets
from retrieval.data.synth import SynthConfig, make_data
from retrieval.infer.indexdir.build import IndexSettings, build_index, open_index
from retrieval.infer.pipeline.embed import embed_images
from retrieval.train.config import TrainConfig
from retrieval.train.run import train


def prepared(work: Path, products: int = 4000, categories: int = 40, epochs: int = 5,
             colour_shift: float = 45.0, relist_fraction: float = 0.25) -> dict:
    """Generated data and a trained tiny-tower run under ``work`` (made once)."""
    data = work / "data"
    if not (data / "train.bson").exists():
        make_data(data, SynthConfig(products, categories, seed=0, image_size=64, colour_shift=colour_shift,
                                    relist_fraction=relist_fraction), progress=False)
    run = work / "run"
    if not (run / "checkpoints" / "last.ckpt").exists():
        shutil.rmtree(run, ignore_errors=True)
        train(data / "train.bson", run,
              TrainConfig.build(image_size=64, embed_dim=128, epochs=epochs, val_fraction=0.1),
              data / "category_names.csv", progress=False)
    return {"data": data, "run": run}


def decoded_images(path: Path, rows: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    reader = RecordReader(path)
    imgs, owner = [], []
    for k, r in enumerate(rows):
        for pic in reader.read(int(r)).images:
            imgs.append(to_model_input(decode_image(pic, min_size=size), size, train=False))
            owner.append(k)
    return torch.stack(imgs), torch.tensor(owner)


def forward_only(net, images: torch.Tensor, owner: torch.Tensor, batch: int = 256) -> float:
    """Images/s of the model alone (decoded images already in memory), product-sized batches."""
    t = time.perf_counter()
    for lo in range(0, len(images), batch):
        o = owner[lo:lo + batch]
        embed_images(net, images[lo:lo + batch], o - o[0], int(o[-1] - o[0]) + 1)
    return len(images) / (time.perf_counter() - t)


def prepared_convnext(work: Path, products: int = 300) -> dict:
    """A convnext_tiny run at 180 px (two training steps: throughput only); ``products`` train and as many test
    products."""
    data = work / "data180"
    if not (data / "train.bson").exists():
        make_data(data, SynthConfig(products, 20, seed=0, image_size=180, test_fraction=1.0), progress=False)
    run = work / "run_convnext"
    if not (run / "checkpoints" / "last.ckpt").exists():
        shutil.rmtree(run, ignore_errors=True)
        train(data / "train.bson", run, TrainConfig.build(backbone="convnext_tiny", image_size=180, embed_dim=256,
                                                    max_steps=2, batch_size=8, val_fraction=0.0),
              data / "category_names.csv", progress=False)
    return {"data": data, "run": run}


def throughput(work: Path, p: dict, name: str) -> tuple[tuple, object, np.ndarray, torch.Tensor, torch.Tensor]:
    """(table row: build-index end to end vs forward only, bundle, rows, images, owner)."""
    train_bson = p["data"] / "train.bson"
    out = work / f"index_bench_{name}"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    man = build_index(train_bson, p["run"], out, IndexSettings("all"))
    t_build = time.perf_counter() - t
    bundle = open_index(out)
    net = bundle.net
    table = load_offsets(train_bson, progress=False)
    rows = np.flatnonzero(table["category_id"] >= 0)
    n_img = int(table["n_images"][rows].sum())
    images, owner = decoded_images(train_bson, rows, net.cfg.image_size)
    fwd = forward_only(net, images, owner)
    e2e = n_img / man.embedding["seconds"]
    row = (f"{name} @ {net.cfg.image_size}px: build-index embedding (read, decode, model, write) vs forward only "
           f"({fwd:,.0f} img/s)", f"{e2e:,.0f} img/s; whole command incl. start-up {n_img / t_build:,.0f} img/s",
           f"{e2e / fwd:.2f}x", ">= 0.8x", "ok" if e2e / fwd >= 0.8 else "MISS")
    return row, bundle, rows, images, owner


def instance_rate(bundle, table, rows, images, owner, mirror: bool) -> tuple[float, int]:
    """Share of products with >= 2 images whose first image alone finds the product at rank 1."""
    net = bundle.net
    multi = np.flatnonzero(table["n_images"][rows] >= 2)
    pick = np.searchsorted(owner.numpy(), multi)
    q, _ = embed_images(net, images[pick], torch.arange(len(pick)), len(pick), mirror=mirror)
    _, pos = bundle.vectors.search(q.cpu().numpy(), 1)
    return float((bundle.product_ids[pos[:, 0]] == table["product_id"][rows][multi]).mean()), len(multi)


def embedding_rows(work: Path, products: int = 4000, epochs: int = 5, convnext_products: int = 300) -> list[tuple]:
    """build-index's embedding rate vs forward only (convnext_tiny @ 180 px, tiny @ 64 px), and instance retrieval
    at rank 1 without and with ``--mirror``."""
    out_rows = []
    row, *_ = throughput(work, prepared_convnext(work, convnext_products), "convnext_tiny")
    out_rows.append(row)
    p = prepared(work, products, epochs=epochs, relist_fraction=0.0)  # no re-listed twins: rank 1 is the product
    row, bundle, rows, images, owner = throughput(work, p, "tiny")
    out_rows.append(row)
    table = load_offsets(p["data"] / "train.bson", progress=False)
    hit, n = instance_rate(bundle, table, rows, images, owner, mirror=False)
    out_rows.append((f"instance retrieval rank 1 ({n} products with >= 2 images)", f"{hit:.3f}", "", ">= 0.95",
                     "ok" if hit >= 0.95 else "MISS"))
    tta_dir = work / "index_bench_tiny_tta"
    shutil.rmtree(tta_dir, ignore_errors=True)
    build_index(p["data"] / "train.bson", p["run"], tta_dir, IndexSettings("all", mirror=True))
    hit, n = instance_rate(open_index(tta_dir), table, rows, images, owner, mirror=True)
    out_rows.append(("  same, index and query with --mirror-flip", f"{hit:.3f}", "", ">= 0.95",
                     "ok" if hit >= 0.95 else "MISS"))
    return out_rows
