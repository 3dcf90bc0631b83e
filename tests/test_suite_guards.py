"""The suite's own guards, so that it cannot pass by accident: shared fixtures stay read-only (fingerprints of their
files and of the trained module, re-checked around every test), and CI fails on a skip it does not expect."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import conftest
import pytest
import torch
from conftest import ReadOnlyGuard, shared_file, skip_is_expected


def test_the_guard_names_each_changed_created_and_deleted_file_once(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a", "b", "sub/c"):
        (tmp_path / name).write_text("x")
    guard = ReadOnlyGuard()
    guard.watch_folders("f", tmp_path)
    assert guard.changes() == []  # looking changes nothing
    (tmp_path / "a").write_text("y")  # same size, other bytes
    (tmp_path / "sub" / "c").unlink()
    (tmp_path / "sub" / "new").write_text("z")
    got = guard.changes()
    assert got == [f"f: {tmp_path / 'a'} was changed", f"f: {tmp_path / 'sub' / 'c'} was deleted",
                   f"f: {tmp_path / 'sub' / 'new'} was created"]
    assert guard.changes() == []  # the next test is not blamed for the same change
    st = (tmp_path / "b").stat()
    (tmp_path / "b").write_text("x")  # the same bytes written again
    os.utime(tmp_path / "b", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert guard.changes() == [f"f: {tmp_path / 'b'} was rewritten (same bytes)"]


def test_the_guard_sees_a_module_whose_state_moves():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    guard = ReadOnlyGuard()
    guard.watch("net", conftest._module_state(net))
    with torch.no_grad():
        net.eval()(torch.randn(8, 4))  # inference leaves it as it is
    assert guard.changes() == []
    net.train()(torch.randn(8, 4))  # a forward pass in training mode moves the batch-norm statistics
    assert {line.split()[1] for line in guard.changes()} == {"1.running_mean", "1.running_var",
                                                             "1.num_batches_tracked"}


def test_expected_skips_hold_only_where_they_apply(monkeypatch, tmp_path):
    chromium = "the page test needs Debian's headless Chromium: /usr/bin/chromium missing"
    monkeypatch.delenv("REQUIRE_CHROMIUM", raising=False)
    assert skip_is_expected(chromium)
    monkeypatch.setenv("REQUIRE_CHROMIUM", "1")
    assert not skip_is_expected(chromium)
    assert not skip_is_expected("could not import 'onnxruntime': No module named 'onnxruntime'")
    monkeypatch.setattr(conftest, "SHARED", tmp_path / "absent")
    assert skip_is_expected(conftest.SHARED_ABSENT)
    assert skip_is_expected("../shared/data/grocery/train.bson is not on this machine")  # test_benches.py's reason
    with pytest.raises(pytest.skip.Exception, match="is not on this machine"):
        shared_file("category_names.csv")
    monkeypatch.setattr(conftest, "SHARED", tmp_path)  # the folder is there: a missing file is a failure
    assert not skip_is_expected(conftest.SHARED_ABSENT)
    assert not skip_is_expected("../shared/data/grocery/train.bson is not on this machine")
    with pytest.raises(pytest.fail.Exception, match="category_names.csv is missing"):
        shared_file("category_names.csv")
    (tmp_path / "category_names.csv").write_text("x")
    assert shared_file("category_names.csv") == tmp_path / "category_names.csv"


INNER = '''
import pytest
from conftest import read_only


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared")
    (folder / "kept.txt").write_text("kept")
    read_only("shared", folder)
    return folder


def test_writes(shared):
    (shared / "kept.txt").write_text("changed")


def test_reads_after(shared):
    assert (shared / "kept.txt").read_text() == "changed"


def test_browser():
    pytest.skip("the page test needs Debian's headless Chromium: /usr/bin/chromium missing")


def test_odd():
    pytest.skip("an odd reason")
'''


def _inner_session(tmp_path: Path, *select: str, fail_on_skip: bool) -> subprocess.CompletedProcess:
    """This folder's conftest.py and :data:`INNER` run by pytest in a process of their own (no project config)."""
    shutil.copy(Path(conftest.__file__), tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k not in ("FAIL_ON_UNEXPECTED_SKIP", "REQUIRE_CHROMIUM")}
    if fail_on_skip:
        env["FAIL_ON_UNEXPECTED_SKIP"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *select],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_write_into_a_shared_fixture_fails_that_test_only_and_unexpected_skips_are_listed(tmp_path):
    out = _inner_session(tmp_path, fail_on_skip=False)
    assert out.returncode == 1, out.stdout[-3000:]
    assert "1 failed, 1 passed, 2 skipped" in out.stdout and "FAILED test_inner.py::test_writes" in out.stdout, \
        out.stdout[-3000:]
    assert "shared: " in out.stdout and "kept.txt was changed" in out.stdout
    listed = out.stdout.split("unexpected skips")[1]
    assert "SKIPPED test_inner.py::test_odd: an odd reason" in listed and "test_browser" not in listed


def test_an_unexpected_skip_fails_the_session_where_asked_and_an_expected_one_never(tmp_path):
    out = _inner_session(tmp_path, "test_inner.py::test_browser", fail_on_skip=True)
    assert out.returncode == 0 and "unexpected skips" not in out.stdout, out.stdout[-3000:]
    out = _inner_session(tmp_path, "test_inner.py::test_browser", "test_inner.py::test_odd", fail_on_skip=True)
    assert out.returncode == 1 and "SKIPPED test_inner.py::test_odd: an odd reason" in out.stdout, out.stdout[-3000:]
    assert "they fail this session" in out.stdout
