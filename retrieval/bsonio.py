"""Reading Cdiscount BSON files: streaming, offset tables and random access.

A file is a plain concatenation of BSON documents ``{_id, imgs: [{picture}], category_id}``.
Structural damage (bad lengths, missing fields) raises :class:`BsonFormatError` naming the file,
record number, byte offset and product id where known. Image-level damage is not handled here:
pictures are returned as raw bytes and decoded (or skipped and counted) by :mod:`retrieval.images`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
from pathlib import Path
from typing import Iterator, NamedTuple

import bson
import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

_INT32 = struct.Struct("<i")
_INT64 = struct.Struct("<q")
_MIN_DOC = 5
_MAX_DOC = 16 * 1024 * 1024 * 4  # far above any real product (4 JPEGs of ~10 KB)
CHUNK_BYTES = 16 * 1024 * 1024

#: dtype of one row of an offset table.
TABLE_DTYPE = np.dtype(
    [("product_id", "<i8"), ("category_id", "<i8"), ("offset", "<i8"), ("length", "<i4"), ("n_images", "<i2")]
)


class BsonFormatError(ValueError):
    """A BSON file that cannot be read; the message names file, record, offset and product id."""

    def __init__(self, path: str | os.PathLike, reason: str, offset: int | None = None,
                 record: int | None = None, product_id: int | None = None) -> None:
        where = [str(path)]
        if record is not None:
            where.append(f"record {record}")
        if offset is not None:
            where.append(f"byte offset {offset}")
        if product_id is not None:
            where.append(f"product _id {product_id}")
        super().__init__(f"{', '.join(where)}: {reason}")
        self.path, self.offset, self.record, self.product_id = str(path), offset, record, product_id


class Product(NamedTuple):
    """One product: its id, its category (None in test files), its JPEG bytes and where it lies."""

    product_id: int
    category_id: int | None
    images: list[bytes]
    offset: int


def _partial_id(buf: bytes | memoryview) -> int | None:
    """Best-effort ``_id`` from the first bytes of a (possibly damaged) document."""
    b = bytes(buf[:20])
    if b[4:9] == b"\x10_id\x00" and len(b) >= 13:
        return _INT32.unpack_from(b, 9)[0]
    if b[4:9] == b"\x12_id\x00" and len(b) >= 17:
        return _INT64.unpack_from(b, 9)[0]
    return None


def _to_product(path: str, doc: dict, offset: int, record: int) -> Product:
    try:  # fast path: a well-formed Kaggle document
        pid = doc["_id"]
        pictures = [img["picture"] for img in doc["imgs"]]
        cat = doc.get("category_id")
        if type(pid) is int and (cat is None or type(cat) is int) and all(type(x) is bytes for x in pictures):
            return Product(pid, cat, pictures, offset)
    except (KeyError, TypeError):
        pass
    pid = doc.get("_id")
    if not isinstance(pid, int):
        raise BsonFormatError(path, "document has no integer '_id'", offset, record)
    imgs = doc.get("imgs")
    if imgs is None:
        raise BsonFormatError(path, "document has no 'imgs' field", offset, record, pid)
    if not isinstance(imgs, list):
        raise BsonFormatError(path, f"'imgs' is a {type(imgs).__name__}, not a list", offset, record, pid)
    pictures = []
    for i, img in enumerate(imgs):
        pic = img.get("picture") if isinstance(img, dict) else None
        if not isinstance(pic, bytes):
            raise BsonFormatError(path, f"imgs[{i}] has no binary 'picture'", offset, record, pid)
        pictures.append(pic)
    cat = doc.get("category_id")
    if cat is not None and not isinstance(cat, int):
        raise BsonFormatError(path, f"'category_id' is a {type(cat).__name__}, not an int", offset, record, pid)
    return Product(pid, cat, pictures, offset)


def _check_length(path: str, n: int, offset: int, record: int, size: int, head: bytes | memoryview) -> None:
    if n < _MIN_DOC or n > _MAX_DOC:
        what = "not a BSON file" if record == 0 else "corrupt record"
        raise BsonFormatError(path, f"{what}: declared document length {n} is impossible", offset, record)
    if offset + n > size:
        raise BsonFormatError(
            path, f"truncated record: declared length {n} runs past the end of the file ({size} bytes)",
            offset, record, _partial_id(head))


def _open_checked(path: str | os.PathLike) -> int:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such BSON file")
    size = p.stat().st_size
    if size == 0:
        raise BsonFormatError(p, "file is empty (0 bytes), expected BSON documents", 0)
    return size


def iter_products(path: str | os.PathLike, progress: bool = False) -> Iterator[Product]:
    """Stream products in file order with constant memory (one record in memory at a time)."""
    path = str(path)
    size = _open_checked(path)
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=Path(path).name, disable=not progress)
    decode, unpack = bson.decode, _INT32.unpack
    offset, record, shown = 0, 0, 0
    with open(path, "rb", buffering=1 << 20) as f:
        while True:
            head = f.read(4)
            if not head:
                break
            if len(head) < 4:
                raise BsonFormatError(path, "truncated record at end of file", offset, record)
            n = unpack(head)[0]
            if n < _MIN_DOC or n > _MAX_DOC or offset + n > size:
                _check_length(path, n, offset, record, size, head + f.read(16))
            data = head + f.read(n - 4)
            try:
                doc = decode(data)
            except Exception as e:
                raise BsonFormatError(path, f"invalid BSON document ({e})", offset, record, _partial_id(data)) from e
            yield _to_product(path, doc, offset, record)
            offset += n
            record += 1
            if offset - shown > CHUNK_BYTES:
                bar.update(offset - shown)
                shown = offset
    bar.update(offset - shown)
    bar.close()


def _scan_slow(path: str, mm: mmap.mmap, off: int, n: int, record: int) -> tuple[int, int, int]:
    try:
        doc = bson.decode(mm[off:off + n])
    except Exception as e:
        raise BsonFormatError(path, f"invalid BSON document ({e})", off, record, _partial_id(mm[off:off + 20])) from e
    p = _to_product(path, doc, off, record)
    return p.product_id, -1 if p.category_id is None else p.category_id, len(p.images)


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
                off = end
        finally:
            del b
    bar.close()
    return np.concatenate(parts) if parts else np.empty(0, TABLE_DTYPE)


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def load_offsets(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> np.ndarray:
    """The offset table of ``path``, cached while its size and mtime hold.

    The cache lies beside the data, or in ``cache_dir`` (default: ``$CDISCOUNT_CACHE_DIR`` if set).
    """
    p = Path(path)
    _open_checked(p)
    cache_dir = cache_dir or os.environ.get("CDISCOUNT_CACHE_DIR")
    folder = Path(cache_dir) if cache_dir else p.parent
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
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, table)
        os.replace(tmp, cache)
        meta.write_text(json.dumps(fp))
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
            raise BsonFormatError(self.path, "file shorter than its offset table (changed since indexing?)", offset, record)
        try:
            doc = bson.decode(buf)
        except Exception as e:
            raise BsonFormatError(self.path, f"invalid BSON document ({e})", offset, record, _partial_id(buf)) from e
        return _to_product(self.path, doc, offset, record)

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
