"""One build-index serves evaluate and predict: the run's validation products are a held-out segment whose stored
embeddings and head inputs evaluate scores (no picture read, no backbone run) against the other segments, and
every figure equals the two-build flow's (a train-split index and its own forward pass)."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_same_calibration

import retrieval.infer.pipeline.parts as parts_mod
from retrieval.data.offsets import load_offsets
from retrieval.errors import UserError
from retrieval.infer.evaluate import evaluate
from retrieval.infer.indexdir.bundle import open_index
from retrieval.infer.indexdir.changes import remove_products
from retrieval.infer.indexdir.compact import compact
from retrieval.infer.pipeline.embed import LoaderSettings
from retrieval.rundir import RunDir

LOADER = LoaderSettings(workers=0)
EXACT = ("products", "images", "head_accuracy", "knn_accuracy", "fused_accuracy", "fused_top5_accuracy",
         "level1_accuracy", "level2_accuracy", "image_accuracy", "fused_without_duplicates_accuracy",
         "duplicate_coverage", "calibration_products")


def test_the_all_index_holds_the_validation_products_out_in_a_segment_of_their_own(indexes, trained_run):
    b = open_index(indexes["all"])
    split = RunDir(trained_run).split()
    table = load_offsets(b.layout.resolve(b.manifest.sources[0].path, b.manifest.origin))
    sid = b.manifest.held_out
    assert sid is not None and [s for s, _ in b.manifest.segments][-1] == sid
    held = next(s for s in b.segments if s.sid == sid)
    assert sorted(held.arrays["product_ids"].tolist()) == sorted(table["product_id"][split.val_rows].tolist())
    assert b.live_count == len(split.train_rows) + len(split.val_rows)  # predict, similar and serve see them all
    masked = open_index(indexes["all"], hold_out=True)
    train = open_index(indexes["train"])
    assert masked.live_count == train.live_count == len(split.train_rows)
    np.testing.assert_array_equal(masked.vectors.labels[masked.vectors.labels >= 0], train.vectors.labels)
    np.testing.assert_allclose(masked.prototypes, train.prototypes, atol=1e-6)
    q = train.vector(3)[None]
    np.testing.assert_array_equal(masked.vectors.search(q, 5)[1], train.vectors.search(q, 5)[1])


def test_evaluate_on_one_build_equals_the_two_build_flow_without_a_forward_pass(own_indexes, tmp_path,
                                                                                  monkeypatch):
    two = evaluate(own_indexes["train"], out_dir=tmp_path / "two", loader=LOADER)
    cal_two = RunDir(own_indexes["run"]).read_calibration()

    def no_forward(*a, **k):
        raise AssertionError("evaluate ran the network over pictures")
    monkeypatch.setattr(parts_mod, "embed_products", no_forward)
    one = evaluate(own_indexes["all"], out_dir=tmp_path / "one", loader=LOADER)
    cal_one = RunDir(own_indexes["run"]).read_calibration()
    with pytest.raises(AssertionError, match="ran the network"):  # the two-build flow would have been caught
        evaluate(own_indexes["train"], out_dir=tmp_path / "again", loader=LOADER)
    assert one["embedded"].startswith("stored") and two["embedded"] == "by evaluate"
    for k in EXACT:
        assert one[k] == pytest.approx(two[k], abs=1e-9), k
    assert one["by_frequency"] == two["by_frequency"]
    assert one["knn_best"] == two["knn_best"] and one["fusion"]["rule"] == two["fusion"]["rule"]
    assert_same_calibration(cal_one, cal_two)


def test_one_build_after_changes_and_compaction_keeps_its_held_out_segment(own_indexes, tmp_path):
    idx = own_indexes["all"]
    b = open_index(idx)
    held = next(s for s in b.segments if s.sid == b.manifest.held_out)
    gone_val = int(held.arrays["product_ids"][0])
    gone_train = int(b.segments[0].arrays["product_ids"][0])
    remove_products(idx, [gone_val, gone_train])
    compact(idx)  # rewrites the training segment without its removed row; the held-out one stays whole
    b = open_index(idx)
    assert b.manifest.held_out in [s for s, _ in b.manifest.segments]
    m = evaluate(idx, out_dir=tmp_path / "e", loader=LOADER)
    assert m["products"] == len(held) - 1 and m["embedded"].startswith("stored")
    assert b.position_of(gone_val) is None and b.position_of(gone_train) is None


def test_an_index_built_before_one_build_says_how_to_get_it(own_indexes, tmp_path):
    idx = own_indexes["all"]
    b = open_index(idx)
    val_ids = next(s for s in b.segments if s.sid == b.manifest.held_out).arrays["product_ids"].tolist()
    # an old folder: the validation products in an ordinary segment (no held-out mark)
    from dataclasses import replace

    from retrieval.infer.indexdir.compact import commit_manifest
    from retrieval.infer.indexdir.folder import IndexFolder
    commit_manifest(IndexFolder(idx), replace(b.manifest, held_out=None))
    with pytest.raises(UserError, match="build-index") as e:
        evaluate(idx, out_dir=tmp_path / "e", loader=LOADER)
    assert "validation products" in str(e.value) and len(val_ids) > 0


def test_evaluate_of_a_sample_skips_the_held_out_parts_left_empty(own_indexes, tmp_path):
    from retrieval.infer.evaluate import EvaluateSettings
    from retrieval.infer.indexdir.build import IndexSettings, build_index
    idx = tmp_path / "small_parts"  # 30 held-out products in 6 parts: a sample of 3 leaves 3 or more empty
    build_index(own_indexes["data"] / "train.bson", own_indexes["run"], idx, IndexSettings(part_products=5), LOADER)
    held = next(s for s in open_index(idx).segments if s.sid == open_index(idx).manifest.held_out)
    assert len(held.parts) == 6
    m = evaluate(idx, out_dir=tmp_path / "e", loader=LOADER, settings=EvaluateSettings(max_products=3))
    assert m["products"] == 3 and m["embedded"].startswith("stored")
    assert sum(b["products"] for b in m["by_frequency"].values()) == 3
