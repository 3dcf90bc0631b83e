"""Crash points, as SQLite tests its commits: every write, fsync and rename of build-index, add-to-index and
POST /products in turn ends the process (``CDISCOUNT_CRASH_AT``, ``os._exit(77)``); each time the folder opens at
the old or the new generation with its exact product count and every file it references present."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_world, read_only

from retrieval.data.offsets import load_offsets
from retrieval.data.synth import SynthConfig, make_data
from retrieval.infer.indexdir.build import open_index
from retrieval.infer.indexdir.changes import remove_products
from retrieval.infer.indexdir.compact import check_folder

ROOT = Path(__file__).resolve().parents[1]
# One driver process imports everything once and forks a child per crash point (the parent runs no torch or
# FAISS work before forking); the parent checks the folder the child left, torch-free, and prints one line.
DRIVER = r"""
import json, os, shutil, sys
from pathlib import Path
op, world, new, kinds, points = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4].split(","), sys.argv[5]
from retrieval.infer.indexdir.compact import check_folder
from retrieval.infer.indexdir.folder import IndexFolder

def child(idx):
    import torch
    torch.set_num_threads(1)
    from retrieval.infer.pipeline.embed import LoaderSettings
    if op == "build":
        from retrieval.infer.indexdir.build import IndexSettings, build_index
        build_index(world / "data" / "train.bson", world / "run", idx, IndexSettings("train", part_products=40),
                    LoaderSettings(workers=0), restart=True)
    elif op in ("add", "replace"):
        from retrieval.infer.indexdir.build import add_to_index
        add_to_index(idx, new, LoaderSettings(workers=0), replace=op == "replace")
    elif op == "remove":
        from retrieval.infer.indexdir.changes import remove_products
        remove_products(idx, ids[:10])
    elif op == "relabel":
        from retrieval.infer.indexdir.changes import relabel_products
        relabel_products(idx, {i: cat for i in ids[:10]})
    elif op == "compact":
        from retrieval.infer.indexdir.compact import compact
        compact(idx)
    else:
        from fastapi.testclient import TestClient
        from retrieval.serve.api import create_app
        with TestClient(create_app(idx), base_url="http://localhost") as c:
            r = c.post("/products", files={"file": ("new.bson", new.read_bytes(), "application/octet-stream")})
            if r.status_code != 200:
                os._exit(3)

source = world / ("idx-removed" if op == "compact" else "idx")
import numpy as np
from retrieval.infer.indexdir.manifest import IndexManifest
_man = IndexManifest.load(IndexFolder.manifest_file(IndexFolder(source).generation()))
ids = [int(i) for i in np.load(IndexFolder(source).segment(_man.segments[0][0]) / "product_ids.npy")[20:40]]
cat = int(np.load(IndexFolder(source).segment(_man.segments[0][0]) / "category_ids.npy")[0])

def state(idx):
    man = IndexManifest.load(IndexFolder.manifest_file(IndexFolder(idx).generation()))
    return [len(man.segments), man.removed_count, sum(e["relabel_count"] for e in man.segment_state.values())]

def run(kind, n):
    idx = world / f"idx-{op}-{kind}-{n}"  # beside the pristine one: its relative paths hold
    shutil.copytree(source, idx)
    pid = os.fork()
    if pid == 0:
        if kind:
            os.environ["CDISCOUNT_CRASH_AT"] = f"{kind}:{n}"
        try:
            child(idx)
        except BaseException as e:
            print("child error", repr(e), file=sys.stderr, flush=True)
            os._exit(1)
        os._exit(0)
    rc = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    out = {"kind": kind, "n": n, "rc": rc}
    try:
        out["gen"], out["count"] = check_folder(idx)
        out["state"] = [out["count"]] + state(idx)
        with IndexFolder(idx).writer():  # the next writer collects garbage: never what the live one needs
            pass
        assert check_folder(idx) == (out["gen"], out["count"])
        out["uploads"] = sorted(p.name for p in IndexFolder(idx).uploads.glob("*.bson")) if op == "post" else []
    except Exception as e:
        out["error"] = repr(e)
    print(json.dumps(out), flush=True)
    if rc != 77:
        return False
    shutil.rmtree(idx)
    return True

print(json.dumps({"kind": "none", "n": 0, "rc": 0, "gen": check_folder(source)[0],
                  "state": [check_folder(source)[1]] + state(source)}), flush=True)
