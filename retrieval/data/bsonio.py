"""Reading Cdiscount BSON files: the record format, its errors, and streaming in file order.

A file is a plain concatenation of BSON documents ``{_id, imgs: [{picture}], category_id}``.
Structural damage (bad lengths, missing fields) raises :class:`BsonFormatError` naming the file,
record number, byte offset and product id where known. Image-level damage is not handled here:
pictures are returned as raw bytes and decoded (or skipped and counted) by :mod:`retrieval.data.images`.
"""
from __future__ import annotations

import logging
import mmap
import os
import struct
from pathlib import Path
from typing import Iterator, NamedTuple

import bson
from tqdm import tqdm

from ..errors import UserError

log = logging.getLogger(__name__)

_INT32 = struct.Struct("<i")
_INT64 = struct.Struct("<q")
_MIN_DOC = 5
_MAX_DOC = 16 * 1024 * 1024 * 4  # far above any real product (4 JPEGs of ~10 KB)
CHUNK_BYTES = 16 * 1024 * 1024


class BsonFormatError(UserError):
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


def decode_record(path: str, buf: bytes, offset: int, record: int) -> Product:
    """One document's bytes -> :class:`Product`; damage raises :class:`BsonFormatError` with its position."""
    try:
        doc = bson.decode(buf)
    except Exception as e:
        raise BsonFormatError(path, f"invalid BSON document ({e})", offset, record, _partial_id(buf)) from e
    return _to_product(path, doc, offset, record)


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
    unpack = _INT32.unpack
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
            yield decode_record(path, head + f.read(n - 4), offset, record)
            offset += n
            record += 1
            if offset - shown > CHUNK_BYTES:
                bar.update(offset - shown)
                shown = offset
    bar.update(offset - shown)
    bar.close()


def _scan_slow(path: str, mm: mmap.mmap, off: int, n: int, record: int) -> tuple[int, int, int]:
    p = decode_record(path, mm[off:off + n], off, record)
    return p.product_id, -1 if p.category_id is None else p.category_id, len(p.images)
