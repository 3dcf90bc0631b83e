"""A catalogue that changes: remove, relabel and replace products (library, CLI, HTTP) checked against a brute-force
oracle over the live products read straight from the segments' files; compaction drops what was removed; damaged
files are named, never served; a full disk changes nothing."""
from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval import durable
from retrieval.data.offsets import load_offsets
from retrieval.data.synth import SynthConfig, make_data
from retrieval.errors import UserError
from retrieval.infer.indexdir.build import IndexSettings, add_to_index, build_index, open_index
from retrieval.infer.indexdir.changes import UnknownProducts, relabel_products, remove_products
from retrieval.infer.indexdir.compact import check_index, compact
from retrieval.infer.indexdir.folder import DiskFull, IndexFolder
from retrieval.infer.indexdir.integrity import Damaged
from retrieval.infer.pipeline.embed import LoaderSettings
from retrieval.infer.query import UnknownProduct, similar
from retrieval.infer.scoring.candidates import class_sizes

ROOT = Path(__file__).resolve().parents[1]


def _oracle(idx: Path) -> dict:
    """Every live product of the live generation, read from the files with plain numpy (no segment code):
    id -> (embedding, class, category id), applying the manifest's deletion sets and relabels by hand."""
    import json
    layout = IndexFolder(idx)
    man = json.loads((layout.generation() / "manifest.json").read_text())
    out = {}
    for sid, _ in man["segments"]:
        path = layout.segment(sid)
        meta = json.loads((path / "segment.json").read_text())
        emb = np.concatenate([np.load(path / "emb" / f"{k:05d}.npy") for k in range(len(meta["parts"]))])
        ids, labels = np.load(path / "product_ids.npy"), np.load(path / "faiss" / "labels.npy")
        cats = np.load(path / "category_ids.npy")
        st = man.get("segment_state", {}).get(sid, {})
        gone = set(np.load(idx / st["removed"]).tolist()) if st.get("removed") else set()
        rel = {int(r[0]): (int(r[1]), int(r[2])) for r in np.load(idx / st["relabels"])} if st.get("relabels") else {}
        for i in range(len(ids)):
            if i not in gone:
                cat, lab = rel.get(i, (int(cats[i]), int(labels[i])))
                out[int(ids[i])] = (emb[i], lab, cat)
    return out


def _brute(oracle: dict, q: np.ndarray, k: int, label: int | None = None) -> list[int]:
    ids = [i for i, (_, lab, _) in oracle.items() if label is None or lab == label]
    scores = np.array([float(q @ oracle[i][0]) for i in ids])
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[j] for j in order]


def _same_top(oracle: dict, q: np.ndarray, got: list[int], k: int, label: int | None = None) -> None:
    """``got`` is a top ``k`` of the live products for ``q``: the brute-force list, up to the order of equal
    similarities (pictures shared by several products tie)."""
    want = _brute(oracle, q, k, label)
    score = lambda ids: [round(float(q @ oracle[i][0]), 5) for i in ids]  # noqa: E731
    assert len(got) == len(want) and score(got) == score(want) and all(i in oracle for i in got)
    if label is not None:
        assert all(oracle[i][1] == label for i in got)


