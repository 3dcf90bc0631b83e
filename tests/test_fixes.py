"""Regressions found by using the CLI as a new user would: each case failed before its fix."""
from __future__ import annotations

import subprocess
import sys
import warnings

import bson
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cli
from index import knn_vote
from retrieval.data.bsonio import iter_products
from retrieval.data.categories import CategoryTable
from retrieval.data.datasets import collate_products
from retrieval.data.synth import SynthConfig, make_data
from retrieval.errors import UserError
from retrieval.infer.indexdir.bundle import open_index
from retrieval.infer.pipeline.embed import LoaderSettings
from retrieval.infer.predict import predict, read_submission
from retrieval.infer.query import Neighbour
from retrieval.infer.scoring.fused import FusionOverrides
from retrieval.train.run import resolve_config

runner = CliRunner()


def run(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def test_collate_accepts_a_first_product_without_pictures():
    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    b = collate_products([([], 0, -1, 1, []), ([img, img], 1, -1, 0, [7, 8]), ([], 2, -1, 0, [])])
    assert b.images.shape == (2, 3, 8, 8) and b.owner.tolist() == [1, 1] and b.failed.tolist() == [1, 0, 0]
    assert b.hashes.tolist() == [7, 8]
    assert collate_products([([], 5, -1, 0, [])]).images.shape[0] == 0


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


def test_cli_rejects_bad_numbers_and_says_how_to_resume(indexes, small_data, tmp_path, monkeypatch):
    for args in (("--k", 0), ("--k", -3), ("--batch-size", 0), ("--alpha", 2)):
        r = run("predict", small_data["test.bson"], "--index", indexes["all"], "--out", tmp_path / "s.csv", *args)
        assert r.exit_code == 2 and "Invalid value" in r.output, r.output
    import retrieval.infer.predict as mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(mod, "predict", interrupted)
    r = run("predict", small_data["test.bson"], "--index", indexes["all"], "--out", tmp_path / "s.csv")
    assert r.exit_code == 130 and "run `predict` again to resume" in r.output


def test_cli_reports_user_errors_in_one_line_but_lets_bugs_through(indexes, monkeypatch):
    r = run("similar", "--index", indexes["all"], "--product-id", -5)
    assert r.exit_code == 2 and "error: product _id -5 is not in the index" in r.output
    import retrieval.infer.query as mod

    def bug(*a, **k):
        raise RuntimeError("a real bug")
    monkeypatch.setattr(mod, "similar", bug)
    r = run("similar", "--index", indexes["all"], "--product-id", 1)
    assert isinstance(r.exception, RuntimeError)


def test_make_data_refuses_to_overwrite(tmp_path):
    cfg = SynthConfig(products=10, categories=2, image_size=16)
    make_data(tmp_path, cfg, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_data(tmp_path, cfg, progress=False)
    assert make_data(tmp_path, SynthConfig(products=12, categories=2, image_size=16), progress=False,
                     overwrite=True)["train.bson"].exists()


def test_resume_refuses_changed_model_settings(trained_run):
    with pytest.raises(UserError, match=r"image_size 32 -> 64"):
        resolve_config(trained_run, True, image_size=64)
    with pytest.raises(UserError, match=r"backbone 'tiny' -> 'RN50'"):
        resolve_config(trained_run, True, backbone="RN50")
    cfg = resolve_config(trained_run, True, epochs=9, image_size=32)
    assert cfg.schedule.epochs == 9 and cfg.model.image_size == 32 and cfg.model.embed_dim == 32


def test_vote_with_more_neighbours_asked_than_indexed_is_quiet():
    sims = np.array([[0.9, -3.4028235e38, -np.inf]], np.float32)  # FAISS pads missing results
    labels = np.array([[1, -1, -1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = knn_vote(sims, labels, 3, tau=0.01)
    assert p.tolist() == [[0.0, 1.0, 0.0]]


def test_every_option_has_help():
    import typer.main
    group = typer.main.get_command(cli.app)
    for name, cmd in group.commands.items():
        for p in cmd.params:
            if p.param_type_name == "option" and p.name != "help":
                assert p.help, f"{name} --{p.name} has no help"
    assert "training products" in run("make-data", "--help").output


def test_similar_text_has_a_header_and_unknown_categories_read_unknown(indexes):
    r = run("similar", "--index", indexes["all"], "--product-id", int(open_index(indexes["all"]).product_ids[0]),
            "-k", 2)
    assert r.exit_code == 0 and r.output.splitlines()[0].split()[:3] == ["rank", "product", "_id"]
    assert Neighbour(1, 0.5, 42, "", "", "").path == "unknown"


def test_category_csv_bom_duplicates_and_encoding(tmp_path):
    p = tmp_path / "c.csv"
    p.write_bytes("\ufeffcategory_id,category_level1,category_level2,category_level3\n1,A,B,C\n".encode("utf-8"))
    assert CategoryTable.from_csv(p).ids == (1,)
    p.write_text("category_id,category_level1,category_level2,category_level3\n1,A,B,C\n2,A,B,D\n1,A,B,E\n")
    with pytest.raises(UserError, match=r"c.csv, line 4: category_id 1 repeats line 2"):
        CategoryTable.from_csv(p)
    p.write_bytes(b"category_id,category_level1,category_level2,category_level3\n1,A,B,C\n2,A,B,\xe9t\xe9\n")
    with pytest.raises(UserError, match=r"c.csv, line 3: not UTF-8"):
        CategoryTable.from_csv(p)


def test_unlabelled_training_products_are_counted(small_data, tmp_path):
    from retrieval.rundir import RunDir
    from retrieval.train.config import TrainConfig
    from retrieval.train.datamodule import CdiscountDataModule
    docs = [{"_id": p.product_id, "imgs": [{"picture": x} for x in p.images], "category_id": p.category_id}
            for p in iter_products(small_data["train.bson"])]
    for d in docs[:7]:
        del d["category_id"]
    path = tmp_path / "train.bson"
    path.write_bytes(b"".join(bson.encode(d) for d in docs))
    dm = CdiscountDataModule(str(path), None, TrainConfig().data, RunDir(tmp_path / "run"), 32)
    assert dm.unlabelled == 7 and len(dm.labelled_rows) == len(docs) - 7


def test_serving_never_imports_training():
    code = ("import sys, retrieval.infer.query, retrieval.infer.predict, retrieval.infer.evaluate; "
            "bad = [m for m in sys.modules if m.startswith(('pytorch_lightning', 'lightning', 'retrieval.train', "
            "'pytorch_metric_learning'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
