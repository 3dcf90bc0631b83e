"""The one harness every bench runs on: shared flags, a results file, timing, memory, percentiles and intervals.

A bench builds its parser with ``parser(__doc__)`` (``--quick``, ``--out``, ``--workdir``), adds its own options,
and calls ``start(ap, quick={...})``: the quick sizes replace the defaults under ``--quick``, and from then on
everything the bench prints on standard output also goes to its results file, after a header naming the command,
commit, date and machine; a footer adds the wall time and the peak RSS. Progress and logs go to standard error
and stay out of the file.

Intervals, one method per kind: a proportion (an accuracy, a precision, a recall) gets the 95% Wilson score interval
(``wilson``: the library's own, the one ``evaluate`` reports), also when its products are weighted
(``wilson_weighted``: Wilson at Kish's effective sample size); a paired difference of two classifiers on the same
products gets the 95% paired bootstrap interval (``paired_interval``).
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # real data beside the checkout (../shared/data)
RESULTS = ROOT / "bench" / "results"
QUICK_RESULTS = ROOT / "bench_out" / "quick"  # a smoke run's results file: never one of bench/results/
_T0 = time.perf_counter()


# --- flags and the results file -------------------------------------------------------------------------------

def bench_name() -> str:
    """The running bench's name (its script's stem, e.g. ``bench_add``)."""
    return Path(sys.argv[0]).stem or "bench"


def parser(doc: str | None, workdir: str | Path | None = None) -> argparse.ArgumentParser:
    """An argument parser with the flags every bench takes; ``doc`` (the module docstring) is its help."""
    first, _, rest = (doc or "").strip().partition("\n\n")
    ap = argparse.ArgumentParser(description=" ".join(first.split()) or None, epilog=rest.strip() or None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes: a smoke run of under 2 minutes on 2 CPU cores (what the tests run)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default: bench/results/<bench>_<date>.md; with --quick "
                         "bench_out/quick/<bench>.md)")
    ap.add_argument("--workdir", type=Path, default=Path(workdir or f"bench_out/{bench_name()}"),
                    help="scratch folder (default: %(default)s)")
    return ap


def parse(ap: argparse.ArgumentParser, quick: dict | None = None, argv: Sequence[str] | None = None
          ) -> argparse.Namespace:
    """Parse the command line; under ``--quick`` the ``quick`` values replace the parsed ones."""
    a = ap.parse_args(argv)
    if a.quick:
        for k, v in (quick or {}).items():
            if not hasattr(a, k):
                raise AttributeError(f"quick size {k!r} names no option of {bench_name()}")
            setattr(a, k, v)
    return a


def start(ap: argparse.ArgumentParser, quick: dict | None = None, argv: Sequence[str] | None = None,
          title: str | None = None) -> argparse.Namespace:
    """``parse`` then ``record``: the bench's options, its results file open."""
    a = parse(ap, quick, argv)
    record(a, title or ap.description)
    return a


class _Tee:
    """Standard output, copied into the results file."""

    def __init__(self, stream, file) -> None:
        self.stream, self.file = stream, file

    def write(self, s: str) -> int:
        self.stream.write(s)
        self.file.write(s)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


_RUN: dict = {}


def record(a: argparse.Namespace, title: str | None = None) -> Path:
    """Open the results file (``a.out`` or the default), write its header, copy standard output into it from now
    on, and write the footer (wall time, peak RSS, whether the bench failed) when the process ends."""
    out = Path(a.out) if getattr(a, "out", None) else default_out(bool(getattr(a, "quick", False)))
    out.parent.mkdir(parents=True, exist_ok=True)
    f = open(out, "w", buffering=1)
    f.write(header(title))
    sys.stdout.flush()
    _RUN.update(file=f, path=out, failed=None, stdout=sys.stdout)
    sys.stdout = _Tee(sys.stdout, f)
    previous = sys.excepthook

    def hook(kind, value, tb):
        _RUN["failed"] = f"{kind.__name__}: {value}"
        previous(kind, value, tb)
    sys.excepthook = hook
    atexit.register(_footer)
    print(f"results file: {out}", file=sys.stderr)
    return out


