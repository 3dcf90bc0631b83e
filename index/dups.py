"""Exact-duplicate lookup: 64-bit hashes of indexed pictures' bytes -> index positions (numpy only).

The real train.bson holds 12.37M pictures but only 7.77M distinct ones, and test products often reuse a
training picture byte for byte; such a match names the category almost surely (the 2017 winners' MD5 trick).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .vote import class_shares


class DuplicateTable:
    """Sorted ``hashes [M]`` (int64) of indexed pictures and the index ``positions [M]`` of their products."""

    def __init__(self, hashes: np.ndarray, positions: np.ndarray, presorted: bool = False) -> None:
        hashes, positions = np.asarray(hashes, np.int64), np.asarray(positions, np.int64)
        if hashes.shape != positions.shape or hashes.ndim != 1:
            raise ValueError(f"hashes {hashes.shape} and positions {positions.shape} must be equal 1-d shapes")
        if presorted:  # a table saved by this class: already in hash order (checked, never trusted blindly)
            if len(hashes) > 1 and not (hashes[1:] >= hashes[:-1]).all():
                raise ValueError("duplicate table hashes are not sorted")
            self.hashes, self.positions = hashes, positions
            return
        order = np.argsort(hashes, kind="stable")
        self.hashes, self.positions = hashes[order], positions[order]

    def __len__(self) -> int:
        return len(self.hashes)

    def merged(self, hashes: np.ndarray, positions: np.ndarray) -> "DuplicateTable":
        """This table with more pictures added."""
        return DuplicateTable(np.concatenate([self.hashes, hashes]), np.concatenate([self.positions, positions]))

    def matches(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All exact matches of ``query [N]`` hashes: ``(query index [R], index position [R])``."""
        query = np.asarray(query, np.int64)
        lo = np.searchsorted(self.hashes, query, "left")
        hi = np.searchsorted(self.hashes, query, "right")
        n = hi - lo
        qi = np.repeat(np.arange(len(query)), n)
        starts = np.repeat(lo - np.concatenate([[0], np.cumsum(n)[:-1]]), n)
        return qi, self.positions[starts + np.arange(n.sum())]

    def product_labels(self, query: np.ndarray, owner: np.ndarray, n_products: int, labels: np.ndarray,
                       cap: int = 16, exclude: int | None = None) -> np.ndarray:
        """Class labels ``[P, cap]`` (-1 padded) of the indexed pictures that exactly match a product's pictures
        (``query [N]`` hashes, ``owner [N]`` product of each); unlabelled matches, and those of index position
        ``exclude`` (a query product's own pictures), are left out."""
        qi, pos = self.matches(query)
        if exclude is not None:
            qi, pos = qi[pos != exclude], pos[pos != exclude]
        prod, lab = np.asarray(owner, np.int64)[qi], np.asarray(labels)[pos]
        keep = lab >= 0
        prod, lab = prod[keep], lab[keep]
        out = np.full((n_products, cap), -1, np.int32)
        if len(prod):
            order = np.argsort(prod, kind="stable")
            prod, lab = prod[order], lab[order]
            first = np.searchsorted(prod, prod, "left")
            slot = np.arange(len(prod)) - first
            ok = slot < cap
            out[prod[ok], slot[ok]] = lab[ok]
        return out

    def save(self, path: str | Path) -> None:
        """Write the table to the ``.npz`` file ``path`` (its owner names it)."""
        np.savez(Path(path), hashes=self.hashes, positions=self.positions)

    @classmethod
    def load(cls, path: str | Path) -> "DuplicateTable":
        """The table in the ``.npz`` file ``path``, or an empty one where there is none."""
        path = Path(path)
        if not path.exists():
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))
        with np.load(path) as z:
            return cls(z["hashes"], z["positions"], presorted=True)


class JoinedDuplicates(DuplicateTable):
    """Several tables searched as one, positions of table ``i`` shifted by ``offsets[i]``: nothing is copied or
    sorted again (an index of one large segment and a few small additions). ``hashes`` and ``positions`` are
    the tables one after the other (each sorted, not the whole)."""

    def __init__(self, tables: list[DuplicateTable], offsets: list[int]) -> None:
        if len(tables) != len(offsets):
            raise ValueError("one offset per table")
        self.tables, self.offsets = list(tables), [int(o) for o in offsets]

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables)

    @property
    def hashes(self) -> np.ndarray:
        return np.concatenate([t.hashes for t in self.tables])

    @property
    def positions(self) -> np.ndarray:
        return np.concatenate([t.positions + o for t, o in zip(self.tables, self.offsets, strict=True)])

    def save(self, path: str | Path) -> None:
        """Saved as one table, sorted (as :meth:`DuplicateTable.load` expects)."""
        DuplicateTable(self.hashes, self.positions).save(path)

    def matches(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`DuplicateTable.matches`: each query's matches in table order (as one merged table)."""
        got = [(qi, pos + o) for (qi, pos), o in zip((t.matches(query) for t in self.tables), self.offsets,
                                                    strict=True)]
        qi, pos = np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
        order = np.argsort(qi, kind="stable")
        return qi[order], pos[order]


def duplicate_share(classes: np.ndarray, dup_labels: np.ndarray) -> np.ndarray:
    """Share ``[P, W]`` of each candidate class among a product's exact-match labels ``dup_labels [P, D]``
    (-1 = none); all zero for a product without a match."""
    return class_shares(classes, dup_labels, np.ones(dup_labels.shape, np.float32))
