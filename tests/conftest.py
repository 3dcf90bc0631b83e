"""Shared fixtures (the real data folder, small generated data sets, a trained run and its indexes), the guard
that keeps the session's shared fixtures read-only, and the list of skips CI expects."""
from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import xxhash

if __name__ != "conftest":  # pytest loads this file as `conftest`: a second copy would hold a guard nobody checks
    raise ImportError(f"import tests/conftest.py as `from conftest import ...`, not as {__name__}")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _threads():
    torch_threads = os.environ.get("TEST_TORCH_THREADS")
    if torch_threads:
        import torch
        torch.set_num_threads(int(torch_threads))


# ---- the real data folder and the skips CI expects ---------------------------------------------------------

SHARED_ABSENT = "the real data folder ../shared/data is not on this machine"


def shared_file(name: str) -> Path:
    """``../shared/data/<name>``. Without the folder the test is skipped (a machine without the real data); a
    folder that lacks the file is a broken set-up, and the test fails."""
    if not SHARED.is_dir():
        pytest.skip(SHARED_ABSENT)
    p = SHARED / name
    if not p.exists():
        pytest.fail(f"real data file {p} is missing from {SHARED} (the folder is there: its files must be too)")
    return p


@dataclass(frozen=True)
class ExpectedSkip:
    """A skip CI accepts: its reason matches ``pattern`` (from the start) while ``applies()`` holds."""

    pattern: str
    applies: Callable[[], bool]
    why: str


EXPECTED_SKIPS = (
    ExpectedSkip(re.escape(SHARED_ABSENT) + "$", lambda: not SHARED.is_dir(), "shared_file() without ../shared/data"),
    ExpectedSkip(r"\.\./shared/data/\S+ is not on this machine$", lambda: not SHARED.is_dir(),
                 "test_benches.py: a bench on real data, without ../shared/data"),
    ExpectedSkip(r"the page test needs Debian's headless Chromium", lambda: not os.environ.get("REQUIRE_CHROMIUM"),
                 "test_api.py: the page test without Chromium, where REQUIRE_CHROMIUM is unset"),
)


def skip_is_expected(reason: str) -> bool:
    return any(re.match(s.pattern, reason) and s.applies() for s in EXPECTED_SKIPS)


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    if getattr(report, "wasxfail", None) is not None:
        return f"xfail: {report.wasxfail}"
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


_UNEXPECTED: list[tuple[str, str]] = []  # (node id, reason) of every skip off the list, in this session


def _note_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped:
        reason = _skip_reason(report)
        if not skip_is_expected(reason):
            _UNEXPECTED.append((report.nodeid, reason))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip(report)


def _fail_on_unexpected_skip() -> bool:
    return os.environ.get("FAIL_ON_UNEXPECTED_SKIP", "") not in ("", "0")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _UNEXPECTED and _fail_on_unexpected_skip() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    if not _UNEXPECTED:
        return
    verdict = "they fail this session (FAIL_ON_UNEXPECTED_SKIP)" if _fail_on_unexpected_skip() else \
        "set FAIL_ON_UNEXPECTED_SKIP=1 to fail on them, as CI does"
    terminalreporter.section("unexpected skips", sep="=", red=True)
    for nodeid, reason in _UNEXPECTED:
        terminalreporter.line(f"SKIPPED {nodeid}: {reason}")
    terminalreporter.line(f"{len(_UNEXPECTED)} skip(s) not in tests/conftest.py's EXPECTED_SKIPS: {verdict}")


# ---- shared fixtures are read-only ------------------------------------------------------------------------

Fingerprint = tuple  # what identifies a file's state: kind, size, mtime and the hash of its bytes


