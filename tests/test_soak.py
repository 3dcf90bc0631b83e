"""A bounded soak of the real server on 127.0.0.1: mixed queries from 16 clients while adds run."""
from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import bson
import httpx
import numpy as np
import pytest
from conftest import process_server

from retrieval.data.bsonio import iter_products

ROOT = Path(__file__).resolve().parents[1]
QUERIES, CLIENTS, ADDS, PER_ADD = 5000, 16, 20, 3
# the 16 query clients run in their own process, so that their threads do not slow this one's /health probe
CLIENT = """
import sys
from concurrent.futures import ThreadPoolExecutor
import httpx
from retrieval.data.bsonio import iter_products
url, n, clients, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
products = list(iter_products(data))
ids, pics = [p.product_id for p in products], [p.images[0] for p in products]
local = __import__("threading").local()

def query(i):
    c = getattr(local, "c", None) or setattr(local, "c", httpx.Client(base_url=url, timeout=60)) or local.c
    kind = i % 3
    if kind == 0:
        r = c.post("/similar", data={"product_id": ids[i % len(ids)], "k": 5})
    elif kind == 1:
        r = c.post("/similar", data={"k": 5}, files=[("images", ("q.jpg", pics[i % len(pics)]))])
    else:
        r = c.post("/classify", data={"product_id": ids[i % len(ids)], "top": 3})
    if r.status_code != 200:
        print("ERROR", i, r.status_code, r.text[:200], flush=True)

with ThreadPoolExecutor(clients) as pool:
    list(pool.map(query, range(n)))
"""


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the 16 clients alone may take 900 s on a busy machine
def test_soak_mixed_queries_while_adds_run(indexes, small_data, tmp_path):
    world = tmp_path / "w"
    world.mkdir()
    folder = world / "idx"
    shutil.copytree(indexes["all"], folder)
    with process_server(folder, "--token", "t0ken", log=tmp_path / "server.log") as (server, url):
        base = httpx.get(url + "/health", timeout=30).json()["products"]
        products = list(iter_products(small_data["train.bson"]))
        pics = [p.images[0] for p in products]
        errors, health, stop = [], [], threading.Event()

        def adder() -> None:
            try:
                with httpx.Client(base_url=url, timeout=120, headers={"Authorization": "Bearer t0ken"}) as c:
                    for a in range(ADDS):
                        docs = [{"_id": 900_000 + a * PER_ADD + j, "imgs": [{"picture": pics[(a + j) % len(pics)]}],
                                 "category_id": products[0].category_id} for j in range(PER_ADD)]
                        r = c.post("/products", files={"file": ("a.bson", b"".join(bson.encode(d) for d in docs))})
                        if r.status_code != 200 or r.json()["added"] != PER_ADD:
                            errors.append(("add", a, r.status_code, r.text[:200]))
            finally:
                stop.set()  # the watcher ends with the adds, whatever became of them

        def watch() -> None:
            with httpx.Client(base_url=url, timeout=10) as c:
                while not stop.is_set():
                    t = time.perf_counter()
                    c.get("/health")
                    health.append(time.perf_counter() - t)
                    time.sleep(0.02)

        threads = [threading.Thread(target=adder), threading.Thread(target=watch)]
        for t in threads:
            t.start()
        try:
            clients = subprocess.run([sys.executable, "-c", CLIENT, url, str(QUERIES), str(CLIENTS),
                                      str(small_data["train.bson"])], cwd=ROOT, capture_output=True, text=True,
                                     timeout=900)
        except BaseException:
            stop.set()  # the watcher ends when the clients fail
            raise
        assert clients.returncode == 0, clients.stderr[-2000:]
        errors += [line for line in clients.stdout.splitlines() if line.startswith("ERROR")]
        for t in threads:
            t.join(timeout=600)
            assert not t.is_alive(), f"{t.name} did not end within 600 s"
        final = httpx.get(url + "/health", timeout=30).json()["products"]
    assert server.returncode in (0, -15), (tmp_path / "server.log").read_text()[-3000:]
    assert errors == []
    assert final == base + ADDS * PER_ADD  # every add landed exactly once
    assert len(health) > 20 and float(np.percentile(health, 99)) < 0.1  # /health never waits behind an add
