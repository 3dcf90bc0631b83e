"""The one home of durable writes and checked reads: files written aside, fsynced and renamed (a file is whole or
absent), the crash points tests drive through ``CDISCOUNT_CRASH_AT``, and JSON files read back with a one-line
error naming any damaged or foreign one. Every writer of the project (run folders, part stores, index folders,
model files, caches) goes through here."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Callable

from .errors import UserError

CRASH_ENV = "CDISCOUNT_CRASH_AT"  # "write:N", "fsync:N" or "rename:N": os._exit(77) at the N-th such step
CRASH_CODE = 77
_counts: dict[str, int] = {}


def crash_point(kind: str) -> None:
    """Count one ``kind`` step (write, fsync, rename) of this process; exit at once (no cleanup, as a kill -9)
    when ``CDISCOUNT_CRASH_AT`` names this step. A no-op when the variable is unset."""
    spec = os.environ.get(CRASH_ENV)
    if not spec or not spec.startswith(kind + ":"):
        return
    _counts[spec] = _counts.get(spec, 0) + 1
    if _counts[spec] == int(spec.split(":", 1)[1]):
        os._exit(CRASH_CODE)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (one crash point)."""
    crash_point("fsync")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root``, then ``root`` itself."""
    for here, _dirs, files in os.walk(root, topdown=False):
        for f in files:
            fsync_path(Path(here) / f)
        fsync_path(Path(here))


def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """``write(path)`` (one crash point, before it); for files inside a folder that is itself renamed into place."""
    crash_point("write")
    write(Path(path))


def rename(src: Path, dst: Path) -> None:
    """``os.replace`` (one crash point, before it)."""
    crash_point("rename")
    os.replace(src, dst)


def aside(final: Path) -> Path:
    """The hidden name a file is written under before it is renamed to ``final`` (unique to this process)."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def place(written: Path, final: Path) -> Path:
    """fsync a file written aside, rename it to ``final`` and fsync the folder: ``final`` is now durable."""
    fsync_path(written)
    rename(written, final)
    fsync_path(Path(final).parent)
    return Path(final)


def write_atomic(final: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """``write(f)`` into a binary file beside ``final``, then :func:`place` it: a reader (or a crash at any
    instant) sees the old file or the whole new one, never a part. The aside file is removed on failure."""
    final = Path(final)
    tmp = aside(final)
    try:
        crash_point("write")
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
        return place(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(final: str | Path, obj: object, indent: int | None = None) -> Path:
    """A JSON file written with :func:`write_atomic`."""
    return write_atomic(final, lambda f: f.write(json.dumps(obj, indent=indent).encode()))


def read_json(path: str | Path, what: str, remedy: str) -> dict:
    """The JSON object in ``path`` (``what`` it should be, e.g. "run config"), or a :class:`UserError` in one
    line naming the file when it is missing, unreadable, not JSON or not an object, ending with ``remedy``."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing (the {what}); {remedy}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is damaged (the {what} is not readable JSON: {type(e).__name__}); {remedy}"
                        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is damaged (the {what} is a JSON {type(obj).__name__}, not an object); {remedy}")
    return obj
