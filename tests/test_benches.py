"""Every benchmark still runs and still measures: each in its --quick mode, in its own process, and its results
file is read back: the header names the command, commit, date and machine, and each table the bench promises is
there with its columns, at least one row, and numbers in a plausible range (ratios above 0, shares in [0, 1],
an accuracy inside its own interval, p50 <= p99). Also the harness's intervals against known values."""
from __future__ import annotations

import datetime
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
BENCHES = sorted(p.name for p in BENCH.glob("bench_*.py"))
SHARED = ROOT.parent / "shared" / "data"
QUICK_TIMEOUT_S = 150  # each --quick run takes under 2 minutes alone on 2 CPU cores

POS = (1e-9, float("inf"))  # a rate, a time, a ratio: above 0
NONNEG = (0.0, float("inf"))  # a time or a memory growth printed rounded: 0 or more
SHARE = (0.0, 1.0)  # an accuracy, a recall, a precision
# per bench: the tables its results file must hold, each as {column: (low, high) or None (only present)}; every
# cell of a checked column that holds a number must lie in the range, and at least one must hold one
TABLES: dict[str, list[dict[str, tuple[float, float] | None]]] = {
    "bench_add.py": [{"catalogue (products)": POS, "add 300 (ms, median)": (1e-3, 6e4), "vs smallest": POS,
                      "reader reopen (ms)": POS}],
    "bench_audit.py": [{"training products": POS, "labels flipped": POS, "precision of the top (flipped count)": SHARE,
                        "recall of the top": SHARE, "recall of the whole list": SHARE}],
    "bench_catalogue.py": [{"catalogue (products)": POS, "index": None, "remove 1,000 (ms, median)": POS,
                            "vs smallest": POS},
                           {"by id q/s (none removed)": POS, "ratio [quartiles of rounds]": POS,
                            "served recall@10 (10% removed, vs live)": SHARE, "build recall@10": SHARE},
                           {"compact 10% removed (s)": NONNEG, "its peak RSS (MB)": POS, "check / read": POS}],
    "bench_cpu_runtime.py": [{"px": POS, "runtime": None, "images/s": POS, "vs eager fp32": POS},
                             {"runtime": None, "min cosine": (-1.0, 1.0001), "mean cosine": (-1.0, 1.0001)}],
    "bench_data.py": [{"measure": None, "value": NONNEG, "ratio": POS}],
    "bench_gpu.py": [{"backbone": None, "img/s": POS, "vs forward only": POS}],
    "bench_gpu_scale.py": [{"what": None, "img/s": POS, "vs forward only": POS}],
    "bench_index.py": [{"index": None, "QPS": POS, "recall@10": SHARE, "QPS vs Flat": POS},
                       {"measure": None, "value": POS, "ratio": POS}],
    "bench_one_build.py": [{"flow": None, "stage": None, "seconds": NONNEG, "products embedded": NONNEG},
                           {"evaluate figure": None, "two builds": None, "one build": None}],
    "bench_pipeline.py": [{"predictor": None, "product accuracy": SHARE},
                          {"measure": None, "value": NONNEG, "ratio": POS},
                          {"stage": None, "seconds": NONNEG, "share": (0.0, 100.0)}],
    "bench_real.py": [{"what": None, "test accuracy": SHARE, "95% interval": SHARE},
                      {"similar": None, "value": SHARE}],
    "bench_runtime_e2e.py": [{"runtime": None, "build-index + predict products/s": POS, "vs torch": POS,
                              "test accuracy (submission)": SHARE}],
    "bench_scale.py": [{"stage": None, "s @ 500": NONNEG, "s @ 1,000": NONNEG, "time 500->1,000": POS}],
    "bench_serve.py": [{"indexed": POS, "POST /similar": None, "p50 ms": NONNEG, "p99 ms": NONNEG, "QPS": POS,
                        "QPS / reference": POS}],
    "bench_tail_synth.py": [{"variant (rule chosen on validation)": None, "test products": POS, "accuracy": SHARE,
                             "95% interval": SHARE}],
    "bench_train.py": [{"backbone": None, "loader img/s": POS, "train step img/s": POS, "loader / step": POS}],
}
# (value column, interval column): the value must lie inside its own interval
INSIDE = {"bench_real.py": ("test accuracy", "95% interval"), "bench_tail_synth.py": ("accuracy", "95% interval")}
NEEDS = {"bench_real.py": "grocery/train.bson", "bench_audit.py": "grocery/train.bson",
         "bench_scale.py": "category_names.csv"}  # real data beside the checkout
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?", re.IGNORECASE)


