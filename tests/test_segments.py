"""Segments: search over several equals one Flat index (brute force), an add costs what it adds, a rebuild never
touches what the live generation reads, compaction, garbage, readers that follow another process's commit,
and two writers."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from index import SegmentedIndex, VectorIndex
from retrieval.data.synth import SynthConfig, make_data
from retrieval.errors import UserError
from retrieval.infer.indexdir import compact as compact_mod
from retrieval.infer.indexdir.build import IndexSettings, add_to_index, build_index, open_index
from retrieval.infer.indexdir.compact import check_folder, compact
from retrieval.infer.indexdir.folder import IndexFolder, WriterBusy
from retrieval.infer.pipeline.embed import LoaderSettings
from retrieval.infer.query import similar

ROOT = Path(__file__).resolve().parents[1]


def _unit(rng, n: int, d: int = 16) -> np.ndarray:
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_segment_search_equals_brute_force_over_all_vectors():
    rng = np.random.default_rng(0)
    sizes = [50, 1, 7, 30]
    blocks = [_unit(rng, n) for n in sizes]
    labels = [rng.integers(0, 4, n) for n in sizes]
    parts = []
    for b, lab in zip(blocks, labels, strict=True):
        vi = VectorIndex.create(16, "Flat")
        vi.add(b, lab)
        parts.append(vi)
    seg = SegmentedIndex(parts)
    allv, alll = np.concatenate(blocks), np.concatenate(labels)
    q = _unit(rng, 9)
    scores = q @ allv.T  # the oracle: brute force over every vector, positions in concatenation order
    for k in (1, 5, 88, 100):
        sims, pos = seg.search(q, k)
        kk = min(k, len(allv))
        truth = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
        assert np.array_equal(pos[:, :kk], truth) and (pos[:, kk:] == -1).all()
        assert np.allclose(sims[:, :kk], np.take_along_axis(scores, truth, 1), atol=1e-5)
    for allowed in ([2], [0, 3]):
        ok = np.isin(alll, allowed)
        masked = np.where(ok[None], scores, -np.inf)
        truth = np.argsort(-masked, axis=1, kind="stable")[:, :5]
        for _ in range(2):  # the second search comes from the per-generation filter cache
            _, pos = seg.search(q, 5, allowed)
            assert np.array_equal(pos, truth) and ok[pos].all()
    assert np.array_equal(seg.labels, alll) and len(seg) == sum(sizes)
    assert seg.locate(57) == (2, 6) and seg.locate(0) == (0, 0)


def _new(tmp_path: Path, seed: int, n: int = 10) -> Path:
    return make_data(tmp_path / f"new{seed}", SynthConfig(products=n, categories=3, seed=seed, image_size=32),
                     progress=False)["train.bson"]


def _files(root: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*") if p.is_file()}


def test_an_add_writes_one_small_segment_and_never_reads_the_old_index(world, tmp_path, monkeypatch):
    idx = world / "idx"
    before = open_index(idx)
    old = {sid: _files(IndexFolder(idx).segment(sid)) for sid, _ in before.manifest.segments}
    loads = []
    real = VectorIndex.load
    monkeypatch.setattr(VectorIndex, "load", classmethod(lambda cls, f, mmap=False: loads.append(Path(f)) or
                                                          real.__func__(cls, f, mmap)))
    start = time.time()
    added, _ = add_to_index(idx, _new(tmp_path, 41), LoaderSettings(workers=0))
    assert added > 0 and loads == []  # the old FAISS file is not read, let alone rewritten
    monkeypatch.undo()
    after = open_index(idx, reuse=before)
    assert [s for s, _ in after.manifest.segments[:-1]] == [s for s, _ in before.manifest.segments]
    for sid, files in old.items():  # the old segments' files are the very same inodes, unchanged
        assert _files(IndexFolder(idx).segment(sid)) == files
    new_sid = after.manifest.segments[-1][0]
    new_size = sum(p.stat().st_size for p in IndexFolder(idx).segment(new_sid).rglob("*") if p.is_file())
    written = [p for p in idx.rglob("*") if p.is_file() and p.stat().st_mtime >= start]
    assert written and max(p.stat().st_size for p in written) <= new_size
    assert after.segments[0] is before.segments[0]  # the reader reuses what it had open
    # the new products are found where a brute-force scan of every stored vector puts them
    allv = np.stack([after.vector(i) for i in range(len(after.product_ids))])
    q = allv[-3:]
    truth = np.argsort(-(q @ allv.T), axis=1, kind="stable")[:, :5]
    assert np.array_equal(after.vectors.search(q, 5)[1], truth)
    for p in range(len(after.product_ids)):
        assert after.position_of(int(after.product_ids[p])) == p


def test_compaction_keeps_every_answer_and_adds_compact_on_their_own(world, tmp_path, monkeypatch):
    idx = world / "idx"
    for seed in (51, 52, 53):
        add_to_index(idx, _new(tmp_path, seed, 6), LoaderSettings(workers=0))
    b = open_index(idx)
    assert len(b.manifest.segments) == 5  # the build's two (training products, held-out validation ones), 3 adds
    q = np.stack([b.vector(i) for i in range(0, len(b.product_ids), 5)])
    want = b.vectors.search(q, 11)  # one more: a tie at the 10th place is no difference
    cat = int(b.categories.encode([b.arrays["category_ids"][0]])[0])
    want_cat = b.vectors.search(q, 11, [cat])
    ids_b = np.asarray(b.product_ids)
    assert compact(idx) is not None
    c = open_index(idx)
    # the held-out segment stays as it is (first now); the four others are one
    assert len(c.manifest.segments) == 2 and c.manifest.count == b.manifest.count
    assert c.manifest.segments[0][0] == b.manifest.held_out == c.manifest.held_out
    ids_c = np.asarray(c.product_ids)  # positions moved: compare products

    def same(got, expected) -> bool:  # equal similarities; the same product wherever a similarity is not tied
        (gs, gp), (es, ep) = got, expected
        lone = np.array([[np.sum(np.isclose(row, v, atol=1e-5)) == 1 for v in row] for row in es])[:, :10]
        es, ep = es[:, :10], ep[:, :10]
        gi, ei = np.where(gp >= 0, ids_c[gp], -1), np.where(ep >= 0, ids_b[ep], -1)  # -1: no more results
        return np.allclose(gs, es, atol=1e-6) and np.array_equal(gi[lone], ei[lone])
    assert same(c.vectors.search(q, 10), want) and same(c.vectors.search(q, 10, [cat]), want_cat)
    last = int(ids_b[-1])
    assert sorted(ids_c.tolist()) == sorted(ids_b.tolist())
    assert np.array_equal(c.vector(c.position_of(last)), b.vector(b.position_of(last)))
    assert compact(idx) is None  # nothing left to merge
    monkeypatch.setattr(compact_mod, "COMPACT_AT", 1)
    add_to_index(idx, _new(tmp_path, 54, 6), LoaderSettings(workers=0))
    add_to_index(idx, _new(tmp_path, 55, 6), LoaderSettings(workers=0))  # three small segments > 1: merged
    assert len(open_index(idx).manifest.segments) == 2


def test_garbage_is_collected_but_never_what_a_kept_generation_needs(world, tmp_path):
    idx = world / "idx"
    layout = IndexFolder(idx)
    dead_work = layout.add_parts("deadbeef")
    dead_work.mkdir(parents=True)
    (dead_work / "part_x.npz").write_bytes(b"x")
    layout.uploads.mkdir()
    stale = layout.uploads / "tmpdead.bson"
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))  # a killed server's upload, long ago
    fresh = layout.uploads / "tmpfresh.bson"  # may be on its way into an add
    fresh.write_bytes(b"x")
    orphan = layout.segments / "s00000000000000000001"
    orphan.mkdir()
    added = sum(add_to_index(idx, _new(tmp_path, seed, 4), LoaderSettings(workers=0))[0] for seed in (61, 62, 63))
    assert not dead_work.exists() and not stale.exists() and fresh.exists() and not orphan.exists()
    gens = sorted((idx / "generations").iterdir())
    assert len(gens) == IndexFolder.KEEP
    listed = set()
    for g in gens:
        listed |= {s for s, _ in json.loads((g / "manifest.json").read_text())["segments"]}
    assert {p.name for p in layout.segments.iterdir()} == listed  # every listed one kept, nothing else
    assert check_folder(idx)[1] == 150 + added


def test_an_old_folder_is_refused_and_a_rebuild_says_what_it_drops(world, tmp_path, caplog):
    idx = world / "idx"
    added, _ = add_to_index(idx, _new(tmp_path, 71, 5), LoaderSettings(workers=0))
    with caplog.at_level(logging.WARNING):
        build_index(world / "data" / "train.bson", world / "run", idx, IndexSettings("all", part_products=40),
                    LoaderSettings(workers=0))
    assert f"{added} products added since its build" in caplog.text and "add-to-index" in caplog.text
    assert len(open_index(idx).product_ids) == 150
    man = IndexFolder.manifest_file(IndexFolder(idx).generation())
    d = json.loads(man.read_text())
    d["version"] = 3
    man.write_text(json.dumps(d))
    with pytest.raises(UserError, match="rebuild the index"):
        open_index(idx)


def test_a_commit_by_another_process_is_served_whole(world, tmp_path):
    from fastapi.testclient import TestClient

    from retrieval.serve.api import create_app
    idx = world / "idx"
    new = _new(tmp_path, 81, 20)
    with TestClient(create_app(idx), base_url="http://localhost") as c:
        assert c.get("/health").json()["products"] == 150
        out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "add-to-index", str(new), "--index", str(idx),
                              "--workers", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        full = len(open_index(idx).product_ids)
        assert full > 150
        seen = []
        for _ in range(100):  # the watcher stats CURRENT once a second
            seen.append(c.get("/health").json()["products"])
            if seen[-1] == full:
                break
            time.sleep(0.1)
        assert seen[-1] == full and set(seen) <= {150, full}  # never a mix
        pid = int(open_index(idx).product_ids[-1])
        r = c.post("/similar", data={"product_id": pid, "k": 3, "include_self": True})
        assert r.status_code == 200 and r.json()["results"][0]["product_id"] == pid


def test_two_writers_one_is_refused_and_nothing_is_corrupted(world, tmp_path):
    from fastapi.testclient import TestClient

    from retrieval.serve.api import create_app
    idx = world / "idx"
    upload = _new(tmp_path, 91, 8)
    with TestClient(create_app(idx), base_url="http://localhost") as c:
        with IndexFolder(idx).writer():  # another process (a CLI add) is writing: the server's add is refused
            r = c.post("/products", files={"file": ("a.bson", upload.read_bytes(), "application/octet-stream")})
            assert r.status_code == 409
            out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "add-to-index", str(_new(tmp_path, 92, 8)),
                                  "--index", str(idx), "--workers", "0"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=300)
            assert out.returncode != 0 and "another process is writing this index" in out.stdout + out.stderr
        assert check_folder(idx)[1] == 150 and not list(IndexFolder(idx).uploads.glob("*.bson"))
        r = c.post("/products", files={"file": ("a.bson", upload.read_bytes(), "application/octet-stream")})
        assert r.status_code == 200 and r.json()["products"] == 150 + r.json()["added"]
    with pytest.raises(WriterBusy):
        with IndexFolder(idx).writer(), IndexFolder(idx).writer():
            pass


REBUILD = """
import sys
from retrieval.infer.indexdir.build import IndexSettings, build_index
from retrieval.infer.pipeline.embed import LoaderSettings
build_index(sys.argv[1], sys.argv[2], sys.argv[3], IndexSettings("all", part_products=int(sys.argv[4])),
            LoaderSettings(workers=0), restart=True)