class ReadOnlyGuard:
    """Fingerprints of what the session's shared fixtures hand out (every file under their folders, or an object
    such as a trained module in memory), taken when each was made and compared after the setup, the call and the
    teardown of every test: the test in whose phase something changed fails, with the changed files named.
    (Tests run as root, so file modes cannot stop a write: only a comparison can.)"""

    def __init__(self) -> None:
        self._watched: dict[str, tuple[Callable[[], dict[str, Fingerprint]], dict[str, Fingerprint]]] = {}
        self._hashes: dict[tuple, str] = {}

    def watch_folders(self, name: str, *folders: Path) -> None:
        """Keep ``folders`` (whole trees) as they are now."""
        self.watch(name, lambda: {k: v for f in folders for k, v in self._tree(f).items()})

    def watch(self, name: str, fingerprints: Callable[[], dict[str, Fingerprint]]) -> None:
        """Keep what ``fingerprints()`` returns (item -> fingerprint) as it is now."""
        self._watched[name] = (fingerprints, fingerprints())

    def changes(self) -> list[str]:
        """One line per changed item since the last look (which becomes the new reference, so that the next test
        is not blamed for the same change)."""
        lines = []
        for name, (fingerprints, before) in self._watched.items():
            now = fingerprints()
            changed = [f"{name}: {k} {_what(before.get(k), now.get(k))}" for k in sorted(before.keys() | now.keys())
                       if before.get(k) != now.get(k)]
            if changed:
                self._watched[name] = (fingerprints, now)
                lines += changed
        return lines

    def _tree(self, root: Path) -> dict[str, Fingerprint]:
        out: dict[str, Fingerprint] = {}
        if not root.exists():
            return {str(root): ("missing",)}
        for p in sorted([root, *root.rglob("*")]):
            try:
                st = p.lstat()
                if stat.S_ISLNK(st.st_mode):
                    out[str(p)] = ("link", os.readlink(p))
                elif stat.S_ISDIR(st.st_mode):
                    out[str(p)] = ("dir",)
                else:
                    key = (str(p), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                    if key not in self._hashes:
                        self._hashes[key] = xxhash.xxh3_64_hexdigest(p.read_bytes())
                    out[str(p)] = ("file", st.st_size, st.st_mtime_ns, self._hashes[key])
            except FileNotFoundError:  # removed while the tree was listed: absent
                continue
        return out


def _what(before: Fingerprint | None, now: Fingerprint | None) -> str:
    if before is None:
        return "was created"
    if now is None or now == ("missing",):
        return "was deleted"
    if before[0] == now[0] == "file":
        return "was rewritten (same bytes)" if before[3] == now[3] else "was changed"
    return f"changed from {before[0]} to {now[0]}"


GUARD = ReadOnlyGuard()


def _guarded_phase(when: str) -> Iterator[None]:
    try:
        result = yield
    except BaseException as e:
        changed = GUARD.changes()
        if changed:
            raise pytest.fail.Exception(f"{_guard_message(when, changed)}\nand it raised {e!r}", pytrace=False) from e
        raise
    changed = GUARD.changes()
    if changed:
        pytest.fail(_guard_message(when, changed), pytrace=False)
    return result


def _guard_message(when: str, changed: list[str]) -> str:
    return (f"the test's {when} wrote into a shared, read-only session fixture (work on a copy: tests/conftest.py's "
            f"own_indexes, world or shutil.copytree into tmp_path):\n  " + "\n  ".join(changed))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    return (yield from _guarded_phase("setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    return (yield from _guarded_phase("call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    return (yield from _guarded_phase("teardown"))


def read_only(name: str, *folders: Path) -> None:
    """Guard ``folders`` of the fixture ``name`` from here on: every test that changes a file under them fails."""
    GUARD.watch_folders(name, *folders)


def _module_state(module) -> Callable[[], dict[str, Fingerprint]]:
    def fingerprints() -> dict[str, Fingerprint]:
        import torch
        return {k: (xxhash.xxh3_64_hexdigest(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()),)
                for k, v in module.state_dict().items()}
    return fingerprints


# ---- small generated data sets, a trained run and its indexes ---------------------------------------------

def assert_same_calibration(a: dict, b: dict) -> None:
    """Two evaluate runs' fitted fusions: the same rule and settings, the weights equal to float rounding
    (searches in batches of another shape sum in another order)."""
    import numpy as np
    assert {k: v for k, v in a.items() if k != "weights"} == {k: v for k, v in b.items() if k != "weights"}
    if a.get("weights") is None or b.get("weights") is None:  # the grid rule has no fitted weights
        assert a.get("weights") is None and b.get("weights") is None
        return
    np.testing.assert_allclose(a["weights"], b["weights"], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict[str, Path]:
    """150 training + 30 test products, 6 categories, 32 px images. Read-only."""
    from retrieval.data.offsets import load_offsets
    from retrieval.data.synth import SynthConfig, make_data
    data = make_data(tmp_path_factory.mktemp("gen"), SynthConfig(products=150, categories=6, seed=1, image_size=32,
                                                                 test_fraction=0.2), progress=False)
    for name in ("train.bson", "test.bson"):  # the offset tables' caches, which the first reader writes beside
        load_offsets(data[name], progress=False)
    read_only("small_data", data["train.bson"].parent)
    return data


TRAINED_EPOCHS = 3


@pytest.fixture(scope="session")
def trained(small_data, tmp_path_factory):
    """``(run folder, TrainResult)`` of a tiny-tower run trained for ``TRAINED_EPOCHS`` epochs on ``small_data``;
    the result keeps the trained module in memory. Read-only (folder and module): a test that evaluates (which
    writes the fitted fusion into the run) takes :func:`own_indexes`."""
    from retrieval.train.config import TrainConfig
    from retrieval.train.run import train
    run = tmp_path_factory.mktemp("trained")
    res = train(small_data["train.bson"], run, TrainConfig.build(image_size=32, embed_dim=32, batch_size=16, workers=0,
                                                                 val_fraction=0.2, epochs=TRAINED_EPOCHS, lr=3e-3),
                small_data["category_names.csv"], progress=False)
    read_only("trained", run)
    GUARD.watch("trained (the module in memory)", _module_state(res.module))
    return run, res


@pytest.fixture(scope="session")
def trained_run(trained) -> Path:
    """The run folder of ``trained``. Read-only."""
    return trained[0]


def build_world(root: Path, small_data: dict, trained_run: Path) -> Path:
    """``root`` holding a copy of ``small_data`` (``data/``), of the trained run (``run/``) and an index of all
    150 products (``idx/``), side by side (the index's relative paths hold wherever ``root`` is copied)."""
    from retrieval.infer.indexdir.build import IndexSettings, build_index
    from retrieval.infer.pipeline.embed import LoaderSettings
    shutil.copytree(small_data["train.bson"].parent, root / "data")
    shutil.copytree(trained_run, root / "run")
    build_index(root / "data" / "train.bson", root / "run", root / "idx", IndexSettings("all", part_products=40),
                LoaderSettings(workers=0))
    return root


@pytest.fixture(scope="session")
def built_world(tmp_path_factory, small_data, trained_run) -> Path:
    """One :func:`build_world` for the session. Read-only: tests that change it take :func:`world`."""
    root = build_world(tmp_path_factory.mktemp("built") / "world", small_data, trained_run)
    read_only("built_world", root)
    return root


@pytest.fixture()
def world(tmp_path, built_world) -> Path:
    """A copy of :func:`built_world` of the test's own, to change at will."""
    shutil.copytree(built_world, tmp_path / "world")
    return tmp_path / "world"


@pytest.fixture(scope="session")
def indexes(small_data, trained_run, tmp_path_factory) -> dict[str, Path]:
    """A train-split index and an all-products index of ``small_data``. Read-only: tests that change them, or
    their run (evaluate), take :func:`own_indexes`."""
    from retrieval.infer.indexdir.build import IndexSettings, build_index
    from retrieval.infer.pipeline.embed import LoaderSettings
    root = tmp_path_factory.mktemp("indexes")
    for split in ("train", "all"):
        build_index(small_data["train.bson"], trained_run, root / split, IndexSettings(split, part_products=40),
                    LoaderSettings(workers=0))
    read_only("indexes", root)
    return {"train": root / "train", "all": root / "all"}


def private_copy(base: Path, dest: Path, *folders: Path) -> list[Path]:
    """Copies of ``folders`` (each under ``base``) under ``dest``, each at its own path relative to ``base``: the
    relative paths an index keeps to its run and data lead to the copies."""
    out = []
    for f in folders:
        shutil.copytree(f, dest / f.relative_to(base))
        out.append(dest / f.relative_to(base))
    return out


@pytest.fixture()
def own_indexes(tmp_path, tmp_path_factory, indexes, trained_run, small_data) -> dict[str, Path]:
    """:func:`indexes` of the test's own, with copies of the run and the data beside them (``train``, ``all``,
    ``run``, ``data``): evaluate writes the fusion it fits into the index's run, and predict reads it there."""
    base = tmp_path_factory.getbasetemp()
    idx_root, run, data = private_copy(base, tmp_path / "own", indexes["train"].parent, trained_run,
                                       small_data["train.bson"].parent)
    return {"train": idx_root / "train", "all": idx_root / "all", "run": run, "data": data}


# ---- servers on a socket bound before they start ----------------------------------------------------------

def listening_socket() -> socket.socket:
    """A TCP socket on a free port of 127.0.0.1, bound and listening. Handed to the server as it is: no other
    process can take the port between its choice and the server's start (as it could after bind, close, serve)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


@contextmanager
def thread_server(app, start_seconds: float = 60.0) -> Iterator[int]:
    """``app`` under uvicorn in a thread of this process, on a :func:`listening_socket`; yields its port once
    uvicorn has started (fails after ``start_seconds``), and stops it on the way out."""
    import uvicorn
    sock = listening_socket()
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + start_seconds
        while not srv.started:
            assert t.is_alive(), "the uvicorn thread ended before the server started"
            assert time.monotonic() < deadline, f"uvicorn did not start within {start_seconds:.0f} s"
            time.sleep(0.05)
        yield sock.getsockname()[1]
    finally:
        srv.should_exit = True
        t.join(30)
        sock.close()
    assert not t.is_alive(), "uvicorn did not stop within 30 s"


@contextmanager
def process_server(index: Path, *args: str, log: Path, start_seconds: float = 120.0
                   ) -> Iterator[tuple[subprocess.Popen, str]]:
    """``cli.py serve --index INDEX --fd N ARGS`` in its own process, N a :func:`listening_socket` passed down;
    yields ``(process, url)`` once GET /health answers 200. Fails, with the end of the server's log (``log``),
    if the process exits first or does not answer within ``start_seconds``. Stops it on the way out (SIGTERM,
    then SIGKILL after 20 s)."""
    import httpx
    sock = listening_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with sock, open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", "--index", str(index),
                                 "--fd", str(sock.fileno()), *args], cwd=ROOT, pass_fds=[sock.fileno()],
                                stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + start_seconds
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode} before answering: {log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /health within {start_seconds:.0f} s: "
                            f"{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)
