"""Generation commits, compaction of small segments, and a check of a folder's live generation (torch-free)."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from index import DuplicateTable, VectorIndex, choose_factory

from ...errors import UserError
from .folder import IndexFolder, write_file
from .manifest import IndexManifest
from .segments import ARRAYS, load_segment, write_segment

log = logging.getLogger(__name__)
COMPACT_SMALL = 50_000  # a segment of at most this many products is small
COMPACT_AT = 8  # an add that leaves more small segments than this at the tail compacts them into one


def commit_manifest(folder: IndexFolder, manifest: IndexManifest) -> str:
    """Commit ``manifest`` (whose segments are sealed) as the folder's new live generation; returns its name."""
    return folder.commit(lambda gen: write_file(IndexFolder.manifest_file(gen), manifest.save)).name


def live_manifest(folder: IndexFolder) -> IndexManifest:
    return IndexManifest.load(IndexFolder.manifest_file(folder.generation()))


def _small_tail(man: IndexManifest) -> int:
    """How many segments at the end of ``man.segments`` are small."""
    n = 0
    for _, count in reversed(man.segments):
        if count > COMPACT_SMALL:
            break
        n += 1
    return n


def maybe_compact(folder: IndexFolder) -> str | None:
    """Compact when more than :data:`COMPACT_AT` small segments trail (the caller holds the writer lock)."""
    if _small_tail(live_manifest(folder)) > COMPACT_AT:
        return _compact(folder)
    return None


def compact(index_dir: str | Path) -> str | None:
    """Merge the small segments at the end of the live generation into one and commit it (holding the writer
    lock); returns the new generation's name, or None when there was nothing to merge. Results and positions
    of every query are unchanged (a merged Flat segment is still exact)."""
    folder = IndexFolder(index_dir)
    with folder.writer():
        return _compact(folder)


def _compact(folder: IndexFolder) -> str | None:
    man = live_manifest(folder)
    tail = _small_tail(man)
    if tail < 2:
        log.info("%s: %d segments, none to merge", folder.path, len(man.segments))
        return None
    keep, merge = man.segments[:-tail], man.segments[-tail:]
    segs = [load_segment(folder, sid) for sid, _ in merge]
    n = sum(len(s) for s in segs)
    flat = all(s.vectors.factory == "Flat" for s in segs)
    vi = VectorIndex.create(man.dim, "Flat" if flat else choose_factory(n, man.dim))
    emb = [s.embeddings(k) for s in segs for k in range(len(s.parts))]
    labels = np.concatenate([s.vectors.labels for s in segs])
    if not flat:
        vi.train_on_blocks(emb, n)
    start = 0
    for block in emb:
        vi.add(np.asarray(block, np.float32), labels[start:start + len(block)])
        start += len(block)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in segs])])
    owners = [s.duplicates.positions + o for s, o in zip(segs, offsets[:-1], strict=True)]
    dups = DuplicateTable(np.concatenate([s.duplicates.hashes for s in segs]), np.concatenate(owners))
    arrays = {k: np.concatenate([s.arrays[k] for s in segs]) for k in ARRAYS}
    parts = [p for s in segs for p in s.parts]
    sid = write_segment(folder, vi, arrays, dups, parts, [f for s in segs for f in s.emb_files()])
    name = commit_manifest(folder, replace(man, segments=keep + ((sid, n),)))
    log.info("%s: %d small segments (%d products) merged into %s", folder.path, tail, n, sid)
    return name


def check_folder(index_dir: str | Path) -> tuple[str, int]:
    """``(live generation, products)`` after checking that every file it references is present and agrees
    (counts of arrays, id maps, labels, embeddings); a :class:`UserError` otherwise. Reads no model."""
    folder = IndexFolder(index_dir)
    gen = folder.generation()
    man = IndexManifest.load(IndexFolder.manifest_file(gen))
    total = 0
    for sid, count in man.segments:
        path = folder.segment(sid)
        try:
            meta = json.loads((path / "segment.json").read_text())
            sizes = {k: len(np.load(path / f"{k}.npy", mmap_mode="r"))
                     for k in (*ARRAYS, "id_sorted", "id_order")}
            sizes["labels"] = len(np.load(path / "faiss" / "labels.npy", mmap_mode="r"))
            sizes["emb"] = sum(len(np.load(path / "emb" / f"{k:05d}.npy", mmap_mode="r"))
                               for k in range(len(meta["parts"])))
            ok = (path / "faiss" / "index.faiss").stat().st_size > 0 and (path / "duplicates.npz").exists()
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{folder.path}: segment {sid} of {gen.name} is broken ({e})") from None
        if not ok or meta["count"] != count or set(sizes.values()) != {count}:
            raise UserError(f"{folder.path}: segment {sid} of {gen.name} disagrees ({sizes}, listed {count})")
        total += count
    if total != man.count:
        raise UserError(f"{folder.path}: {gen.name} counts {man.count} products, its segments {total}")
    for src in man.sources:
        if not folder.resolve(src.path, man.origin).exists():
            raise UserError(f"{folder.path}: source {src.path} of {gen.name} is missing")
    return gen.name, total
