"""Data-layer throughput: raw read, streaming, offset scan, random reads, JPEG decode, streaming memory.

    python bench/bench_data.py [--products 20000] [--big-gb 1.0] [--workdir bench_out/data] [--quick]
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import bson
import harness
import numpy as np
from harness import best_time
from PIL import Image

from retrieval.data.bsonio import iter_products
from retrieval.data.images import decode_image
from retrieval.data.offsets import RecordReader, scan_offsets
from retrieval.data.synth import SynthConfig, make_data

# Peak RSS is read from VmHWM: unlike getrusage's ru_maxrss it starts afresh at exec, so the child does not
# inherit the (large) parent's high-water mark.
RSS_SCRIPT = """
from harness import status_mb
from retrieval.data.bsonio import iter_products
base = status_mb('VmRSS')
n = sum(len(p.images) for p in iter_products({path!r}))
print(base, status_mb('VmHWM'), n)
"""


def main() -> None:
    ap = harness.parser(__doc__, workdir="bench_out/data")
    ap.add_argument("--products", type=int, default=20000)
    ap.add_argument("--big-gb", type=float, default=1.0, help="size of the file streamed for peak RSS")
    a = harness.start(ap, quick={"products": 500, "big_gb": 0.01})
    work = Path(a.workdir)
    train = work / "train.bson"
    if not train.exists():
        make_data(work, SynthConfig(products=a.products, categories=200, seed=0, test_fraction=0.01))
    size = train.stat().st_size
    mb = size / 1e6

    def raw():
        with open(train, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass

    t_raw = best_time(raw)
    t_ref = best_time(lambda: sum(1 for _ in bson.decode_file_iter(open(train, "rb"))))
    t_stream = best_time(lambda: sum(1 for _ in iter_products(train)))
    table = scan_offsets(train, progress=False)
    n = len(table)
    t_scan = best_time(lambda: scan_offsets(train, progress=False))
    reader = RecordReader(train, table)
    rows = np.random.default_rng(0).integers(0, n, 20000)
    t_rand = best_time(lambda: [reader.read(int(r)) for r in rows])
    pics = [p for prod in iter_products(train) for p in prod.images][:3000]
    t_fast = best_time(lambda: [decode_image(p) for p in pics])
    t_pil = best_time(lambda: [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pics])
    t_dct = best_time(lambda: [decode_image(p, min_size=90) for p in pics])
    real = harness.SHARED_DATA / "train_example.bson"
    real_pics = [p for prod in iter_products(real) for p in prod.images] * 20 if real.exists() else []
    if real_pics:
        t_real = best_time(lambda: [decode_image(p) for p in real_pics])
        t_real_pil = best_time(lambda: [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in real_pics])

    big = work / "big.bson"
    if not big.exists() or big.stat().st_size < a.big_gb * 1e9:
        data = train.read_bytes()
        with open(big, "wb") as f:
            for _ in range(int(np.ceil(a.big_gb * 1e9 / len(data)))):
                f.write(data)
    env = {**os.environ, "PYTHONPATH": f"{harness.ROOT}:{harness.ROOT / 'bench'}"}
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT.format(path=str(big))], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    base_mb, peak_mb = float(out[0]), float(out[1])

    print(f"file: {train} ({n:,} products, {mb:,.0f} MB); big file {big.stat().st_size / 1e9:.2f} GB; "
          f"cores {os.cpu_count()}\n")
    rows_out = [
        ("raw sequential read", f"{mb / t_raw:,.0f} MB/s", "reference", "", ""),
        ("bson.decode_file_iter", f"{n / t_ref:,.0f} products/s", "reference", "", ""),
        ("iter_products (streaming)", f"{n / t_stream:,.0f} products/s", f"{t_ref / t_stream:.2f}x decode_file_iter",
         ">= 0.9x", "ok" if t_ref / t_stream >= 0.9 else "MISS"),
        ("offset table scan", f"{mb / t_scan:,.0f} MB/s ({n / t_scan:,.0f} products/s)",
         f"{t_raw / t_scan:.2f}x raw read", ">= 0.5x", "ok" if t_raw / t_scan >= 0.5 else "MISS"),
        ("random pread + decode", f"{len(rows) / t_rand:,.0f} reads/s", "", "", ""),
        ("PIL decode", f"{len(pics) / t_pil:,.0f} img/s", "reference", "", ""),
        ("simplejpeg decode", f"{len(pics) / t_fast:,.0f} img/s", f"{t_pil / t_fast:.2f}x PIL", ">= 2.5x",
         "ok" if t_pil / t_fast >= 2.5 else "MISS"),
        ("simplejpeg, DCT down-scale to >= 90 px", f"{len(pics) / t_dct:,.0f} img/s", f"{t_pil / t_dct:.2f}x PIL",
         ">= 2.5x", "ok" if t_pil / t_dct >= 2.5 else "MISS"),
    ]
    if real_pics:
        rows_out += [("real train_example pictures: PIL", f"{len(real_pics) / t_real_pil:,.0f} img/s", "reference",
                      "", ""),
                     ("real train_example pictures: simplejpeg", f"{len(real_pics) / t_real:,.0f} img/s",
                      f"{t_real_pil / t_real:.2f}x PIL", ">= 2.5x", "ok" if t_real_pil / t_real >= 2.5 else "MISS")]
    rows_out += [
        ("peak RSS growth, streaming big file", f"{peak_mb - base_mb:,.1f} MB", "", "< 200 MB",
         "ok" if peak_mb - base_mb < 200 else "MISS"),
    ]
    harness.table(rows_out, ("measure", "value", "ratio", "goal", ""))


if __name__ == "__main__":
    main()
