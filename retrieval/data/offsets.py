"""The offset table of a BSON file (built in one pass, cached) and random access to records by row."""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..durable import write_atomic, write_json
from .bsonio import (
    _INT32,
    _MAX_DOC,
    _MIN_DOC,
    BsonFormatError,
    Product,
    _check_length,
    _open_checked,
    _scan_slow,
    decode_record,
)

log = logging.getLogger(__name__)

#: dtype of one row of an offset table.
TABLE_DTYPE = np.dtype(
    [("product_id", "<i8"), ("category_id", "<i8"), ("offset", "<i8"), ("length", "<i4"), ("n_images", "<i2")]
)


def _walk(mm: mmap.mmap, start: int, stop: int, size: int) -> tuple[list[int], int]:
    """Record starts from ``start`` until the first record that ends past ``stop`` or looks wrong."""
    offs: list[int] = []
    append, unpack, off = offs.append, _INT32.unpack_from, start
    while off < stop and off + 4 <= size:
        n = unpack(mm, off)[0]
        if n < _MIN_DOC or n > _MAX_DOC or off + n > size:
            break
        append(off)
        off += n
    return offs, off


def _gather_i32(b: np.ndarray, pos: np.ndarray) -> np.ndarray:
    pos = np.minimum(pos, len(b) - 4)  # out-of-range positions only occur on records already marked bad
    v = b[pos].astype(np.uint32) | b[pos + 1].astype(np.uint32) << 8 | b[pos + 2].astype(np.uint32) << 16 \
        | b[pos + 3].astype(np.uint32) << 24
    return v.view(np.int32).astype(np.int64)


def _matches(b: np.ndarray, pos: np.ndarray, pattern: bytes) -> np.ndarray:
    pos = np.minimum(pos, len(b) - len(pattern))
    ok = np.ones(len(pos), bool)
    for i, ch in enumerate(pattern):
        ok &= b[pos + i] == ch
    return ok


def _scan_block(b: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, ...]:
    """Vectorised field extraction for well-formed Kaggle records; ``ok`` marks those it could read."""
    ok = _matches(b, starts + 4, b"\x10_id\x00") & _matches(b, starts + 13, b"\x04imgs\x00") & (ends - starts >= 24)
    s = np.where(ok, starts, 0)
    pid = _gather_i32(b, s + 9)
    arr = s + 19
    arr_end = np.where(ok, arr + _gather_i32(b, arr), 0)
    tail = np.where(ok, ends - arr_end, 0)
    ok &= (tail == 1) | (tail == 18)
    has_cat = ok & (tail == 18)
    cpos = np.where(has_cat, arr_end, 0)
    has_cat &= _matches(b, cpos, b"\x10category_id\x00")
    ok &= (tail == 1) | has_cat
    cat = np.where(has_cat, _gather_i32(b, cpos + 13), -1)
    count = np.zeros(len(starts), np.int64)
    p = arr + 4
    for j in range(10):  # up to 10 pictures per record on the fast path
        active = ok & (p < arr_end - 1)
        if not active.any():
            break
        q = np.where(active, p, 0)
        good = _matches(b, q, b"\x03" + str(j).encode() + b"\x00") & _matches(b, q + 7, b"\x05picture\x00")
        ok &= ~active | good
        active &= good
        p = np.where(active, p + 3 + _gather_i32(b, q + 3), p)
        count += active
    ok &= p == arr_end - 1
    return ok, pid, cat, count


