"""Every damaged or foreign JSON file a user can meet is refused in one line naming it, before any work, and no
message carries an object's repr."""
from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from cli import app

runner = CliRunner()
REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>")


def _refused(args: list, names: str) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    out = r.output.strip()
    assert r.exit_code == 2, out
    assert names in out and "Traceback" not in out and len(out.splitlines()) == 1 and not REPR.search(out), out
    return out


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_damaged_run_files_are_one_line_errors(world, tmp_path, content):
    data, run, idx = world / "data", world / "run", world / "idx"
    (run / "calibration.json").write_text(content)
    _refused(["predict", data / "test.bson", "--index", idx, "--out", tmp_path / "s.csv", "--workers", 0],
             "calibration.json is damaged")
    (run / "calibration.json").unlink()
    (run / "frozen_baseline.json").write_text(content)
    _refused(["evaluate", "--index", idx, "--out", tmp_path / "e", "--workers", 0], "frozen_baseline.json is damaged")
    assert not (tmp_path / "e").exists()  # refused before any work
    (run / "run_config.json").write_text(content)
    _refused(["train", data / "train.bson", "--out", run, "--resume", "--workers", 0], "run_config.json is damaged")


def test_a_run_config_of_another_version_names_its_unknown_settings(world):
    run = world / "run"
    cfg = json.loads((run / "run_config.json").read_text())
    cfg["train"]["schedule"]["warp_speed"] = 9
    cfg["train"]["colour"] = "red"
    (run / "run_config.json").write_text(json.dumps(cfg))
    out = _refused(["train", world / "data" / "train.bson", "--out", run, "--resume", "--workers", 0],
                   "run_config.json")
    assert "schedule.warp_speed" in out and "colour" in out


def test_a_damaged_part_store_key_is_a_one_line_error(world, tmp_path):
    sub = tmp_path / "s.csv"
    parts = tmp_path / "s.csv.parts"
    parts.mkdir()
    (parts / "store.json").write_text("{cut sho")
    _refused(["predict", world / "data" / "test.bson", "--index", world / "idx", "--out", sub, "--workers", 0],
             "store.json is damaged")


def test_a_damaged_segment_record_is_a_one_line_error(world, tmp_path):
    seg = next((world / "idx" / "segments").iterdir())
    (seg / "segment.json").write_text("[]")
    _refused(["similar", "--index", world / "idx", "--product-id", 1], "segment.json is damaged")
