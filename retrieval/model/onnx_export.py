"""ONNX export of an :class:`EmbeddingNet`, its parity check against torch fp32, and static int8 quantisation.

The exported graph takes what ``embed_images`` feeds the network: pictures ``[B, 3, S, S]`` with values 0..255
(float32; uint8 batches are cast outside, exactly as ``EmbeddingNet.normalise`` casts them), a dynamic batch
axis, the normalisation inside, and returns ``(emb [B, D] unit-norm, logits [B, C])``. Needs the ``onnx`` extra.
"""
from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..durable import aside, place
from ..errors import UserError
from .network import EmbeddingNet

log = logging.getLogger(__name__)

OPSET = 17
FP32_MAX_ABS_DIFF = 1e-4  # max |ONNX - torch fp32| over unit embeddings and head probabilities
INT8_MIN_COSINE = 0.99  # every int8 embedding's cosine to its torch fp32 embedding
EXPORTERS = ("legacy", "dynamo")  # tried in this order: legacy keeps opset 17; dynamo may only emit 18


def require_onnx():
    """``(onnx, onnxruntime)``, or a UserError naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserError("the ONNX runtimes need onnx and onnxruntime: pip install -e '.[onnx]'") from None
    return onnx, onnxruntime


class _Graph(nn.Module):
    """What is exported: pictures ``[B, 3, S, S]`` float 0..255 -> ``(emb [B, D], logits [B, C])``."""

    def __init__(self, net: EmbeddingNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb, logits, _ = self.net(images)
        return emb, logits


def _export_with(graph: nn.Module, example: torch.Tensor, path: Path, exporter: str) -> None:
    names = {"input_names": ["images"], "output_names": ["emb", "logits"], "opset_version": OPSET}
    if exporter == "legacy":
        torch.onnx.export(graph, (example,), str(path), dynamo=False, do_constant_folding=True,
                          dynamic_axes={k: {0: "batch"} for k in ("images", "emb", "logits")}, **names)
    else:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        program = torch.onnx.export(graph, (example,), dynamo=True, dynamic_shapes={"images": {0: batch}},
                                    **names)
        program.save(str(path))


def export_fp32(net: EmbeddingNet, path: str | Path, exporters: tuple[str, ...] = EXPORTERS) -> str:
    """Write ``net`` (a CPU copy in eval mode) to ``path`` as fp32 ONNX; returns the exporter that worked."""
    onnx, _ = require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = net.eval()
    graph = _Graph(net).eval()
    s = net.cfg.image_size
    example = torch.randint(0, 256, (2, 3, s, s)).float()
    errors = []
    for exporter in exporters:
        tmp = aside(path)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter says it is legacy
                _export_with(graph, example, tmp, exporter)
            onnx.checker.check_model(str(tmp))
            place(tmp, path)
            log.info("exported %s with the %s exporter (opset %s)", path, exporter,
                     onnx.load(str(path), load_external_data=False).opset_import[0].version)
            return exporter
        except Exception as e:  # noqa: BLE001 (each exporter fails in its own way; the next one is tried)
            log.warning("ONNX export with the %s exporter failed: %s: %s", exporter, type(e).__name__, e)
            errors.append(f"{exporter}: {type(e).__name__}: {e}")
        finally:
            tmp.unlink(missing_ok=True)
    raise UserError(f"could not export {net.cfg.backbone} to ONNX ({'; '.join(errors)})")


def session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session: ``threads`` intra-op threads (default: as many as torch uses), one
    inter-op thread, every graph optimisation, no spin-waiting."""
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle threads sleep instead of spinning: the loader's decoders share the cores (grocery build-index +
    # predict, Lite0 128 px, 2 cores: 233-248 products/s against 215-226 with spinning)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _batches(pictures: torch.Tensor, batch: int):
    for i in range(0, len(pictures), batch):
        yield pictures[i:i + batch]


@torch.no_grad()
def torch_outputs(net: EmbeddingNet, pictures: torch.Tensor, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The torch fp32 oracle (eval mode, autocast off): uint8 ``pictures [N, 3, S, S]`` -> (unit ``emb [N, D]``,
    ``probs [N, C]``)."""
    dev = next(net.parameters()).device
    embs, probs = [], []
    with torch.autocast(dev.type, enabled=False):
        for x in _batches(pictures, batch):
            e, logits, _ = net.eval()(x.to(dev))
            embs.append(e.float().cpu())
            probs.append(logits.float().softmax(-1).cpu())
    return torch.cat(embs).numpy(), torch.cat(probs).numpy()


def onnx_outputs(sess, pictures: torch.Tensor, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A session's (``emb [N, D]`` re-normalised, ``probs [N, C]``) for uint8 ``pictures [N, 3, S, S]``."""
    embs, probs = [], []
    for x in _batches(pictures, batch):
        e, logits = sess.run(None, {"images": x.float().numpy()})
        embs.append(torch.nn.functional.normalize(torch.from_numpy(e), dim=-1))
        probs.append(torch.from_numpy(logits).softmax(-1))
    return torch.cat(embs).numpy(), torch.cat(probs).numpy()


def check_fp32(net: EmbeddingNet, sess, pictures: torch.Tensor) -> dict:
    """Max |difference| of unit embeddings and of head probabilities against torch fp32; a UserError past
    :data:`FP32_MAX_ABS_DIFF`."""
    te, tp = torch_outputs(net, pictures)
    oe, op = onnx_outputs(sess, pictures)
    check = {"pictures": len(pictures), "max_emb_diff": float(np.abs(te - oe).max()),
             "max_prob_diff": float(np.abs(tp - op).max())}
    if max(check["max_emb_diff"], check["max_prob_diff"]) > FP32_MAX_ABS_DIFF:
        raise UserError(f"the ONNX export disagrees with torch fp32 on {len(pictures)} pictures: max |diff| "
                        f"{check['max_emb_diff']:.2e} (embeddings), {check['max_prob_diff']:.2e} (probabilities), "
                        f"tolerance {FP32_MAX_ABS_DIFF:g}; use --runtime torch")
    return check


def check_int8(net: EmbeddingNet, sess, pictures: torch.Tensor) -> dict:
    """Per-picture cosine of int8 embeddings to torch fp32 ones, and head top-1 agreement; a UserError when
    any cosine is under :data:`INT8_MIN_COSINE`."""
    te, tp = torch_outputs(net, pictures)
    oe, op = onnx_outputs(sess, pictures)
    cos = (te * oe).sum(-1)
    check = {"pictures": len(pictures), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
             "top1_agreement": float((tp.argmax(-1) == op.argmax(-1)).mean()),
             "max_prob_diff": float(np.abs(tp - op).max())}
    if check["min_cosine"] < INT8_MIN_COSINE:
        raise UserError(f"the int8 model strays from torch fp32: cosine {check['min_cosine']:.4f} on the worst of "
                        f"{len(pictures)} pictures (needs >= {INT8_MIN_COSINE}); use --runtime onnx")
    return check


def _reader(pictures: torch.Tensor, batch: int):
    from onnxruntime.quantization import CalibrationDataReader

    class PictureReader(CalibrationDataReader):
        """Feeds uint8 ``pictures [N, 3, S, S]`` to the calibrator, ``batch`` at a time, as float 0..255."""

        def __init__(self) -> None:
            self._it = iter(_batches(pictures, batch))

        def get_next(self) -> dict | None:
            x = next(self._it, None)
            return None if x is None else {"images": x.float().numpy()}

        def rewind(self) -> None:
            self._it = iter(_batches(pictures, batch))

    return PictureReader()


def quantize_int8(fp32_path: str | Path, out_path: str | Path, pictures: torch.Tensor, batch: int = 32) -> None:
    """Static int8 after ONNX Runtime's pre-processing (symbolic shape inference, graph optimisation, ONNX shape
    inference): QDQ, per-channel int8 weights, uint8 activations, min-max ranges over ``pictures`` (uint8
    ``[N, 3, S, S]``) for the ops in :data:`QUANTISED`. Kept fp32: the stem convolution and everything after the
    backbone (:func:`fp32_nodes`)."""
    require_onnx()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    if len(pictures) == 0:
        raise UserError("int8 calibration needs pictures; none were given")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as work:
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        tmp = Path(work) / "int8.onnx"
        quantize_static(str(pre), str(tmp), _reader(pictures, batch), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=list(QUANTISED),
                        nodes_to_exclude=fp32_nodes(pre))
        place(tmp, out_path)
    log.info("int8 model written to %s (calibrated on %d pictures)", out_path, len(pictures))


# The compute ops only. ORT's default list also takes Pad, Concat, Gather, Slice..., which broke EfficientNet-Lite's
# "same" padding (computed from the input's shape, then a Pad of uint8 activations whose zero point is not 0):
# worst cosine to fp32 0.82-0.84 at 224 px and ~0 at 64 px with them (bench/results/bench_cpu_runtime.md).
QUANTISED = ("Conv", "Gemm", "MatMul", "Add", "Mul", "Clip", "Relu", "GlobalAveragePool", "AveragePool",
             "MaxPool", "Flatten", "Reshape", "Transpose")


def fp32_nodes(path: str | Path) -> list[str]:
    """Nodes left fp32: the first convolution (it sees the raw picture; fp32 there raised lite0's worst cosine
    0.963 -> 0.972) and everything after the backbone (projection, batch norm, heads, L2 norm: no compute, the
    embedding's last digits). Backbone nodes are told by the legacy exporter's names (``/net/backbone/...``); in
    a graph named otherwise, the nodes after the last GlobalAveragePool / Flatten stand for them."""
    onnx, _ = require_onnx()
    nodes = list(onnx.load(str(path)).graph.node)
    convs = [n.name for n in nodes if n.op_type == "Conv"][:1]
    if any(n.name.startswith("/net/backbone/") for n in nodes):
        return convs + [n.name for n in nodes if not n.name.startswith("/net/backbone/")]
    pools = [i for i, n in enumerate(nodes) if n.op_type in ("GlobalAveragePool", "Flatten")]
    return convs + [n.name for n in nodes[pools[-1] + 1:]] if pools else convs
