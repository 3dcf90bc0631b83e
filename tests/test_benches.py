"""Every benchmark still runs: each in its --quick mode, in its own process (so none can rot unnoticed)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted(p.name for p in (ROOT / "bench").glob("bench_*.py"))


def test_every_bench_script_is_listed():
    assert {"bench_data.py", "bench_index.py", "bench_pipeline.py", "bench_real.py", "bench_scale.py",
            "bench_serve.py", "bench_train.py"} <= set(BENCHES)


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHES)
def test_bench_runs_quick_and_prints_a_table(name, tmp_path):
    needs = {"bench_real.py": "grocery/train.bson", "bench_scale.py": "category_names.csv"}  # real data beside
    if name in needs and not (ROOT.parent / "shared" / "data" / needs[name]).exists():
        pytest.skip(f"../shared/data/{needs[name]} is not on this machine")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / name), "--quick", "--workdir", str(tmp_path / "w")],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "|---|" in out.stdout  # a Markdown table was printed
