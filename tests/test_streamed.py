"""Streamed evaluation: scores per part equal scores over the whole set (a second computation on the concatenated
candidates), their memory does not grow with the number of parts, evaluate gives the same metrics whatever the
part size, and the approximate peer graph finds the brute-force peers."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from conftest import assert_same_calibration

from retrieval.infer.evaluate import EvaluateSettings, evaluate
from retrieval.infer.pipeline.embed import LoaderSettings
from retrieval.infer.scoring.candidates import Candidates
from retrieval.infer.scoring.fused import FusedClassifier
from retrieval.infer.scoring.peers import first_stage, peer_graph, top_classes
from retrieval.infer.scoring.sample import sample_rows
from retrieval.infer.scoring.streamed import gather, score_parts


def _candidates(n: int, classes: int, rng: np.random.Generator) -> Candidates:
    p = rng.dirichlet(np.full(classes, 0.3), n)
    labels = rng.integers(0, classes, (n, 10))
    sims = -np.sort(-rng.uniform(0.2, 1.0, (n, 10)), 1)
    dups = np.where(rng.random((n, 2)) < 0.2, rng.integers(0, classes, (n, 2)), -1)
    return Candidates.build(p, (sims, labels), rng.random(n) < 0.95, dups, m=5)


CLFS = (FusedClassifier(0.4, 10, 0.07, 1.0, 3), FusedClassifier(0.0, 5, 0.05, 0.0, 3),
        FusedClassifier(0.6, 10, 0.1, 0.0, 3, 1.5))


def test_scores_by_part_equal_the_whole_and_memory_does_not_grow_with_parts():
    rng = np.random.default_rng(0)
    parts = [_candidates(500, 300, rng) for _ in range(16)]
    whole = Candidates.concat(parts)
    got = score_parts(lambda i: parts[i], len(parts), *CLFS, keep=10)
    fused, knn, no_dup = CLFS
    want_c, want_p = top_classes(*first_stage(fused, whole), 10)  # one pass over all products at once
    assert np.array_equal(got.classes, want_c) and np.allclose(got.probs, want_p)
    assert np.array_equal(got.knn, knn.predict_candidates(whole, 1)[0][:, 0])
    assert np.array_equal(got.no_dup, no_dup.predict_candidates(whole, 1)[0][:, 0])
    assert np.array_equal(got.has_dup, (whole.dups >= 0).any(1)) and np.array_equal(got.has_image, whole.has_image)

    def peak(n_parts: int) -> int:
        tracemalloc.start()
        score_parts(lambda i: parts[i], n_parts, *CLFS, keep=10)
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top
    per_product_out = 10 * (4 + 4) + 3 * 8 + 2  # classes, probs, two predictions, flags
    grown = peak(16) - peak(4)
    assert grown < 3 * 12 * 500 * per_product_out  # what 12 more parts add: their few output numbers only
    whole_bytes = sum(a.nbytes for a in (whole.classes, whole.head, whole.sims, whole.labels, whole.dups, whole.size))
    assert peak(16) < whole_bytes  # never all candidates at once


def test_gather_reads_the_sampled_rows_of_each_part():
    rng = np.random.default_rng(1)
    parts = [_candidates(n, 50, rng) for n in (7, 1, 12, 5)]
    whole = Candidates.concat(parts)
    rows = sample_rows(25, seed=3, cap=9)
    assert len(rows) == 9 and np.all(np.diff(rows) > 0) and np.array_equal(sample_rows(8, cap=9), np.arange(8))
    got = gather(lambda i: parts[i], [len(p) for p in parts], rows)
    assert np.array_equal(got.labels, whole.labels[rows]) and np.array_equal(got.head[:, :5], whole.head[rows][:, :5])


def test_evaluate_gives_the_same_metrics_whatever_the_part_size(own_indexes, tmp_path):
    indexes = own_indexes  # evaluate writes the fusion it fits into the run
    one = evaluate(indexes["train"], out_dir=tmp_path / "a", loader=LoaderSettings(workers=0),
                   settings=EvaluateSettings(10_000))
    many = evaluate(indexes["train"], out_dir=tmp_path / "b", loader=LoaderSettings(workers=0),
                    settings=EvaluateSettings(7))
    for key in ("products", "head_accuracy", "knn_accuracy", "fused_accuracy", "fused_top5_accuracy",
                "fused_without_duplicates_accuracy", "by_frequency", "level2_accuracy"):
        assert one[key] == many[key], key
    assert_same_calibration(one["calibration"], many["calibration"])
    assert one["calibration_products"] == one["products"] and not (tmp_path / "b" / "parts").exists()


def test_approximate_peer_graph_finds_the_exact_peers_at_the_recall_it_reports():
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(300, 16))
    emb = centres[rng.integers(0, 300, 30_000)] + 0.25 * rng.normal(size=(30_000, 16))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    has = rng.random(len(emb)) < 0.98
    g = peer_graph([emb[:12_000], emb[12_000:]], has, 5, memory_budget=0.8e6)  # half floats pass it: SQ8 codes
    assert "SQ8" in g.cost["factory"] and g.cost["recall"] >= 0.95 and g.cost["index_mb"] < 1.0
    q = rng.choice(np.flatnonzero(has), 400, replace=False)
    s = emb[q] @ emb.T
    s[:, ~has] = -9
    s[np.arange(len(q)), q] = -9
    truth = np.argsort(-s, 1)[:, :5]
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(g.pos[q].tolist(), truth.tolist(), strict=True)])
    assert recall >= 0.93  # the reported recall was measured on another sample: close to it here
    assert not (g.pos[~has] >= 0).any() and not np.isin(g.pos, np.flatnonzero(~has)).any()


@pytest.mark.parametrize("n", [3, 2])
def test_tiny_graphs_are_exact(n):
    emb = np.eye(4, dtype=np.float32)[:n]
    g = peer_graph([emb], np.ones(n, bool), 3)
    assert g.cost["factory"] in ("Flat", "none") and g.cost["recall"] == 1.0


def test_wilson_interval_against_hand_computed_values():
    from retrieval.infer.evaluate import wilson
    lo, hi = wilson(8, 10)  # textbook: 8/10 -> [0.490, 0.943]
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0) and wilson(0, 20)[0] == pytest.approx(0.0, abs=1e-12)
    lo, hi = wilson(500, 1000)
    assert hi - lo == pytest.approx(2 * 1.96 * 0.5 / np.sqrt(1000), rel=0.01)  # the normal interval at large n
