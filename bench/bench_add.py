"""What an add costs against the catalogue's size: 300 products added to a 100k- and a 1M-product index.

Synthetic: the base segment holds N random unit vectors (Flat, dim --dim) with random ids; an add is what
add-to-index does after embedding (embedding 300 products costs the same at any catalogue size, and is left
out): the known-id check against every segment's id map, one new segment (its own Flat index of the 300,
arrays, id map, duplicate table, embeddings) written through ``segments.write_segment``, and the generation
commit (fsync of every new file, CURRENT moved). Then a reader that serves the index opens the new generation
beside the live one (``open_index(reuse=...)`` reads only the new segment; the model load is stubbed: it is
the same at any size). The last column is the step the old design paid per add: the whole FAISS file written
again (and read by the server).
Usage: python bench/bench_add.py [--sizes 100000 1000000] [--add 300] [--dim 64] [--repeat 7] [--quick]
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import harness
import numpy as np

from index import DuplicateTable, VectorIndex
from retrieval.infer.indexdir import bundle as bundle_mod
from retrieval.infer.indexdir.compact import check_folder, commit_manifest
from retrieval.infer.indexdir.folder import IndexFolder
from retrieval.infer.indexdir.manifest import IndexManifest, Source
from retrieval.infer.indexdir.segments import SegmentData, locate_ids, write_segment


def _unit(rng, n: int, d: int) -> np.ndarray:
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _segment(folder: IndexFolder, rng, ids: np.ndarray, d: int) -> tuple[str, np.ndarray]:
    """One Flat segment of random unit vectors for products ``ids``."""
    n = len(ids)
    v = _unit(rng, n, d)
    labels = rng.integers(0, 10, n)
    vi = VectorIndex.create(d, "Flat")
    vi.add(v, labels)
    arrays = {"product_ids": ids, "category_ids": labels, "offsets": np.zeros(n, np.int64),
              "lengths": np.ones(n, np.int64), "sources": np.zeros(n, np.int32)}
    dups = DuplicateTable(rng.integers(0, 2 ** 62, n), np.arange(n))
    return write_segment(folder, vi, SegmentData(labels, arrays, dups, [(0, n)], [v])), v


def _manifest(d: int) -> IndexManifest:
    return IndexManifest(model_file="none", model_sha256="0" * 64, run_dir=".", backbone="synthetic", image_size=0,
                         dim=d, factory="Flat", count=0, split="all", mirror=False, store_key={}, parts=(),
                         sources=())


class _Model:  # a reader's model, loaded once per server: the same at any size, so stubbed here
    sha256 = "0" * 64


def bench(root: Path, n: int, add: int, d: int, repeat: int) -> tuple:
    folder = IndexFolder(root / f"idx_{n}")
    shutil.rmtree(folder.path, ignore_errors=True)
    rng = np.random.default_rng(n)
    ids = rng.choice(10 * n, n, replace=False).astype(np.int64)
    with folder.writer():
        for name in ("base", "upload"):  # the (empty) data files the manifest names
            (folder.path / name).touch()
        sid, _ = _segment(folder, rng, ids, d)
        man = replace(_manifest(d), count=n, segments=((sid, n),), sources=(Source("base", {}),))
        commit_manifest(folder, man)
    real = bundle_mod.load_index_model
    bundle_mod.load_index_model = lambda *a, **k: _Model()
    try:
        reader = bundle_mod.open_index(folder.path)  # the first open of a reader reads every segment
        os.sync()  # the base segment's writeback is over before the adds are timed (steady state)
        adds, reopens, next_id = [], [], 10 * n
        for i in range(repeat + 1):  # the first add is a warm-up, not timed
            new = np.arange(next_id, next_id + add, dtype=np.int64)
            next_id += add
            t = time.perf_counter()
            with folder.writer():
                man = IndexManifest.load(IndexFolder.manifest_file(folder.generation()))
                assert (locate_ids(folder, [s for s, _ in man.segments], new)[0] < 0).all()
                sid, _ = _segment(folder, rng, new, d)
                commit_manifest(folder, man.with_segment(sid, [(f"add-{next_id}", add)], Source("upload", {})))
            took = time.perf_counter() - t
            t = time.perf_counter()
            reader = bundle_mod.open_index(folder.path, reuse=reader)
            if i:
                adds.append(took)
                reopens.append(time.perf_counter() - t)
        assert check_folder(folder.path)[1] == n + (repeat + 1) * add == len(reader.product_ids)
    finally:
        bundle_mod.load_index_model = real
    t = time.perf_counter()
    reader.segments[0].vectors.save(root / f"rewrite_{n}")
    rewrite = time.perf_counter() - t
    shutil.rmtree(root / f"rewrite_{n}")
    return n, float(np.median(adds)), float(np.median(reopens)), rewrite


def main() -> None:
    ap = harness.parser(__doc__, workdir="bench_out/add")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--add", type=int, default=300)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=7, help="timed adds per size (median), after one warm-up")
    a = harness.start(ap, quick={"sizes": [10_000, 40_000], "repeat": 3})
    a.workdir.mkdir(parents=True, exist_ok=True)
    bundle_mod.query_tower = lambda bundle, runtime: None  # synthetic: no runtime to load
    rows = [bench(a.workdir, n, a.add, a.dim, a.repeat) for n in a.sizes]
    base = rows[0][1]
    harness.table([(f"{n:,}", f"{add * 1e3:.1f}", f"{add / base:.2f}x", f"{reopen * 1e3:.1f}",
                         f"{rewrite * 1e3:.0f}") for n, add, reopen, rewrite in rows],
                       ("catalogue (products)", f"add {a.add} (ms, median)", "vs smallest",
                        "reader reopen (ms)", "old design: rewrite whole FAISS file (ms)"))
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
