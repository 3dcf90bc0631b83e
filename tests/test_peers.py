"""Peer propagation, checked against a dense label-propagation loop written here, a hand-made case, and the
pipeline (a prediction over several parts equals one over a single part: the peers span the whole file)."""
from __future__ import annotations

import numpy as np
import pytest

from index import vote as vote_module
from retrieval.data.offsets import RecordReader, load_offsets
from retrieval.infer.indexdir.bundle import open_index
from retrieval.infer.pipeline.embed import LoaderSettings, embed_products
from retrieval.infer.predict import PredictSettings, predict, read_submission
from retrieval.infer.scoring.fused import FusionOverrides
from retrieval.infer.scoring.peers import PeerSettings, calibrate_peers, load_peers, peer_graph, propagate, top_classes


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _dense_lp(emb, has, base, mu, k, tau, iters):
    """Textbook label propagation with dense matrices: F <- (1 - mu) B + mu W F, W the row-normalised kNN graph
    (weights exp(sim / tau) over the k most similar other products with an image)."""
    n = len(emb)
    s = emb @ emb.T
    w = np.zeros((n, n))
    for i in range(n):
        if not has[i]:
            continue
        others = [j for j in np.argsort(-s[i]) if j != i and has[j]][:k]
        if not others:
            continue
        e = np.exp((s[i, others] - s[i, others].max()) / tau)
        w[i, others] = e / e.sum()
    f = base.copy()
    for _ in range(iters):
        f = np.where(w.sum(1, keepdims=True) > 0, (1 - mu) * base + mu * w @ f, base)
        f /= f.sum(1, keepdims=True)
    return f


def test_peer_graph_is_the_brute_force_neighbours_without_self_or_imageless_products():
    rng = np.random.default_rng(0)
    emb = _unit(rng.normal(size=(60, 8)))
    has = np.ones(60, bool)
    has[[3, 17]] = False
    g = peer_graph([emb[:25], emb[25:]], has, 4)  # two blocks, as predict's parts
    s = emb @ emb.T
    for i in range(60):
        want = [j for j in np.argsort(-s[i]) if j != i and has[j]][:4] if has[i] else [-1] * 4
        assert g.pos[i].tolist() == want
    assert not np.isin(g.pos, [3, 17]).any()


@pytest.mark.parametrize("mu,k,tau", [(0.5, 3, 0.1), (0.9, 6, 0.05)])
def test_sparse_propagation_equals_dense_label_propagation(mu, k, tau, tmp_path):
    rng = np.random.default_rng(1)
    n, c = 40, 7
    emb = _unit(rng.normal(size=(n, 5)))
    has = np.ones(n, bool)
    has[5] = False
    base = rng.dirichlet(np.ones(c) * 0.5, size=n)
    classes = np.tile(np.arange(c), (n, 1))
    s = PeerSettings(mu, k, tau, iters=8, keep=c)  # keeping every class: no truncation, exact
    got_c, got_p = propagate(classes, base.astype(np.float32), peer_graph([emb], has, k), s)
    want = _dense_lp(emb, has, base, mu, k, tau, 8)
    dense = np.zeros((n, c))
    np.put_along_axis(dense, np.maximum(got_c, 0), np.where(got_c >= 0, got_p, 0), 1)
    assert np.allclose(dense, want, atol=1e-5)
    assert np.allclose(dense[5], base[5] / base[5].sum(), atol=1e-6)  # no image: no peers, unchanged
    assert (np.diff(got_p, axis=1) <= 1e-7).all()  # best first
    with pytest.MonkeyPatch.context() as m:  # in blocks of 7 rows (the whole file's arrays never at once)
        m.setattr(vote_module, "CHUNK_ROWS", 7)
        small_c, small_p = propagate(classes, base.astype(np.float32), peer_graph([emb], has, k), s)
    assert np.array_equal(small_c, got_c) and np.allclose(small_p, got_p, atol=1e-7)
    # as predict runs it: the graph's links only, the first stage read from memory-mapped files (int16 classes)
    first_c, first_p = top_classes(classes, base, s.keep)
    np.save(tmp_path / "c.npy", first_c.astype(np.int16))
    np.save(tmp_path / "p.npy", first_p.astype(np.float32))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(vote_module, "CHUNK_ROWS", 7)
        links = peer_graph([emb], has, k).links(tau, k)
        lean_c, lean_p = propagate(np.load(tmp_path / "c.npy", mmap_mode="r"),
                                   np.load(tmp_path / "p.npy", mmap_mode="r"), links, s)
    assert lean_c.dtype == np.int16 and lean_p.dtype == np.float32
    assert np.array_equal(lean_c, got_c) and np.allclose(lean_p, got_p, atol=1e-7)
    assert links.pos.shape == (n, k) and np.allclose(links.w.sum(1)[has], 1, atol=1e-6)


