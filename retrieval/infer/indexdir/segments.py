"""Segments: the immutable pieces a generation lists. ``IDX/segments/<id>/`` holds

- ``faiss/``: the segment's own :class:`~index.VectorIndex` (``index.faiss``, ``labels.npy``, ``search.json``);
- ``<array>.npy`` for each of :data:`ARRAYS` (``[n]``, local position order), ``id_sorted.npy`` /
  ``id_order.npy`` (the id map: sorted product ids ``[n]`` and their local positions ``[n]``);
- ``duplicates.npz``: picture hashes and their owners' local positions;
- ``emb/<k>.npy``: the embeddings ``[n_k, D]`` it owns, part by part (hard links of work parts where the file
  system allows, so a build's parts are not copied), ``class_sums.npy`` (their sum per class ``[C, D]``: the
  class prototypes' numerators) and ``segment.json`` (count, parts).

A segment is written in a hidden folder, fsynced and renamed into place; nothing in it changes afterwards."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index import DuplicateTable, VectorIndex, class_sums, mapped_rows

from ...errors import UserError
from .folder import IndexFolder, write_file

ARRAYS = ("product_ids", "category_ids", "offsets", "lengths", "sources")


def _emb_file(path: Path, k: int) -> Path:
    return path / "emb" / f"{k:05d}.npy"


def _place(src: Path, dst: Path) -> None:
    """Hard-link ``src`` (an immutable file) to ``dst``; copy where links are refused."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_segment(folder: IndexFolder, vectors: VectorIndex, arrays: dict[str, np.ndarray],
                  duplicates: DuplicateTable, parts: list[tuple[int | str, int]],
                  embeddings: list[Path | np.ndarray]) -> str:
    """Write and seal one segment; returns its id. ``arrays`` are ``[n]`` in local order, ``duplicates`` use
    local positions, ``embeddings[k]`` (a ``.npy`` file to link, or an array ``[n_k, D]``) holds part ``k``."""
    n = len(vectors)
    if any(len(arrays[k]) != n for k in ARRAYS) or sum(c for _, c in parts) != n or len(embeddings) != len(parts):
        raise ValueError(f"a segment of {n} vectors needs {n} rows in every array, part and embedding")
    sid, tmp = folder.new_segment_dir()
    try:
        write_file(tmp / "faiss", vectors.save)
        for k in ARRAYS:
            write_file(tmp / f"{k}.npy", lambda p, k=k: np.save(p, arrays[k]))
        ids = np.asarray(arrays["product_ids"], np.int64)
        order = np.argsort(ids, kind="stable")
        write_file(tmp / "id_sorted.npy", lambda p: np.save(p, ids[order]))
        write_file(tmp / "id_order.npy", lambda p: np.save(p, order.astype(np.int64)))
        write_file(tmp / "duplicates.npz", duplicates.save)
        (tmp / "emb").mkdir()
        for k, emb in enumerate(embeddings):
            if isinstance(emb, Path):
                write_file(_emb_file(tmp, k), lambda p, emb=emb: _place(emb, p))
            else:
                write_file(_emb_file(tmp, k), lambda p, emb=emb: np.save(p, np.asarray(emb, np.float32)))
        sums = class_sums((np.load(_emb_file(tmp, k), mmap_mode="r") for k in range(len(embeddings))), vectors.labels)
        write_file(tmp / "class_sums.npy", lambda p: np.save(p, sums))
        meta = {"count": n, "parts": [list(p) for p in parts], "factory": vectors.factory}
        write_file(tmp / "segment.json", lambda p: p.write_text(json.dumps(meta)))
        folder.seal(tmp, sid)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sid


