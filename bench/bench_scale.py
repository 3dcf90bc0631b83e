"""The whole chain at catalogue scale over the real 5,270-category tree: how time and memory grow with N.

For each N (default 1M and Cdiscount's 7,069,896 generated products, 32 px pictures, Cdiscount-like skew with the
largest category at 1.1%, test products in Cdiscount's proportion: 1,768,182 at the full size), every stage runs
in a fresh process so that its peak RSS is its own: the offset table, training a tiny tower for a fixed number
of steps, build-index over the training split, evaluate over the validation split (5% of N, streamed: no cap;
peer calibration included), predict over test.bson (peer propagation as calibrated), and serve on the index
(start-up seconds and RSS, by-id and by-picture latency at 1 and 16 in flight, an add of 1,000 products).
Printed: seconds and peak RSS per stage and N, and the growth ratio from each N to the next.

Resumable stage by stage: a finished stage leaves ``WORKDIR/n<N>/stages/<stage>.json`` and is not run again
(``--redo STAGE`` runs one again); build-index and predict also resume their own parts. The work folder defaults
to ``~/cdiscount_scale``, outside the repository: a run longer than a session continues in the next one.
Then full vs sampled softmax at 5,270 classes: the head alone (forward+backward, 1280-d as EfficientNet-Lite,
batch 256), and whole training runs at the middle N (accuracy and step time).
Usage: python bench/bench_scale.py [--sizes 1000000 7069896] [--steps 300] [--workdir ~/cdiscount_scale]
       [--redo STAGE ...] [--until STAGE] [--no-softmax] [--out FILE] [--quick]
(--quick: 500 and 1,000 products, 1 training step, 40 serve queries, no softmax comparison: a smoke run)
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path

import harness

CATEGORIES_CSV = harness.SHARED_DATA / "category_names.csv"
STAGES = ("generate", "offsets", "train", "build-index", "evaluate", "predict", "serve")
TEST_FRACTION = 1_768_182 / 7_069_896  # Cdiscount's test products per training product
INDEX_MEMORY = 2e9  # build-index --index-memory 2: IVF-Flat at 1M products of 128-d, half floats (SQfp16) at 7M
TRAIN = dict(image_size=32, embed_dim=128, batch_size=256, val_fraction=0.05, workers=2, lr=3e-3)


WORK = {  # what a stage keeps to resume an interrupted run (removed when it is run again)
    "build-index": lambda w: [w / "index"], "predict": lambda w: [w / "submission.csv.parts"],
    "evaluate": lambda w: [w / "run" / "eval" / "parts"], "serve": lambda w: [w / "serve"],
    **{s: (lambda w: []) for s in ("generate", "offsets", "train")}}


def run_stage(stage: str, work: Path, n: int, steps: int, extra: dict) -> dict:
    """One stage in this process; returns seconds, peak RSS (this process: all, and anonymous only; largest
    worker) and a result."""
    data, run, idx = work / "data", work / extra.get("run", "run"), work / "index"
    anon = harness.PeakRSS("RssAnon")  # heap and arrays: what cannot be dropped, unlike mapped file pages
    t = time.perf_counter()
    result: object = None
    if stage == "generate":
        from retrieval.data.synth import SynthConfig, make_data
        make_data(data, SynthConfig(products=n, seed=0, image_size=32, test_fraction=TEST_FRACTION,
                                    categories_csv=str(CATEGORIES_CSV), largest_share=0.011), progress=False,
                  overwrite=True)
    elif stage == "offsets":
        from retrieval.data.offsets import load_offsets
        for f in data.glob("*.offsets.*"):
            f.unlink()
        files = [data / "train.bson", data / "test.bson"]
        for f in files:  # cold, at every size: a 58 GB file is never in the page cache
            _evict(f)
        t = time.perf_counter()
        for f in files:  # the reference: the disk's own sequential read of the same bytes, cold
            with open(f, "rb") as fh:
                while fh.read(16 << 20):
                    pass
            _evict(f)
        read_s = time.perf_counter() - t
        t = time.perf_counter()
        n_rows = len(load_offsets(files[0], progress=False)) + len(load_offsets(files[1], progress=False))
        result = {"products": n_rows, "cold_read_s": round(read_s, 1),
                  "scan_vs_read": round((time.perf_counter() - t) / read_s, 2)}
    elif stage == "train":
        from retrieval.train.config import TrainConfig
        from retrieval.train.run import train
        shutil.rmtree(run, ignore_errors=True)
        cfg = TrainConfig.build(**{**TRAIN, **extra.get("train", {})}, **(
            {"epochs": extra["epochs"]} if "epochs" in extra else {"max_steps": steps}))
        res = train(data / "train.bson", run, cfg, data / "category_names.csv", progress=False)
        result = res.best_val_accuracy
    elif stage == "build-index":
        from retrieval.infer.indexdir.build import IndexSettings, build_index
        man = build_index(data / "train.bson", run, idx, IndexSettings("train", memory_budget=INDEX_MEMORY))
        result = {"products": man.count, "factory": man.factory, "recall_at_10": man.tuned_recall_at_10}
    elif stage == "evaluate":
        from retrieval.infer.evaluate import evaluate
        m = evaluate(idx)
        result = {k: m[k] for k in ("products", "head_accuracy", "knn_accuracy", "fused_accuracy") if k in m}
    elif stage == "predict":
        from retrieval.infer.indexdir.bundle import open_index
        from retrieval.infer.predict import predict, score_submission
        from retrieval.infer.scoring.fused import FusionOverrides
        from retrieval.infer.scoring.peers import load_peers
        calibrated = load_peers(open_index(idx, mmap=True).run).mu
        mu = calibrated or 0.5  # propagation is measured even where evaluate turned it off
        r = predict(data / "test.bson", idx, work / "submission.csv", FusionOverrides(peer_weight=mu))
        result = {"products": r.products, "peer_weight": mu, "calibrated_peer_weight": calibrated,
                  "peer_graph": r.params.get("peer_graph"),
                  "accuracy": score_submission(work / "submission.csv", data / "test_labels.csv"),
                  "stages": {k: round(v, 1) for k, v in r.stages.items()}}
    elif stage == "serve":
        from scale_serve import serve_figures
        result = serve_figures(idx, data / "test.bson", work / "serve", extra.get("serve_requests", 2000))
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "rss_mb": harness.status_mb("VmHWM"), "anon_mb": anon.stop(),
            "anon_timeline": anon.timeline, "worker_rss_mb": harness.status_children_mb(), "result": result}


def stage_in_child(stage: str, work: Path, n: int, steps: int, extra: dict | None = None,
                   spent: Path | None = None) -> dict:
    """Run one stage in a fresh process. With ``spent``, the seconds of earlier interrupted runs of this stage
    (kept there, updated every 10 s while it runs) are added to ``seconds``: a resumed stage reports its whole
    time, and ``resumed_s`` says how much of it came from earlier runs."""
    before = float(spent.read_text()) if spent is not None and spent.exists() else 0.0
    t0, done = time.perf_counter(), threading.Event()

    def tally(spent: Path) -> None:
        while not done.wait(10.0):
            tmp = spent.with_suffix(".tmp")
            tmp.write_text(f"{before + time.perf_counter() - t0:.1f}")
            tmp.replace(spent)
    if spent is not None:
        threading.Thread(target=tally, args=(spent,), daemon=True).start()
    out = subprocess.run([sys.executable, __file__, "--stage", stage, "--workdir", str(work), "--n", str(n),
                          "--steps", str(steps), "--extra", json.dumps(extra or {})],
                         capture_output=True, text=True)
    done.set()
    if out.returncode != 0:
        raise RuntimeError(f"stage {stage} at N={n} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if before:
        r["seconds"], r["resumed_s"] = r["seconds"] + before, before
    return r


def head_softmax_times(classes: int = 5270, dim: int = 1280, batch: int = 256, negatives: int = 512) -> tuple:
    """Seconds per forward+backward of the classification head alone: full softmax vs sampled."""
    import torch
    import torch.nn.functional as F

    from retrieval.train.losses import sampled_softmax_loss
    head = torch.nn.Linear(dim, classes)
    z = torch.randn(batch, dim, requires_grad=True)
    y = torch.randint(0, classes, (batch,))

    def full():
        F.cross_entropy(head(z), y, label_smoothing=0.1).backward()

    def sampled():
        sampled_softmax_loss(z, head, y, negatives, 0.1).backward()
    return harness.best_time(full, 20), harness.best_time(sampled, 20)


def _evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (clean pages: no root needed), so that a read of it is cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    ap = harness.parser(__doc__, workdir=Path.home() / "cdiscount_scale")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--redo", nargs="*", default=[], choices=STAGES, help="run these stages again")
    ap.add_argument("--keep-embeddings", action="store_true",
                    help="with --redo build-index: keep its embedded parts, so that only the FAISS index is built "
                         "again (after a change of index layout; the stage's time is then the index's alone)")
    ap.add_argument("--until", choices=STAGES, help="stop after this stage (the rest run in a later call)")
    ap.add_argument("--no-softmax", action="store_true", help="skip the full vs sampled softmax comparison")
    ap.add_argument("--softmax-epochs", type=int, default=2)
    ap.add_argument("--stage", choices=STAGES)
    ap.add_argument("--n", type=int)
    ap.add_argument("--extra", default="{}")
    ap.add_argument("--serve-requests", type=int, default=2000, help="by-id queries per concurrency of the serve "
                    "stage (a quarter as many by picture)")
    a = harness.parse(ap, quick={"sizes": [500, 1000], "steps": 1, "no_softmax": True, "serve_requests": 40})
    if a.stage:  # a child running one stage: its JSON line is read by the parent, no results file
        print(json.dumps(run_stage(a.stage, Path(a.workdir), a.n, a.steps, json.loads(a.extra))))
        return
    if a.quick and a.workdir == ap.get_default("workdir"):
        a.workdir = Path("bench_out/scale_quick")
    harness.record(a, ap.description)
    if not CATEGORIES_CSV.exists():
        sys.exit(f"{CATEGORIES_CSV} is needed (the real category tree)")
    root = Path(a.workdir)
    found: dict[tuple[str, int], dict] = {}
    for n in a.sizes:
        done_dir = root / f"n{n}" / "stages"
        done_dir.mkdir(parents=True, exist_ok=True)
        for i, stage in enumerate(STAGES):
            saved = done_dir / f"{stage}.json"
            fresh = stage in a.redo or any(s in a.redo for s in STAGES[:i])
            if fresh:
                (done_dir / f"{stage}.spent").unlink(missing_ok=True)
            earlier = None
            if fresh and saved.exists():
                earlier = json.loads(saved.read_text())
                saved.unlink()  # a stage run again invalidates the ones after it, and its kept parts
                keep = a.keep_embeddings and stage == "build-index"
                for work in ([] if keep else WORK[stage](root / f"n{n}")):
                    shutil.rmtree(work, ignore_errors=True)
            if saved.exists():
                found[stage, n] = r = json.loads(saved.read_text())
                print(f"N={n:,} {stage}: kept from an earlier run", flush=True)
            else:
                spent = done_dir / f"{stage}.spent"
                found[stage, n] = r = stage_in_child(stage, root / f"n{n}", n, a.steps,
                                                     {"serve_requests": a.serve_requests}, spent=spent)
                if earlier is not None and a.keep_embeddings and stage == "build-index":
                    r["index_only"], r["earlier"] = True, {k: earlier[k] for k in ("seconds", "result") if k in earlier}
                tmp = saved.with_suffix(".tmp")
                tmp.write_text(json.dumps(r))
                tmp.replace(saved)
                spent.unlink(missing_ok=True)
            print(f"N={n:,} {stage}: {r['seconds']:.1f} s, peak RSS {r['rss_mb']:.0f} MB "
                  f"(anonymous {r.get('anon_mb', float('nan')):.0f} MB), {r['result']}", flush=True)
            if stage == a.until:
                break
    if a.until:
        return
    rows = []
    for stage in STAGES:
        row: list = [stage]
        for n in a.sizes:
            r = found[stage, n]
            row += [f"{r['seconds']:.1f}", f"{r['rss_mb']:.0f} / {r.get('anon_mb', float('nan')):.0f} / "
                                           f"{r['worker_rss_mb']:.0f}"]
        for n0, n1 in pairwise(a.sizes):
            r0, r1 = found[stage, n0], found[stage, n1]
            anon = r1.get("anon_mb", float("nan")) / r0.get("anon_mb", float("nan"))
            row += [f"{r1['seconds'] / r0['seconds']:.2f}x", f"{r1['rss_mb'] / r0['rss_mb']:.2f}x / {anon:.2f}x"]
        rows.append(tuple(row))
    header = ["stage"]
    for n in a.sizes:
        header += [f"s @ {n:,}", f"peak RSS MB (all / anonymous / worker) @ {n:,}"]
    for n0, n1 in pairwise(a.sizes):
        header += [f"time {n0:,}->{n1:,}", f"RSS all / anonymous {n0:,}->{n1:,}"]
    print()
    harness.table(rows, tuple(header))
    peak = max(found[st, n]["rss_mb"] for st in STAGES for n in a.sizes)
    print(f"\nlargest peak RSS of any stage: {peak / 1024:.2f} GB (goal <= 12 GB)")
    for n0, n1 in pairwise(a.sizes):
        grow = n1 / n0
        for st in ("offsets", "build-index", "evaluate", "predict"):  # per-product stages: time should grow ~ N
            r = found[st, n1]["seconds"] / found[st, n0]["seconds"]
            goal = 7.5 * grow / 7.07  # 7.5x for 1M -> 7.07M, scaled to other sizes
            print(f"{st} {n0:,} -> {n1:,}: time {r:.2f}x for {grow:.2f}x the products (goal <= {goal:.2f}x)")
        for st in ("evaluate", "predict"):
            r0, r1 = found[st, n0], found[st, n1]
            print(f"{st} {n0:,} -> {n1:,}: peak RSS {r1['rss_mb'] / r0['rss_mb']:.2f}x, anonymous "
                  f"{r1.get('anon_mb', float('nan')) / r0.get('anon_mb', float('nan')):.2f}x (goal <= 1.5x)")
    for n in a.sizes:  # offsets is bound by the disk: its time against a plain cold read of the same files
        off = found["offsets", n]["result"]
        if isinstance(off, dict):
            print(f"offsets @ {n:,}: {found['offsets', n]['seconds']:.1f} s, a plain cold read of the files "
                  f"{off['cold_read_s']} s: scan / read {off['scan_vs_read']:.2f}")
    ev = {n: found["evaluate", n]["result"] for n in a.sizes}
    print("\nevaluate (no product cap):", json.dumps(ev))
    print("serve:", json.dumps({n: found["serve", n]["result"] for n in a.sizes}))
    if a.no_softmax:
        return

    full_s, sampled_s = head_softmax_times()
    mid = a.sizes[len(a.sizes) // 2]
    work = root / f"n{mid}"
    res = {neg: stage_in_child("train", work, mid, a.steps, {"run": f"run_{neg}", "epochs": a.softmax_epochs,
                                                              "train": {"sampled_negatives": neg}}) for neg in (0, 512)}
    per_step = {neg: r["seconds"] / _steps(work / f"run_{neg}") for neg, r in res.items()}
    acc = {neg: r["result"] or 0.0 for neg, r in res.items()}
    print(f"\nfull vs sampled softmax (512 negatives) at 5,270 classes: head alone, and training at N={mid:,} "
          f"({a.softmax_epochs} epochs, tiny tower, 32 px, 128-d)")
    harness.table([
        ("head alone (1280-d, batch 256), ms per fwd+bwd", full_s * 1e3, sampled_s * 1e3, f"{sampled_s / full_s:.2f}x"),
        ("training, s per step (whole run / steps)", per_step[0], per_step[512], f"{per_step[512] / per_step[0]:.2f}x"),
        ("validation product accuracy (best epoch)", acc[0], acc[512], f"{acc[512] - acc[0]:+.4f}")],
        ("measure", "full", "sampled", "sampled vs full"))


def _steps(run: Path) -> int:
    """Optimizer steps a run logged."""
    with open(run / "logs" / "metrics.csv") as f:
        return max(1, max(int(r["step"]) for r in csv.DictReader(f) if r.get("step")) + 1)


if __name__ == "__main__":
    main()
