"""index/: approximate search against exact search, restriction by category, save/load, the vote."""
from __future__ import annotations

import re

import numpy as np
import pytest

from index import VectorIndex, choose_factory, exact_topk, knn_vote, recall_at_k, rerank, take_rows
from index.ivf import HNSW_COARSE_AT, LIST_LEN, TRAIN_MIN


def clustered(n, d=32, centres=50, seed=0, noise=0.3):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d))
    lab = rng.integers(0, centres, n)
    x = c[lab] + noise * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), lab


@pytest.fixture(scope="module")
def data():
    x, lab = clustered(6000)
    q, _ = clustered(200, seed=1)
    exact = VectorIndex.create(32, "Flat")
    exact.add(x, lab)
    return x, lab, q, exact


def test_flat_is_exact(data):
    x, lab, q, exact = data
    sims, pos = exact.search(q, 10)
    brute = q @ x.T
    assert np.array_equal(pos[:, 0], brute.argmax(1))
    assert np.allclose(sims, -np.sort(-brute, axis=1)[:, :10], atol=1e-5)


@pytest.mark.parametrize("factory", ["IVF64,Flat", "HNSW16", "IVF64,SQ8", "IVF64_HNSW32,Flat", "IVF64_HNSW32,SQ8"])
def test_approximate_indexes_match_flat(data, factory):
    x, lab, q, exact = data
    idx = VectorIndex.create(32, factory)
    idx.add(x, lab)
    _, tune_truth = exact_topk(q[:100], np.array_split(x, 7), 10)  # streamed over blocks
    assert np.array_equal(tune_truth, exact.search(q[:100], 10)[1])
    recall = idx.tune(q[:100], tune_truth, target=0.95)
    _, truth = exact.search(q[100:], 10)
    assert recall >= 0.95
    assert recall_at_k(idx.search(q[100:], 10)[1], truth, 10) >= 0.9  # holds on unseen queries


def test_restricted_search_only_returns_allowed_labels(data):
    x, lab, q, _ = data
    for factory in ("Flat", "IVF64,Flat", "HNSW16", "IVF64_HNSW32,Flat"):
        idx = VectorIndex.create(32, factory)
        idx.add(x, lab)
        sims, pos = idx.search(q, 5, allowed_labels=[3, 7])
        assert (pos >= 0).all() and set(lab[pos].ravel()) <= {3, 7}
        mask = np.isin(lab, [3, 7])
        brute = np.where(mask[None], q @ x.T, -np.inf)
        assert np.array_equal(pos[:, 0], brute.argmax(1))
    _, pos = idx.search(q, 5, allowed_labels=[999])
    assert (pos == -1).all()


def test_save_load_round_trip(data, tmp_path):
    x, lab, q, _ = data
    idx = VectorIndex.create(32, "IVF64,Flat")
    idx.add(x, lab)
    idx.nprobe = 8
    idx._apply()
    idx.save(tmp_path)
    for mmap in (False, True):
        back = VectorIndex.load(tmp_path, mmap=mmap)
        assert back.nprobe == 8 and np.array_equal(back.labels, lab)
        a, b = idx.search(q, 10), back.search(q, 10)
        assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])


def test_add_appends_positions(data):
    x, lab, q, _ = data
    idx = VectorIndex.create(32, "Flat")
    idx.add(x[:100], lab[:100])
    idx.add(x[100:110], lab[100:110])
    _, pos = idx.search(x[105:106], 1)
    assert pos[0, 0] == 105 and len(idx) == 110
    with pytest.raises(ValueError, match="vectors must be"):
        idx.add(np.zeros((2, 5), np.float32), [0, 0])


def test_rerank_and_take_rows_against_loops():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    q = rng.normal(size=(6, 8)).astype(np.float32)
    short = np.array([rng.permutation(50)[:7] for _ in range(6)])  # a search lists a position once
    short[rng.random(short.shape) < 0.2] = -1
    blocks = [x[:11], x[11:12], x[12:40], x[40:]]
    sims, pos = rerank(q, short, 3, lambda p: take_rows(blocks, p))
    for i in range(6):
        cand = sorted({int(p) for p in short[i] if p >= 0}, key=lambda p: -float(q[i] @ x[p]))[:3]
        assert sorted(pos[i][pos[i] >= 0].tolist()) == sorted(cand)
        assert np.allclose(sims[i][: len(cand)], [q[i] @ x[p] for p in cand], atol=1e-5)
    assert np.array_equal(take_rows(blocks, np.array([0, 11, 12, 49])), x[[0, 11, 12, 49]])
    with pytest.raises(IndexError):
        take_rows(blocks, np.array([3, 50]))  # past the end: refused, never a shorter array
    import index.rows as store_mod
    whole = rerank(q, short, 3, lambda p: take_rows(blocks, p))
    monkey = store_mod.RERANK_BYTES
    try:
        store_mod.RERANK_BYTES = 7 * 8 * 4 * 2  # two queries a chunk
        chunked = rerank(q, short, 3, lambda p: take_rows(blocks, p))
    finally:
        store_mod.RERANK_BYTES = monkey
    assert all(np.array_equal(a, b) for a, b in zip(whole, chunked, strict=True))


