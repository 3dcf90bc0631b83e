"""Pipeline benchmark: head/kNN/fused accuracy, predict throughput vs forward-only, stage shares, demo time.

    python bench/bench_pipeline.py [--workdir bench_out/pipeline] [--skip-demo] [--quick]
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import torch
from pipeline_common import decoded_images, forward_only, prepared, prepared_convnext

from retrieval.data.datasets import to_model_input
from retrieval.data.images import decode_image
from retrieval.data.offsets import RecordReader, load_offsets
from retrieval.infer.evaluate import evaluate
from retrieval.infer.indexdir.build import IndexSettings, build_index, open_index
from retrieval.infer.indexdir.folder import IndexFolder
from retrieval.infer.pipeline.embed import embed_images
from retrieval.infer.predict import predict
from retrieval.infer.scoring.candidates import Candidates, neighbour_labels
from retrieval.infer.scoring.fused import FusedClassifier


def stage_shares(test: Path, bundle, params: dict) -> dict[str, float]:
    """Seconds per stage, each measured alone on the same test products."""
    net = bundle.net
    table = load_offsets(test, progress=False)
    reader = RecordReader(test, table)
    t = time.perf_counter()
    prods = [reader.read(i) for i in range(len(table))]
    s = {"read": time.perf_counter() - t}
    t = time.perf_counter()
    imgs, owner = [], []
    for k, p in enumerate(prods):
        for pic in p.images:
            imgs.append(to_model_input(decode_image(pic, min_size=net.cfg.image_size), net.cfg.image_size, False))
            owner.append(k)
    s["decode"] = time.perf_counter() - t
    images, owner = torch.stack(imgs), torch.tensor(owner)
    t = time.perf_counter()
    embs, probs = [], []
    for lo in range(0, len(prods), 146):  # ~256 images per batch
        m = (owner >= lo) & (owner < lo + 146)
        e, p = embed_images(net, images[m], owner[m] - lo, min(146, len(prods) - lo))
        embs.append(e.numpy()), probs.append(p.numpy())
    s["model"] = time.perf_counter() - t
    emb, prob = np.concatenate(embs), np.concatenate(probs)
    t = time.perf_counter()
    has = np.ones(len(emb), bool)
    sims, labels = neighbour_labels(bundle.vectors, emb, int(params["k"]), has)
    s["search"] = time.perf_counter() - t
    t = time.perf_counter()
    clf = FusedClassifier(params["alpha"], params["k"], params["tau"], params["beta"], 0, params["temperature"],
                          tuple(params["weights"]) if params["weights"] else None)
    clf.predict_candidates(Candidates.build(prob, (sims, labels), has))
    s["fusion"] = time.perf_counter() - t
    s["_fwd_img_s"] = forward_only(net, images, owner)
    return s


def convnext_predict(work: Path, products: int) -> tuple[float, float, int]:
    """(predict img/s over its product loop, forward-only img/s, images) for a convnext_tiny run at 180 px.
    The loop (read, decode, model, search, fusion, writing parts) excludes start-up: model build, hashing."""
    p = prepared_convnext(work, products)
    idx = work / "index_convnext"
    if not IndexFolder(idx).exists():
        build_index(p["data"] / "train.bson", p["run"], idx, IndexSettings("all"))
    rep = predict(p["data"] / "test.bson", idx, work / "submission_convnext.csv")
    net = open_index(idx).net
    table = load_offsets(p["data"] / "test.bson", progress=False)
    images, owner = decoded_images(p["data"] / "test.bson", np.arange(len(table)), net.cfg.image_size)
    return rep.images / sum(rep.stages.values()), forward_only(net, images, owner), rep.images


def main() -> None:
    ap = harness.parser(__doc__, workdir="bench_out/pipeline")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--products", type=int, default=6000)
    ap.add_argument("--categories", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--colour-shift", type=float, default=75.0)
    ap.add_argument("--convnext-products", type=int, default=300)
    a = harness.start(ap, quick={"products": 300, "categories": 10, "epochs": 1, "skip_demo": True,
                                 "convnext_products": 12})
    work = Path(a.workdir)
    p = prepared(work, a.products, a.categories, a.epochs, a.colour_shift)
    print(f"generated data: {a.products:,} products, {a.categories} categories, colour shift {a.colour_shift}, "
          f"64 px; tiny tower, {a.epochs} epochs\n")
    train_bson, test_bson = p["data"] / "train.bson", p["data"] / "test.bson"
    for split in ("train", "all"):
        if not IndexFolder(work / f"index_{split}").exists():
            build_index(train_bson, p["run"], work / f"index_{split}", IndexSettings(split))
    m = evaluate(work / "index_train", out_dir=work / "eval")
    best_single = max(m["head_accuracy"], m["knn_accuracy"])
    print("## Accuracy on the validation split (products), generated data, tiny tower\n")
    harness.table([("head only", f"{m['head_accuracy']:.4f}", ""),
                 (f"kNN only (k={m['knn_best']['k']}, tau={m['knn_best']['tau']})", f"{m['knn_accuracy']:.4f}", ""),
                 (f"fused (alpha={m['calibration']['alpha']}, k={m['calibration']['k']}, "
                  f"tau={m['calibration']['tau']})",
                  f"{m['fused_accuracy']:.4f}", "ok" if m["fused_accuracy"] >= best_single else "MISS (goal >= best)")],
                ("predictor", "product accuracy", ""))
    rep = predict(test_bson, work / "index_all", work / "submission.csv")
    bundle = open_index(work / "index_all")
    s = stage_shares(test_bson, bundle, rep.params)
    fwd = s.pop("_fwd_img_s")
    e2e = rep.images / rep.seconds
    loop = rep.images / sum(rep.stages.values())  # read, decode, model, search, fusion: no start-up
    cx = convnext_predict(work, a.convnext_products)
    print(f"\n## predict end to end vs model forward only on the same images ({rep.images:,} tiny, "
          f"{cx[2]:,} convnext)\n")
    harness.table([("tiny @ 64px: forward only", f"{fwd:,.0f} img/s", "reference", ""),
                 ("tiny @ 64px: predict end to end (whole command)",
                  f"{e2e:,.0f} img/s, {rep.products / rep.seconds:,.0f} products/s",
                  f"{e2e / fwd:.2f}x forward", "ok" if e2e / fwd >= 0.8 else "MISS (goal >= 0.8x)"),
                 ("tiny @ 64px: predict, product loop", f"{loop:,.0f} img/s", f"{loop / fwd:.2f}x forward",
                  "ok" if loop / fwd >= 0.8 else "MISS (goal >= 0.8x)"),
                 ("convnext_tiny @ 180px: forward only", f"{cx[1]:,.1f} img/s", "reference", ""),
                 ("convnext_tiny @ 180px: predict, product loop", f"{cx[0]:,.1f} img/s",
                  f"{cx[0] / cx[1]:.2f}x forward",
                  "ok" if cx[0] / cx[1] >= 0.8 else "MISS (goal >= 0.8x)"),
                 ("implied real test set (3,095,080 images), convnext_tiny, this CPU",
                  f"{3_095_080 / cx[0] / 3600:,.0f} h", "", "")],
                ("measure", "value", "ratio", ""))
    total = sum(s.values())
    print("\n## Share of time per stage (each measured alone on the same products)\n")
    harness.table([(k, f"{v:.2f}", f"{100 * v / total:.1f}%") for k, v in s.items()], ("stage", "seconds", "share"))
    if not a.skip_demo:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            subprocess.run([sys.executable, str(harness.ROOT / "cli.py"), "demo", "--workdir", tmp + "/demo"],
                           check=True, capture_output=True)
            print(f"\ndemo wall time: {time.perf_counter() - t:.0f} s (goal < 600 s on 2 cores)")


if __name__ == "__main__":
    main()
