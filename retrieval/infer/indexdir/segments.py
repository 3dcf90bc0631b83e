"""Segments: the immutable pieces a generation lists. ``IDX/segments/<id>/`` holds

- ``faiss/``: the segment's own :class:`~index.VectorIndex` (``index.faiss``, ``labels.npy``, ``search.json``);
- ``<array>.npy`` for each of :data:`ARRAYS` (``[n]``, local position order), ``id_sorted.npy`` /
  ``id_order.npy`` (the id map: sorted product ids ``[n]`` and their local positions ``[n]``);
- ``duplicates.npz``: picture hashes and their owners' local positions;
- ``emb/<k>.npy``: the embeddings ``[n_k, D]`` it owns, part by part (hard links of work parts where the file
  system allows, so a build's parts are not copied), ``class_sums.npy`` (their sum per class ``[C, D]``: the
  class prototypes' numerators) and ``segment.json`` (count, parts, factory, the recall@10 it was tuned to, and
  the size and checksum of every other file: ``integrity``).

A segment is written in a hidden folder, fsynced and renamed into place; nothing in it changes afterwards. A
generation may list it with a deletion set and a relabel table (:class:`SegmentState`, files under ``state/``):
the opened :class:`Segment` is then that generation's view of it (removed rows never found, never voting, out of
their class's sum; relabelled rows voting for their new class)."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index import DuplicateTable, VectorIndex, class_sums, mapped_rows

from ...durable import write_file
from .folder import IndexFolder
from .integrity import Damaged, read_json, record_tree, verify, verify_small

ARRAYS = ("product_ids", "category_ids", "offsets", "lengths", "sources")
META = "segment.json"  # the segment's record (factory, recall, parts, its files' checksums); this module
ID_SORTED, ID_ORDER = "id_sorted.npy", "id_order.npy"  # owns every file name in a segment
DUPLICATES, CLASS_SUMS = "duplicates.npz", "class_sums.npy"
HELD_OUT = "held_out"  # a held-out segment's stored head inputs, one file per part (evaluate reads them)


@dataclass(frozen=True)
class SegmentData:
    """What one segment holds: ``labels [n]`` (classes, -1: none), per-product ``arrays`` (:data:`ARRAYS`, local
    order), the exact-duplicate table (local positions), its ``parts`` ``(name, products)`` and per part its
    embeddings (a ``.npy`` ``[n_k, D]`` to link, or an array); a held-out segment also keeps per part the stored
    head inputs of its products (``.npz`` files to link: ``head_in [N, V, D]``, ``img_owner``, ``img_hash``,
    ``n_images``, ``failed``)."""

    labels: np.ndarray
    arrays: dict[str, np.ndarray]
    duplicates: DuplicateTable
    parts: list[tuple[int | str, int]]
    embeddings: list[Path | np.ndarray]
    held_out: tuple[Path, ...] = ()


def _emb_file(path: Path, k: int) -> Path:
    return path / "emb" / f"{k:05d}.npy"


def held_out_file(path: Path, k: int) -> Path:
    """Part ``k``'s stored head inputs in a held-out segment at ``path``."""
    return path / HELD_OUT / f"{k:05d}.npz"


def _place(src: Path, dst: Path) -> None:
    """Hard-link ``src`` (an immutable file) to ``dst``; copy where links are refused."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def meta_file(sid: str) -> str:
    """``segment.json`` of segment ``sid``, relative to the index folder (as a manifest's checksums name it)."""
    return f"segments/{sid}/{META}"


def segment_meta(folder: IndexFolder, sid: str) -> dict:
    """Segment ``sid``'s ``segment.json`` (a one-line :class:`Damaged` error naming it when unreadable)."""
    return read_json(folder.segment(sid) / META)


def write_segment(folder: IndexFolder, vectors: VectorIndex, data: SegmentData, recall: float = 1.0) -> str:
    """Write and seal one segment of ``data`` searched by ``vectors``; returns its id."""
    n, arrays, parts, embeddings = len(vectors), data.arrays, data.parts, data.embeddings
    duplicates = data.duplicates
    if any(len(arrays[k]) != n for k in ARRAYS) or sum(c for _, c in parts) != n or len(embeddings) != len(parts) \
            or len(data.held_out) not in (0, len(parts)):
        raise ValueError(f"a segment of {n} vectors needs {n} rows in every array, part and embedding")
    sid, tmp = folder.new_segment_dir()
    try:
        write_file(tmp / "faiss", vectors.save)
        for k in ARRAYS:
            write_file(tmp / f"{k}.npy", lambda p, k=k: np.save(p, arrays[k]))
        ids = np.asarray(arrays["product_ids"], np.int64)
        order = np.argsort(ids, kind="stable")
        write_file(tmp / ID_SORTED, lambda p: np.save(p, ids[order]))
        write_file(tmp / ID_ORDER, lambda p: np.save(p, order.astype(np.int64)))
        write_file(tmp / DUPLICATES, duplicates.save)
        (tmp / "emb").mkdir()
        for k, emb in enumerate(embeddings):
            if isinstance(emb, Path):
                write_file(_emb_file(tmp, k), lambda p, emb=emb: _place(emb, p))
            else:
                write_file(_emb_file(tmp, k), lambda p, emb=emb: np.save(p, np.asarray(emb, np.float32)))
        if data.held_out:
            (tmp / HELD_OUT).mkdir()
            for k, f in enumerate(data.held_out):
                write_file(held_out_file(tmp, k), lambda p, f=f: _place(f, p))
        sums = class_sums((np.load(_emb_file(tmp, k), mmap_mode="r") for k in range(len(embeddings))), vectors.labels)
        write_file(tmp / CLASS_SUMS, lambda p: np.save(p, sums))
        meta = {"count": n, "parts": [list(p) for p in parts], "factory": vectors.factory,
                "tuned_recall_at_10": round(float(recall), 4), "files": record_tree(tmp, META)}
        write_file(tmp / META, lambda p: p.write_text(json.dumps(meta)))
        folder.seal(tmp, sid)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sid


@dataclass(frozen=True)
class SegmentState:
    """What a generation changed in one segment: ``removed [R]`` sorted local positions, and ``relabels [M, 3]``
    rows ``(local position, category id, class)`` sorted by position."""

    removed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    relabels: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))

    @property
    def empty(self) -> bool:
        return not len(self.removed) and not len(self.relabels)