def test_coded_index_with_exact_vectors_at_hand_ranks_like_flat(data):
    x, lab, q, exact = data
    sq = VectorIndex.create(32, "IVF16,PQ8")  # coarse codes: alone they miss many of the exact neighbours
    sq.add(x, lab)
    sq.set_nprobe(16)
    _, truth = exact.search(q, 10)
    plain = recall_at_k(sq.search(q, 10)[1], truth, 10)
    sq.refine = lambda p: take_rows([x], p)
    sims, pos = sq.search(q, 10)
    assert recall_at_k(pos, truth, 10) > max(plain + 0.1, 0.8)
    assert np.allclose(sims, np.take_along_axis(q @ x.T, pos, 1), atol=1e-5)  # exact similarities, not decoded


def test_choose_factory():
    assert choose_factory(5000, 256) == "Flat"
    for n in (100_000, 1_000_000, 7_069_896, 70_000_000):  # lists of about LIST_LEN vectors at every size
        f = choose_factory(n, 128, memory_budget=float("inf"))
        nlist = int(re.match(r"IVF(\d+)", f).group(1))
        assert 0.9 < n / nlist / LIST_LEN < 1.1 and f.endswith(",Flat")
        assert ("_HNSW32" in f) == (nlist >= HNSW_COARSE_AT)  # a coarse graph once a flat scan of lists would cost
    assert choose_factory(7_000_000, 512, memory_budget=8e9).endswith("SQfp16")  # half floats fit 8 GB
    assert choose_factory(7_000_000, 512, memory_budget=4e9).endswith("SQ8")
    assert choose_factory(7_000_000, 512, memory_budget=1e9).startswith("OPQ")
    with pytest.raises(ValueError, match="bad FAISS factory"):
        VectorIndex.create(8, "NotAnIndex")


def test_two_level_training_fills_the_coarse_graph_with_unit_centroids(data):
    x, lab, _, _ = data
    idx = VectorIndex.create(32, "IVF128_HNSW32,Flat")
    assert idx.training_rows(10_000_000) == TRAIN_MIN  # 40 a list would be fewer: the floor holds
    idx.train(x)
    quantizer = idx.ivf.quantizer
    cent = quantizer.reconstruct_n(0, quantizer.ntotal)
    assert quantizer.ntotal == 128 and np.allclose(np.linalg.norm(cent, axis=1), 1, atol=1e-4)
    idx.add(x, lab)
    sizes = np.array([idx.ivf.invlists.list_size(i) for i in range(128)])
    assert sizes.sum() == len(x) and (sizes > 0).sum() > 100  # the lists are used, not a few giant ones
    assert idx.training_rows(len(x)) == 0  # trained: no sample needed


def test_coded_index_reranks_only_where_its_codes_fall_short(data, tmp_path):
    x, lab, q, exact = data
    _, truth = exact.search(q[:100], 10)
    fine = VectorIndex.create(32, "IVF16,SQ8")  # 8 bits a dimension: the codes alone reach the target
    fine.add(x, lab)
    fine.refine = lambda p: take_rows([x], p)
    assert fine.tune(q[:100], truth, 0.9) >= 0.9 and not fine.rerank
    coarse = VectorIndex.create(32, "IVF16,PQ8")  # 8 bytes a vector: alone they never reach it
    coarse.add(x, lab)
    coarse.refine = lambda p: take_rows([x], p)
    assert coarse.tune(q[:100], truth, 0.8) >= 0.8 and coarse.rerank
    coarse.save(tmp_path / "a")
    fine.save(tmp_path / "b")
    assert VectorIndex.load(tmp_path / "a").rerank and not VectorIndex.load(tmp_path / "b").rerank


def test_knn_vote_matches_python_loop():
    rng = np.random.default_rng(0)
    sims = np.sort(rng.uniform(-1, 1, (20, 8)), axis=1)[:, ::-1].astype(np.float32)
    labels = rng.integers(-1, 5, (20, 8))
    labels[3] = -1  # a query with no neighbour
    got = knn_vote(sims, labels, 5, tau=0.1, k=6)
    for q in range(20):
        ref = [0.0] * 5
        for j in range(6):
            if labels[q, j] >= 0:
                ref[labels[q, j]] += np.exp(sims[q, j] / 0.1)
        total = sum(ref)
        ref = [r / total if total else 0.0 for r in ref]
        assert np.allclose(got[q], ref, atol=1e-5)
    assert got[3].sum() == 0


