"""The category table: Kaggle category ids <-> contiguous class indices, with the 3-level hierarchy."""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..durable import write_json
from ..errors import UserError

CSV_HEADER = ["category_id", "category_level1", "category_level2", "category_level3"]


@dataclass(frozen=True)
class CategoryTable:
    """Categories sorted by id. ``level1[i]``/``level2[i]`` are the class indices of category i's parents."""

    ids: tuple[int, ...]
    names: tuple[tuple[str, str, str], ...]
    level1_names: tuple[str, ...]
    level2_names: tuple[str, ...]
    level1: tuple[int, ...]
    level2: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_level1(self) -> int:
        return len(self.level1_names)

    @property
    def n_level2(self) -> int:
        return len(self.level2_names)

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[int, str, str, str]]) -> "CategoryTable":
        rows = sorted(rows)
        ids = [r[0] for r in rows]
        if len(set(ids)) != len(ids):
            raise UserError("category table has duplicate category ids")
        l1 = sorted({r[1] for r in rows})
        l2 = sorted({r[2] for r in rows})  # by name: a few level-2 names sit under two level-1 parents
        l1i = {n: i for i, n in enumerate(l1)}
        l2i = {n: i for i, n in enumerate(l2)}
        return cls(tuple(ids), tuple((r[1], r[2], r[3]) for r in rows), tuple(l1), tuple(l2),
                   tuple(l1i[r[1]] for r in rows), tuple(l2i[r[2]] for r in rows))

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> "CategoryTable":
        """Parse Kaggle's ``category_names.csv`` (quoted fields and trailing spaces kept verbatim; a UTF-8
        byte-order mark is accepted). Bad encoding, fields or duplicate ids raise naming the file and line."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such category file")
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise UserError(f"{p}, line {line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") \
                from None
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != CSV_HEADER:
            raise UserError(f"{p}: expected header {','.join(CSV_HEADER)}, got {header}")
        rows, seen = [], {}
        for r in reader:
            line = reader.line_num
            if len(r) != 4:
                raise UserError(f"{p}, line {line}: expected 4 fields, got {len(r)}")
            try:
                cid = int(r[0])
            except ValueError:
                raise UserError(f"{p}, line {line}: category_id {r[0]!r} is not an integer") from None
            if cid in seen:
                raise UserError(f"{p}, line {line}: category_id {cid} repeats line {seen[cid]}")
            seen[cid] = line
            rows.append((cid, r[1], r[2], r[3]))
        if not rows:
            raise UserError(f"{p}: no categories")
        return cls.from_rows(rows)

    @classmethod
    def from_ids(cls, ids: Iterable[int]) -> "CategoryTable":
        """A flat table (no names, one level-1/level-2 group) from the category ids seen in training data."""
        uniq = sorted({int(i) for i in ids if int(i) >= 0})
        if not uniq:
            raise UserError("no category ids to build a category table from")
        return cls.from_rows([(i, "", "", str(i)) for i in uniq])

    def to_csv(self, path: str | os.PathLike) -> None:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(CSV_HEADER)
            for cid, n in zip(self.ids, self.names, strict=True):
                w.writerow([cid, *n])

    def to_dict(self) -> dict:
        return {"ids": list(self.ids), "names": [list(n) for n in self.names]}

    @classmethod
    def from_dict(cls, d: dict) -> "CategoryTable":
        return cls.from_rows([(int(i), *n) for i, n in zip(d["ids"], d["names"], strict=True)])

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CategoryTable":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def index_array(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted ids (int64) for ``np.searchsorted`` lookups, and the identity class order."""
        return np.asarray(self.ids, dtype=np.int64), np.arange(len(self.ids))

    def encode(self, category_ids: Sequence[int] | np.ndarray, product_ids: Sequence[int] | np.ndarray | None = None,
               source: str = "") -> np.ndarray:
        """Class indices of ``category_ids``; an unknown id raises naming the product and category."""
        cats = np.asarray(category_ids, dtype=np.int64)
        table = np.asarray(self.ids, dtype=np.int64)
        idx = np.searchsorted(table, cats).clip(0, len(table) - 1)
        bad = np.flatnonzero(table[idx] != cats)
        if bad.size:
            i = int(bad[0])
            who = f"product _id {int(product_ids[i])}" if product_ids is not None else f"row {i}"
            where = f"{source}: " if source else ""
            raise UserError(f"{where}{who} has category_id {int(cats[i])}, which is not in the "
                             f"category table ({bad.size} such rows in all)")
        return idx

    def decode(self, classes: np.ndarray) -> np.ndarray:
        """Category ids (int64) of class indices."""
        return np.asarray(self.ids, dtype=np.int64)[np.asarray(classes)]

    def parents(self) -> tuple[np.ndarray, np.ndarray]:
        """Level-1 and level-2 class index of every category, as int64 arrays ``[C]``."""
        return np.asarray(self.level1, dtype=np.int64), np.asarray(self.level2, dtype=np.int64)
