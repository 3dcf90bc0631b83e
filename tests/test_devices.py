"""--devices as users write it: a count, auto, or a list of indices; a list of two runs DDP (not one process)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval.errors import UserError
from retrieval.infer.pipeline.embed import LoaderSettings
from retrieval.infer.predict import PredictSettings, predict
from retrieval.model.runtime import Devices, lightning_devices, parse_devices

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, parsed, ddp", [("1", 1, False), ("2", 2, True), ("auto", "auto", True),
                                                ("0,1", (0, 1), True), ("1,", (1,), False), (" 0, 2 ", (0, 2), True)])
def test_devices_parse_each_form(text, parsed, ddp):
    assert parse_devices(text) == parsed
    assert Devices(text).distributed is ddp


@pytest.mark.parametrize("text", ["0,0", "a,b", "-1,2", ","])
def test_bad_devices_are_refused_with_the_forms_named(text):
    with pytest.raises(UserError, match="a list of device indices"):
        parse_devices(text)


def test_a_list_on_the_cpu_means_that_many_processes_and_names_gpus_elsewhere():
    assert lightning_devices((0, 1), "cpu") == 2
    assert lightning_devices((0, 1), "gpu") == [0, 1]
    assert lightning_devices(3, "cpu") == 3


@pytest.mark.slow
def test_predict_with_a_device_list_on_cpu_equals_one_process(small_data, indexes, tmp_path):
    single = tmp_path / "one.csv"
    predict(small_data["test.bson"], indexes["all"], single, loader=LoaderSettings(workers=0),
            settings=PredictSettings(8))
    double = tmp_path / "two.csv"
    with socket.socket() as s:  # a free port for the ranks to meet on (other DDP runs may share the machine)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "cli.py", "predict", str(small_data["test.bson"]), "--index",
                          str(indexes["all"]), "--out", str(double), "--devices", "0,1", "--accelerator", "cpu",
                          "--workers", "0", "--part-products", "8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world_size=2" in out.stderr or "rank 1 of 2" in out.stderr  # two processes ran, not one
    assert double.read_bytes() == single.read_bytes()