def _assert_readers_follow(idx: Path, removed: set[int]) -> None:
    """Every reader of a freshly opened bundle agrees with the oracle over the live products."""
    oracle = _oracle(idx)
    assert not removed & set(oracle)
    b = open_index(idx)
    assert b.live_count == len(oracle)
    for pid in removed:
        assert b.position_of(pid) is None
        with pytest.raises(UnknownProduct):
            similar(b, product_id=pid, k=3)
    queries = list(oracle)[::9]
    restricted = 0
    for pid in queries:
        q = oracle[pid][0]
        got = [int(b.product_ids[p]) for p in b.vectors.search(q[None], 8)[1][0] if p >= 0]
        _same_top(oracle, q, got, 8)
        lab = oracle[pid][1]
        if lab >= 0:
            got = [int(b.product_ids[p]) for p in b.vectors.search(q[None], 5, [lab])[1][0] if p >= 0]
            _same_top(oracle, q, got, 5, lab)
            restricted += 1
        assert b.vectors.labels[b.position_of(pid)] == lab
    assert len(queries) >= 10 and restricted >= 10  # the searches restricted to a class were checked too
    labels = np.array([lab for _, lab, _ in oracle.values()])
    want_sizes = np.bincount(labels[labels >= 0], minlength=len(b.categories))
    sizes = class_sizes(b.vectors)
    assert np.array_equal(np.pad(sizes, (0, len(want_sizes) - len(sizes))), want_sizes)
    sums = np.zeros((len(b.categories), b.manifest.dim))
    for e, lab, _ in oracle.values():
        if lab >= 0:
            sums[lab] += e
    np.testing.assert_allclose(b.class_sums, sums, atol=1e-4)


def test_remove_relabel_replace_every_reader_follows(world, tmp_path):
    idx = world / "idx"
    b0 = open_index(idx)
    ids = [int(i) for i in b0.product_ids]
    gone = set(ids[3:40:3])
    remove_products(idx, sorted(gone))
    _assert_readers_follow(idx, gone)
    # the removed products' pictures never vote as exact duplicates (their labels are gone with them)
    b = open_index(idx)
    pos0 = [b0.position_of(p) for p in gone]
    hashes = b.duplicates.hashes[np.isin(b.duplicates.positions, pos0)]
    _, matched = b.duplicates.matches(hashes)
    live_owner = [p for p in matched.tolist() if p not in pos0 and b.vectors.labels[p] >= 0]
    want = sorted(int(b.vectors.labels[p]) for p in live_owner)  # only live owners vote (pictures shared by others)
    got = b.duplicates.product_labels(hashes, np.zeros(len(hashes), np.int64), 1, b.vectors.labels, cap=64)[0]
    assert len(hashes) and sorted(got[got >= 0].tolist()) == want and len(matched) > len(live_owner)
    # relabel: the product votes for its new class in the very next query
    victim = ids[1]
    cats = b.categories.ids
    new_cat = int(next(c for c in cats if c != int(b.arrays["category_ids"][b.position_of(victim)])))
    relabel_products(idx, {victim: new_cat})
    b = open_index(idx)
    pos = b.position_of(victim)
    assert int(b.arrays["category_ids"][pos]) == new_cat
    assert b.vectors.labels[pos] == b.categories.encode([new_cat])[0]
    _assert_readers_follow(idx, gone)
    # replace: an indexed product gets new pictures; its old row leaves in the same commit
    new = make_data(tmp_path / "new", SynthConfig(products=12, categories=3, seed=31, image_size=32),
                    progress=False)["train.bson"]
    from retrieval.data.offsets import load_offsets
    new_ids = set(load_offsets(new)["product_id"].tolist())
    overlap = new_ids & set(open_index(idx).product_ids.tolist())
    assert overlap
    added, replaced = add_to_index(idx, new, LoaderSettings(workers=0), replace=True)
    assert added == len(new_ids) and set(replaced) == overlap
    oracle = _oracle(idx)
    b = open_index(idx)
    for pid in overlap:  # found once, in the new segment, with the new file's embedding
        p = b.position_of(pid)
        assert b.vectors.locate(p)[0] == len(b.segments) - 1
        np.testing.assert_allclose(b.vector(p), oracle[pid][0])
    _assert_readers_follow(idx, gone - new_ids)


def test_unknown_ids_or_categories_change_nothing(world):
    idx = world / "idx"
    gen = IndexFolder(idx).current_name()
    b = open_index(idx)
    with pytest.raises(UnknownProducts, match="999999"):
        remove_products(idx, [int(b.product_ids[0]), 999999])
    with pytest.raises(UserError, match="not in the run's category table"):
        relabel_products(idx, {int(b.product_ids[0]): 123456789})
    with pytest.raises(UnknownProducts):
        relabel_products(idx, {424242: int(b.categories.ids[0])})
    remove_products(idx, [int(b.product_ids[0])])
    with pytest.raises(UnknownProducts):  # removed: unknown from now on
        remove_products(idx, [int(b.product_ids[0])])
    assert IndexFolder(idx).current_name() != gen and open_index(idx).live_count == 149