@dataclass
class Segment:
    """One opened segment (shared by every generation that lists it: it never changes)."""

    sid: str
    path: Path
    vectors: VectorIndex
    arrays: dict[str, np.ndarray]
    id_sorted: np.ndarray  # [n] product ids, ascending
    id_order: np.ndarray  # [n] local position of each sorted id
    duplicates: DuplicateTable  # local positions
    parts: list[tuple[int | str, int]]
    _maps: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def part_starts(self) -> np.ndarray:
        return np.cumsum([c for _, c in self.parts])

    def class_sums(self) -> np.ndarray:
        """Sum ``[C, D]`` of the segment's embeddings per class (its labels >= 0), as written with it; computed
        from the stored embeddings for a segment written before it kept them."""
        f = self.path / "class_sums.npy"
        if f.exists():
            return np.load(f)
        return class_sums((self.embeddings(k) for k in range(len(self.parts))), self.vectors.labels)

    def emb_files(self) -> list[Path]:
        return [_emb_file(self.path, k) for k in range(len(self.parts))]

    def embeddings(self, k: int) -> np.ndarray:
        """Part ``k``'s embeddings ``[n_k, D]``, memory-mapped once."""
        if k not in self._maps:
            self._maps[k] = np.load(_emb_file(self.path, k), mmap_mode="r")
        return self._maps[k]

    def vector(self, local: int) -> np.ndarray:
        """The stored embedding ``[D]`` at local position ``local``."""
        starts = self.part_starts
        k = int(np.searchsorted(starts, local, side="right"))
        return np.array(self.embeddings(k)[local - (0 if k == 0 else int(starts[k - 1]))])

    def vectors_at(self, local: np.ndarray) -> np.ndarray:
        """The stored embeddings ``[U, D]`` at sorted local positions ``local [U]`` (the exact vectors that
        re-rank a coded index's shortlist)."""
        return mapped_rows([self.embeddings(k) for k in range(len(self.parts))], local)

    def find(self, product_id: int) -> int | None:
        """Local position of ``product_id`` (binary search of the id map), or None."""
        i = int(np.searchsorted(self.id_sorted, product_id))
        return int(self.id_order[i]) if i < len(self.id_sorted) and self.id_sorted[i] == product_id else None


def load_segment(folder: IndexFolder, sid: str, mmap: bool = False) -> Segment:
    """Open segment ``sid`` of ``folder``, refusing one whose files are missing or disagree."""
    path = folder.segment(sid)
    if not (path / "segment.json").exists():
        raise UserError(f"{folder.path}: segment {sid} listed by the live generation is missing; rebuild the index")
    meta = json.loads((path / "segment.json").read_text())
    vi = VectorIndex.load(path / "faiss", mmap=mmap)
    mode = "r" if mmap else None  # mapped: pages are read when touched, and stay page cache the kernel can drop
    arrays = {k: np.load(path / f"{k}.npy", mmap_mode=mode) for k in ARRAYS}
    if len(vi) != meta["count"] or any(len(a) != len(vi) for a in arrays.values()):
        raise UserError(f"{folder.path}: segment {sid}'s arrays disagree with its index ({len(vi)}); rebuild the "
                        "index")
    seg = Segment(sid, path, vi, arrays, np.load(path / "id_sorted.npy", mmap_mode=mode),
                  np.load(path / "id_order.npy", mmap_mode=mode),
                  DuplicateTable.load(path / "duplicates.npz"), [tuple(p) for p in meta["parts"]])
    vi.refine = seg.vectors_at  # a coded index (SQ8, PQ) re-ranks its shortlists with the stored embeddings
    return seg


def known_ids(folder: IndexFolder, sids: list[str], ids: np.ndarray) -> np.ndarray:
    """Which of ``ids [M]`` are in any of the segments ``sids``: ``[M]`` bool, reading only the id maps
    (memory-mapped: a few pages per id, not the catalogue)."""
    ids = np.asarray(ids, np.int64)
    known = np.zeros(len(ids), bool)
    for sid in sids:
        srt = np.load(folder.segment(sid) / "id_sorted.npy", mmap_mode="r")
        if len(srt) == 0 or len(ids) == 0:
            continue
        i = np.minimum(np.searchsorted(srt, ids), len(srt) - 1)
        known |= np.asarray(srt[i]) == ids
    return known
