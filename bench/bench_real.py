"""Accuracy on real photographs: the Grocery Store data set in Cdiscount BSON form (81 classes, ../shared/data/grocery).

Prints test.bson product accuracy, each with a 95% Wilson interval, of
  (a)  a cosine kNN over the frozen ImageNet backbone's pooled features (k, tau chosen on val.bson),
  (a2) a linear probe on the same frozen features (logistic regression, L2 chosen on val.bson),
  (b)  the head, (c) the kNN and (d) the fused classifier after `train` with the default recipe for a pretrained
       backbone (what `train FILE --out RUN --backbone B --pretrained imagenet` runs), calibrated by `evaluate`
       on the shipped val.bson,
the paired difference fused - max(head, kNN, linear probe) (95% paired bootstrap interval), recall@1 of `similar`,
and a plot of test accuracy against training minutes for several epoch budgets (each a full run of that length).
The baselines here are written independently of the library (plain numpy / torch), so they check it.
Usage: python bench/bench_real.py [--budgets 1,2,4,8] [--image-size 160] [--backbone efficientnet_lite0]
       [--workdir bench_out/real] [--set lr=1e-3 ...] [--out FILE] [--quick]
       (GROCERY_DIR=folder reads the data from elsewhere than ../shared/data/grocery)
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import time
from pathlib import Path

import harness
import numpy as np
import torch
import torch.nn.functional as F
from grocery_tail import sample
from real_report import by_size_table, grid_gammas, plot
from tail_classifiers import balanced_classifiers

from index import knn_vote
from retrieval.data.images import decode_image, encode_jpeg
from retrieval.data.offsets import RecordReader, load_offsets
from retrieval.infer.evaluate import evaluate
from retrieval.infer.indexdir.build import IndexSettings, build_index, open_index
from retrieval.infer.predict import PredictSettings, predict, read_submission
from retrieval.infer.query import similar
from retrieval.infer.scoring.fused import FusionOverrides
from retrieval.model.config import ModelConfig
from retrieval.model.network import EmbeddingNet, product_mean
from retrieval.train.config import TrainConfig
from retrieval.train.probe import frozen_features
from retrieval.train.run import train

GROCERY = Path(os.environ.get("GROCERY_DIR") or harness.SHARED_DATA / "grocery")


def product_features(path: Path, backbone: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Frozen pooled ImageNet features per product ``[N, F]`` (mean over its pictures) and category ids ``[N]``."""
    net = EmbeddingNet(ModelConfig(backbone, "imagenet", size, 8, 1))
    table = load_offsets(path, progress=False)
    f = frozen_features(net, RecordReader(path, table), np.arange(len(table)), np.zeros(len(table), np.int64))
    return product_mean(f.x, f.owner, f.n_products).numpy(), table["category_id"]


def knn_predict(tx, ty, qx, k: int, tau: float) -> np.ndarray:
    """Cosine kNN vote (the index's vote: weights exp(sim / tau) over the k nearest) -> category ids ``[Q]``."""
    a, b = F.normalize(torch.as_tensor(tx), dim=1), F.normalize(torch.as_tensor(qx), dim=1)
    classes, y = np.unique(ty, return_inverse=True)
    sims, pos = (b @ a.T).topk(min(k, len(a)), dim=1)
    return classes[knn_vote(sims.numpy(), y[pos.numpy()], len(classes), tau).argmax(1)]


