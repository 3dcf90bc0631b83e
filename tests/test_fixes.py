"""Regressions found by using the CLI as a new user would: each case failed before its fix."""
from __future__ import annotations

import subprocess
import sys

import bson
import pytest

from retrieval.data.bsonio import iter_products
from retrieval.errors import UserError
from retrieval.infer.pipeline.embed import LoaderSettings
from retrieval.infer.predict import predict, read_submission
from retrieval.infer.scoring.fused import FusionOverrides


def test_predict_writes_a_row_when_the_first_product_has_no_picture(indexes, small_data, tmp_path):
    docs = [{"_id": p.product_id, "imgs": [{"picture": x} for x in p.images]} for p in iter_products(small_data["test.bson"])]
    docs.insert(0, {"_id": 5, "imgs": [{"picture": b"\xff\xd8 not a jpeg"}]})
    path = tmp_path / "t.bson"
    path.write_bytes(b"".join(bson.encode(d) for d in docs))
    predict(path, indexes["all"], tmp_path / "s.csv", loader=LoaderSettings(workers=0))
    ids, _ = read_submission(tmp_path / "s.csv")
    assert ids.tolist() == [d["_id"] for d in docs]


def test_predict_checks_arguments_before_making_state_and_can_restart(indexes, small_data, tmp_path):
    out = tmp_path / "s.csv"
    for bad in ({"k": 0}, {"alpha": 1.5}, {"tau": 0.0}):
        with pytest.raises(UserError):
            predict(small_data["test.bson"], indexes["all"], out, FusionOverrides(**bad), loader=LoaderSettings(workers=0))
        assert not (tmp_path / "s.csv.parts").exists()
    with pytest.raises(UserError, match="batch size must be at least 1"):
        LoaderSettings(batch_size=0)
    parts = tmp_path / "s.csv.parts"
    parts.mkdir()
    (parts / "store.json").write_text('{"test": {}, "params": {"alpha": 0.9}}')  # left by an earlier, other run
    with pytest.raises(UserError, match=r"other settings \(.*params.alpha 0.9 -> .*--restart"):
        predict(small_data["test.bson"], indexes["all"], out, loader=LoaderSettings(workers=0))
    rep = predict(small_data["test.bson"], indexes["all"], out, loader=LoaderSettings(workers=0), restart=True)
    assert rep.products == rep.computed == 30 and out.exists()


def test_serving_never_imports_training():
    code = ("import sys, retrieval.infer.query, retrieval.infer.predict, retrieval.infer.evaluate; "
            "bad = [m for m in sys.modules if m.startswith(('pytorch_lightning', 'lightning', 'retrieval.train', "
            "'pytorch_metric_learning'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
