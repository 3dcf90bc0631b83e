"""A trained tiny-tower run on generated data, shared by the index and pipeline benchmarks."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from retrieval.bsonio import RecordReader, load_offsets
from retrieval.dataset import _to_tensor
from retrieval.embed import embed_images
from retrieval.images import decode_image
from retrieval.indexing import build_index, open_index
from retrieval.synth import SynthConfig, make_data
from retrieval.train import TrainConfig, train


def prepared(work: Path, products: int = 4000, categories: int = 40, epochs: int = 5) -> dict:
    """Generated data, a trained run and a train-split index under ``work`` (made once)."""
    data = work / "data"
    if not (data / "train.bson").exists():
        make_data(data, SynthConfig(products, categories, seed=0, image_size=64), progress=False)
    run = work / "run"
    if not (run / "checkpoints" / "last.ckpt").exists():
        shutil.rmtree(run, ignore_errors=True)
        train(data / "train.bson", run, TrainConfig(image_size=64, embed_dim=128, epochs=epochs, val_fraction=0.1),
              data / "category_names.csv", progress=False)
    return {"data": data, "run": run}


def decoded_images(path: Path, rows: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    reader = RecordReader(path)
    imgs, owner = [], []
    for k, r in enumerate(rows):
        for pic in reader.read(int(r)).images:
            imgs.append(_to_tensor(decode_image(pic, min_size=size), size, train=False))
            owner.append(k)
    return torch.stack(imgs), torch.tensor(owner)


def forward_only(net, images: torch.Tensor, owner: torch.Tensor, batch: int = 256) -> float:
    """Images/s of the model alone (decoded images already in memory), product-sized batches."""
    t = time.perf_counter()
    for lo in range(0, len(images), batch):
        o = owner[lo:lo + batch]
        embed_images(net, images[lo:lo + batch], o - o[0], int(o[-1] - o[0]) + 1)
    return len(images) / (time.perf_counter() - t)


def embedding_rows(work: Path) -> list[tuple]:
    p = prepared(work)
    train_bson = p["data"] / "train.bson"
    out = work / "index_bench"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    man = build_index(train_bson, p["run"], out, "all")
    t_build = time.perf_counter() - t
    bundle = open_index(out)
    net = bundle.model[0]
    table = load_offsets(train_bson, progress=False)
    rows = np.flatnonzero(table["category_id"] >= 0)
    n_img = int(table["n_images"][rows].sum())
    images, owner = decoded_images(train_bson, rows, net.cfg.image_size)
    fwd = forward_only(net, images, owner)
    e2e = n_img / t_build
    # instance retrieval: one image of a product with >= 2 images -> is that product rank 1?
    multi = np.flatnonzero(table["n_images"][rows] >= 2)
    pick = np.searchsorted(owner.numpy(), multi)  # first image of each such product
    q, _ = embed_images(net, images[pick], torch.arange(len(pick)), len(pick))
    _, pos = bundle.index.search(q.cpu().numpy(), 1)
    hit = float((bundle.product_ids[pos[:, 0]] == table["product_id"][rows][multi]).mean())
    return [
        ("model forward only", f"{fwd:,.0f} img/s", "reference", "", ""),
        ("build-index end to end", f"{e2e:,.0f} img/s ({man['count'] / t_build:,.0f} products/s, "
                                   f"{man['factory']})", f"{e2e / fwd:.2f}x forward", ">= 0.8x",
         "ok" if e2e / fwd >= 0.8 else "MISS"),
        (f"instance retrieval rank 1 ({len(multi)} products, >= 2 images)", f"{hit:.3f}", "", ">= 0.95",
         "ok" if hit >= 0.95 else "MISS"),
    ]
