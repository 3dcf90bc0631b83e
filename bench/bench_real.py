"""Accuracy on real photographs: the Grocery Store data set in Cdiscount BSON form (81 classes, ../shared/data/grocery).

One run prints product accuracy on test.bson of (a) kNN over plain ImageNet EfficientNet-Lite0 features,
(b) the head after fine-tuning the pretrained backbone on train.bson, (c) kNN after fine-tuning, (d) fused with
the alpha, k, tau, beta that `evaluate` calibrated on val.bson, (e) the same fine-tuning from random init; and
recall@1 of `similar`.
Usage: python bench/bench_real.py [--epochs 3] [--image-size 160] [--crop-min 0.35] [--colour-aug 0.3]
       [--workdir bench_out/real]
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import common
import numpy as np
import torch
import torch.nn.functional as F

from index import VectorIndex, knn_vote
from retrieval.data.datasets import ProductDataset, product_loader
from retrieval.data.images import decode_image, encode_jpeg
from retrieval.data.offsets import RecordReader, load_offsets
from retrieval.model.network import create_backbone
from retrieval.model.runtime import autocast_for
from retrieval.infer.evaluate import evaluate
from retrieval.infer.folder import build_index, open_index
from retrieval.infer.predict import predict, read_submission
from retrieval.infer.query import similar
from retrieval.train.config import TrainConfig
from retrieval.train.run import train

GROCERY = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery"


@torch.no_grad()
def imagenet_features(path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm pooled ImageNet Lite0 features ``[N, 1280]`` and category ids of every product."""
    tower, _, mean, std = create_backbone("efficientnet_lite0", "imagenet", size)
    tower.eval()
    m, s = torch.tensor(mean).view(1, 3, 1, 1) * 255, torch.tensor(std).view(1, 3, 1, 1) * 255
    table = load_offsets(path, progress=False)
    feats = []
    for b in product_loader(ProductDataset(RecordReader(path, table), np.arange(len(table)), size), 128, 2):
        with autocast_for(torch.device("cpu")):
            f = tower((b.images.float() - m) / s).float()
        feats.append(F.normalize(f, dim=-1).numpy())
    return np.concatenate(feats), table["category_id"]


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 10, tau: float = 0.05) -> float:
    classes, y = np.unique(train_y, return_inverse=True)
    vi = VectorIndex.create(train_x.shape[1], "Flat")
    vi.add(train_x, y)
    sims, pos = vi.search(test_x, k)
    pred = classes[knn_vote(sims, vi.labels[pos], len(classes), tau).argmax(1)]
    return float((pred == test_y).mean())


def test_accuracy(sub: Path, test: Path) -> float:
    ids, cats = read_submission(sub)
    table = load_offsets(test, progress=False)
    assert np.array_equal(ids, table["product_id"])
    return float((cats == table["category_id"]).mean())


def finetune(work: Path, name: str, pretrained: str | None, a: argparse.Namespace) -> dict:
    """Train on every product of train.bson, index them, calibrate alpha/k/tau/beta with `evaluate` on the shipped
    val.bson (photos of another session, like test.bson), predict test.bson."""
    run, t0 = work / name, time.perf_counter()
    if not (run / "model.pt").exists():
        shutil.rmtree(run, ignore_errors=True)
        cfg = TrainConfig.build(backbone="efficientnet_lite0", pretrained=pretrained, image_size=a.image_size,
                                embed_dim=256, epochs=a.epochs, batch_size=64, lr=a.lr,
                                backbone_lr_mult=a.backbone_lr_mult if pretrained else 1.0, warmup_fraction=0.1,
                                m_per_class=4, val_fraction=0.0, crop_min=a.crop_min, colour_jitter=a.colour_aug,
                                workers=2)
        train(GROCERY / "train.bson", run, cfg, progress=False)
    t_train = time.perf_counter() - t0
    idx = work / f"{name}_idx"
    if not (idx / "manifest.json").exists():
        build_index(GROCERY / "train.bson", run, idx, "all")
    m = evaluate(idx, GROCERY / "val.bson", out_dir=work / f"{name}_eval")
    out = {"train_s": t_train, "val_head": m["head_accuracy"], "val_knn": m["knn_accuracy"],
           "val_fused": m["fused_accuracy"], "cal": m["calibration"]}
    for key, kw in (("head", {"alpha": 1.0, "beta": 0.0}), ("knn", {"alpha": 0.0, "beta": 0.0}), ("fused", {})):
        sub = work / f"{name}_{key}.csv"
        predict(GROCERY / "test.bson", idx, sub, restart=True, **kw)
        out[key] = test_accuracy(sub, GROCERY / "test.bson")
    return out


