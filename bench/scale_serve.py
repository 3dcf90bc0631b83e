"""bench_scale's serve stage: `cli.py serve` on a catalogue-size index, measured from outside over HTTP.

Start-up seconds (process start to the first 200 from /health) and the server's RSS after start-up, by-id and
by-picture POST /similar latency p50/p99 at 1 and 16 requests in flight, and the wall time of one POST /products
adding 1,000 products (the first 1,000 of test.bson, unlabelled: findable, they do not vote).
"""
from __future__ import annotations

import time
from pathlib import Path

import harness
import httpx
import loadgen
import numpy as np
from harness import start_server

TOKEN = "bench-scale"


def _new_products(test_bson: Path, out: Path, n: int = 1000) -> Path:
    """The first ``n`` records of ``test_bson``, byte for byte, as a BSON file to add."""
    from retrieval.data.offsets import load_offsets
    table = load_offsets(test_bson, progress=False)[:n]
    with open(test_bson, "rb") as f, open(out, "wb") as g:
        for off, length in zip(table["offset"].tolist(), table["length"].tolist(), strict=True):
            f.seek(off)
            g.write(f.read(length))
    return out


def serve_figures(idx: Path, test_bson: Path, work: Path, requests: int = 2000) -> dict:
    """The serve figures of one index (see the module docstring), as a dict for the stage's JSON."""
    from retrieval.data.offsets import RecordReader
    from retrieval.infer.indexdir.bundle import open_index
    work.mkdir(parents=True, exist_ok=True)
    bundle = open_index(idx, mmap=True)
    rng = np.random.default_rng(0)
    ids = rng.choice(bundle.product_ids, min(500, len(bundle.product_ids)), replace=False).tolist()
    reader = RecordReader(test_bson)
    pictures = [reader.read(int(i)).images[0] for i in rng.choice(len(reader), 64, replace=False)]
    del bundle
    t0 = time.perf_counter()
    server, url = start_server(idx, work / "server.log", "--token", TOKEN, seconds=float("inf"))
    port = int(url.rsplit(":", 1)[1])
    try:
        out: dict = {"startup_s": round(time.perf_counter() - t0, 1),
                     "rss_mb_after_startup": harness.status_mb("VmRSS", server.pid)}
        host = f"127.0.0.1:{port}"
        kinds = {"by_id": [loadgen.form_request(host, "/similar", {"product_id": int(i), "k": 10}) for i in ids],
                 "by_picture": [loadgen.multipart_request(host, "/similar", {"k": 10}, [("images", "q.jpg", p)])
                                for p in pictures]}
        for kind, reqs in kinds.items():
            loadgen.load("127.0.0.1", port, reqs, 32, 4)  # warm up
            for conc in (1, 16):
                n = requests if kind == "by_id" else requests // 4
                lat, wall = loadgen.load("127.0.0.1", port, reqs, n, conc)
                p50, p99 = (round(v * 1e3, 2) for v in harness.percentiles(lat, (50, 99)).values())
                out[f"{kind}_{conc}"] = {"qps": round(n / wall, 1), "p50_ms": p50, "p99_ms": p99}
        new = _new_products(test_bson, work / "add_1000.bson")
        t = time.perf_counter()
        with open(new, "rb") as f:
            r = httpx.post(url + "/products", files={"file": ("add.bson", f, "application/octet-stream")},
                           headers={"Authorization": f"Bearer {TOKEN}"}, timeout=3600)
        out["add_1000"] = {"status": r.status_code, "seconds": round(time.perf_counter() - t, 2)}
        out["rss_mb_peak"] = harness.status_mb("VmHWM", server.pid)
        return out
    finally:
        server.terminate()
        server.wait(60)
