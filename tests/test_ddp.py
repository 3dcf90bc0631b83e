"""Two processes on CPU (Lightning DDP over gloo): training, build-index and predict match one process.

The two-process tests are ``slow``; the rank-1 reading of the split runs in this process, in the fast suite."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_calibration

from retrieval.infer.evaluate import EvaluateSettings
from retrieval.infer.indexdir.bundle import open_index
from retrieval.infer.indexdir.folder import IndexFolder
from retrieval.infer.pipeline.embed import LoaderSettings
from retrieval.infer.pipeline.store import PartStore
from retrieval.infer.predict import PredictSettings, predict
from retrieval.model.export import load_model_file

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.mark.slow
def test_two_process_training_gives_a_loadable_model(small_data, tmp_path):
    run = tmp_path / "run"
    out = _run(["cli.py", "train", str(small_data["train.bson"]), "--out", str(run), "--categories",
                str(small_data["category_names.csv"]), "--devices", "2", "--accelerator", "cpu", "--max-steps", "3",
                "--image-size", "32", "--embed-dim", "32", "--batch-size", "8", "--workers", "0"])
    assert out.stdout.count("best validation product accuracy") == 1  # rank 0 reports, once
    ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ck["global_step"] == 3
    assert len(load_model_file(run / "model.pt").categories) == 6


def test_a_second_rank_reads_the_split_and_never_writes_it(small_data, trained_run, monkeypatch):
    from retrieval.rundir import RunDir
    from retrieval.train.config import DataSettings
    from retrieval.train.datamodule import CdiscountDataModule
    run = RunDir(trained_run)
    saved = run.split()
    before = run.split_file.stat().st_mtime_ns
    monkeypatch.setenv("LOCAL_RANK", "1")
    dm = CdiscountDataModule(str(small_data["train.bson"]), None, DataSettings(val_fraction=0.2, workers=0), run, 32)
    assert np.array_equal(dm.val_rows, saved.val_rows) and run.split_file.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="no split for this data on a rank other than 0"):
        CdiscountDataModule(str(small_data["train.bson"]), None, DataSettings(val_fraction=0.3, workers=0), run, 32)


SCRIPT = """
import sys
from retrieval.model.runtime import Devices
from retrieval.infer.indexdir.build import IndexSettings, build_index
from retrieval.infer.pipeline.embed import LoaderSettings
from retrieval.infer.predict import PredictSettings, predict
from retrieval.infer.evaluate import EvaluateSettings, evaluate
where = Devices(2, 1, "cpu")
what, data, run, index, out, chunk = sys.argv[1:]
if what == "index":
    build_index(data, run, out, IndexSettings("all", part_products=40), LoaderSettings(workers=0, where=where))
elif what == "evaluate":
    evaluate(index, out_dir=out, loader=LoaderSettings(workers=0, where=where), settings=EvaluateSettings(7))
else:
    predict(data, index, out, loader=LoaderSettings(workers=0, where=where), settings=PredictSettings(int(chunk)))
"""


@pytest.mark.slow
@pytest.mark.timeout(2000)  # three two-process runs of up to 600 s each
def test_two_process_build_index_and_predict_match_one_process(small_data, trained_run, indexes, tmp_path):
    script = tmp_path / "two.py"
    script.write_text(SCRIPT)
    idx2 = tmp_path / "index2"
    _run([str(script), "index", str(small_data["train.bson"]), str(trained_run), "-", str(idx2), "0"], cwd=tmp_path)
    one, two = open_index(indexes["all"]), open_index(idx2)
    assert one.manifest.parts == two.manifest.parts and len(one.manifest.parts) >= 3
    assert np.array_equal(one.product_ids, two.product_ids) and np.array_equal(one.vectors.labels, two.vectors.labels)
    for p, _ in one.manifest.parts:
        folders = IndexFolder(indexes["all"]).embeddings, IndexFolder(idx2).embeddings
        a, b = (dict(np.load(PartStore.part_file(f, p)), emb=np.load(PartStore.embeddings_file(f, p))) for f in folders)
        assert np.array_equal(a["rows"], b["rows"]) and np.allclose(a["emb"], b["emb"], atol=1e-6)
        assert np.array_equal(a["img_hash"], b["img_hash"])
    assert np.array_equal(one.duplicates.hashes, two.duplicates.hashes)
    # decode counts merge across ranks (they were 0 under DDP): the same summary as one process, and every image
    import bson
    with open(small_data["train.bson"], "rb") as f:  # counted independently of the offset table
        n_images = sum(len(d["imgs"]) for d in bson.decode_file_iter(f))
    assert two.manifest.decode == one.manifest.decode
    assert two.manifest.embedding["images"] == one.manifest.embedding["images"] == n_images

    for chunk in (8, 1000):  # 4 parts over 2 ranks; 1 part, so that rank 1 has nothing to do
        single = tmp_path / f"one_{chunk}.csv"
        predict(small_data["test.bson"], indexes["all"], single, loader=LoaderSettings(workers=0),
                settings=PredictSettings(chunk))
        double = tmp_path / f"two_{chunk}.csv"
        _run([str(script), "predict", str(small_data["test.bson"]), "-", str(indexes["all"]), str(double),
              str(chunk)], cwd=tmp_path)
        assert double.read_bytes() == single.read_bytes()
        assert not (tmp_path / f"two_{chunk}.csv.parts").exists()


@pytest.mark.slow
def test_two_process_evaluate_matches_one_process(own_indexes, tmp_path):
    import json

    from retrieval.infer.evaluate import evaluate
    indexes = own_indexes  # evaluate writes the fusion it fits into the run
    script = tmp_path / "two.py"
    script.write_text(SCRIPT)
    one = evaluate(indexes["train"], out_dir=tmp_path / "one", loader=LoaderSettings(workers=0),
                   settings=EvaluateSettings(7))
    _run([str(script), "evaluate", "-", "-", str(indexes["train"]), str(tmp_path / "two"), "0"], cwd=tmp_path)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert one["products"] == two["products"] > 14 and one["images"] == two["images"]  # >= 3 parts over 2 ranks
    for key in ("head_accuracy", "knn_accuracy", "fused_accuracy", "image_accuracy", "grid"):
        assert one[key] == two[key], key
    assert_same_calibration(one["calibration"], two["calibration"])
    assert not (tmp_path / "two" / "parts").exists()
