"""Latency and throughput of the HTTP API under a bounded concurrent load on 127.0.0.1.

A real server (`python cli.py serve`, uvicorn) over the trained tiny-tower index of pipeline_common; a lean load
generator (bench/loadgen.py: asyncio, raw sockets, requests encoded once) keeps C requests in
flight over C keep-alive connections. Printed: p50/p99 latency and QPS of POST /similar by product id and by an
uploaded picture, against the same query run inside one process (index search alone; embedding + search)
measured in the same run, so the ratio is the cost of HTTP, multipart parsing and JSON; GET /health at the same
concurrency is the floor that HTTP alone sets on this machine.
A second run grows the index by --extra-vectors random vectors (Flat): a catalogue where the search is the cost,
so that batching concurrent queries into one FAISS call shows.
Usage: python bench/bench_serve.py [--requests 400] [--concurrency 1 4 16] [--extra-vectors 200000]
       [--products 4000] [--epochs 5] [--workdir bench_out/pipeline] [--quick]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import harness
import httpx
import loadgen
import numpy as np
from pipeline_common import prepared

from retrieval.infer.indexdir.build import IndexSettings, build_index, open_index
from retrieval.infer.indexdir.folder import IndexFolder
from retrieval.infer.query import embed_pictures, neighbours, product_pictures

ROOT = harness.ROOT


def inflate(idx: Path, extra: int, seed: int = 0) -> None:
    """Grow an index by ``extra`` random unit vectors, committed as one new segment (Flat): a catalogue where the
    search, not the model or HTTP, is the cost of a query. The fake products carry product 0's pictures and
    stored data; only real products are queried by id."""
    from index import DuplicateTable, VectorIndex
    from retrieval.infer.indexdir.compact import commit_manifest
    from retrieval.infer.indexdir.segments import SegmentData, write_segment
    b = open_index(idx)
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(extra, b.manifest.dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    labels = rng.integers(0, len(b.categories.ids), extra)
    vi = VectorIndex.create(b.manifest.dim, "Flat")
    vi.add(v, labels)
    fake = {"product_ids": int(b.product_ids.max()) + 1 + np.arange(extra, dtype=np.int64),
            "category_ids": np.asarray(b.categories.ids, np.int64)[labels]}
    arrays = {k: fake[k] if k in fake else np.repeat(a[:1], extra) for k, a in b.arrays.items()}
    layout = IndexFolder(idx)
    with layout.writer():
        sid = write_segment(layout, vi, SegmentData(labels, arrays, DuplicateTable(np.zeros(0, np.int64),
                                                                                  np.zeros(0, np.int64)),
                                                    [("synthetic", extra)], [v]))
        man = b.manifest
        commit_manifest(layout, replace(man, count=man.count + extra, segments=man.segments + ((sid, extra),)))


def serve_rows(idx: Path, a: argparse.Namespace, add_file: Path | None, commit_file: Path | None = None
               ) -> tuple[list, dict, dict | None, str]:
    """Load the server of ``idx`` at each concurrency, by id and by picture, against the in-process reference."""
    bundle = open_index(idx)
    n_real = int(sum(c for _, c in bundle.manifest.parts))  # real products come first (inflate's segment lists no part)
    ids = bundle.product_ids[np.random.default_rng(0).permutation(n_real)[:a.requests]]
    pics = [product_pictures(bundle, int(bundle.position_of(int(i))))[0] for i in ids]

    # the same work inside one process, one query at a time: the reference
    t = time.perf_counter()
    for i in ids:
        neighbours(bundle, bundle.vector(bundle.position_of(int(i))), a.k)
    ref = {"by id": len(ids) / (time.perf_counter() - t)}
    t = time.perf_counter()
    for pic in pics:
        neighbours(bundle, embed_pictures(bundle, [pic])[0], a.k)
    ref["by picture"] = len(pics) / (time.perf_counter() - t)

    server, url = harness.start_server(idx, Path(a.workdir) / "serve.log", "--token", "bench")
    port = int(url.rsplit(":", 1)[1])
    try:
        host = f"127.0.0.1:{port}"
        kinds = {"GET /health": [loadgen.get_request(host, "/health")],
                 "by id": [loadgen.form_request(host, "/similar", {"product_id": int(i), "k": a.k}) for i in ids],
                 "by picture": [loadgen.multipart_request(host, "/similar", {"k": a.k}, [("images", "q.jpg", pic)])
                                for pic in pics]}
        rows, qps_at = [], {}
        for name, requests in kinds.items():
            for conc in a.concurrency:
                lat, wall = loadgen.load("127.0.0.1", port, requests, a.requests, conc)
                qps = a.requests / wall
                r = ref.get(name)
                pct = harness.percentiles(lat, (50, 99))
                rows.append((f"{len(bundle.product_ids):,}", name, conc, f"{pct[50] * 1e3:.1f}",
                             f"{pct[99] * 1e3:.1f}", f"{qps:.0f}", f"{r:.0f}" if r else "",
                             f"{qps / r:.2f}x" if r else ""))
                qps_at[name, conc] = qps
        during = health_during_add(url, add_file) if add_file else None
        if commit_file:
            during = by_id_during_commit(url, idx, commit_file, [int(i) for i in ids], a.k)
    finally:
        server.terminate()
        server.wait(10)
    lo, hi = min(a.concurrency), max(a.concurrency)
    summary = (f"{len(bundle.product_ids):,} products ({bundle.manifest.factory}): by picture at {hi} in flight / at "
               f"{lo} = {qps_at['by picture', hi] / qps_at['by picture', lo]:.2f}x; by picture at {hi} / in-process "
               f"{qps_at['by picture', hi] / ref['by picture']:.2f}x; by id at {hi} / in-process "
               f"{qps_at['by id', hi] / ref['by id']:.2f}x")
    return rows, qps_at, during, summary


def main() -> None:
    ap = harness.parser(__doc__, workdir="bench_out/pipeline")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--extra-vectors", type=int, default=200_000,
                    help="a second run over the index grown by this many random vectors (0: none)")
    ap.add_argument("--products", type=int, default=4000, help="generated products of the tiny-tower run")
    ap.add_argument("--epochs", type=int, default=5)
    a = harness.start(ap, quick={"requests": 20, "concurrency": [1, 4], "extra_vectors": 2000, "products": 200,
                                 "epochs": 1})
    p = prepared(Path(a.workdir), a.products, epochs=a.epochs)
    idx = Path(a.workdir) / "index_serve"
    shutil.rmtree(idx, ignore_errors=True)  # fresh each run: the add below changes it
    build_index(p["data"] / "train.bson", p["run"], idx, IndexSettings("all"))
    big = Path(a.workdir) / "index_serve_big"
    shutil.rmtree(big, ignore_errors=True)
    shutil.copytree(idx, big)
    rows, _, during, summary = serve_rows(idx, a, p["data"] / "test.bson")
    summaries, committed = [summary], None
    if a.extra_vectors:
        inflate(big, a.extra_vectors)
        more, _, committed, summary = serve_rows(big, a, None, commit_file=p["data"] / "test.bson")
        rows += more
        summaries.append(summary)
    print(f"\nk={a.k}, {a.requests} requests per row; reference = the same query in one process, one at a time "
          f"(by picture: the picture and its mirror image embedded, then searched)")
    harness.table(rows, ("indexed", "POST /similar", "in flight", "p50 ms", "p99 ms", "QPS", "reference q/s",
                              "QPS / reference"))
    print()
    for line in summaries:
        print(line)
    print(f"GET /health while POST /products adds {during['added']:,} products ({during['seconds']:.1f} s): "
          f"p50 {during['p50'] * 1e3:.1f} ms, p99 {during['p99'] * 1e3:.1f} ms over {during['n']} probes")
    if committed:
        c = committed
        print(f"POST /similar by id while another process (cli.py add-to-index) commits {c['added']:,} products to the "
              f"{c['before']:,}-product index ({c['seconds']:.1f} s, then 2.5 s for the server to follow): p50 "
              f"{c['p50'] * 1e3:.1f} ms, p99 {c['p99'] * 1e3:.1f} ms over {c['n']} probes, statuses {c['statuses']}; "
              f"the server then answered for {c['after']:,} products")


def by_id_during_commit(url: str, idx: Path, bson_file: Path, ids: list[int], k: int) -> dict:
    """Latency of by-id queries while another process commits an add to the served folder, and for 2.5 s after
    (the server follows the new generation within about a second); every status is counted."""
    from collections import Counter
    with httpx.Client(base_url=url, timeout=30) as c:
        before = c.get("/health").json().get("products", 0)
        lat, statuses = [], Counter()
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "add-to-index", str(bson_file), "--index",
                                 str(idx), "--workers", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        end, i, seconds = None, 0, 0.0
        while end is None or time.monotonic() < end:
            if end is None and proc.poll() is not None:
                end, seconds = time.monotonic() + 2.5, time.perf_counter() - t0
            t = time.perf_counter()
            r = c.post("/similar", data={"product_id": ids[i % len(ids)], "k": k})
            lat.append(time.perf_counter() - t)
            statuses[r.status_code] += 1
            i += 1
        if proc.returncode != 0:
            raise RuntimeError(f"add-to-index failed: {proc.stderr.read().decode()[-2000:]}")
        after = c.get("/health").json().get("products", 0)
    pct = harness.percentiles(lat, (50, 99))
    return {"added": after - before, "before": before, "after": after, "seconds": seconds, "n": len(lat),
            "p50": pct[50], "p99": pct[99], "statuses": dict(statuses)}


def health_during_add(url: str, bson_file: Path) -> dict:
    """Latency of /health probes while an authenticated add of every product of ``bson_file`` runs."""
    import threading
    done, lat, out = threading.Event(), [], {}

    def add():
        t = time.perf_counter()
        r = httpx.post(url + "/products", headers={"Authorization": "Bearer bench"}, timeout=600,
                       files={"file": ("more.bson", bson_file.read_bytes(), "application/octet-stream")})
        out.update(added=r.json().get("added", 0), seconds=time.perf_counter() - t)
        done.set()

    threading.Thread(target=add).start()
    with httpx.Client(base_url=url, timeout=30) as c:
        while not done.is_set():
            t = time.perf_counter()
            c.get("/health")
            lat.append(time.perf_counter() - t)
            time.sleep(0.01)
    pct = harness.percentiles(lat, (50, 99))
    return {**out, "p50": pct[50], "p99": pct[99], "n": len(lat)}


if __name__ == "__main__":
    main()
