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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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


@dataclass(frozen=True, slots=True)
class Product:
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
    return Product(pid, int(cat) if cat is not None else None, pictures, offset)


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
    """Stream products in file order with constant memory (reads 16 MB chunks).

    Each chunk of complete documents is decoded by pymongo's C decoder in one call.
    """
    path = str(path)
    size = _open_checked(path)
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=Path(path).name, disable=not progress)
    record, base = 0, 0
    carry = b""
    with open(path, "rb", buffering=0) as f:
        while True:
            chunk = f.read(CHUNK_BYTES)
            buf = carry + chunk if carry else chunk
            if not buf:
                break
            view = memoryview(buf)
            pos, starts, pending = 0, [], None
            try:
                while pos + 4 <= len(buf):
                    n = _INT32.unpack_from(buf, pos)[0]
                    _check_length(path, n, base + pos, record + len(starts), size, view[pos:pos + 20])
                    if pos + n > len(buf):
                        break
                    starts.append(pos)
                    pos += n
                if not chunk and pos < len(buf):
                    raise BsonFormatError(path, "truncated record at end of file", base + pos,
                                          record + len(starts), _partial_id(view[pos:pos + 20]))
            except BsonFormatError as e:
                pending = e  # yield the good records before it first
            try:
                docs = bson.decode_all(view[:pos])
            except Exception:  # locate the bad document
                docs = []
                for i, s in enumerate(starts):
                    n = _INT32.unpack_from(buf, s)[0]
                    try:
                        docs.append(bson.decode(view[s:s + n]))
                    except Exception as e:
                        raise BsonFormatError(path, f"invalid BSON document ({e})", base + s, record + i,
                                              _partial_id(view[s:s + 20])) from e
            for i, (s, doc) in enumerate(zip(starts, docs)):
                yield _to_product(path, doc, base + s, record + i)
            if pending is not None:
                raise pending
            record += len(starts)
            bar.update(pos)
            view.release()
            carry = buf[pos:]
            base += pos
            if not chunk:
                break
    bar.close()


def _scan_doc(mm: mmap.mmap | bytes, off: int, n: int) -> tuple[int, int, int] | None:
    """Fast path for the Kaggle layout: (product_id, category_id or -1, n_images), else None."""
    if mm[off + 4:off + 9] != b"\x10_id\x00" or mm[off + 13:off + 19] != b"\x04imgs\x00":
        return None
    pid = _INT32.unpack_from(mm, off + 9)[0]
    arr = off + 19
    alen = _INT32.unpack_from(mm, arr)[0]
    end = arr + alen
    p, count = arr + 4, 0
    while p < end - 1:
        if mm[p] != 3:
            return None
        p += 1
        while mm[p]:
            p += 1
        p += 1
        if mm[p + 4:p + 13] != b"\x05picture\x00":
            return None
        p += _INT32.unpack_from(mm, p)[0]
        count += 1
    tail = off + n - end
    if tail == 1:
        return pid, -1, count
    if tail == 18 and mm[end:end + 13] == b"\x10category_id":
        return pid, _INT32.unpack_from(mm, end + 14)[0], count
    return None


def _scan_slow(path: str, mm: mmap.mmap, off: int, n: int, record: int) -> tuple[int, int, int]:
    try:
        doc = bson.decode(mm[off:off + n])
    except Exception as e:
        raise BsonFormatError(path, f"invalid BSON document ({e})", off, record, _partial_id(mm[off:off + 20])) from e
    p = _to_product(path, doc, off, record)
    return p.product_id, -1 if p.category_id is None else p.category_id, len(p.images)


def scan_offsets(path: str | os.PathLike, progress: bool = True) -> np.ndarray:
    """One pass over the file: a structured array of :data:`TABLE_DTYPE`, one row per product."""
    path = str(path)
    size = _open_checked(path)
    rows: list[tuple] = []
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"index {Path(path).name}", disable=not progress)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        off, record, last = 0, 0, 0
        unpack = _INT32.unpack_from
        while off < size:
            if off + 4 > size:
                raise BsonFormatError(path, "truncated record at end of file", off, record)
            n = unpack(mm, off)[0]
            _check_length(path, n, off, record, size, mm[off:off + 20])
            got = _scan_doc(mm, off, n) if n >= 20 else None
            if got is None:
                got = _scan_slow(path, mm, off, n, record)
            rows.append((got[0], got[1], off, n, got[2]))
            off += n
            record += 1
            if off - last > CHUNK_BYTES:
                bar.update(off - last)
                last = off
        bar.update(off - last)
    bar.close()
    return np.array(rows, dtype=TABLE_DTYPE)


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