def linear_probe(tx, ty, qx, wd: float) -> np.ndarray:
    """Multinomial logistic regression on standardised features (L-BFGS, L2 ``wd``)."""
    classes, y = np.unique(ty, return_inverse=True)
    mu, sd = tx.mean(0), tx.std(0) + 1e-6
    x, yt = torch.tensor((tx - mu) / sd, dtype=torch.float32), torch.tensor(y)
    lin = torch.nn.Linear(x.shape[1], len(classes))
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), yt) + wd * (lin.weight ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return classes[lin(torch.tensor((qx - mu) / sd, dtype=torch.float32)).argmax(1).numpy()]


def frozen_baselines(a: argparse.Namespace, qy: np.ndarray) -> dict:
    t = time.perf_counter()
    (tx, ty), (vx, vy), (qx, _) = (product_features(GROCERY / f"{s}.bson", a.backbone, a.image_size)
                                   for s in ("train", "val", "test"))
    k, tau = max(((k, tau) for k in (1, 5, 10, 20) for tau in (0.02, 0.05, 0.1)),
                 key=lambda kt: (knn_predict(tx, ty, vx, *kt) == vy).mean())
    wd = max((1e-3, 1e-4, 1e-5), key=lambda w: (linear_probe(tx, ty, vx, w) == vy).mean())
    return {"knn": knn_predict(tx, ty, qx, k, tau) == qy, "lp": linear_probe(tx, ty, qx, wd) == qy,
            "what": f"k {k}, tau {tau}; L2 {wd}", "seconds": time.perf_counter() - t}


def finetune(work: Path, epochs: int, a: argparse.Namespace, qy: np.ndarray) -> dict:
    """Train on all of train.bson, index it, calibrate with `evaluate` on val.bson, predict test.bson; the same
    calibrated without the grid's prototype vote (gamma 0), and the class-balanced classifiers on the embeddings."""
    name = f"e{epochs}"
    run, t0 = work / name, time.perf_counter()
    shutil.rmtree(run, ignore_errors=True)
    cfg = TrainConfig.build(backbone=a.backbone, pretrained="imagenet", image_size=a.image_size, epochs=epochs,
                            val_fraction=0.0, **a.set)
    train(GROCERY / "train.bson", run, cfg, progress=False)
    t_train = time.perf_counter() - t0
    idx = work / f"{name}_idx"
    shutil.rmtree(idx, ignore_errors=True)
    build_index(GROCERY / "train.bson", run, idx, IndexSettings("all"))
    out = {}
    with grid_gammas((0.0,)):  # first calibrated without the prototype vote (the ablation), then as shipped
        evaluate(idx, GROCERY / "val.bson", out_dir=work / f"{name}_eval_noproto")
        predict(GROCERY / "test.bson", idx, work / f"{name}_noproto.csv", FusionOverrides(peer_weight=0.0),
                settings=PredictSettings(restart=True))
        out["fused_noproto"] = read_submission(work / f"{name}_noproto.csv")[1] == qy
    m = evaluate(idx, GROCERY / "val.bson", out_dir=work / f"{name}_eval")
    out.update({"minutes": t_train / 60, "val": (m["head_accuracy"], m["knn_accuracy"], m["fused_accuracy"]),
                "fusion": m["fusion"], "cal": m["calibration"], "peers": m["peers"], "index": idx})
    for key, kw in (("head", {"alpha": 1.0, "beta": 0.0, "gamma": 0.0}), ("knn", {"alpha": 0.0, "beta": 0.0,
                                                                                 "gamma": 0.0}),
                    ("fused_np", {"peer_weight": 0.0}), ("fused", {})):
        sub = work / f"{name}_{key}.csv"
        predict(GROCERY / "test.bson", idx, sub, FusionOverrides(**kw), settings=PredictSettings(restart=True))
        out[key] = read_submission(sub)[1] == qy
    bal = balanced_classifiers(run, idx, GROCERY / "val.bson", GROCERY / "test.bson", work / f"{name}_emb",
                               a.crt_steps)
    out.update({key: bal[key] for key in ("ncm", "crt", "knn_p05", "knn_p1")}, balanced_what=bal["what"])
    return out


def similar_recall(work: Path, idx: Path, n: int) -> tuple[float, float]:
    """Instance recall@1 (a mirrored, 90%-cropped copy of an indexed picture finds its product) and category
    recall@1 (a test product's nearest indexed product has its category)."""
    bundle, rng = open_index(idx), np.random.default_rng(0)
    reader, test, f = RecordReader(GROCERY / "train.bson"), RecordReader(GROCERY / "test.bson"), work / "query.jpg"
    hits = cat_hits = 0
    for row in rng.choice(len(reader), n, replace=False):
        p = reader.read(int(row))
        rgb = decode_image(p.images[0])
        h, w = rgb.shape[:2]
        f.write_bytes(encode_jpeg(np.ascontiguousarray(rgb[h // 20: h - h // 20, w // 20: w - w // 20][:, ::-1])))
        hits += similar(bundle, images=[f], k=1)[0].product_id == p.product_id
    for row in rng.choice(len(test), n, replace=False):
        p = test.read(int(row))
        f.write_bytes(p.images[0])
        cat_hits += similar(bundle, images=[f], k=1)[0].category_id == p.category_id
    return hits / n, cat_hits / n


def main() -> None:
    ap = harness.parser(__doc__, workdir="bench_out/real")
    ap.add_argument("--budgets", default="1,2,4,8", help="epoch budgets; the last is the headline run")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides, e.g. lr=1e-3 freeze_blocks=0")
    ap.add_argument("--recall-queries", type=int, default=600, help="0: no similar-product recall")
    ap.add_argument("--classes", type=int, default=0,
                    help="> 0: a sample of this many classes (20 train, 5 val, 15 test products each)")
    ap.add_argument("--crt-steps", type=int, default=1500, help="steps of each cRT fit (class-balanced batches)")
    a = harness.start(ap, quick={"budgets": "1", "image_size": 64, "recall_queries": 20, "classes": 12,
                                 "crt_steps": 150})
    a.set = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in a.set)}
    if a.classes:
        global GROCERY
        GROCERY = sample(Path(a.workdir) / "grocery", a.classes, {"train": 20, "val": 5, "test": 15}, 0, GROCERY)
    a.image_size = a.image_size or \
        TrainConfig.build(backbone=a.backbone, pretrained="imagenet", **a.set).model.image_size
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    qy = load_offsets(GROCERY / "test.bson", progress=False)["category_id"]
    base = frozen_baselines(a, qy)
    budgets = sorted(int(b) for b in a.budgets.split(","))
    runs = {e: finetune(work, e, a, qy) for e in budgets}
    main_run = runs[budgets[-1]]
    recipe = TrainConfig.build(backbone=a.backbone, pretrained="imagenet", **a.set)
    print(f"## Grocery Store (real photos, {len(np.unique(qy))} classes, {len(qy):,} test products): {a.backbone} @ "
          f"{a.image_size} px\n")
    print(f"recipe: {json.dumps({**recipe.schedule.__dict__, **recipe.data.__dict__, **recipe.loss.__dict__})}\n")
    rows = [("(a) kNN, frozen ImageNet features", base["knn"], "", base["what"].split(";")[0]),
            ("(a2) linear probe, frozen ImageNet features", base["lp"], "", base["what"].split("; ")[1])]
    for e in budgets:
        r = runs[e]
        rows += [(f"(b) head, fine-tuned {e} epochs", r["head"], f"{r['minutes']:.1f}", ""),
                 (f"(c) kNN, fine-tuned {e} epochs", r["knn"], "", ""),
                 (f"(e) nearest class mean, fine-tuned {e} epochs", r["ncm"], "", r["balanced_what"]),
                 (f"(f) cRT (class-balanced re-trained classifier), {e} epochs", r["crt"], "", ""),
                 (f"(g) kNN weighted by 1 / size^0.5, {e} epochs", r["knn_p05"], "", "k 20, tau 0.05"),
                 (f"(g1) kNN weighted by 1 / size, {e} epochs", r["knn_p1"], "", "k 20, tau 0.05"),
                 (f"(d1) fused without peers, without the prototype vote, {e} epochs", r["fused_noproto"], "",
                  "calibrated on val.bson with gamma 0"),
                 (f"(d0) fused without peers, {e} epochs", r["fused_np"], "",
                  f"{r['fusion']['rule']} rule (CV grid {r['fusion']['cv_grid']:.3f} / learnt "
                  f"{r['fusion']['cv_learnt']:.3f}), T {r['fusion']['temperature']:.2f}"),
                 (f"(d) fused, fine-tuned {e} epochs", r["fused"], "",
                  f"peer weight {r['peers']['mu']}, k {r['peers']['k']}, tau {r['peers']['tau']} (on val.bson "
                  f"{r['val'][2]:.3f} vs {r['peers']['fused_without_peers_accuracy']:.3f} without)")]
    table = [(what, float(c.mean()), harness.interval(*harness.proportion(c)[1:]), mins, note)
             for what, c, mins, note in rows]
    harness.table(table, ("what", "test accuracy", "95% interval", "train minutes", "notes"))
    best_part = max((main_run["head"], main_run["knn"], base["lp"]), key=np.mean)
    diff = main_run["fused"].astype(float) - best_part.astype(float)
    lo, hi = harness.paired_interval(diff)
    print(f"\nfused - max(head, kNN, linear probe) at {budgets[-1]} epochs: {diff.mean():+.4f} "
          f"(paired 95% interval [{lo:+.4f}, {hi:+.4f}])")
    for e in budgets:
        r = runs[e]
        best = max((r["head"], r["knn"], base["lp"]), key=np.mean).astype(float)
        d, d0 = r["fused"] - best, r["fused_np"] - best
        (lo, hi), (lo0, hi0) = harness.paired_interval(d), harness.paired_interval(d0)
        print(f"  {e} epochs: fused - max {d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]; "
              f"without peers {d0.mean():+.4f} [{lo0:+.4f}, {hi0:+.4f}]")
    print(f"val.bson at {budgets[-1]} epochs: head {main_run['val'][0]:.3f}, kNN {main_run['val'][1]:.3f}, "
          f"fused {main_run['val'][2]:.3f}\n")
    print("fused - frozen linear probe, per budget (goal: >= +0.01 with the paired interval above 0):")
    for e in budgets:
        d = runs[e]["fused"].astype(float) - base["lp"].astype(float)
        lo, hi = harness.paired_interval(d)
        print(f"  {e} epochs: {d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]")
    print()
    by_size_table(GROCERY, qy, base, runs, budgets)
    print()
    if a.recall_queries:
        inst, cat = similar_recall(work, main_run["index"], a.recall_queries)
        harness.table([("instance recall@1 (mirrored, cropped copy finds its product)", inst),
                            ("category recall@1 (test photo's nearest indexed product)", cat)], ("similar", "value"))
    print(f"\nplot: {plot(work, runs, base)}")


if __name__ == "__main__":
    main()