def test_every_bench_has_its_checks_and_a_line_in_bench_readme():
    assert {"bench_data.py", "bench_index.py", "bench_pipeline.py", "bench_real.py", "bench_scale.py",
            "bench_serve.py", "bench_train.py"} <= set(BENCHES)
    assert set(BENCHES) == set(TABLES), "a new bench declares the tables its results file must hold"
    readme = (BENCH / "README.md").read_text()
    for name in BENCHES:
        assert f"| `{name}` |" in readme, f"bench/README.md has no line for {name}"
    for name in BENCHES:  # one harness: no bench parses its own flags or prints its own tables
        src = (BENCH / name).read_text()
        assert "harness.parser(" in src and ("harness.start(" in src or "harness.record(" in src), name
        assert "argparse.ArgumentParser(" not in src and "print_table" not in src, name


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table of ``text``: (header cells, rows of cells)."""
    out, lines = [], text.splitlines()
    for i in range(len(lines) - 1):
        if lines[i].startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            rows, j = [], i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append(_cells(lines[j]))
                j += 1
            out.append((_cells(lines[i]), rows))
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def numbers(cell: str) -> list[float]:
    return [float(m.replace(",", "")) for m in NUMBER.findall(cell)]


def check_results(name: str, text: str) -> None:
    head = dict(re.findall(r"^- (command|commit|date|machine): (.+)$", text, re.MULTILINE))
    assert text.startswith(f"# {name[:-3]}"), text[:200]
    assert name in head.get("command", "") and "--quick" in head["command"], head
    assert re.fullmatch(r"[0-9a-f]{40}( \(with uncommitted changes\))?|unknown \(not a git checkout\)",
                        head.get("commit", "")), head
    when = datetime.datetime.fromisoformat(head.get("date", ""))
    assert abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) < 3600, head
    assert re.match(r"\d+ CPUs", head.get("machine", "")) and "GPU: " in head["machine"], head
    assert re.search(r"^wall time [\d.]+ s\b.*; peak RSS \d+ MB", text, re.MULTILINE), text[-500:]
    assert "The bench failed" not in text
    found = tables(text)
    assert found, "no table"
    for spec in TABLES[name]:
        matching = [(h, rows) for h, rows in found if set(spec) <= set(h)]
        assert matching, f"no table with the columns {list(spec)}; tables: {[h for h, _ in found]}"
        for header, rows in matching:
            assert rows, f"table {header} has no row"
            for col, rng in spec.items():
                if rng is None:
                    continue
                k = header.index(col)
                vals = [v for r in rows if k < len(r) for v in numbers(r[k])[:1 if col != "95% interval" else 2]]
                assert vals, f"column {col!r} holds no number: {[r[k] for r in rows]}"
                lo, hi = rng
                assert all(lo <= v <= hi for v in vals), f"column {col!r} out of [{lo}, {hi}]: {vals}"
    if name in INSIDE:
        value, interval = INSIDE[name]
        for header, rows in found:
            if value in header and interval in header:
                for r in rows:
                    v, (lo, hi) = numbers(r[header.index(value)])[0], numbers(r[header.index(interval)])[:2]
                    assert lo - 1e-3 <= v <= hi + 1e-3, (r, v, lo, hi)
    for header, rows in found:  # a latency's median is not above its 99th percentile
        if "p50 ms" in header and "p99 ms" in header:
            for r in rows:
                assert numbers(r[header.index("p50 ms")])[0] <= numbers(r[header.index("p99 ms")])[0] + 1e-9, r
    for header, rows in found:  # every ratio printed as "N.NNx" is above 0
        for r in rows:
            for cell in r:
                for m in re.findall(r"([-+]?\d[\d,]*(?:\.\d+)?)x\b", cell):
                    assert float(m.replace(",", "")) > 0, (header, r)


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHES)
def test_bench_runs_quick_and_writes_its_results(name, tmp_path):
    if name in NEEDS and not (SHARED / NEEDS[name]).exists():
        pytest.skip(f"../shared/data/{NEEDS[name]} is not on this machine")
    results = tmp_path / "results.md"
    out = subprocess.run([sys.executable, str(BENCH / name), "--quick", "--workdir", str(tmp_path / "w"),
                          "--out", str(results)], cwd=ROOT, capture_output=True, text=True, timeout=QUICK_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-3000:]
    check_results(name, results.read_text())


def test_the_results_checker_refuses_an_empty_or_wrong_file():
    """The checker itself: a file with a header but a table of the wrong columns, or an empty table, fails."""
    head = ("# bench_add: x\n\n- command: `python bench/bench_add.py --quick`\n- commit: " + "a" * 40 + "\n- date: "
            + datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            + "\n- machine: 2 CPUs, x; GPU: none\n\n")
    foot = "\n---\nwall time 1.0 s (the whole process); peak RSS 10 MB (this process)\n"
    good = ("| catalogue (products) | add 300 (ms, median) | vs smallest | reader reopen (ms) |\n|---|---|---|---|\n"
            "| 10,000 | 80.0 | 1.00x | 3.0 |\n")
    check_results("bench_add.py", head + good + foot)
    for bad in (good.split("| 10,000")[0], good.replace("1.00x", "0.00x"), good.replace("80.0", "-1"),
                good.replace("vs smallest", "other")):
        with pytest.raises(AssertionError):
            check_results("bench_add.py", head + bad + foot)
    with pytest.raises(AssertionError):
        check_results("bench_add.py", good + foot)  # no header


def _harness():
    sys.path.insert(0, str(BENCH))
    try:
        import harness
    finally:
        sys.path.remove(str(BENCH))
    return harness


def test_harness_intervals_against_known_values():
    h = _harness()
    lo, hi = h.wilson(5, 10)  # Wilson 95% of 5/10: 0.2366 to 0.7634
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    assert h.wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and h.wilson(10, 10)[1] == pytest.approx(1.0)
    c = np.array([1, 0, 1, 1, 0, 1, 1, 1])
    assert h.wilson_weighted(c, np.ones(8)) == pytest.approx(h.wilson(6, 8))  # equal weights: Wilson itself
    assert h.proportion(c)[0] == 0.75
    d = np.array([1.0, 0.0, 0.0, 1.0, -1.0, 1.0] * 50)
    lo, hi = h.paired_interval(d)
    assert lo < d.mean() < hi and hi - lo < 0.25
    p = h.percentiles([1, 2, 3, 4, 100], (50, 99))
    assert p[50] == 3.0 and 90 < p[99] <= 100


def test_harness_writes_header_table_and_footer(tmp_path):
    """A bench of ten lines on the harness: its results file has the header, what it printed, and the footer."""
    script = tmp_path / "bench_tiny.py"
    script.write_text(f'''"""A tiny bench.\n\nMore."""
import sys
sys.path.insert(0, {str(BENCH)!r})
import harness
ap = harness.parser(__doc__)
ap.add_argument("--n", type=int, default=100)
a = harness.start(ap, quick={{"n": 3}})
harness.table([("n", a.n, 1.5)], ("what", "value", "ratio"))
''')
    out = tmp_path / "r.md"
    run = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    text = out.read_text()
    assert text.startswith("# bench_tiny: A tiny bench.")
    assert "| n | 3 | 1.5 |" in text and "| n | 3 | 1.5 |" in run.stdout  # quick sizes applied, stdout copied
    assert re.search(r"^- commit: [0-9a-f]{40}", text, re.MULTILINE)
    assert "--quick" in re.search(r"^- command: (.+)$", text, re.MULTILINE).group(1)
    assert re.search(r"^wall time [\d.]+ s\b.*; peak RSS \d+ MB", text, re.MULTILINE)