def default_out(quick: bool) -> Path:
    if quick:
        return QUICK_RESULTS / f"{bench_name()}.md"
    return RESULTS / f"{bench_name()}_{datetime.date.today().isoformat()}.md"


def header(title: str | None = None) -> str:
    """The results file's first lines: title, command, commit, date, machine."""
    lines = [f"# {bench_name()}" + (f": {title}" if title else ""), "",
             f"- command: `{shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}` "
             f"(in `{os.getcwd()}`)",
             f"- commit: {commit()}",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"- machine: {machine()}", "", ""]
    return "\n".join(lines)


def _footer() -> None:
    f = _RUN.get("file")
    if f is None or f.closed:
        return
    sys.stdout.flush()
    if isinstance(sys.stdout, _Tee):
        sys.stdout = _RUN["stdout"]
    f.write(f"\n---\nwall time {process_seconds():.1f} s (the whole process, imports included); peak RSS "
            f"{status_mb('VmHWM'):.0f} MB (this process)\n")
    if _RUN["failed"]:
        f.write(f"\n**The bench failed**: {_RUN['failed']}\n")
    f.close()


def commit() -> str:
    """``git rev-parse HEAD`` of the checkout, marked when tracked files have uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=20,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return sha + (" (with uncommitted changes)" if dirty else "")


def machine() -> str:
    """CPU count and model, memory, GPU (or none), platform and Python."""
    model = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown CPU"
    mem = _proc_field("/proc/meminfo", "MemTotal")
    mem_s = f", {int(mem.split()[0]) / 2 ** 20:.0f} GB RAM" if mem else ""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    cpus = f"{os.cpu_count()} CPUs" + (f" ({usable} usable)" if usable != os.cpu_count() else "")
    return f"{cpus}, {model}{mem_s}; GPU: {gpu()}; {platform.platform()}; Python {platform.python_version()}"


def gpu() -> str:
    """The GPUs ``nvidia-smi`` lists (name, memory), else torch's CUDA device when torch is already imported."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            if out:
                return "; ".join(out.splitlines())
        except (OSError, subprocess.SubprocessError):
            pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "none"


def _proc_field(path: str, key: str) -> str | None:
    try:
        for line in open(path):
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def table(rows: Sequence[Sequence], header: Sequence[str]) -> None:
    """Print rows as a Markdown table (floats to 3 significant digits, with thousands separators)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(f"{c:,.3g}" if isinstance(c, float) else str(c) for c in r) + " |")


# --- time and memory ------------------------------------------------------------------------------------------

def process_seconds() -> float:
    """Seconds since this process started (from /proc; else since the harness was imported)."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        return float(open("/proc/uptime").read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _T0


def best_time(fn: Callable[[], object], repeat: int = 3) -> float:
    """Fastest wall time of ``repeat`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def percentiles(values, qs: Sequence[float] = (50, 99)) -> dict:
    """``{q: the q-th percentile}`` of ``values`` (latencies, per-round ratios...); over the first axis, so rows of
    several measures give an array per ``q``."""
    v = np.asarray(values, dtype=np.float64)
    return {q: (float(x) if np.ndim(x) == 0 else x) for q, x in zip(qs, np.percentile(v, list(qs), axis=0),
                                                                     strict=True)}


def status_mb(key: str = "VmRSS", pid: int | str = "self") -> float:
    """A memory field of ``/proc/<pid>/status`` in MB: ``VmRSS`` (now), ``VmHWM`` (peak since exec: unlike
    getrusage's ru_maxrss a child does not inherit its parent's), ``RssAnon`` (heap and arrays, not the file pages
    a mapping can drop). NaN where the field is not there."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def status_children_mb() -> float:
    """The largest peak RSS of this process's finished children (getrusage), in MB; 0 if none. A forked child
    counts what it held before its exec too (DataLoader workers: fair; a subprocess of a large parent: not)."""
    import resource
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


