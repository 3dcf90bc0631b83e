"""Checksums of an index folder's files (xxHash's XXH3-64, a maintained library): recorded when a segment is
sealed (``segment.json``'s ``files``) and when a generation commits (its manifest's ``checksums`` of the files it
references outside segments, and its own ``digest``); verified when a file is read whole and, every byte, by
``cli.py check``. A damaged file is a :class:`Damaged` error naming it, never an answer."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import xxhash

from ... import durable
from ...errors import UserError

log = logging.getLogger(__name__)
BLOCK = 8 << 20  # bytes read at a time
OPEN_VERIFY_MAX = 64 << 20  # files up to this size are verified whenever they are opened (larger: by `check`)


class Damaged(UserError):
    """A file of an index folder whose bytes, size or presence disagree with what was recorded at commit."""


def file_digest(path: Path) -> str:
    """XXH3-64 of a file's bytes, as 16 hex digits (read in blocks of :data:`BLOCK`)."""
    h = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def record(path: Path) -> list:
    """``[size, digest]`` of a file, as a manifest stores it."""
    return [Path(path).stat().st_size, file_digest(path)]


def record_tree(root: Path, leave_out: str) -> dict[str, list]:
    """``{relative path: [size, digest]}`` of every file under ``root`` but the one named ``leave_out`` (the
    record itself)."""
    root = Path(root)
    return {str(p.relative_to(root)): record(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != leave_out}


def verify(path: Path, expected: list | None, full: bool = True, what: str = "") -> None:
    """Refuse ``path`` when it is missing, its size differs from ``expected[0]`` or (``full``) its digest from
    ``expected[1]``; ``expected`` None (a file written before checksums were kept) checks presence only."""
    path = Path(path)
    name = f"{what}{path}"
    if not path.is_file():
        raise Damaged(f"{name} is missing; restore the folder from a copy or rebuild the index")
    if expected is None:
        return
    size, digest = expected
    if path.stat().st_size != size:
        raise Damaged(f"{name} is damaged: {path.stat().st_size} bytes, {size} recorded at commit (cut short or "
                      "overwritten); restore it or rebuild the index")
    if full and file_digest(path) != digest:
        raise Damaged(f"{name} is damaged: its checksum differs from the one recorded at commit; restore it or "
                      "rebuild the index")


def verify_small(path: Path, expected: list | None, what: str = "") -> None:
    """:func:`verify` every byte of a file up to :data:`OPEN_VERIFY_MAX`, only its size past it."""
    full = expected is None or expected[0] <= OPEN_VERIFY_MAX
    verify(path, expected, full=full, what=what)


def json_digest(d: dict) -> str:
    """The digest of a JSON object without its own ``digest`` key (keys sorted: independent of layout)."""
    body = json.dumps({k: v for k, v in d.items() if k != "digest"}, sort_keys=True).encode()
    return xxhash.xxh3_64_hexdigest(body)


def read_json(path: Path, what: str = "") -> dict:
    """A JSON object file, refused (one line naming it) when unreadable, not an object, or its ``digest`` (where
    it has one) disagrees with its content."""
    path = Path(path)
    try:
        d = durable.read_json(path, "index folder's record", "restore it or rebuild the index")
    except UserError as e:
        raise Damaged(f"{what}{e}") from None
    if "digest" in d and d["digest"] != json_digest(d):
        raise Damaged(f"{what}{path} is damaged: its content disagrees with its own checksum; restore it or "
                      "rebuild the index")
    return d