def test_compaction_drops_removed_rows_and_is_built_like_a_build(world, monkeypatch):
    idx = world / "idx"
    b0 = open_index(idx)
    ids = [int(i) for i in b0.segments[0].arrays["product_ids"]]  # the training products' segment (120)
    held = b0.manifest.held_out  # the validation products' segment (30): never rewritten
    gone = set(ids[:20])
    remove_products(idx, sorted(gone))  # 20 of 120: under a fifth, kept as a deletion set
    assert len(open_index(idx).segments[0].state.removed) == 20
    remove_products(idx, ids[20:32])  # 32 of 120: past a fifth, the segment is rewritten without them
    gone |= set(ids[20:32])
    b = open_index(idx)
    assert b.manifest.segment_state == {} and [s.sid for s in b.segments][0] == held
    new = b.segments[-1]
    assert len(b.segments) == 2 and len(new) == 88 and b.manifest.held_out == held
    assert new.meta["factory"] == "Flat" and new.meta["tuned_recall_at_10"] == 1.0
    _assert_readers_follow(idx, gone)
    # a segment past the Flat size is built within the memory budget and tuned like a build's
    import retrieval.infer.indexdir.builder as builder
    monkeypatch.setattr(builder, "choose_factory", lambda n, d, budget: "IVF4,SQ8" if budget < 1e6 else "IVF4,Flat")
    remove_products(idx, [ids[40]])
    compact(idx, index_memory=1e5)
    seg = open_index(idx).segments[-1]
    assert seg.meta["factory"] == "IVF4,SQ8" and 0.9 <= seg.meta["tuned_recall_at_10"] <= 1.0
    assert len(seg) == 87 and check_index(idx).damaged == ()


DAMAGE = ["faiss/index.faiss", "faiss/labels.npy", "product_ids.npy", "id_sorted.npy", "duplicates.npz",
          "class_sums.npy", "segment.json"]


@pytest.mark.parametrize("name", DAMAGE + ["emb/00000.npy"])
@pytest.mark.parametrize("how", ["flip", "truncate", "missing"])
def test_a_damaged_file_is_named_never_served(world, name, how):
    idx = world / "idx"
    seg = open_index(idx).segments[0]
    f = seg.path / name
    data = bytearray(f.read_bytes())
    if how == "flip":
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(255 - x for x in data[mid:mid + 64])
        f.write_bytes(bytes(data))
    elif how == "truncate":
        f.write_bytes(bytes(data[:len(data) // 2]))
    else:
        f.unlink()
    report = check_index(idx)
    assert len(report.damaged) >= 1 and name.split("/")[-1] in report.damaged[0]
    opened_checks = name != "emb/00000.npy" or how != "flip"  # embeddings are mapped: `check` reads their bytes
    if opened_checks:
        with pytest.raises(Damaged, match=name.split("/")[-1].replace(".", r"\.")):
            open_index(idx)
    if how == "flip":  # the command, once per kind of file (its start-up costs seconds)
        r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "check", "--index", str(idx)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and name.split("/")[-1] in r.stderr and "Traceback" not in r.stderr


def test_similar_on_a_damaged_index_is_one_line_exit_2(world):
    idx = world / "idx"
    b = open_index(idx)
    f = b.segments[0].path / "faiss" / "index.faiss"
    data = bytearray(f.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes()
    f.write_bytes(bytes(data[:len(f.read_bytes())]))
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "similar", "--index", str(idx), "--product-id",
                        str(int(b.product_ids[0]))], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "index.faiss is damaged" in r.stderr and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error")]) == 1


def test_a_server_keeps_the_last_good_generation(world):
    from fastapi.testclient import TestClient

    from retrieval.serve.api import create_app
    idx = world / "idx"
    pid = int(open_index(idx).product_ids[5])
    with TestClient(create_app(idx), base_url="http://localhost") as c:
        state = c.app.state.index
        try:
            gen = state.bundle.generation
            remove_products(idx, [pid])
            entry = next(iter(open_index(idx).manifest.segment_state.values()))
            (idx / entry["removed"]).write_bytes(b"\x93NUMPY garbage")  # the new generation's deletion set is damaged
            with pytest.raises(Damaged):
                state.reload()
            assert state.bundle.generation == gen
            r = c.post("/similar", data={"product_id": pid, "k": 3})
            assert r.status_code == 200 and c.get("/health").json()["products"] == 150
        finally:  # its watcher would retry the damaged generation, and log it, during the tests that follow
            state.close()


def _enospc_at(monkeypatch, n: int) -> None:
    """The ``n``-th write step of this process fails with ENOSPC, as a full disk would."""
    real, seen = durable.crash_point, {"write": 0}

    def point(kind: str) -> None:
        if kind == "write":
            seen["write"] += 1
            if seen["write"] == n:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(kind)
    monkeypatch.setattr(durable, "crash_point", point)


@pytest.mark.parametrize("n", [1, 2, 3])  # a remove writes its deletion set, the manifest, CURRENT
def test_a_full_disk_changes_nothing_and_leaves_nothing(world, monkeypatch, n, tmp_path):
    idx = world / "idx"
    layout = IndexFolder(idx)
    ids = [int(i) for i in open_index(idx).product_ids[:6]]
    remove_products(idx, ids[4:])  # something for a compaction to drop
    gen = layout.current_name()
    before = sorted(p.relative_to(idx) for p in idx.rglob("*") if "work" not in p.parts and p.is_file())
    new = make_data(tmp_path / "new", SynthConfig(products=8, categories=3, seed=77, image_size=32),
                    progress=False)["train.bson"]
    load_offsets(new)  # its offset cache exists: the n-th write counted below is the index folder's
    for op in (lambda: remove_products(idx, ids[:4]), lambda: add_to_index(idx, new, LoaderSettings(workers=0)),
               lambda: compact(idx)):
        _enospc_at(monkeypatch, n)
        with pytest.raises(DiskFull, match="nothing was changed"):
            op()
        monkeypatch.undo()
        assert layout.current_name() == gen
        after = sorted(p.relative_to(idx) for p in idx.rglob("*") if "work" not in p.parts and p.is_file())
        assert after == before and not list(layout.work.glob("add-*"))
    assert check_index(idx).damaged == ()


def test_http_writes_need_the_token_and_follow_at_once(world, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from retrieval.serve.api import create_app
    from retrieval.serve.guards import ServeSettings
    idx = world / "idx"
    b = open_index(idx)
    pid, other = int(b.product_ids[7]), int(b.product_ids[8])
    auth = {"Authorization": "Bearer s3cret"}
    with TestClient(create_app(idx, ServeSettings(token="s3cret")), base_url="http://localhost") as c:
        assert c.delete(f"/products/{pid}").status_code == 401
        assert c.delete("/elsewhere/1").status_code == 401 and c.put("/products").status_code == 401  # by method
        assert c.patch(f"/products/{pid}", data={"category_id": 1}).status_code == 401
        assert c.delete(f"/products/{pid}", headers={"Authorization": "Bearer nope"}).status_code == 403
        assert c.delete("/products/987654", headers=auth).status_code == 404
        r = c.delete(f"/products/{pid}", headers=auth)
        assert r.status_code == 200 and r.json()["products"] == 149
        assert c.post("/similar", data={"product_id": pid}).status_code == 404
        assert c.get(f"/products/{pid}/images/0").status_code == 404
        from retrieval.infer.query import product_pictures
        own = product_pictures(b, b.position_of(pid))  # its own pictures would find it first, were it there
        for route in ("/similar", "/classify"):
            r = c.post(route, files=[("images", (f"p{i}.jpg", p, "image/jpeg")) for i, p in enumerate(own)],
                       data={"k": 50} if route == "/similar" else {})
            assert r.status_code == 200
            if route == "/similar":
                assert pid not in [n["product_id"] for n in r.json()["results"]]
        for page in range(0, 150, 20):  # paging through everything never meets it
            got = c.post("/similar", data={"product_id": other, "k": 20, "offset": page}).json()["results"]
            assert pid not in [n["product_id"] for n in got]
        cat = int(b.categories.ids[0])
        found = c.post("/similar", data={"product_id": other, "k": 50, "category": cat}).json()["results"]
        assert pid not in [n["product_id"] for n in found]
        assert c.patch(f"/products/{other}", data={"category_id": 123456789}, headers=auth).status_code == 400
        r = c.patch(f"/products/{other}", data={"category_id": cat}, headers=auth)
        assert r.status_code == 200
        found = c.post("/similar", data={"product_id": other, "k": 5, "category": cat, "include_self": True})
        assert other in [n["product_id"] for n in found.json()["results"]]
        health = c.get("/health").json()
        assert health["products"] == 149 and health["segments"][0]["removed"] == 1
        assert health["segments"][0]["relabelled"] == 1 and health["segments"][0]["factory"] == "Flat"
        _enospc_at(monkeypatch, 1)
        r = c.delete(f"/products/{other}", headers=auth)
        assert r.status_code == 507 and "nothing was changed" in r.json()["detail"]
        monkeypatch.undo()
        import retrieval.serve.writes as writes

        class Full:  # the upload's own file fills the disk half-way
            def __init__(self, **kw):
                self.f = open(kw["dir"] / "partial.bson", "wb")
                self.name = self.f.name

            def write(self, _chunk):
                raise OSError(errno.ENOSPC, "No space left on device")

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()
        monkeypatch.setattr(writes.tempfile, "NamedTemporaryFile", Full)
        bson_bytes = (world / "data" / "test.bson").read_bytes()
        r = c.post("/products", files={"file": ("n.bson", bson_bytes, "application/octet-stream")}, headers=auth)
        assert r.status_code == 507 and not list(IndexFolder(idx).uploads.iterdir())
        monkeypatch.undo()
        assert c.get("/health").json()["products"] == 149


def test_cli_remove_relabel_and_a_server_follows_within_a_second(world, tmp_path):
    import time

    from fastapi.testclient import TestClient

    from retrieval.serve.api import create_app
    idx = world / "idx"
    b = open_index(idx)
    a, z = int(b.product_ids[10]), int(b.product_ids[11])
    cli = [sys.executable, str(ROOT / "cli.py")]
    with TestClient(create_app(idx), base_url="http://localhost") as c:
        r = subprocess.run(cli + ["remove", "--index", str(idx), "--product-id", str(a), "--product-id", "5555555"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "5555555" in r.stderr and "Traceback" not in r.stderr
        r = subprocess.run(cli + ["remove", "--index", str(idx), "--product-id", str(a)], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 3
        while c.post("/similar", data={"product_id": a}).status_code != 404:
            assert time.monotonic() < deadline, "the server did not follow the CLI's remove"
            time.sleep(0.1)
    csv = tmp_path / "fix.csv"
    cat = int(b.categories.ids[-1])
    csv.write_text(f"_id,category_id\n{z},{cat}\n")
    r = subprocess.run(cli + ["relabel", str(csv), "--index", str(idx)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(open_index(idx).arrays["category_ids"][open_index(idx).position_of(z)]) == cat
    csv.write_text(f"_id,category_id\n{z},99999999\n")
    r = subprocess.run(cli + ["relabel", str(csv), "--index", str(idx)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "99999999" in r.stderr


def test_audit_finds_flipped_labels_and_relabel_takes_its_csv(world, tmp_path):
    from retrieval.infer.audit import audit_index, write_audit
    from retrieval.infer.indexdir.changes import read_corrections
    idx = world / "idx"
    b = open_index(idx)
    before = {s.product_id for s in audit_index(idx)}  # what the index already disagrees with
    cats = [int(c) for c in b.categories.ids]
    rng = np.random.default_rng(3)
    clean = [int(p) for p in b.product_ids if int(p) not in before]
    flips = {}
    for pid in rng.choice(clean, 6, replace=False).tolist():
        own = int(b.arrays["category_ids"][b.position_of(pid)])
        flips[pid] = int(rng.choice([c for c in cats if c != own]))
    relabel_products(idx, flips)  # wrong labels, on purpose
    suspects = audit_index(idx)
    found = {s.product_id for s in suspects}
    assert len(set(flips) & found) >= 5  # the index disagrees with the wrong labels
    for s in suspects:  # each suspect's label is the one now indexed, and the suggestion another category
        assert s.category_id == int(open_index(idx).arrays["category_ids"][open_index(idx).position_of(s.product_id)])
        assert s.suggested_id != s.category_id and 0 < s.p_suggested <= 1 and s.p_own <= s.p_suggested
    assert [s.p_suggested for s in suspects] == sorted((s.p_suggested for s in suspects), reverse=True)
    out = tmp_path / "audit.csv"
    write_audit(idx, suspects, out, tmp_path / "audit.png")
    assert (tmp_path / "audit.png").stat().st_size > 1000
    fixes = read_corrections(out)
    assert fixes == {s.product_id: s.suggested_id for s in suspects}
    relabel_products(idx, fixes)
    after = open_index(idx)
    for pid in set(flips) & found:  # back to a category the index agrees with
        assert int(after.arrays["category_ids"][after.position_of(pid)]) != flips[pid]


CHANGES = """
import sys, json
from pathlib import Path
import numpy as np
from retrieval.infer.indexdir.build import add_to_index
from retrieval.infer.indexdir.changes import relabel_products, remove_products
from retrieval.infer.indexdir.compact import check_folder, compact
from retrieval.infer.pipeline.embed import LoaderSettings
idx, new, ids, cat = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
steps = [lambda: remove_products(idx, ids[:8]), lambda: relabel_products(idx, {i: cat for i in ids[8:16]}),
         lambda: add_to_index(idx, new, LoaderSettings(workers=0), replace=True), lambda: compact(idx)]
for step in steps:
    step()
    print(json.dumps(check_folder(idx)), flush=True)
"""


@pytest.mark.slow
def test_kill_9_at_random_moments_of_changes_leaves_a_committed_state(world, tmp_path):
    """Remove, relabel, replace and compact in one process, killed with SIGKILL at random moments: the folder
    always opens at one of the states the whole run passes through, with every file it references whole."""
    import json
    import os
    import signal
    import time
    new = make_data(tmp_path / "new", SynthConfig(products=12, categories=3, seed=31, image_size=32),
                    progress=False)["train.bson"]
    b = open_index(world / "idx")
    args = [json.dumps([int(i) for i in b.product_ids[40:56]]), str(int(b.categories.ids[0]))]
    script = tmp_path / "changes.py"
    script.write_text(CHANGES)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    probe = world / "probe"
    shutil.copytree(world / "idx", probe)
    t = time.perf_counter()
    done = subprocess.run([sys.executable, str(script), str(probe), str(new), *args], check=True, env=env,
                          capture_output=True, text=True, timeout=600)
    whole = time.perf_counter() - t
    from retrieval.infer.indexdir.compact import check_folder
    states = [check_folder(world / "idx")[1]] + [json.loads(line)[1] for line in done.stdout.splitlines()]
    assert len(states) == 5
    for n, moment in enumerate(np.random.default_rng(5).uniform(0.3 * whole, whole, 6)):
        idx = world / f"idx{n}"
        shutil.copytree(world / "idx", idx)
        p = subprocess.Popen([sys.executable, str(script), str(idx), str(new), *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        time.sleep(moment)
        p.send_signal(signal.SIGKILL)
        p.wait(60)
        gen, count = check_folder(idx)
        assert count in states and check_index(idx).damaged == ()
        assert open_index(idx).live_count == count


def test_two_writers_a_change_is_refused_while_another_writes(world):
    from fastapi.testclient import TestClient

    from retrieval.infer.indexdir.folder import WriterBusy
    from retrieval.serve.api import create_app
    idx = world / "idx"
    pid = int(open_index(idx).product_ids[3])
    with TestClient(create_app(idx), base_url="http://localhost") as c:
        with IndexFolder(idx).writer():  # another process is writing
            assert c.delete(f"/products/{pid}").status_code == 409
            assert c.patch(f"/products/{pid}", data={"category_id": 1}).status_code == 409
            with pytest.raises(WriterBusy):
                remove_products(idx, [pid])
            r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "remove", "--index", str(idx), "--product-id",
                                str(pid)], capture_output=True, text=True, timeout=300)
            assert r.returncode == 2 and "another process is writing" in r.stderr
        assert c.get("/health").json()["products"] == 150
        assert c.delete(f"/products/{pid}").status_code == 200


def test_a_bad_index_type_is_refused_before_any_work(world, monkeypatch):
    import retrieval.infer.indexdir.build as build_mod
    monkeypatch.setattr(build_mod, "load_model_file", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(UserError, match="IVF_garbage"):
        build_index(world / "data" / "train.bson", world / "run", world / "idx2",
                    IndexSettings("all", index_type="IVF_garbage,Flat"), LoaderSettings(workers=0))
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "build-index", str(world / "data" / "train.bson"),
                        "--model", str(world / "run"), "--out", str(world / "idx3"), "--index-type",
                        "IVF_garbage,Flat"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "IVF_garbage" in r.stderr and "Traceback" not in r.stderr
    assert not (world / "idx3" / "CURRENT").exists()


def test_a_damaged_manifest_or_state_file_is_named(world):
    idx = world / "idx"
    remove_products(idx, [int(open_index(idx).product_ids[2])])
    man = IndexFolder.manifest_file(IndexFolder(idx).generation())
    good = man.read_text()
    man.write_text(good.replace('"removed_count": 1', '"removed_count": 0'))  # a value changed, still valid JSON
    with pytest.raises(Damaged, match="manifest.json"):
        open_index(idx)
    with pytest.raises(Damaged, match="manifest.json"):
        check_index(idx)
    man.write_text(good)
    state = next((idx / "state").iterdir())
    state.write_bytes(state.read_bytes()[:-8])  # cut short
    with pytest.raises(Damaged, match=state.name):
        open_index(idx)
    assert state.name in check_index(idx).damaged[0]


def test_the_collector_never_makes_damage_permanent(world):
    """A live manifest that fails its checksum, or CURRENT naming no generation: a writer refuses or fails, and
    nothing the folder holds is collected (a reader's refusal stays repairable)."""
    idx = world / "idx"
    layout = IndexFolder(idx)
    sid = open_index(idx).manifest.segments[0][0]
    man = IndexFolder.manifest_file(layout.generation())
    good = man.read_text()
    man.write_text(good.replace(sid, sid[:-1] + ("0" if sid[-1] != "0" else "1")))  # one digit of the id
    with pytest.raises(Damaged):
        remove_products(idx, [int(np.load(layout.segment(sid) / "product_ids.npy")[0])])
    assert layout.segment(sid).is_dir()
    man.write_text(good)
    current = layout.current_name()
    layout.current_file.write_text("g00000000000000000001")  # names no generation
    with pytest.raises(UserError):
        remove_products(idx, [int(np.load(layout.segment(sid) / "product_ids.npy")[0])])
    assert (idx / "generations" / current).is_dir() and layout.segment(sid).is_dir()
    layout.current_file.write_text(current)
    assert check_index(idx).damaged == ()


def test_compaction_refuses_damaged_rows_instead_of_sealing_them(world):
    idx = world / "idx"
    ids = [int(i) for i in open_index(idx).product_ids]
    remove_products(idx, ids[:5])
    seg = open_index(idx).segments[0]
    emb = seg.path / "emb" / "00001.npy"
    data = bytearray(emb.read_bytes())
    data[-100] ^= 0xFF  # a flipped bit in a mapped file: opening does not read it, compaction must
    emb.write_bytes(bytes(data))
    gen = IndexFolder(idx).current_name()
    with pytest.raises(Damaged, match="00001.npy"):
        compact(idx)
    assert IndexFolder(idx).current_name() == gen and not list((idx / "work").glob("compact-*"))


def test_a_write_the_server_cannot_open_is_not_reported_live(world, monkeypatch):
    from fastapi.testclient import TestClient

    import retrieval.serve.api as api
    idx = world / "idx"
    b = open_index(idx)
    pid = int(b.product_ids[9])
    with TestClient(api.create_app(idx), base_url="http://localhost") as c:
        real = api.open_index
        monkeypatch.setattr(api, "open_index", lambda *a, **k: (_ for _ in ()).throw(Damaged("x is damaged")))
        r = c.delete(f"/products/{pid}")
        assert r.status_code == 503 and "committed" in r.json()["detail"]
        assert c.post("/similar", data={"product_id": pid}).status_code == 200  # still the last good one
        monkeypatch.setattr(api, "open_index", real)
        c.app.state.index._failed = (None, 0.0)
        c.app.state.index.poll()  # the next try opens it
        assert c.post("/similar", data={"product_id": pid}).status_code == 404
        assert c.patch(f"/products/{b.product_ids[1]}", data={"category_id": 2 ** 70}).status_code == 422


def test_http_replace_gives_indexed_products_their_new_pictures(world, tmp_path):
    from fastapi.testclient import TestClient

    from retrieval.data.offsets import load_offsets
    from retrieval.serve.api import create_app
    idx = world / "idx"
    new = make_data(tmp_path / "new", SynthConfig(products=12, categories=3, seed=31, image_size=32),
                    progress=False)["train.bson"]
    ids = set(load_offsets(new)["product_id"].tolist())
    overlap = ids & set(open_index(idx).product_ids.tolist())
    body = {"file": ("new.bson", new.read_bytes(), "application/octet-stream")}
    with TestClient(create_app(idx), base_url="http://localhost") as c:
        r = c.post("/products", files=body)
        assert r.status_code == 200 and set(r.json()["already_indexed"]) == overlap  # skipped without the flag
        assert r.json()["products"] == 150 + len(ids - overlap)
        r = c.post("/products?replace=true", files=body)
        assert r.status_code == 200 and set(r.json()["replaced"]) == ids and r.json()["products"] == 150 + len(ids
                                                                                                           - overlap)
        b = c.app.state.index.bundle
        for pid in ids:  # each found once, in the newest segment
            assert b.vectors.locate(b.position_of(pid))[0] == len(b.segments) - 1
    _assert_readers_follow(idx, set())


def test_id_and_correction_files_are_read_as_written_or_refused_by_line(tmp_path):
    from retrieval.infer.indexdir.changes import read_corrections, read_ids
    f = tmp_path / "ids.csv"
    f.write_text("_id,category_id\n12,5\n\n7,5\n")
    assert read_ids(f) == [12, 7]
    f.write_text("12\n7\nx7\n")
    with pytest.raises(UserError, match="line 3"):
        read_ids(f)
    f.write_text("p_suggested,category_id,_id\n0.9,1000010653,12\n")  # columns found by name
    assert read_corrections(f) == {12: 1000010653}
    f.write_text("12,5\n12,6\n")
    with pytest.raises(UserError, match="two categories"):
        read_corrections(f)
    f.write_text("id,cat\n1,2\n")
    with pytest.raises(UserError, match="_id and category_id"):
        read_corrections(f)
