"""Latency and throughput of the HTTP API under a bounded concurrent load on 127.0.0.1.

A real server (`python cli.py serve`, uvicorn) over the trained tiny-tower index of pipeline_common; clients in
threads keep C requests in flight. Printed: p50/p99 latency and QPS of POST /similar by product id and by an
uploaded picture, against the same query run inside one process (index search alone; embedding + search)
measured in the same run, so the ratio is the cost of HTTP, multipart parsing and JSON.
Usage: python bench/bench_serve.py [--requests 400] [--concurrency 1 4 16] [--workdir bench_out/pipeline]
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common
import httpx
import numpy as np
from pipeline_common import prepared

from retrieval.infer.folder import IndexSettings, build_index, open_index
from retrieval.infer.query import embed_pictures, neighbours, product_pictures

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, make_request, n: int, concurrency: int) -> tuple[np.ndarray, float]:
    """Latencies (s) of ``n`` requests with ``concurrency`` in flight, and the wall time."""
    def one(i: int) -> float:
        t = time.perf_counter()
        r = make_request(client, i)
        r.raise_for_status()
        return time.perf_counter() - t
    with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        one(0)  # warm-up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            lat = np.array(list(pool.map(one, range(n))))
        return lat, time.perf_counter() - t0


def wait_until_up(server: subprocess.Popen, url: str, log: Path, seconds: float = 120) -> None:
    """Poll /health until the server answers; a server that exits or never answers is an error quoting its log."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and server.poll() is None:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"the server did not come up (exit code {server.poll()}); its log ends:\n"
                       + log.read_text()[-3000:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--workdir", default="bench_out/pipeline")
    ap.add_argument("--quick", action="store_true", help="200 products, 20 requests at 1 and 4 in flight (smoke test)")
    a = ap.parse_args()
    if a.quick:
        import pipeline_common
        pipeline_common.set_quick()
        a.requests, a.concurrency = 20, [1, 4]
    p = prepared(Path(a.workdir))
    idx = Path(a.workdir) / "index_serve"
    shutil.rmtree(idx, ignore_errors=True)  # fresh each run: the add below changes it
    build_index(p["data"] / "train.bson", p["run"], idx, IndexSettings("all"))
    bundle = open_index(idx)
    ids = bundle.product_ids[np.random.default_rng(0).permutation(len(bundle.product_ids))[:a.requests]]
    pics = [product_pictures(bundle, int(np.flatnonzero(bundle.product_ids == i)[0]))[0] for i in ids]

    # the same work inside one process: the reference
    t = time.perf_counter()
    for i in ids:
        neighbours(bundle, bundle.vector(int(np.flatnonzero(bundle.product_ids == i)[0])), a.k)
    direct_id = len(ids) / (time.perf_counter() - t)
    t = time.perf_counter()
    for pic in pics:
        neighbours(bundle, embed_pictures(bundle, [pic])[0], a.k)
    direct_img = len(pics) / (time.perf_counter() - t)

    port = _port()
    log = open(Path(a.workdir) / "serve.log", "w")
    server = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", "--index", str(idx), "--port", str(port),
                               "--token", "bench"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, url, Path(log.name))
        by_id = lambda c, i: c.post("/similar", data={"product_id": int(ids[i % len(ids)]), "k": a.k})  # noqa: E731
        by_img = lambda c, i: c.post("/similar", data={"k": a.k},  # noqa: E731
                                     files=[("images", ("q.jpg", pics[i % len(pics)], "image/jpeg"))])
        rows, qps_at = [], {}
        for name, fn, ref in (("by id", by_id, direct_id), ("by picture", by_img, direct_img)):
            for conc in a.concurrency:
                lat, wall = load(url, fn, a.requests, conc)
                qps = a.requests / wall
                rows.append((name, conc, f"{np.percentile(lat, 50) * 1e3:.1f}", f"{np.percentile(lat, 99) * 1e3:.1f}",
                             f"{qps:.0f}", f"{ref:.0f}", f"{qps / ref:.2f}x"))
                qps_at[name, conc] = qps
        during = health_during_add(url, p["data"] / "test.bson")
    finally:
        server.terminate()
        server.wait(10)
    print(f"\n{len(bundle.product_ids):,} indexed products, {bundle.manifest.factory}, k={a.k}, "
          f"{a.requests} requests per row; reference = the same query in one process, one at a time")
    common.print_table(rows, ("POST /similar", "in flight", "p50 ms", "p99 ms", "QPS", "reference q/s",
                              "QPS / reference"))
    lo, hi = min(a.concurrency), max(a.concurrency)
    print(f"\nby picture: QPS at {hi} in flight / at {lo} in flight = "
          f"{qps_at['by picture', hi] / qps_at['by picture', lo]:.2f}x; by picture at {hi} / in-process "
          f"{qps_at['by picture', hi] / direct_img:.2f}x; by id at {hi} / in-process {qps_at['by id', hi] / direct_id:.2f}x")
    print(f"GET /health while POST /products adds {during['added']:,} products ({during['seconds']:.1f} s): "
          f"p50 {during['p50'] * 1e3:.1f} ms, p99 {during['p99'] * 1e3:.1f} ms over {during['n']} probes")


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
    return {**out, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)), "n": len(lat)}


if __name__ == "__main__":
    main()
