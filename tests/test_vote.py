"""The kNN vote's one home (index/vote.py) against plain Python loops."""
import warnings

import numpy as np

from index import class_shares, knn_vote, normalise_rows, vote_weights


def test_class_shares_match_a_loop():
    rng = np.random.default_rng(0)
    classes = rng.integers(-1, 6, (40, 5))
    labels = rng.integers(-1, 6, (40, 7))
    weights = rng.random((40, 7)).astype(np.float32)
    weights[3] = 0  # a row with no weight at all
    got = class_shares(classes, labels, weights)
    for p in range(40):
        total = sum(w for lab, w in zip(labels[p], weights[p], strict=True) if lab >= 0)
        for j, c in enumerate(classes[p]):
            hit = sum(w for lab, w in zip(labels[p], weights[p], strict=True) if lab >= 0 and lab == c)
            assert abs(got[p, j] - (hit / total if total > 0 else 0.0)) < 1e-5


def test_normalise_rows_and_dense_vote_match_a_loop():
    v = np.array([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]])
    assert normalise_rows(v).tolist() == [[0.25, 0.75], [0.0, 0.0], [0.5, 0.5]]
    sims = np.array([[0.9, 0.8, 0.1], [0.5, -np.inf, 0.4]], np.float32)
    labels = np.array([[2, 0, 2], [1, 3, -1]])
    got = knn_vote(sims, labels, 4, tau=0.1, k=3)
    for q in range(2):
        votes = np.zeros(4)
        best = max(s for s, lab in zip(sims[q], labels[q], strict=True) if lab >= 0 and np.isfinite(s))
        for s, lab in zip(sims[q], labels[q], strict=True):
            if lab >= 0 and np.isfinite(s):
                votes[lab] += np.exp((s - best) / 0.1)
        np.testing.assert_allclose(got[q], votes / votes.sum(), rtol=1e-5)
    w, _ = vote_weights(sims, labels, 0.1, 2)
    assert w.shape == (2, 2) and w[1, 1] == 0  # the -inf neighbour weighs nothing


def test_vote_with_more_neighbours_asked_than_indexed_is_quiet():
    sims = np.array([[0.9, -3.4028235e38, -np.inf]], np.float32)  # FAISS pads missing results
    labels = np.array([[1, -1, -1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = knn_vote(sims, labels, 3, tau=0.01)
    assert p.tolist() == [[0.0, 1.0, 0.0]]
