"""Fast CPU inference with ONNX Runtime: :class:`OnnxTower`, a drop-in for :class:`EmbeddingNet` where
``embed_images`` calls it, and :func:`load_runtime`, which exports (fp32, then static int8) beside the run once
per model file and checks each export against torch fp32 before using it.

``RUN/onnx/model.fp32.onnx`` and ``model.int8.onnx`` each have a ``.json`` sidecar naming the model.pt sha256
they came from, their own sha256 and the check they passed; a sidecar for another model.pt (or a file whose
bytes changed) means a fresh export.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..durable import write_json
from ..errors import UserError
from . import onnx_export as ox
from .export import LoadedModel
from .network import EmbeddingNet
from .runtimes import PRECISION, check_runtime

log = logging.getLogger(__name__)

# embeddings of one precision family (runtimes.PRECISION) agree within FP32_MAX_ABS_DIFF; int8 ones only to
# INT8_MIN_COSINE of fp32
FP32_MAX_ABS_DIFF, INT8_MIN_COSINE = ox.FP32_MAX_ABS_DIFF, ox.INT8_MIN_COSINE
CHECK_PICTURES, CALIBRATION_PICTURES = 64, 256
FILES = {"onnx": "model.fp32.onnx", "onnx-int8": "model.int8.onnx"}


class OnnxTower(nn.Module):
    """An ONNX Runtime session behind ``EmbeddingNet``'s call: uint8 (or float 0..255) ``images [B, 3, S, S]``
    -> (unit ``emb [B, D]``, ``logits [B, C]``, ``{}``), on the CPU. It has ``.cfg``, ``.eval()`` and a
    zero-size parameter, so ``device_of`` says cpu and ``embed_images`` runs it unchanged."""

    def __init__(self, path: str | Path, cfg, runtime: str, record: dict, threads: int | None = None) -> None:
        super().__init__()
        self.cfg, self.runtime, self.path, self.record = cfg, runtime, Path(path), record
        self.session = ox.session(path, threads)
        self._anchor = nn.Parameter(torch.empty(0), requires_grad=False)  # device_of(net) -> cpu

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        emb, logits = self.session.run(None, {"images": x})
        return torch.from_numpy(emb), torch.from_numpy(logits), {}

    @property
    def fingerprint(self) -> dict:
        """What an index manifest records of the runtime that embedded it (see :func:`runtime_mismatch`)."""
        return {"runtime": self.runtime, "precision": PRECISION[self.runtime], "onnx_sha256": self.record["sha256"]}


def runtime_fingerprint(net: nn.Module) -> dict:
    """The manifest record of ``net``: an :class:`OnnxTower`'s fingerprint, or torch's."""
    return net.fingerprint if isinstance(net, OnnxTower) else {"runtime": "torch", "precision": "fp32"}


def runtime_mismatch(recorded: dict | None, current: dict) -> str | None:
    """Why a query runtime may not search an index built with ``recorded`` (None: it may). fp32 runtimes mix
    freely; an int8 index needs the same int8 file (its calibration decides the vectors), and fp32 and int8
    never mix. An index without a record was built with torch."""
    recorded = recorded or {"runtime": "torch", "precision": "fp32"}
    if recorded["precision"] != current["precision"]:
        return (f"the index was embedded with the {recorded['runtime']} runtime ({recorded['precision']}); "
                f"this query runs {current['runtime']} ({current['precision']}): rerun with "
                f"--runtime {recorded['runtime']} or rebuild the index")
    if current["precision"] == "int8" and recorded.get("onnx_sha256") != current.get("onnx_sha256"):
        return "the index was embedded with another int8 model (other calibration); rebuild the index"
    return None


def net_sha256(net: EmbeddingNet) -> str:
    """sha256 of a network's config and weights (the key of an export for a network without a model file)."""
    h = hashlib.sha256(json.dumps(net.cfg.to_dict(), sort_keys=True).encode())
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fresh(path: Path, model_sha256: str) -> dict | None:
    """The sidecar of an export made from ``model_sha256`` whose bytes are unchanged, else None."""
    side = path.with_name(path.name + ".json")
    if not (path.exists() and side.exists()):
        return None
    try:
        record = json.loads(side.read_text())
    except ValueError:
        return None
    if record.get("model_sha256") != model_sha256:
        log.info("%s was exported from another model.pt; exporting again", path)
        return None
    if record.get("sha256") != _file_sha256(path):
        log.warning("%s changed since it was exported; exporting again", path)
        return None
    return record


def _write_record(path: Path, record: dict) -> dict:
    record = {**record, "sha256": _file_sha256(path)}
    side = path.with_name(path.name + ".json")
    write_json(side, record, indent=1)
    return record


