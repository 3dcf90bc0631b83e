"""build-index and predict end to end on a GPU over a large generated set at Cdiscount's 180 px, against the model's
forward-only rate in the same run: does the pipeline keep the GPU fed now that batches are padded to a few shapes
(cuDNN plans each new input shape once)? Prints the stage times of predict and the implied time of test.bson.

The data are generated in parallel shards (one process per core; product ids offset per shard) and joined.
Usage: python bench/bench_gpu_scale.py [--products 200000] [--workers N] [--batch 256] [--workdir /tmp/gpu_scale]
       [--json OUT] [--quick]
(--quick: 40 generated 64 px products, batch 16: a smoke run that is quick on a CPU too)
"""
from __future__ import annotations

import json
import os
import shutil
import time
from multiprocessing import Pool
from pathlib import Path

import bson
import harness
import torch
from bench_gpu import TEST_IMAGES, forward_rate

from retrieval.data.synth import SynthConfig, make_data
from retrieval.infer.indexdir.build import IndexSettings, build_index
from retrieval.infer.indexdir.bundle import open_index
from retrieval.infer.pipeline.embed import LoaderSettings
from retrieval.infer.predict import PredictSettings, predict
from retrieval.train.config import TrainConfig
from retrieval.train.run import train

SHARD_IDS = 10 ** 9  # product ids of shard i start at i * SHARD_IDS


def _shard(args: tuple[Path, int, int, int]) -> Path:
    out, seed, n, size = args
    make_data(out, SynthConfig(n, 200, seed=seed, image_size=size, test_fraction=0.25), progress=False, overwrite=True)
    return out


def generate(data: Path, products: int, shards: int, size: int) -> float:
    """``products`` training products (and a quarter as many test products) in ``shards`` processes, joined."""
    t = time.perf_counter()
    data.mkdir(parents=True, exist_ok=True)
    jobs = [(data / f"shard{i}", i, products // shards, size) for i in range(shards)]
    with Pool(shards) as pool:
        dirs = pool.map(_shard, jobs)
    for name in ("train.bson", "test.bson"):
        with open(data / name, "wb") as out:
            for i, d in enumerate(dirs):
                with open(d / name, "rb") as f:
                    for doc in bson.decode_file_iter(f):
                        doc["_id"] += i * SHARD_IDS
                        out.write(bson.encode(doc))
    shutil.copy(dirs[0] / "category_names.csv", data / "category_names.csv")
    for d in dirs:
        shutil.rmtree(d)
    return time.perf_counter() - t


def main() -> None:
    ap = harness.parser(__doc__, workdir="/tmp/gpu_scale")
    ap.add_argument("--products", type=int, default=200_000)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=180, help="Cdiscount's pictures are 180 px")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20, help="timed forward batches")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--json", help="also write the figures here")
    a = harness.start(ap, quick={"products": 40, "image_size": 64, "batch": 16, "reps": 2, "workers": 1})
    size = a.image_size
    work = Path(a.workdir)
    data = work / f"data{size}"
    gen_s = generate(data, a.products, max(1, min(a.products // 20, (os.cpu_count() or 2) - 1)), size) \
        if not (data / "test.bson").exists() else 0
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    train(data / "train.bson", run, TrainConfig.build(backbone=a.backbone, image_size=size, embed_dim=256, max_steps=2,
                                                      batch_size=16, val_fraction=0.0, workers=0),
          data / "category_names.csv", progress=False)
    loader = LoaderSettings(batch_size=a.batch, workers=a.workers)
    index = work / "index"
    shutil.rmtree(index, ignore_errors=True)
    man = build_index(data / "train.bson", run, index, IndexSettings("all"), loader)
    embed = man.embedding["images"] / man.embedding["seconds"]
    fwd = forward_rate(open_index(index).net, size, a.batch, a.reps)
    rep = predict(data / "test.bson", index, work / "pred.csv", loader=loader, settings=PredictSettings(restart=True))
    pred = rep.images / rep.seconds
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n## {a.backbone} at {size} px on {name}: {man.count:,} indexed products ({man.embedding['images']:,} "
          f"images), {rep.products:,} predicted ({rep.images:,} images); {a.workers} loader workers; data generated "
          f"in {gen_s:.0f} s\n")
    harness.table([("model forward only (batch %d, bf16)" % a.batch, f"{fwd:,.0f}", "1.00x", ""),
                 ("build-index end to end (read, decode, model, index)", f"{embed:,.0f}", f"{embed / fwd:.2f}x", ""),
                 ("predict end to end (whole command)", f"{pred:,.0f}", f"{pred / fwd:.2f}x",
                  f"{TEST_IMAGES / pred / 60:.1f} min for test.bson ({TEST_IMAGES:,} images)")],
                ("what", "img/s", "vs forward only", "implied"))
    print("\npredict stage seconds:", json.dumps({k: round(v, 2) for k, v in rep.stages.items()}), "|", rep.decode)
    if a.json:
        Path(a.json).write_text(json.dumps({"forward": fwd, "build_index": embed, "predict": pred,
                                            "stages": rep.stages, "indexed": man.count, "images": rep.images,
                                            "generate_s": gen_s}, indent=1))


if __name__ == "__main__":
    main()