"""


@pytest.mark.slow
def test_a_rebuild_killed_at_random_moments_leaves_the_live_answers(world, tmp_path):
    """``build_index(restart=True)`` with other settings (its work is discarded), killed with SIGKILL at random
    moments: a reader opened before, and one opened after, answer every by-id query as before."""
    idx = world / "idx"
    live = open_index(idx)
    ids = [int(i) for i in live.product_ids[::15]]
    want = {i: [n.product_id for n in similar(live, product_id=i, k=5)] for i in ids}
    vecs = {p: live.vector(p) for p in range(0, 150, 15)}
    script = tmp_path / "rebuild.py"
    script.write_text(REBUILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [str(world / "data" / "train.bson"), str(world / "run"), str(idx)]
    t = time.perf_counter()
    probe = world / "probe"
    shutil.copytree(idx, probe)
    subprocess.run([sys.executable, str(script), args[0], args[1], str(probe), "30"], env=env, check=True,
                   capture_output=True, timeout=300)
    whole = time.perf_counter() - t
    rng = np.random.default_rng(3)
    for i, moment in enumerate(rng.uniform(0.3 * whole, whole, 6)):
        p = subprocess.Popen([sys.executable, str(script), *args, str(30 + i)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(moment)
        p.send_signal(signal.SIGKILL)
        p.wait(60)
        check_folder(idx)
        for b in (live, open_index(idx)):
            for pid, found in want.items():
                assert [n.product_id for n in similar(b, product_id=pid, k=5)] == found
        for pos, v in vecs.items():
            assert np.array_equal(live.vector(pos), v)


def test_a_coded_index_folder_re_ranks_with_its_stored_embeddings(small_data, trained_run, tmp_path, caplog):
    """4-bit codes, too coarse to reach the target recall alone: build-index turns the re-rank on, the folder's
    search returns exact similarities (the stored embeddings' dot products, computed here by brute force) and
    build-index reports its recall@10."""
    with caplog.at_level(logging.INFO):
        man = build_index(small_data["train.bson"], trained_run, tmp_path / "sq", IndexSettings(
            "train", index_type="IVF4,SQ4"), LoaderSettings(workers=0))
    assert "recall@10" in caplog.text and 0.9 <= man.tuned_recall_at_10 <= 1.0
    b = open_index(tmp_path / "sq", mmap=True)
    stored = np.concatenate([np.load(f) for s in b.segments for f in s.emb_files()])
    assert b.vectors.parts[0].coded and b.vectors.parts[0].rerank and len(stored) == man.count
    sims, pos = b.vectors.search(stored[:40], 5)
    # each its own nearest (or tied with a duplicate) wherever the coded shortlist held it: at the tuned recall
    assert np.mean((pos[:, 0] == np.arange(40)) | np.isclose(sims[:, 0], 1.0, atol=1e-5)) >= 0.9
    brute = stored @ stored.T
    assert np.allclose(sims, np.take_along_axis(brute[:40], pos, 1), atol=1e-5)
    ranked = -np.sort(-brute, 1)
    for k in (1, 5, 10):  # recall@k over every stored product, ties counted as found: at least the reported one
        sims, pos = b.vectors.search(stored, k)
        found = np.take_along_axis(brute, pos, 1) >= ranked[:, k - 1:k] - 1e-6  # as near as the k-th true one
        assert found.mean() >= man.tuned_recall_at_10 - 0.02, k


def test_a_joined_column_reads_like_the_concatenated_array():
    from retrieval.infer.indexdir.bundle import Joined
    pieces = [np.arange(10, 17), np.arange(0), np.array([100, 101]), np.arange(50, 53)]
    whole = np.concatenate(pieces)
    col = Joined(pieces)
    assert len(col) == len(whole) and np.array_equal(np.asarray(col), whole)
    for i in (0, 6, 7, 8, 11, -1, -12):
        assert col[i] == whole[i]
    for idx in (np.array([11, 0, 7, 7, 9]), slice(2, 10, 3), whole > 50, np.array([-1, -2])):
        assert np.array_equal(col[idx], whole[idx])
    with pytest.raises(IndexError):
        col[12]
    with pytest.raises(IndexError):
        col[np.array([3, 12])]
    assert np.array_equal(col == 101, whole == 101) and col.shape == whole.shape and col.dtype == whole.dtype


def test_class_prototypes_are_the_mean_stored_embedding_over_every_segment(world, tmp_path):
    """Each segment keeps its embeddings' sum per class; the bundle's prototypes after an add equal the
    normalised mean of every indexed product's stored embedding, class by class (a loop over the products), and
    a product queried as itself is left out of its class's prototype."""
    idx = world / "idx"
    add_to_index(idx, _new(tmp_path, 71, 8), LoaderSettings(workers=0))
    b = open_index(idx)
    assert len(b.segments) == 3 and all((s.path / "class_sums.npy").exists() for s in b.segments)
    emb = np.concatenate([np.load(f) for s in b.segments for f in s.emb_files()])
    labels = np.asarray(b.vectors.labels)
    want = np.zeros(b.prototypes.shape)
    for e, lab in zip(emb, labels, strict=True):
        if lab >= 0:
            want[lab] += e
    norm = np.linalg.norm(want, axis=1, keepdims=True)
    want = np.divide(want, norm, out=np.zeros_like(want), where=norm > 0)
    np.testing.assert_allclose(b.prototypes, want, atol=1e-5)
    assert (norm[:, 0] == 0).sum() == (np.bincount(labels[labels >= 0], minlength=len(want)) == 0).sum()
    pos = int(np.flatnonzero(labels >= 0)[0])
    without = want[labels[pos]] * norm[labels[pos]] - emb[pos]
    np.testing.assert_allclose(b.prototypes_without(pos)[labels[pos]], without / np.linalg.norm(without), atol=1e-5)
    _as_written_before_checksums(idx)  # a segment written before the sums (and checksums): computed from embeddings
    (b.segments[0].path / "class_sums.npy").unlink()
    np.testing.assert_allclose(open_index(idx).prototypes, want, atol=1e-5)


def _as_written_before_checksums(idx: Path) -> None:
    """Rewrite the live generation as code before checksums wrote it: no ``files`` in any segment.json, no
    ``checksums`` in the manifest."""
    from dataclasses import replace

    from retrieval.infer.indexdir.manifest import IndexManifest
    layout = IndexFolder(idx)
    f = IndexFolder.manifest_file(layout.generation())
    man = IndexManifest.load(f)
    for sid, _ in man.segments:
        meta = layout.segment(sid) / "segment.json"
        d = json.loads(meta.read_text())
        d.pop("files", None)
        meta.write_text(json.dumps(d))
    replace(man, checksums={}).save(f)
