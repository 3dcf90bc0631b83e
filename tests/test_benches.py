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
    needs = {"bench_real.py": "grocery/train.bson", "bench_audit.py": "grocery/train.bson",
             "bench_scale.py": "category_names.csv"}  # real data beside
    if name in needs and not (ROOT.parent / "shared" / "data" / needs[name]).exists():
        pytest.skip(f"../shared/data/{needs[name]} is not on this machine")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / name), "--quick", "--workdir", str(tmp_path / "w")],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "|---|" in out.stdout  # a Markdown table was printed


def test_size_weighted_knn_of_the_tail_bench_against_a_hand_made_case():
    """bench/tail_classifiers' size-weighted kNN: a query nearer a small category's one product than a large
    category's two products is voted to the small one when weights are divided by the size, and to the large one
    by the plain vote (tau 1: weights e^0.9 vs e^0.8 + e^0.7)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from tail_classifiers import knn_by_size
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import numpy as np
    q = np.array([[1.0, 0.0]])
    tx = np.array([[0.9, np.sqrt(1 - 0.81)], [0.8, -0.6], [0.7, np.sqrt(1 - 0.49)]])
    ty = np.array([0, 1, 1])
    assert np.exp(0.9) < np.exp(0.8) + np.exp(0.7) and np.exp(0.9) > (np.exp(0.8) + np.exp(0.7)) / 2
    assert knn_by_size(tx, ty, q, 2, power=0.0, k=3, tau=1.0).tolist() == [1]
    assert knn_by_size(tx, ty, q, 2, power=1.0, k=3, tau=1.0).tolist() == [0]
    assert knn_by_size(tx, ty, q, 2, power=1.0, k=1, tau=1.0).tolist() == [0]