def test_duplicate_table_finds_exact_pictures_and_labels_products(tmp_path):
    from index import DuplicateTable, duplicate_share
    table = DuplicateTable(np.array([5, 3, 5, 9]), np.array([0, 1, 2, 3]))
    qi, pos = table.matches(np.array([5, 9, 4, 3]))
    assert sorted(zip(qi.tolist(), pos.tolist(), strict=True)) == [(0, 0), (0, 2), (1, 3), (3, 1)]
    labels = np.array([10, 11, 12, -1])  # position 3 has no category: it does not vote
    got = table.product_labels(np.array([5, 9, 4, 3]), np.array([0, 0, 1, 2]), 3, labels, cap=4)
    assert [sorted(r[r >= 0].tolist()) for r in got] == [[10, 12], [], [11]]
    classes = np.array([[10, 12, -1], [7, -1, -1], [3, 11, -1]])
    np.testing.assert_allclose(duplicate_share(classes, got), [[0.5, 0.5, 0], [0, 0, 0], [0, 1, 0]])
    table.merged(np.array([4]), np.array([7])).save(tmp_path / "dups.npz")
    back = DuplicateTable.load(tmp_path / "dups.npz")
    assert back.matches(np.array([4]))[1].tolist() == [7] and len(back) == 5
    assert len(DuplicateTable.load(tmp_path / "elsewhere.npz")) == 0


def test_joined_duplicate_tables_answer_as_one_merged_table(tmp_path):
    from index import JoinedDuplicates
    from index.dups import DuplicateTable
    rng = np.random.default_rng(2)
    sizes = [40, 3, 0, 9]
    tables = [DuplicateTable(rng.integers(0, 30, n), rng.integers(0, 12, n)) for n in sizes]
    offsets = [0, 12, 15, 15]
    merged = DuplicateTable(np.concatenate([t.hashes for t in tables]),
                            np.concatenate([t.positions + o for t, o in zip(tables, offsets, strict=True)]))
    joined = JoinedDuplicates(tables, offsets)
    query, owner = rng.integers(0, 35, 25), rng.integers(0, 6, 25)
    labels = rng.integers(-1, 5, 40)
    assert len(joined) == len(merged)
    for a, b in zip(joined.matches(query), merged.matches(query), strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(joined.product_labels(query, owner, 6, labels, cap=4, exclude=13),
                          merged.product_labels(query, owner, 6, labels, cap=4, exclude=13))
    joined.save(tmp_path / "d.npz")  # saved whole and sorted: loads as one table
    back = DuplicateTable.load(tmp_path / "d.npz")
    assert np.array_equal(back.matches(query)[1], merged.matches(query)[1])


def test_released_mapped_pages_leave_the_process_but_not_the_data(tmp_path):
    from index import release_pages

    def rss_file_mb() -> float:
        line = next(li for li in open("/proc/self/status") if li.startswith("RssFile"))
        return int(line.split()[1]) / 1024
    np.save(tmp_path / "e.npy", np.arange(16 << 20, dtype=np.float32).reshape(-1, 64))  # 64 MB
    m = np.load(tmp_path / "e.npy", mmap_mode="r")
    before = rss_file_mb()
    total = float(m.sum(dtype=np.float64))  # every page touched
    touched = rss_file_mb()
    release_pages([m, np.zeros(3)])  # plain arrays are left alone
    assert touched - before > 40 and touched - rss_file_mb() > 40
    assert float(m.sum(dtype=np.float64)) == total  # read again from the file, unchanged


@pytest.mark.parametrize("n_removed", [0, 7, 1500, 2400])
def test_a_view_with_removed_rows_searches_like_brute_force_over_the_live_ones(n_removed):
    """Few removed (every one asked for and dropped), many (a few more asked for, rows left short searched again
    with a selector: 2,400 of 4,000 forces that), for a Flat index against a brute-force loop, and an IVF index
    against its own selector search over the same lists; filtered searches never return a removed row."""
    rng = np.random.default_rng(n_removed)
    n, d = 4000, 16
    v = rng.normal(size=(n, d)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    labels = rng.integers(0, 5, n)
    removed = np.sort(rng.choice(n, n_removed, replace=False))
    live = np.setdiff1d(np.arange(n), removed)
    q = v[rng.integers(0, n, 60)] + 0.2 * rng.normal(size=(60, d)).astype(np.float32)
    flat = VectorIndex.create(d, "Flat")
    flat.add(v, labels)
    view = flat.view(np.where(np.isin(np.arange(n), removed), -1, labels), removed)
    for k in (1, 10, 40):
        _, pos = view.search(q, k)
        scores = q @ v[live].T
        truth = live[np.argsort(-scores, axis=1, kind="stable")[:, :k]]
        assert np.array_equal(pos, truth)
    _, pos = view.search(q, 10, [2])
    assert not np.isin(pos, removed).any() and (labels[pos[pos >= 0]] == 2).all()
    ivf = VectorIndex.create(d, "IVF16,Flat")
    ivf.add(v, labels)
    ivf.set_nprobe(3)
    iv = ivf.view(labels, removed)
    got = iv.search(q, 10)[1]
    want = iv._search(q, 10, iv._live_params)[1] if n_removed else ivf.search(q, 10)[1]
    assert np.array_equal(got, want) and not np.isin(got, removed).any()