def run_pictures(run_dir: str | Path, size: int, n: int, split: str = "train") -> torch.Tensor:
    """Up to ``n`` pictures of the run's ``split`` products (uint8 ``[N, 3, size, size]``, decoded as indexing
    decodes them), from the training file its run_config.json names; a UserError when that file is gone."""
    from ..data.datasets import picture_input
    from ..data.images import ImageDecodeError
    from ..data.offsets import RecordReader
    from ..rundir import RunDir
    run = RunDir(Path(run_dir))
    path = Path(run.read_config().get("train_path") or "")
    if not path.is_file():
        raise UserError(f"{run.path}: its training file {path} is missing; the ONNX runtimes check and calibrate "
                        "on the run's own pictures (pass calibration_pictures)")
    s = run.split()
    rows = s.train_rows if split == "train" or not len(s.val_rows) else s.val_rows
    reader, out = RecordReader(path), []
    for row in rows:
        for pic in reader.read(int(row)).images:
            try:
                out.append(picture_input(pic, size))
            except ImageDecodeError:
                continue
            if len(out) >= n:
                return torch.stack(out)
    if not out:
        raise UserError(f"{run.path}: no decodable {split} pictures to check the ONNX export on")
    return torch.stack(out)


def _cpu_net(net: EmbeddingNet) -> EmbeddingNet:
    if next(net.parameters()).device.type == "cpu":
        return net.eval()
    import copy
    return copy.deepcopy(net).cpu().eval()


def ensure_export(net: EmbeddingNet, model_sha256: str, folder: str | Path, runtime: str,
                  calibration: torch.Tensor | None, check: torch.Tensor | None) -> tuple[Path, dict]:
    """The checked export of ``runtime`` in ``folder`` for ``model_sha256``: reused when fresh, else made and
    checked (fp32 parity on ``check``; int8 calibrated on ``calibration``, cosine on ``check``)."""
    folder = Path(folder)
    fp32 = folder / FILES["onnx"]
    record = _fresh(fp32, model_sha256)
    if record is None:
        exporter = ox.export_fp32(net, fp32)
        check_fp32 = ox.check_fp32(net, ox.session(fp32), check)
        record = _write_record(fp32, {"model_sha256": model_sha256, "exporter": exporter, "opset": ox.OPSET,
                                      "torch": torch.__version__, "check": check_fp32})
        log.info("ONNX fp32 export %s matches torch fp32: %s", fp32, check_fp32)
    if runtime == "onnx":
        return fp32, record
    int8 = folder / FILES["onnx-int8"]
    record8 = _fresh(int8, model_sha256)
    if record8 is None or record8.get("fp32_sha256") != record["sha256"]:
        if calibration is None:
            raise UserError("the int8 runtime needs calibration pictures (the run's training pictures)")
        ox.quantize_int8(fp32, int8, calibration)
        check8 = ox.check_int8(net, ox.session(int8), check)
        from onnxruntime import __version__ as ort_version
        record8 = _write_record(int8, {"model_sha256": model_sha256, "fp32_sha256": record["sha256"],
                                       "onnxruntime": ort_version, "calibration_pictures": len(calibration),
                                       "check": check8})
        log.info("ONNX int8 model %s: %s", int8, check8)
    return int8, record8


def load_runtime(model: LoadedModel | EmbeddingNet, runtime: str, run_dir: str | Path,
                 calibration_pictures: torch.Tensor | None = None, threads: int | None = None
                 ) -> EmbeddingNet | OnnxTower:
    """The network to hand ``embed_images``: ``"torch"`` returns the EmbeddingNet itself; ``"onnx"`` and
    ``"onnx-int8"`` an :class:`OnnxTower` over ``run_dir/onnx/``'s export (made and checked on first use).
    Checks and calibration use ``calibration_pictures`` (uint8 ``[N, 3, S, S]``) when given, else the run's
    own pictures: validation ones to check, training ones to calibrate."""
    check_runtime(runtime)
    net = model.net if isinstance(model, LoadedModel) else model
    if runtime == "torch":
        return net
    ox.require_onnx()
    sha = model.sha256 if isinstance(model, LoadedModel) else net_sha256(net)
    folder = Path(run_dir) / "onnx"
    path = folder / FILES[runtime]
    record = _fresh(path, sha)
    if record is None or (runtime == "onnx-int8" and _fresh(folder / FILES["onnx"], sha) is None):
        cpu = _cpu_net(net)
        s = net.cfg.image_size
        if calibration_pictures is not None:
            calibration, check = calibration_pictures, calibration_pictures[:CHECK_PICTURES]
        else:
            calibration = run_pictures(run_dir, s, CALIBRATION_PICTURES) if runtime == "onnx-int8" else None
            check = run_pictures(run_dir, s, CHECK_PICTURES, split="val")
        path, record = ensure_export(cpu, sha, folder, runtime, calibration, check)
    else:
        log.info("reusing %s (exported from model sha256 %s)", path, sha[:12])
    return OnnxTower(path, net.cfg, runtime, record, threads)

