"""End to end on real photos, per CPU runtime: build-index + predict products/s, test accuracy (head, kNN, fused)
and `serve` by picture at 1 and 16 requests in flight, each as a ratio against today's default (torch, bf16
autocast where the CPU has it) measured in the same run.

    python bench/bench_runtime_e2e.py [--steps 60] [--image-size 128] [--requests 200] [--rounds 3]
                                      [--workdir bench_out/rt]
    python bench/bench_runtime_e2e.py --quick   # the tiny tower on 300 generated products (a smoke run)

One short fine-tune of EfficientNet-Lite0 (offline ImageNet weights) on the Grocery Store photos in Cdiscount's
format (../shared/data/grocery), then the same run indexed (train.bson) and queried (test.bson) by each runtime.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import harness
import loadgen
import numpy as np
from harness import start_server

from retrieval.data.offsets import load_offsets
from retrieval.errors import UserError
from retrieval.infer.evaluate import EvaluateSettings, evaluate
from retrieval.infer.indexdir.build import IndexSettings, build_index
from retrieval.infer.pipeline.embed import LoaderSettings
from retrieval.infer.predict import predict, read_submission
from retrieval.model.export import load_model_file
from retrieval.model.onnx_runtime import load_runtime
from retrieval.train.config import TrainConfig
from retrieval.train.run import train

GROCERY = harness.SHARED_DATA / "grocery"
RUNTIMES = ("torch", "onnx", "onnx-int8")


def serve_qps(idx: Path, runtime: str, pictures: list[bytes], n: int, log: Path) -> dict[int, float]:
    """POST /similar by picture over HTTP: requests/s at 1 and 16 in flight (a real `cli.py serve` process)."""
    server, url = start_server(idx, log, "--runtime", runtime, seconds=180)
    port = int(url.rsplit(":", 1)[1])
    try:
        host = f"127.0.0.1:{port}"
        reqs = [loadgen.multipart_request(host, "/similar", {"k": 10}, [("images", "q.jpg", p)]) for p in pictures]
        loadgen.load("127.0.0.1", port, reqs, 32, 4)  # warm up
        out = {}
        for conc in (1, 16):
            _, wall = loadgen.load("127.0.0.1", port, reqs, n, conc)
            out[conc] = n / wall
        return out
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    ap = harness.parser(__doc__, workdir="bench_out/runtime_e2e")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="alternating timed rounds of build-index + predict")
    a = harness.start(ap, quick={"steps": 5, "image_size": 32, "requests": 16})
    logging.basicConfig(level=logging.WARNING)
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    run, data = work / "run", GROCERY
    tower = {"backbone": "efficientnet_lite0", "pretrained": "imagenet"}
    if a.quick:  # the tiny tower on 300 generated products
        from retrieval.data.synth import SynthConfig, make_data
        data, tower = work / "data", {"backbone": "tiny"}
        if not (data / "train.bson").exists():
            make_data(data, SynthConfig(products=300, categories=6, image_size=32), progress=False)
    if not (run / "model.pt").exists():
        t = time.perf_counter()
        train(data / "train.bson", run, TrainConfig.build(**tower, image_size=a.image_size, max_steps=a.steps,
                                                          workers=2), progress=False)
        print(f"fine-tuned {tower['backbone']} for {a.steps} steps at {a.image_size} px in "
              f"{time.perf_counter() - t:.0f} s")
    test = data / "test.bson"
    truth = load_offsets(test, progress=False)
    if a.quick:  # generated test products carry no label: test_labels.csv has them
        from retrieval.infer.predict import read_submission as read_labels
        truth["category_id"] = read_labels(data / "test_labels.csv")[1]
    pictures = []
    from retrieval.data.offsets import RecordReader
    r = RecordReader(test, truth)
    for i in range(0, len(r), max(1, len(r) // 64)):
        pictures += r.read(i).images[:1]
    loader = LoaderSettings(batch_size=128, workers=2)
    exports, refused, rates = {}, {}, {rt: [] for rt in RUNTIMES}
    for rt in RUNTIMES[1:]:  # the export and its check happen once per model file: not part of the rate
        t = time.perf_counter()
        try:
            load_runtime(load_model_file(run / "model.pt", "cpu"), rt, run)
            exports[rt] = time.perf_counter() - t
        except UserError as e:
            refused[rt] = str(e)
    timed = [rt for rt in RUNTIMES if rt not in refused]
    mans = {}
    for _ in range(a.rounds):  # alternating rounds: this machine drifts by ~20% within minutes
        for rt in timed:
            idx, sub = work / f"index_{rt}", work / f"sub_{rt}.csv"
            for old in (idx, Path(f"{sub}.parts")):  # measured from nothing: no part is resumed
                shutil.rmtree(old, ignore_errors=True)
            t = time.perf_counter()
            mans[rt] = build_index(data / "train.bson", run, idx, IndexSettings("all", runtime=rt), loader)
            predict(test, idx, sub, loader=loader)
            rates[rt].append((mans[rt].count + len(truth)) / (time.perf_counter() - t))
    rows = []
    for rt in RUNTIMES:
        if rt in refused:
            rows.append((rt, f"refused: {refused[rt]}", "", "", "", "", "", ""))
            continue
        idx, sub = work / f"index_{rt}", work / f"sub_{rt}.csv"
        ids, cats = read_submission(sub)
        acc = float(np.mean(cats == truth["category_id"]))
        parts = ""
        if not a.quick:  # head, kNN and fused over the same test products (evaluate with test.bson as its file)
            shutil.rmtree(work / f"eval_{rt}", ignore_errors=True)
            m = evaluate(idx, test, out_dir=work / f"eval_{rt}", loader=loader, settings=EvaluateSettings(runtime=rt))
            parts = f"{m['head_accuracy']:.4f} / {m['knn_accuracy']:.4f} / {m['fused_accuracy']:.4f}"
            (run / "calibration.json").unlink(missing_ok=True)  # every runtime's predict runs uncalibrated alike
        qps = serve_qps(idx, rt, pictures, a.requests, work / f"serve_{rt}.log")
        if rt == "torch":
            ref = qps
        ratios = [x / y for x, y in zip(rates[rt], rates["torch"], strict=True)]  # per round, same minute
        rows.append((rt, f"{np.median(rates[rt]):.1f} ({min(rates[rt]):.0f}-{max(rates[rt]):.0f})",
                     f"{np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})", f"{acc:.4f}", parts,
                     f"{qps[1]:.0f} ({qps[1] / ref[1]:.2f}x)", f"{qps[16]:.0f} ({qps[16] / ref[16]:.2f}x)",
                     f"{mans[rt].count:,} + {len(truth):,}"))
    print(f"\n{tower['backbone']} @ {a.image_size} px, {os.cpu_count()} CPU cores; torch = today's default (bf16 "
          "autocast where the CPU has it); ratios against it, same run; one-time export and check (s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in exports.items()))
    print(f"build-index + predict timed in {a.rounds} alternating rounds: median (range) products/s, and the median "
          "(range) of the per-round ratios to torch")
    harness.table(rows, ("runtime", "build-index + predict products/s", "vs torch", "test accuracy (submission)",
                       "head / kNN / fused (evaluate on test, calibrated there)",
                       "serve by picture, 1 in flight QPS", "16 in flight QPS", "products indexed + predicted"))


if __name__ == "__main__":
    main()