def test_a_doubtful_product_follows_its_confident_near_duplicate_peers():
    emb = _unit(np.array([[1, 0, 0], [1, 0.05, 0], [1, -0.05, 0]], np.float64))
    classes = np.array([[0, 1], [0, 1], [1, 0]])  # any class order: classes, not columns, are summed
    probs = np.array([[0.45, 0.55], [0.9, 0.1], [0.2, 0.8]], np.float32)
    g = peer_graph([emb], np.ones(3, bool), 2)
    off = propagate(classes, probs, g, PeerSettings(0.0, 2, 0.05))
    on = propagate(classes, probs, g, PeerSettings(0.5, 2, 0.05, iters=1))
    assert off[0][:, 0].tolist() == [1, 0, 0]
    assert on[0][:, 0].tolist() == [0, 0, 0]
    # one step by hand for product 0: 0.5 * own + 0.5 * (equal-weight mean of two peers: 0.85 / 0.15 on class 0)
    assert on[1][0, 0] == pytest.approx(0.5 * 0.45 + 0.5 * (0.9 + 0.8) / 2, abs=1e-6)


def test_calibration_keeps_peers_off_when_they_do_not_help_and_turns_them_on_when_they_do():
    rng = np.random.default_rng(2)
    n, c = 90, 3
    y = np.repeat(np.arange(c), n // c)
    centres = _unit(rng.normal(size=(c, 16)))
    emb = _unit(centres[y] + 0.15 * rng.normal(size=(n, 16)))
    classes = np.tile(np.arange(c), (n, 1))
    noisy = rng.dirichlet(np.ones(c), size=n) + 0.3 * np.eye(c)[y]  # weak first stage, errors independent of peers
    noisy = (noisy / noisy.sum(1, keepdims=True)).astype(np.float32)
    g = peer_graph([emb], np.ones(n, bool), 20)
    s, grid = calibrate_peers(classes, noisy, g, y)
    assert s.mu > 0 and max(r["accuracy"] for r in grid) > grid[0]["accuracy"] + 0.2
    perfect = np.eye(c, dtype=np.float32)[y]  # already right everywhere: nothing can beat mu 0
    s0, _ = calibrate_peers(classes, perfect, g, y)
    assert s0.mu == 0.0


def test_peers_span_the_whole_file_whatever_the_parts_and_match_dense_propagation(indexes, small_data, tmp_path):
    kw = dict(loader=LoaderSettings(workers=0))
    outs = {}
    for chunk in (7, 1000):
        out = tmp_path / f"c{chunk}.csv"
        predict(small_data["test.bson"], indexes["all"], out, FusionOverrides(alpha=1.0, beta=0.0, peer_weight=0.8),
                settings=PredictSettings(chunk), **kw)
        outs[chunk] = read_submission(out)[1]
    assert outs[7].tolist() == outs[1000].tolist()
    # independently: the head's tempered probabilities over all 6 classes, propagated with dense matrices
    b = open_index(indexes["all"])
    table = load_offsets(small_data["test.bson"])
    got = list(embed_products(b.net, RecordReader(small_data["test.bson"], table), np.arange(len(table)),
                               LoaderSettings(128, 0)))
    emb, probs = np.concatenate([o.emb for o in got]), np.concatenate([o.probs for o in got]).astype(np.float64)
    t = (b.run.read_calibration() or {}).get("temperature", 1.0)
    base = probs ** (1 / t) / (probs ** (1 / t)).sum(1, keepdims=True)
    s = load_peers(b.run, 0.8)  # the run's saved peer k and tau (evaluate may have calibrated them), mu 0.8
    want = _dense_lp(emb, np.ones(len(emb), bool), base, s.mu, s.k, s.tau, s.iters).argmax(1)
    assert outs[7].tolist() == np.asarray(b.categories.ids)[want].tolist()
    plain = tmp_path / "plain.csv"  # a given alpha turns peers off unless a peer weight is given too
    predict(small_data["test.bson"], indexes["all"], plain, FusionOverrides(alpha=1.0, beta=0.0), **kw)
    assert read_submission(plain)[1].tolist() == np.asarray(b.categories.ids)[base.argmax(1)].tolist()


def test_peer_graph_over_an_approximate_index_never_lists_a_product_as_its_own_peer():
    rng = np.random.default_rng(3)
    centres = _unit(rng.normal(size=(200, 16)))
    emb = _unit(centres[rng.integers(0, 200, 24_000)] + 0.3 * rng.normal(size=(24_000, 16)))
    g = peer_graph([emb[:10_000], emb[10_000:]], np.ones(len(emb), bool), 5)  # 24,000 vectors: an IVF index
    assert not (g.pos == np.arange(len(emb))[:, None]).any() and (g.pos >= 0).all()
    q = rng.choice(len(emb), 300, replace=False)
    s = emb[q] @ emb.T
    s[np.arange(len(q)), q] = -9
    truth = np.argsort(-s, 1)[:, :5]
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(g.pos[q].tolist(), truth.tolist(), strict=True)])
    assert recall > 0.8
