"""Every command with --runtime onnx gives what torch fp32 gives; a query runtime that disagrees with the index
is refused. The oracle is the same command run on torch's network with autocast off (fp32 on any CPU)."""
from __future__ import annotations

import shutil
from contextlib import nullcontext

import numpy as np
import onnxruntime  # noqa: F401  (the dev extra installs it: a missing one fails, never skips)
import pytest
from conftest import read_only
from typer.testing import CliRunner

import cli
import retrieval.infer.pipeline.embed as embed_mod
from retrieval.errors import UserError
from retrieval.infer.evaluate import EvaluateSettings, evaluate
from retrieval.infer.indexdir.build import IndexSettings, build_index
from retrieval.infer.indexdir.bundle import open_index
from retrieval.infer.pipeline.embed import LoaderSettings
from retrieval.infer.predict import PredictSettings, predict
from retrieval.infer.query import similar

LOADER = LoaderSettings(workers=0)


@pytest.fixture(scope="module")
def built(small_data, trained_run, tmp_path_factory):
    """The same run indexed twice: torch in fp32 (autocast off) and ONNX Runtime fp32; ``root`` holds copies of
    the data and the run beside the indexes (the ONNX export is written into the run), and is read-only: a test
    that writes (evaluate writes the fitted fusion into the run) copies ``root`` whole."""
    root = tmp_path_factory.mktemp("runtimes")
    shutil.copytree(small_data["train.bson"].parent, root / "data")
    shutil.copytree(trained_run, root / "run")
    mp = pytest.MonkeyPatch()
    mp.setattr(embed_mod, "autocast_for", lambda device: nullcontext())  # torch in fp32, whatever the CPU
    for rt in ("torch", "onnx"):
        for split in ("all", "train"):
            out = root / f"{rt}_{split}" if split == "train" else root / rt
            build_index(root / "data" / "train.bson", root / "run", out,
                        IndexSettings(split, part_products=40, runtime=rt), LOADER)
    read_only("built (test_runtime_commands.py)", root)
    yield root, mp
    mp.undo()


def test_the_manifest_records_the_runtime_and_the_vectors_agree(built):
    root, _ = built
    t, o = open_index(root / "torch"), open_index(root / "onnx")
    assert t.manifest.runtime["runtime"] == "torch" and o.manifest.runtime["runtime"] == "onnx"
    assert o.net is not t.net and type(o.net).__name__ == "OnnxTower"  # queries default to the index's runtime
    assert np.array_equal(t.product_ids, o.product_ids)
    for pos in range(0, len(t.product_ids), 7):
        assert np.abs(t.vector(pos) - o.vector(pos)).max() <= 1e-4


def test_predict_evaluate_and_similar_with_onnx_equal_torch_fp32(built, small_data, tmp_path):
    root, _ = built
    subs = {}
    for rt in ("torch", "onnx"):
        subs[rt] = tmp_path / f"{rt}.csv"
        predict(small_data["test.bson"], root / rt, subs[rt], loader=LOADER, settings=PredictSettings(runtime=rt))
    assert subs["onnx"].read_bytes() == subs["torch"].read_bytes()
    pid = int(open_index(root / "torch").product_ids[5])
    found = {rt: [(n.product_id, round(n.similarity, 4)) for n in similar(root / rt, product_id=pid, k=5)]
             for rt in ("torch", "onnx")}
    assert [p for p, _ in found["onnx"]] == [p for p, _ in found["torch"]]
    own = tmp_path / "own"  # evaluate writes the fusion it fits into the run: a copy of the whole root
    shutil.copytree(root, own)
    m = {rt: evaluate(own / f"{rt}_train", out_dir=tmp_path / f"eval_{rt}", loader=LOADER,
                      settings=EvaluateSettings(runtime=rt))
         for rt in ("torch", "onnx")}
    for key in ("head_accuracy", "knn_accuracy", "fused_accuracy", "products"):
        assert m["onnx"][key] == m["torch"][key], key


def test_a_query_runtime_that_disagrees_with_the_index_is_refused(built, tmp_path):
    root = tmp_path / "own"  # a query runtime's first use writes its export into the run: a copy of the root
    shutil.copytree(built[0], root)
    with pytest.raises(UserError, match="rerun with --runtime torch"):
        open_index(root / "torch", runtime="onnx-int8")
    assert open_index(root / "torch", runtime="onnx").net is not None  # fp32 runtimes mix


def test_onnx_with_several_devices_is_refused(built, small_data, trained_run, tmp_path):
    from retrieval.model.runtime import Devices
    with pytest.raises(UserError, match="one process on the CPU"):
        build_index(small_data["train.bson"], trained_run, tmp_path / "x",
                    IndexSettings("all", runtime="onnx"), LoaderSettings(workers=0, where=Devices(2)))


def test_an_unknown_runtime_is_a_clear_cli_error(built):
    root, _ = built
    r = CliRunner().invoke(cli.app, ["similar", "--index", str(root / "torch"), "--product-id", "1",
                                     "--runtime", "tensorrt"])
    assert r.exit_code == 2 and "valid runtimes are torch, onnx, onnx-int8" in r.output