@dataclass
class Segment:
    """One opened segment as a generation sees it: its immutable files (shared by every generation that lists
    it) and that generation's :class:`SegmentState` (``vectors`` and ``arrays`` then carry the new labels and
    leave the removed rows out of every search)."""

    sid: str
    path: Path
    vectors: VectorIndex
    arrays: dict[str, np.ndarray]
    id_sorted: np.ndarray  # [n] product ids, ascending
    id_order: np.ndarray  # [n] local position of each sorted id
    duplicates: DuplicateTable  # local positions
    parts: list[tuple[int | str, int]]
    meta: dict = field(default_factory=dict)
    state: SegmentState = field(default_factory=SegmentState)
    base: "Segment | None" = None  # the segment as sealed (None: this is it)
    _maps: dict = field(default_factory=dict)
    unmasked: "Segment | None" = None  # a held-out view: the segment as its generation sees it

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def live_count(self) -> int:
        return len(self) - len(self.state.removed)

    @property
    def part_starts(self) -> np.ndarray:
        return np.cumsum([c for _, c in self.parts])

    def with_state(self, state: SegmentState) -> "Segment":
        """This segment as a generation with ``state`` sees it (the sealed files shared, never copied)."""
        base = self.base or self
        if state.empty:
            return base
        labels = np.array(base.vectors.labels, np.int64)
        arrays = dict(base.arrays)
        if len(state.relabels):
            cats = np.array(base.arrays["category_ids"])
            at = state.relabels[:, 0]
            cats[at], labels[at] = state.relabels[:, 1], state.relabels[:, 2]
            arrays["category_ids"] = cats
        labels[state.removed] = -1
        return Segment(base.sid, base.path, base.vectors.view(labels, state.removed), arrays, base.id_sorted,
                       base.id_order, base.duplicates, base.parts, base.meta, state, base, base._maps)

    def held_out(self) -> "Segment":
        """This segment with every row left out (searched by no one; no class sum, size or vote)."""
        state = self.state if self.base is not None else SegmentState()
        masked = self.with_state(SegmentState(np.arange(len(self), dtype=np.int64), state.relabels))
        masked.unmasked = self
        return masked

    def class_sums(self) -> np.ndarray:
        """Sum ``[C, D]`` of the live embeddings per class (labels >= 0): the sums written with the segment, less
        removed rows, relabelled rows moved to their new class (only the changed rows are read)."""
        base = self.base or self
        f = base.path / CLASS_SUMS
        sums = np.load(f) if f.exists() else class_sums((base.embeddings(k) for k in range(len(base.parts))),
                                                        base.vectors.labels)
        if self.base is None:
            return sums
        if len(self.state.removed) == len(base):  # held out, or every row removed: exactly nothing
            return np.zeros_like(sums)
        changed = np.union1d(self.state.removed, self.state.relabels[:, 0])
        old, new = base.vectors.labels[changed], self.vectors.labels[changed]
        width = max(len(sums), int(new.max(initial=-1)) + 1)
        sums = np.pad(sums, ((0, width - len(sums)), (0, 0))) if width > len(sums) else sums.copy()
        vecs = self.vectors_at(changed).astype(np.float64)
        np.subtract.at(sums, old[old >= 0], vecs[old >= 0])
        np.add.at(sums, new[new >= 0], vecs[new >= 0])
        return sums

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
        """Local position of ``product_id`` (binary search of the id map), or None (also when removed)."""
        i = int(np.searchsorted(self.id_sorted, product_id))
        if not (i < len(self.id_sorted) and self.id_sorted[i] == product_id):
            return None
        local = int(self.id_order[i])
        r = self.state.removed
        j = int(np.searchsorted(r, local))
        return None if j < len(r) and r[j] == local else local

    def live_mask(self) -> np.ndarray:
        """``[n]`` bool: the rows this generation serves."""
        live = np.ones(len(self), bool)
        live[self.state.removed] = False
        return live


LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, RuntimeError, IndexError)


def load_segment(folder: IndexFolder, sid: str, mmap: bool = False, meta_record: list | None = None) -> Segment:
    """Open segment ``sid`` of ``folder`` as sealed, refusing one whose files are missing, damaged or disagree:
    ``segment.json`` is checked against ``meta_record`` (``[size, digest]`` from the manifest), every file read
    whole against the checksum it records; memory-mapped files by size (``check`` reads every byte)."""
    path = folder.segment(sid)
    what = f"{folder.path}: segment {sid}: "
    if not (path / META).exists():
        raise Damaged(f"{path / 'segment.json'} is missing (segment {sid}, listed by the live generation); restore "
                      "it or rebuild the index")
    verify(path / META, meta_record, what=what)
    meta = read_json(path / META, what)
    files = meta.get("files")
    for rel in (files or {}):
        big_mapped = rel.startswith(("emb/", HELD_OUT + "/")) or (mmap and (rel.endswith("index.faiss") or rel.split("/")[0] in
                                                          {*(f"{k}.npy" for k in ARRAYS), ID_SORTED, ID_ORDER}))
        expected = files[rel]
        if big_mapped:
            verify(path / rel, expected, full=False, what=what)
        elif rel.endswith("index.faiss"):  # read whole into memory anyway: every byte checked
            verify(path / rel, expected, what=what)
        else:
            verify_small(path / rel, expected, what=what)
    try:
        vi = VectorIndex.load(path / "faiss", mmap=mmap)
        mode = "r" if mmap else None  # mapped: pages are read when touched, and stay page cache the kernel can drop
        arrays = {k: np.load(path / f"{k}.npy", mmap_mode=mode) for k in ARRAYS}
        seg = Segment(sid, path, vi, arrays, np.load(path / ID_SORTED, mmap_mode=mode),
                      np.load(path / ID_ORDER, mmap_mode=mode),
                      DuplicateTable.load(path / DUPLICATES), [tuple(p) for p in meta["parts"]], meta)
    except LOAD_ERRORS as e:
        raise Damaged(f"{what}its files cannot be read ({type(e).__name__}: {str(e)[:120]}); run `cli.py check` "
                      "to name the damaged file, then restore it or rebuild the index") from None
    if len(vi) != meta["count"] or any(len(a) != len(vi) for a in arrays.values()) or len(seg.id_sorted) != len(vi):
        raise Damaged(f"{what}its arrays disagree with its index ({len(vi)} vectors); rebuild the index")
    vi.refine = seg.vectors_at  # a coded index (SQ8, PQ) re-ranks its shortlists with the stored embeddings
    return seg


def load_state(folder: IndexFolder, entry: dict | None, checksums: dict, n: int) -> SegmentState:
    """A generation's :class:`SegmentState` of one segment of ``n`` rows from its manifest ``entry`` (None:
    unchanged), every byte of its files checked against ``checksums``."""
    if not entry:
        return SegmentState()
    out = {}
    for kind, shape in (("removed", (-1,)), ("relabels", (-1, 3))):
        rel = entry.get(kind)
        if not rel:
            continue
        f = folder.path / rel
        verify(f, checksums.get(rel), what=f"{folder.path}: ")
        try:
            a = np.load(f).astype(np.int64).reshape(shape)
        except LOAD_ERRORS as e:
            raise Damaged(f"{f} is damaged ({type(e).__name__}); restore it or rebuild the index") from None
        local = a if a.ndim == 1 else a[:, 0]
        if len(local) and (local.min() < 0 or local.max() >= n):
            raise Damaged(f"{f} is damaged: positions outside its segment of {n} rows")
        out[kind] = a
    return SegmentState(**out)


def locate_ids(folder: IndexFolder, sids: list[str], ids: np.ndarray,
               removed: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Where ``ids [M]`` live in the segments ``sids``: ``(segment number [M], local position [M])``, -1 where an
    id is in none (or only at a position ``removed[sid]`` lists). Reads only the id maps (memory-mapped: a few
    pages per id, not the catalogue)."""
    ids = np.asarray(ids, np.int64)
    seg, local = np.full(len(ids), -1, np.int64), np.full(len(ids), -1, np.int64)
    for s, sid in enumerate(sids):
        srt = np.load(folder.segment(sid) / ID_SORTED, mmap_mode="r")
        if len(srt) == 0 or len(ids) == 0:
            continue
        i = np.minimum(np.searchsorted(srt, ids), len(srt) - 1)
        hit = (np.asarray(srt[i]) == ids) & (seg < 0)
        if hit.any():
            pos = np.asarray(np.load(folder.segment(sid) / ID_ORDER, mmap_mode="r")[i[hit]])
            gone = np.isin(pos, (removed or {}).get(sid, np.zeros(0, np.int64)))
            at = np.flatnonzero(hit)[~gone]
            seg[at], local[at] = s, pos[~gone]
    return seg, local
