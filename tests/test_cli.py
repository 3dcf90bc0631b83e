"""The typer CLI through CliRunner: the happy path end to end and clear errors for bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from retrieval.infer.indexdir.bundle import open_index
from retrieval.infer.query import Neighbour

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_happy_path(tmp_path):
    d = tmp_path / "data"
    r = run("make-data", d, "--products", 60, "--n-categories", 4, "--image-size", 32, "--seed", 2)
    assert r.exit_code == 0, r.output
    r = run("stats", d / "train.bson", "--categories", d / "category_names.csv", "--out", tmp_path / "plots")
    assert r.exit_code == 0 and "products: 60" in r.output and (tmp_path / "plots" / "images_per_product.png").exists()
    r = run("train", d / "train.bson", "--out", tmp_path / "run", "--categories", d / "category_names.csv",
            "--image-size", 32, "--embed-dim", 16, "--max-steps", 6, "--batch-size", 16, "--workers", 0,
            "--val-fraction", 0.2)
    assert r.exit_code == 0, r.output
    assert "best validation product accuracy" in r.output and "next: python cli.py build-index" in r.output
    for split in ("train", "all"):
        r = run("build-index", d / "train.bson", "--model", tmp_path / "run", "--out", tmp_path / split,
                "--split", split, "--workers", 0)
        assert r.exit_code == 0, r.output
    r = run("evaluate", "--index", tmp_path / "train", "--out", tmp_path / "ev", "--workers", 0)
    assert r.exit_code == 0 and "fused accuracy" in r.output and "{" not in r.output, r.output
    r = run("predict", d / "test.bson", "--index", tmp_path / "all", "--out", tmp_path / "sub.csv", "--workers", 0)
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "sub.csv").read_text().splitlines()
    assert lines[0] == "_id,category_id"
    truth = (d / "test_labels.csv").read_text().splitlines()
    assert [x.split(",")[0] for x in lines[1:]] == [x.split(",")[0] for x in truth[1:]]
    first = _first_id(tmp_path / "all")
    r = run("similar", "--index", tmp_path / "all", "--product-id", first, "-k", 3, "--json")
    found = json.loads(r.output.strip().splitlines()[-1])
    assert len(found) == 3 and first not in [f["product_id"] for f in found]  # as POST /similar: not itself
    r = run("similar", "--index", tmp_path / "all", "--product-id", first, "-k", 3, "--json", "--include-self")
    with_self = json.loads(r.output.strip().splitlines()[-1])
    assert any(f["product_id"] == first and f["similarity"] > 0.999 for f in with_self)
    r = run("add-to-index", d / "train.bson", "--index", tmp_path / "all", "--workers", 0)
    assert r.exit_code == 0 and "added 0 products" in r.output
    # a real process: only the project's messages, no loader chatter, no "initialized randomly" before the weights
    import subprocess
    import sys
    p = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "cli.py"), "similar", "--index",
                        str(tmp_path / "all"), "--product-id", str(_first_id(tmp_path / "all")), "-k", "2"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for chatter in ("Could not load library", "No pretrained weights", "initialized randomly", "faiss.loader"):
        assert chatter not in p.stderr + p.stdout


def _first_id(index_dir):
    return int(open_index(index_dir).product_ids[0])


def test_cli_bad_inputs_give_clear_errors(tmp_path, small_data):
    r = run("stats", tmp_path / "missing.bson")
    assert r.exit_code == 2 and "missing.bson" in r.output
    bad = tmp_path / "bad.bson"
    bad.write_text("hello world, not bson at all")
    r = run("stats", bad)
    assert r.exit_code == 2 and "not a BSON file" in r.output and "byte offset 0" in r.output
    r = run("train", small_data["train.bson"], "--out", tmp_path / "r", "--backbone", "nope", "--workers", 0)
    assert r.exit_code == 2 and "'nope' is not one of" in r.output and "RN50" in r.output
    r = run("similar", "--index", tmp_path / "noindex", "--product-id", 1)
    assert r.exit_code == 2 and "noindex: no index here" in r.output
    out = tmp_path / "sub.csv"
    r = run("predict", tmp_path / "missing.bson", "--index", tmp_path / "noindex", "--out", out)
    assert r.exit_code == 2 and "missing.bson: no such BSON file" in r.output, r.output
    r = run("predict", small_data["test.bson"], "--index", tmp_path / "noindex", "--out", out)
    assert r.exit_code == 2 and "noindex: no index here" in r.output, r.output
    assert not out.exists() and not (tmp_path / "sub.csv.parts").exists()  # refused before writing anything


def test_demo_runs_every_stage_and_refuses_a_used_folder(tmp_path):
    import csv
    r = run("demo", "--workdir", tmp_path / "d", "--products", 120, "--n-categories", 4, "--epochs", 1, "--workers", 0)
    assert r.exit_code == 0, r.output
    assert "{" not in r.output and "validation accuracy" in r.output  # a table for a person, JSON in a file
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    table = r.output[r.output.index("demo: "):]  # the summary, after the stages' progress lines
    assert f"{summary['test_accuracy']:.3f}" in table and len(table.strip().splitlines()) < 20
    art = summary["artefacts"]
    with open(art["submission"], newline="") as f, open(tmp_path / "d" / "data" / "test_labels.csv", newline="") as g:
        sub, truth = list(csv.DictReader(f)), list(csv.DictReader(g))  # the accuracy, recomputed by hand
    assert [r["_id"] for r in sub] == [r["_id"] for r in truth]
    hand = sum(a["category_id"] == b["category_id"] for a, b in zip(sub, truth, strict=True)) / len(truth)
    # far above answering the test set's largest category (11 of 24 products; the demo's run scores 0.75)
    majority = max(np.unique([r["category_id"] for r in truth], return_counts=True)[1]) / len(truth)
    assert summary["test_accuracy"] == pytest.approx(hand) and len(truth) > 0
    assert hand >= majority + 0.15, (hand, majority)
    for key in ("checkpoint", "evaluation", "submission", "contact_sheet"):
        assert Path(art[key]).exists()
    assert summary["similar_top"] and summary["similar_query"] not in [p for p, _ in summary["similar_top"]]
    r = run("demo", "--workdir", tmp_path / "d", "--products", 120, "--n-categories", 4, "--epochs", 1, "--workers", 0)
    assert r.exit_code == 2 and "already holds files" in r.output


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


def test_every_option_has_help():
    import typer.main
    group = typer.main.get_command(app)
    options = 0
    for name, cmd in group.commands.items():
        for p in cmd.params:
            if p.param_type_name == "option" and p.name != "help":
                assert p.help, f"{name} --{p.name} has no help"
                options += 1
    assert len(group.commands) >= 10 and options >= 3 * len(group.commands)  # the commands' options were seen
    assert "training products" in run("make-data", "--help").output


def test_similar_text_has_a_header_and_unknown_categories_read_unknown(indexes):
    r = run("similar", "--index", indexes["all"], "--product-id", int(open_index(indexes["all"]).product_ids[0]),
            "-k", 2)
    assert r.exit_code == 0 and r.output.splitlines()[0].split()[:3] == ["rank", "product", "_id"]
    assert Neighbour(1, 0.5, 42, "", "", "").path == "unknown"


def test_train_options_are_the_train_configs_settings(tmp_path, monkeypatch):
    """Both ways: every `train` option is a TrainConfig setting (by name, or one listed rename), every setting
    is reachable (an option, or `--set NAME=VALUE` typed by its default), and what the CLI gives is what the run
    is trained with."""
    import inspect

    import cli
    import retrieval.train.run as run_mod
    from retrieval.train.config import TrainConfig
    defaults = TrainConfig.flat_defaults()
    options = set(inspect.signature(cli.train).parameters) - set(cli.TRAIN_CLI_ONLY)
    assert {cli.TRAIN_RENAMED.get(o, o) for o in options} <= set(defaults)
    for name, default in defaults.items():
        if isinstance(default, (bool, int, float, str)):
            assert TrainConfig.parse_setting(f"{name}={default}") == (name, default)
    seen = {}
    monkeypatch.setattr(run_mod, "train", lambda path, out, cfg, *a, **k: seen.setdefault("cfg", cfg) and 1 / 0)
    d = tmp_path / "d"
    d.mkdir()
    (d / "t.bson").write_bytes(b"")
    r = run("train", d / "t.bson", "--out", tmp_path / "run", "--set", "weight_decay=0.05", "--set",
            "label_smoothing=0.2", "--epochs", 3, "--checkpoint-every", 7, "--metric-loss", "subcenter_arcface")
    cfg = seen["cfg"]
    assert (cfg.schedule.weight_decay, cfg.loss.label_smoothing, cfg.schedule.epochs) == (0.05, 0.2, 3)
    assert cfg.schedule.checkpoint_every_steps == 7 and cfg.loss.metric_loss == "subcenter_arcface"
    assert cfg.schedule.lr == defaults["lr"]  # not given: the default
    for bad, says in (("nope=1", "NAME one of"), ("weight_decay=lots", "takes a float"), ("frozen_baseline=maybe",
                                                                                         "takes a bool")):
        r = run("train", d / "t.bson", "--out", tmp_path / "run2", "--set", bad)
        assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, r.output