class PeakRSS:
    """Samples this process's ``key`` memory (``RssAnon`` by default, or ``VmRSS``) every ``every`` seconds in a
    thread: ``peak_mb`` is the largest seen, ``timeline`` the largest of each ``step`` seconds as
    ``[seconds from the start, MB]`` (which phase of a stage peaks). ``stop()`` returns the peak."""

    def __init__(self, key: str = "RssAnon", every: float = 0.2, step: float = 5.0) -> None:
        self.key, self.peak_mb, self.timeline = key, 0.0, []
        self._stop, self._t0, self._step = threading.Event(), time.perf_counter(), step
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            mb = status_mb(self.key)
            self.peak_mb = max(self.peak_mb, mb)
            at = int((time.perf_counter() - self._t0) // self._step) * self._step
            if self.timeline and self.timeline[-1][0] == at:
                self.timeline[-1][1] = max(self.timeline[-1][1], round(mb))
            else:
                self.timeline.append([at, round(mb)])
            self._stop.wait(every)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak_mb, status_mb(self.key))


# --- intervals ------------------------------------------------------------------------------------------------

def wilson(hits: float, n: float) -> tuple[float, float]:
    """95% Wilson score interval of the proportion ``hits / n`` (the library's, as ``evaluate`` reports it)."""
    from retrieval.infer.evaluate import wilson as library_wilson
    return library_wilson(hits, n)


def wilson_weighted(correct, weights) -> tuple[float, float]:
    """95% Wilson interval of a weighted proportion (``correct`` 0/1, ``weights`` >= 0 per item), at Kish's
    effective sample size ``sum(w)^2 / sum(w^2)``: equal weights give ``wilson`` itself."""
    c, w = np.asarray(correct, np.float64), np.asarray(weights, np.float64)
    n_eff = w.sum() ** 2 / (w ** 2).sum()
    return wilson(float(np.average(c, weights=w)) * n_eff, n_eff)


def proportion(correct, weights=None) -> tuple[float, float, float]:
    """(mean, low, high) of a 0/1 array: its share and 95% Wilson interval (weighted when ``weights`` are given)."""
    c = np.asarray(correct, np.float64)
    if weights is not None:
        return (float(np.average(c, weights=weights)), *wilson_weighted(c, weights))
    return (float(c.mean()) if len(c) else 0.0, *wilson(float(c.sum()), len(c)))


def paired_interval(diff, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% paired bootstrap interval of the mean of ``diff`` (per-product differences of two classifiers scored on
    the same products, e.g. ``a_correct - b_correct``): products resampled with replacement ``n`` times."""
    d = np.asarray(diff, np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (n, len(d)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def interval(lo: float, hi: float, signed: bool = False, digits: int = 3) -> str:
    """``[lo, hi]`` as a table cell."""
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"[{f.format(lo)}, {f.format(hi)}]"


# --- serving --------------------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, log: Path, *args: str, seconds: float = 120) -> tuple[subprocess.Popen, str]:
    """``cli.py serve --index INDEX`` with ``args`` on a free port of 127.0.0.1, its output in ``log``; returns
    the process and its URL once /health answers. A server that exits, or does not answer within ``seconds``,
    is an error quoting its log (and is stopped)."""
    import httpx
    port = free_port()
    with open(log, "w") as f:
        server = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", "--index", str(index), "--port",
                                   str(port), *args], stdout=f, stderr=subprocess.STDOUT)
    url, end = f"http://127.0.0.1:{port}", time.monotonic() + seconds
    while time.monotonic() < end and server.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"the server did not come up (exit code {server.poll()}); its log ends:\n"
                       + Path(log).read_text()[-3000:])