def similar_recall(work: Path, name: str, n: int = 150) -> tuple[float, float]:
    """Instance recall@1 (a mirrored, 90%-cropped copy of an indexed picture finds its product) and category
    recall@1 (a test product's nearest indexed product has its category)."""
    bundle = open_index(work / f"{name}_idx")
    reader = RecordReader(GROCERY / "train.bson")
    rng = np.random.default_rng(0)
    hits = 0
    for row in rng.choice(len(reader), n, replace=False):
        p = reader.read(int(row))
        rgb = decode_image(p.images[0])
        h, w = rgb.shape[:2]
        crop = np.ascontiguousarray(rgb[h // 20: h - h // 20, w // 20: w - w // 20][:, ::-1])
        f = work / "query.jpg"
        f.write_bytes(encode_jpeg(crop))
        hits += similar(bundle, images=[f], k=1)[0].product_id == p.product_id
    test = RecordReader(GROCERY / "test.bson")
    cat_hits = 0
    for row in rng.choice(len(test), n, replace=False):
        p = test.read(int(row))
        f = work / "query.jpg"
        f.write_bytes(p.images[0])
        cat_hits += similar(bundle, images=[f], k=1)[0].category_id == p.category_id
    return hits / n, cat_hits / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="bench_out/real")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--backbone-lr-mult", type=float, default=0.1)
    ap.add_argument("--crop-min", type=float, default=0.35)
    ap.add_argument("--colour-aug", type=float, default=0.3)
    ap.add_argument("--skip-random-init", action="store_true")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    tx, ty = imagenet_features(GROCERY / "train.bson", a.image_size)
    vx, vy = imagenet_features(GROCERY / "val.bson", a.image_size)
    qx, qy = imagenet_features(GROCERY / "test.bson", a.image_size)
    k, tau = max(((k, tau) for k in (1, 5, 10, 20) for tau in (0.02, 0.05, 0.1)),
                 key=lambda kt: knn_accuracy(tx, ty, vx, vy, *kt))  # chosen on val.bson, as evaluate does
    plain = knn_accuracy(tx, ty, qx, qy, k, tau)
    t_plain = time.perf_counter() - t
    pre = finetune(work, "pretrained", "imagenet", a)
    scratch = None if a.skip_random_init else finetune(work, "random_init", None, a)
    inst, cat = similar_recall(work, "pretrained")
    print(f"## Grocery Store (real photos, 81 classes): test product accuracy, EfficientNet-Lite0 @ {a.image_size} px, "
          f"{a.epochs} epochs, lr {a.lr} (backbone x{a.backbone_lr_mult}), crops >= {a.crop_min}, colour "
          f"{a.colour_aug}\n")
    common.print_table([
        (f"(a) kNN over ImageNet features, no training (k {k}, tau {tau} from val.bson)", plain, f"{t_plain:.0f}"),
        ("(b) head, fine-tuned from ImageNet", pre["head"], f"{pre['train_s']:.0f}"),
        ("(c) kNN, fine-tuned from ImageNet", pre["knn"], ""),
        (f"(d) fused, calibrated {pre['cal']}", pre["fused"], ""),
        *([("(e) fused, same recipe from random init", scratch["fused"], f"{scratch['train_s']:.0f}"),
           ("(e) head, random init", scratch["head"], "")] if scratch else []),
    ], ("what", "test accuracy", "seconds"))
    print()
    common.print_table([("instance recall@1 (mirrored, cropped copy finds its product)", inst),
                        ("category recall@1 (test photo's nearest indexed product)", cat)], ("similar", "value"))
    print(f"\nval.bson (calibration): pretrained head {pre['val_head']:.3f}, kNN {pre['val_knn']:.3f}, fused "
          f"{pre['val_fused']:.3f}" + (f"; random init head {scratch['val_head']:.3f}, fused {scratch['val_fused']:.3f}"
                                       if scratch else ""))


if __name__ == "__main__":
    main()
