"""ONNX Runtime towers (fp32 and static int8) on a tiny untrained tower, checked against torch fp32."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime  # noqa: F401  (onnx, onnxruntime, onnxscript: the dev extra installs them; missing fails)
import onnxscript  # noqa: F401  (the dynamo exporter's dependency)
import pytest
import torch
import torch.nn.functional as F

from retrieval.data.categories import CategoryTable
from retrieval.data.datasets import picture_input
from retrieval.data.offsets import RecordReader, file_fingerprint, load_offsets
from retrieval.errors import UserError
from retrieval.infer.pipeline.embed import embed_images
from retrieval.model import onnx_export
from retrieval.model.config import ModelConfig
from retrieval.model.export import load_model_file, save_model_file
from retrieval.model.network import EmbeddingNet
from retrieval.model.onnx_runtime import OnnxTower, load_runtime, runtime_fingerprint, runtime_mismatch
from retrieval.rundir import RunDir, Split

SIZE = 32


def _make_run(run: Path, data: dict[str, Path], seed: int) -> Path:
    """A run folder as train leaves it (model.pt, run_config.json, split.npz) around an untrained tiny tower."""
    torch.manual_seed(seed)
    cats = CategoryTable.from_csv(data["category_names.csv"])
    net = EmbeddingNet(ModelConfig("tiny", None, SIZE, 32, len(cats))).eval()
    with torch.no_grad():  # batch-norm statistics away from (0, 1), so the neck is not an identity
        net.proj[1].running_mean.uniform_(-0.5, 0.5)
        net.proj[1].running_var.uniform_(0.5, 2.0)
    rd = RunDir(run)
    rd.write_config({"train_path": str(data["train.bson"].resolve())})
    table = load_offsets(data["train.bson"], progress=False)
    rows = np.arange(len(table))
    rd.write_split(Split(rows[20:], rows[:20], json.dumps(file_fingerprint(data["train.bson"]))), table["product_id"])
    save_model_file(rd.model_file, net, cats)
    return run


@pytest.fixture(scope="module")
def run(small_data, tmp_path_factory) -> Path:
    return _make_run(tmp_path_factory.mktemp("onnx_run"), small_data, seed=0)


@pytest.fixture(scope="module")
def pictures(small_data) -> torch.Tensor:
    """40 pictures decoded independently of the code under test (the last products of the file)."""
    reader = RecordReader(small_data["train.bson"])
    pics = [picture_input(p, SIZE) for row in range(len(reader) - 1, 0, -1) for p in reader.read(row).images]
    return torch.stack(pics[:40])


@torch.no_grad()
def _torch_fp32(net: EmbeddingNet, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.autocast("cpu", enabled=False):
        emb, logits, _ = net.eval()(x)
    return emb.numpy(), logits.softmax(-1).numpy()


def test_fp32_export_matches_torch_and_embeds_like_the_network(run, pictures):
    loaded = load_model_file(run / "model.pt")
    tower = load_runtime(loaded, "onnx", run)
    assert isinstance(tower, OnnxTower) and (run / "onnx" / "model.fp32.onnx").exists()
    assert tower.cfg == loaded.net.cfg
    emb, logits, _ = tower(pictures)
    t_emb, t_probs = _torch_fp32(loaded.net, pictures)
    assert np.abs(emb.numpy() - t_emb).max() <= 1e-4
    assert np.abs(logits.softmax(-1).numpy() - t_probs).max() <= 1e-4
    assert np.allclose(np.linalg.norm(emb.numpy(), axis=1), 1, atol=1e-5)
    # the drop-in: embed_images runs the tower unchanged (mirrored views too); product means match torch fp32's
    owner = torch.arange(len(pictures)) // 4
    p_emb, p_probs = embed_images(tower, pictures, owner, 10, True)  # mirrored views
    f_emb, f_probs = _torch_fp32(loaded.net, pictures.flip(-1))
    want = F.normalize(torch.from_numpy(t_emb + f_emb), dim=-1).view(10, 4, -1).mean(1)
    assert np.abs(p_emb.numpy() - F.normalize(want, dim=-1).numpy()).max() <= 1e-4
    assert np.abs(p_probs.numpy() - ((t_probs + f_probs) / 2).reshape(10, 4, -1).mean(1)).max() <= 1e-4


def test_uint8_and_float_inputs_agree(run, pictures):
    tower = load_runtime(load_model_file(run / "model.pt"), "onnx", run)
    assert torch.equal(tower(pictures)[0], tower(pictures.float())[0])


@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
def test_dynamic_batch_of_one_and_five(run, pictures, runtime):
    tower = load_runtime(load_model_file(run / "model.pt"), runtime, run)
    five = tower(pictures[:5])[0]
    ones = torch.cat([tower(pictures[i:i + 1])[0] for i in range(5)])
    assert five.shape == (5, 32) and ones.shape == (5, 32)
    assert torch.allclose(five, ones, atol=1e-5)


def test_int8_is_quantised_and_within_cosine_of_fp32(run, pictures):
    loaded = load_model_file(run / "model.pt")
    tower = load_runtime(loaded, "onnx-int8", run)
    graph = onnx.load(str(run / "onnx" / "model.int8.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert int8_weights, "no int8 convolution weights"
    t_emb, t_probs = _torch_fp32(loaded.net, pictures)
    emb = tower(pictures)[0].numpy()
    cos = (emb * t_emb).sum(-1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(t_emb, axis=1)
    assert cos.min() >= 0.99
    assert np.abs(emb - t_emb).max() > 1e-6  # it is not the fp32 graph under another name


def test_stale_or_changed_export_is_made_again(small_data, tmp_path, pictures):
    run = _make_run(tmp_path / "run", small_data, seed=1)
    first = load_model_file(run / "model.pt")
    load_runtime(first, "onnx", run)
    side = run / "onnx" / "model.fp32.onnx.json"
    assert json.loads(side.read_text())["model_sha256"] == first.sha256
    shutil.copy(_make_run(tmp_path / "other", small_data, seed=2) / "model.pt", run / "model.pt")  # retrained
    second = load_model_file(run / "model.pt")
    assert second.sha256 != first.sha256
    tower = load_runtime(second, "onnx", run)
    assert json.loads(side.read_text())["model_sha256"] == second.sha256
    emb = tower(pictures)[0].numpy()
    assert np.abs(emb - _torch_fp32(second.net, pictures)[0]).max() <= 1e-4
    assert np.abs(emb - _torch_fp32(first.net, pictures)[0]).max() > 1e-2  # not the first model's graph
    # bytes changed under an unchanged sidecar: exported again, not trusted
    (run / "onnx" / "model.fp32.onnx").write_bytes(b"garbage")
    tower = load_runtime(second, "onnx", run)
    assert np.abs(tower(pictures)[0].numpy() - _torch_fp32(second.net, pictures)[0]).max() <= 1e-4


def test_runtime_records_refuse_mixed_precision(run):
    loaded = load_model_file(run / "model.pt")
    torch_rec = runtime_fingerprint(loaded.net)
    fp32 = runtime_fingerprint(load_runtime(loaded, "onnx", run))
    int8 = runtime_fingerprint(load_runtime(loaded, "onnx-int8", run))
    assert runtime_mismatch(torch_rec, fp32) is None and runtime_mismatch(None, fp32) is None
    assert runtime_mismatch(int8, int8) is None
    assert "int8" in runtime_mismatch(torch_rec, int8) and "fp32" in runtime_mismatch(int8, fp32)
    assert runtime_mismatch(int8, {**int8, "onnx_sha256": "0" * 64}) is not None
    with pytest.raises(UserError, match="unknown runtime"):
        load_runtime(loaded, "tensorrt", run)
    assert load_runtime(loaded, "torch", run) is loaded.net


def test_dynamo_exporter_matches_and_a_wrong_export_is_refused(run, pictures, tmp_path):
    loaded = load_model_file(run / "model.pt")
    path = tmp_path / "dynamo.onnx"
    assert onnx_export.export_fp32(loaded.net, path, exporters=("dynamo",)) == "dynamo"
    sess = onnx_export.session(path)
    emb = sess.run(None, {"images": pictures.float().numpy()})[0]
    assert np.abs(emb - _torch_fp32(loaded.net, pictures)[0]).max() <= 1e-4
    other = EmbeddingNet(loaded.net.cfg).eval()  # another network's weights: the check must refuse the export
    with pytest.raises(UserError, match="disagrees with torch fp32"):
        onnx_export.check_fp32(other, sess, pictures)