run("", 0)
for kind in kinds:
    if points == "all":
        n = 1
        while n < 400 and run(kind, n):
            n += 1
    else:
        for n in map(int, points.split(",")):
            run(kind, n)
"""


@pytest.fixture(scope="module")
def crash_world(tmp_path_factory, small_data, trained_run):
    """Data, run and an index of all 150 products side by side, and a file of new products."""
    root = build_world(tmp_path_factory.mktemp("crash") / "world", small_data, trained_run)
    new = make_data(root / "new", SynthConfig(products=12, categories=3, seed=31, image_size=32),
                    progress=False)["train.bson"]
    load_offsets(new, progress=False)  # its offset table's cache, which the first reader writes beside it
    shutil.copytree(root / "idx", root / "idx-removed")  # the starting point of a compaction: 15 removed
    remove_products(root / "idx-removed", [int(i) for i in open_index(root / "idx").product_ids[:15]])
    # the driver works on copies beside these (their relative paths hold there): the originals stay as they are
    read_only("crash_world (test_crash.py)", *(root / name for name in ("data", "run", "idx", "idx-removed", "new")))
    return root, new


def _matrix(crash_world, op: str, kinds: str, points: str, seconds: float = 600) -> list[dict]:
    world, new = crash_world
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CDISCOUNT_CRASH_AT", None)
    p = subprocess.run([sys.executable, "-c", DRIVER, op, str(world), str(new), kinds, points], env=env,
                       capture_output=True, text=True, timeout=seconds)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def _check(rows: list[dict], world: Path, op: str) -> None:
    old_gen, _ = check_folder(world / ("idx-removed" if op == "compact" else "idx"))
    base = rows[0]
    whole = rows[1]
    assert base["rc"] == 0 and whole["rc"] == 0 and "error" not in whole, whole
    assert base["gen"] == old_gen
    old, new = base["state"], whole["state"]  # (live products, segments, removed, relabelled)
    assert new != old  # the operation changes the state: old and new are told apart
    crashed = [r for r in rows[2:] if r["rc"] == 77]
    assert crashed, "no crash point was reached"
    kept = 0
    for r in rows[2:]:
        assert "error" not in r, r
        assert r["rc"] in (0, 77), r
        assert (r["gen"], r["state"]) == (old_gen, old) or (r["gen"] != old_gen and r["state"] == new), r
        if op == "post" and r["state"] == new:  # committed: its upload is kept (it is the new products' source)
            assert len(r["uploads"]) == 1, r
            kept += 1
    assert op != "post" or kept >= 1  # some runs committed, and their uploads were checked
    seen = {tuple(r["state"]) for r in crashed}
    old, new = tuple(old), tuple(new)
    assert old in seen and (new in seen or any(r["rc"] == 0 for r in rows[2:])), seen


def test_a_few_crash_points_of_an_add_leave_old_or_new(crash_world):
    """The first write and a late rename of an add: quick enough for every run of the suite (the whole matrix,
    for every operation, is the slow test below)."""
    rows = _matrix(crash_world, "add", "write,rename", "1,7")
    _check(rows, crash_world[0], "add")


@pytest.mark.parametrize("op", ["remove", "relabel", "compact"])
def test_every_crash_point_of_a_change_leaves_old_or_new(crash_world, op):
    """A remove, a relabel and a compaction, killed at every write, fsync and rename in turn (few: fast)."""
    rows = _matrix(crash_world, op, "write,fsync,rename", "all")
    _check(rows, crash_world[0], op)
    assert len([r for r in rows[2:] if r["rc"] == 0]) == 3


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("op", ["build", "add", "post", "replace"])
def test_every_crash_point_leaves_old_or_new(crash_world, op):
    """Every write, fsync and rename, until the operation completes without reaching the point."""
    rows = _matrix(crash_world, op, "write,fsync,rename", "all", seconds=1500)
    _check(rows, crash_world[0], op)
    finals = [r for r in rows[2:] if r["rc"] == 0]
    assert len(finals) == 3  # each kind ran out of points: the whole operation passed every one of them
    world = crash_world[0]
    for r in finals:  # the completed folders open and serve
        b = open_index(world / f"idx-{op}-{r['kind']}-{r['n']}")
        assert b.live_count == r["count"] and b.position_of(int(b.product_ids[-1])) == len(b.product_ids) - 1