def scan_offsets(path: str | os.PathLike, progress: bool = True, block_bytes: int = 64 << 20) -> np.ndarray:
    """One pass over the file: a structured array of :data:`TABLE_DTYPE`, one row per product.

    A tight loop follows the length prefixes; the fields of each block of records are then read with
    numpy gathers. Any record that is not in the usual layout goes through the checked BSON decoder.
    """
    path = str(path)
    size = _open_checked(path)
    parts: list[np.ndarray] = []
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"index {Path(path).name}", disable=not progress)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        b = np.frombuffer(mm, np.uint8)
        off, record = 0, 0
        try:
            while off < size:
                offs, end = _walk(mm, off, off + block_bytes, size)
                if not offs:
                    if off + 4 > size:
                        raise BsonFormatError(path, "truncated record at end of file", off, record)
                    n = _INT32.unpack_from(mm, off)[0]
                    _check_length(path, n, off, record, size, mm[off:off + 20])
                starts = np.asarray(offs, np.int64)
                ends = np.append(starts[1:], end)
                ok, pid, cat, count = _scan_block(b, starts, ends)
                for i in np.flatnonzero(~ok):
                    st, n = int(starts[i]), int(ends[i] - starts[i])
                    pid[i], cat[i], count[i] = _scan_slow(path, mm, st, n, record + int(i))
                part = np.empty(len(starts), TABLE_DTYPE)
                part["product_id"], part["category_id"], part["offset"] = pid, cat, starts
                part["length"], part["n_images"] = ends - starts, count
                parts.append(part)
                record += len(starts)
                bar.update(end - off)
                if hasattr(mmap, "MADV_DONTNEED"):  # drop scanned pages from this process: flat RSS at any size
                    lo = off - off % mmap.PAGESIZE
                    mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)
                off = end
        finally:
            del b
    bar.close()
    return np.concatenate(parts) if parts else np.empty(0, TABLE_DTYPE)


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _writable(folder: Path) -> bool:
    """True where a cache file may go: the folder is writable and not marked read-only by its mode bits."""
    try:
        return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)
    except OSError:
        return False


def default_cache_dir(data_path: str | os.PathLike) -> Path:
    """Where the offset table of ``data_path`` is cached: beside the data, or ``~/.cache/cdiscount`` for a
    read-only data folder."""
    folder = Path(data_path).parent
    return folder if _writable(folder) else Path.home() / ".cache" / "cdiscount"


def load_offsets(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> np.ndarray:
    """The offset table of ``path``, cached while its size and mtime hold.

    The cache lies in ``cache_dir``, by default :func:`default_cache_dir`.
    """
    p = Path(path)
    _open_checked(p)
    folder = Path(cache_dir) if cache_dir else default_cache_dir(p)
    stem = p.name if folder == p.parent else f"{p.name}.{hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:10]}"
    cache = folder / f"{stem}.offsets.npy"
    meta = folder / f"{stem}.offsets.json"
    fp = _fingerprint(p)
    if cache.exists() and meta.exists():
        try:
            if json.loads(meta.read_text()) == fp:
                return np.load(cache)
        except (ValueError, OSError):
            log.warning("ignoring unreadable offset cache %s", cache)
    table = scan_offsets(p, progress=progress)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, lambda f: np.save(f, table))
        write_json(meta, fp)
    except OSError as e:
        log.warning("could not cache offsets for %s (%s); pass a writable cache_dir", p, e)
    return table


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Name, size and mtime of a data file, saved in manifests to refuse mismatched data."""
    p = Path(path)
    return {"name": p.name, **_fingerprint(p)}


class RecordReader:
    """Random access to products by row of an offset table; safe across DataLoader workers.

    The file handle is opened lazily per process (``os.pread``), so the reader pickles cheaply.
    """

    def __init__(self, path: str | os.PathLike, table: np.ndarray | None = None) -> None:
        self.path = str(path)
        self.table = load_offsets(path) if table is None else table
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.table)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def read_at(self, offset: int, length: int, record: int = -1) -> Product:
        """The product stored at ``offset`` (``length`` bytes)."""
        buf = os.pread(self._handle(), length, offset)
        if len(buf) != length:
            raise BsonFormatError(self.path, "file shorter than its offset table (changed since indexing?)",
                                  offset, record)
        return decode_record(self.path, buf, offset, record)

    def read(self, row: int) -> Product:
        """The product at row ``row`` of the table."""
        r = self.table[row]
        return self.read_at(int(r["offset"]), int(r["length"]), row)

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass
