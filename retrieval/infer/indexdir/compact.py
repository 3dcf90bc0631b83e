"""Generation commits (checksums recorded), compaction (segments merged, removed rows dropped, the result built
by the one segment builder) and the check of every byte a live generation references (torch-free)."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from index import DuplicateTable
from index.vote import chunked

from ...durable import write_file
from ...errors import UserError
from .builder import SegmentSpec, build_segment
from .folder import IndexFolder
from .integrity import OPEN_VERIFY_MAX, Damaged, read_json, record, verify
from .manifest import IndexManifest
from .segments import ARRAYS, META, SegmentData, load_segment, load_state, meta_file, segment_meta

log = logging.getLogger(__name__)
COMPACT_SMALL = 50_000  # a segment of at most this many products is small
COMPACT_AT = 8  # an add that leaves more small segments than this at the tail compacts them into one
COMPACT_REMOVED = 0.2  # a segment with a larger share of its rows removed is rewritten without them


def _with_checksums(folder: IndexFolder, man: IndexManifest) -> IndexManifest:
    """``man`` with ``[size, digest]`` of every file it references outside segment folders: each segment's
    ``segment.json`` and each state file (a value recorded by an earlier generation is kept, never re-read)."""
    refs = [meta_file(sid) for sid, _ in man.segments]
    refs += [e[k] for e in man.segment_state.values() for k in ("removed", "relabels") if e.get(k)]
    return replace(man, checksums={r: man.checksums.get(r) or record(folder.path / r) for r in refs})


def commit_manifest(folder: IndexFolder, manifest: IndexManifest) -> str:
    """Commit ``manifest`` (whose segments and state files are sealed) as the folder's new live generation, with
    the checksums of what it references; returns its name."""
    manifest = _with_checksums(folder, manifest)
    return folder.commit(lambda gen: write_file(IndexFolder.manifest_file(gen), manifest.save)).name


def live_manifest(folder: IndexFolder) -> IndexManifest:
    return IndexManifest.load(IndexFolder.manifest_file(folder.generation()))


def _small_tail(man: IndexManifest) -> int:
    """How many segments at the end of ``man.segments`` (the held-out one left aside) are small."""
    n = 0
    for _, count in reversed(_mergeable(man)):
        if count > COMPACT_SMALL:
            break
        n += 1
    return n


def _mergeable(man: IndexManifest) -> tuple[tuple[str, int], ...]:
    return tuple(e for e in man.segments if e[0] != man.held_out)


def _to_merge(man: IndexManifest, force: bool) -> list[str]:
    """Segments to rewrite: the small tail when it is long (``force``: 2 or more), and every segment with more
    than :data:`COMPACT_REMOVED` of its rows removed (``force``: any removed). The held-out segment (evaluate's
    validation products) is never rewritten: it stays whole, its removed rows masked."""
    tail, segments = _small_tail(man), _mergeable(man)
    out = [sid for sid, _ in segments[-tail:]] if tail > (1 if force else COMPACT_AT) else []
    for sid, n in segments:
        gone = man.segment_state.get(sid, {}).get("removed_count", 0)
        if sid not in out and gone and (force or gone > COMPACT_REMOVED * n):
            out.append(sid)
    return out


def maybe_compact(folder: IndexFolder, spec: SegmentSpec | None = None) -> str | None:
    """Compact when more than :data:`COMPACT_AT` small segments trail or a segment has more than
    :data:`COMPACT_REMOVED` of its rows removed (the caller holds the writer lock)."""
    man = live_manifest(folder)
    merge = _to_merge(man, force=False)
    return _compact(folder, man, merge, spec) if merge else None


def compact(index_dir: str | Path, index_memory: float | None = None) -> str | None:
    """Rewrite the small segments at the end of the live generation, and every segment with removed rows, into
    one segment without the removed rows (built like a build: the index type chosen within ``index_memory``
    bytes, default the build's, tuned to the build's recall target), and commit it (holding the writer lock);
    returns the new generation's name, or None when there was nothing to do."""
    folder = IndexFolder(index_dir)
    with folder.writer():
        man = live_manifest(folder)
        merge = _to_merge(man, force=True)
        if not merge:
            log.info("%s: %d segments, none to merge and nothing removed", folder.path, len(man.segments))
            return None
        spec = SegmentSpec("auto", index_memory or man.index_memory or 8e9, man.target_recall)
        return _compact(folder, man, merge, spec)


def _compact(folder: IndexFolder, man: IndexManifest, merge: list[str], spec: SegmentSpec | None) -> str:
    spec = spec or SegmentSpec("auto", man.index_memory or 8e9, man.target_recall)
    counts = dict(man.segments)
    for sid in merge:  # compaction seals what it copies with new checksums: damage is refused first, never sealed
        damage = segment_damage(folder, man, sid, counts[sid], full=True).damaged
        if damage:
            raise Damaged(damage[0])
    work = folder.work / f"compact-{time.time_ns()}"
    try:
        return _rewrite(folder, man, merge, spec, work)
    finally:  # the new segment links what it keeps of the work: none of it is needed once sealed or failed
        shutil.rmtree(work, ignore_errors=True)


def _rewrite(folder: IndexFolder, man: IndexManifest, merge: list[str], spec: SegmentSpec, work: Path) -> str:
    counts = dict(man.segments)
    segs = [load_segment(folder, sid, mmap=True, meta_record=man.checksums.get(meta_file(sid)))
            .with_state(load_state(folder, man.segment_state.get(sid), man.checksums, counts[sid])) for sid in merge]
    keep = [s.live_mask() for s in segs]
    n = int(sum(k.sum() for k in keep))
    if n == 0:
        rest = tuple(e for e in man.segments if e[0] not in merge)
        if not rest:
            raise UserError(f"{folder.path}: every product is removed; an index needs at least one (rebuild it)")
        states = {s: e for s, e in man.segment_state.items() if s not in merge}
        parts = tuple(tuple(p) for s, _ in rest for p in segment_meta(folder, s)["parts"])
        return commit_manifest(folder, replace(man, segments=rest, segment_state=states, parts=parts,
                                               count=sum(c for _, c in rest)))
    work.mkdir(parents=True)
    emb_file = work / "emb.npy"
    dim = man.dim
    out = np.lib.format.open_memmap(emb_file, "w+", np.float32, (n, dim))
    at = 0
    for s, k in zip(segs, keep, strict=True):
        start = 0
        for piece in chunked([s.embeddings(part) for part in range(len(s.parts))]):  # bounded memory
            rows = np.asarray(piece[np.flatnonzero(k[start:start + len(piece)])], np.float32)
            out[at:at + len(rows)] = rows
            at, start = at + len(rows), start + len(piece)
    out.flush()
    del out
    labels = np.concatenate([np.asarray(s.vectors.labels)[k] for s, k in zip(segs, keep, strict=True)])
    arrays = {a: np.concatenate([np.asarray(s.arrays[a])[k] for s, k in zip(segs, keep, strict=True)]) for a in ARRAYS}
    dups, offset = [], 0
    for s, k in zip(segs, keep, strict=True):
        new_pos = np.cumsum(k) - 1 + offset  # each kept row's new local position
        alive = k[s.duplicates.positions]
        dups.append((s.duplicates.hashes[alive], new_pos[s.duplicates.positions[alive]]))
        offset += int(k.sum())
    table = DuplicateTable(np.concatenate([h for h, _ in dups]), np.concatenate([p for _, p in dups]))
    parts = [(f"compacted-{work.name.split('-')[1]}", n)]
    sid, factory, recall = build_segment(folder, dim, spec, SegmentData(labels, arrays, table, parts, [emb_file]))
    rest = tuple(e for e in man.segments if e[0] not in merge) + ((sid, n),)
    states = {s: e for s, e in man.segment_state.items() if s not in merge}
    kept_parts = tuple(tuple(p) for s, _ in rest[:-1] for p in segment_meta(folder, s)["parts"])
    largest = max(rest, key=lambda e: e[1])[0] == sid  # the manifest reports the largest segment's index
    name = commit_manifest(folder, replace(man, segments=rest, segment_state=states, count=sum(c for _, c in rest),
                                           parts=kept_parts + tuple(parts),
                                           factory=factory if largest else man.factory,
                                           tuned_recall_at_10=round(recall, 4) if largest else man.tuned_recall_at_10))
    log.info("%s: %d segments (%d live products) rewritten into %s (%s, recall@10 %.3f)", folder.path, len(merge),
             n, sid, factory, recall)
    return name


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check_index` found: the live generation (a segment id, for :func:`segment_damage`), its live
    products, bytes read, and every damaged file (one line each)."""

    generation: str
    products: int
    bytes_read: int
    damaged: tuple[str, ...]
    unverified: tuple[str, ...] = ()  # what was written before checksums were kept (present, not provably whole)


def segment_damage(folder: IndexFolder, man: IndexManifest, sid: str, count: int, full: bool) -> CheckReport:
    """What :func:`check_index` finds in one segment of ``man`` (``count`` rows) and its state files: the damaged
    files, those not verifiable, bytes read and the live products (0 when damaged)."""
    path = folder.segment(sid)
    damaged: list[str] = []
    read = 0

    def check(f: Path, expected: list | None, whole: bool) -> bool:
        nonlocal read
        try:
            verify(f, expected, full=whole)
            read += f.stat().st_size if whole else 0
            return True
        except Damaged as e:
            damaged.append(str(e))
            return False

    def report(live: int = 0, unverified: tuple = ()) -> CheckReport:
        return CheckReport(sid, live, read, tuple(damaged), unverified)

    if not check(path / META, man.checksums.get(meta_file(sid)), True):
        return report()
    try:
        meta = read_json(path / META)
    except Damaged as e:
        damaged.append(str(e))
        return report()
    files = meta.get("files") or {}
    unverified = () if files and meta_file(sid) in man.checksums else (
        f"segment {sid}: written before checksums were kept (the next change records those of segment.json; a "
        "rebuild or compaction records all)",)
    ok = all([check(path / rel, files[rel], full or files[rel][0] <= OPEN_VERIFY_MAX) for rel in files])
    if meta.get("count") != count:
        damaged.append(f"{path / 'segment.json'}: counts {meta.get('count')} products, the manifest {count}")
    entry = man.segment_state.get(sid) or {}
    for k in ("removed", "relabels"):
        if entry.get(k):
            ok &= check(folder.path / entry[k], man.checksums.get(entry[k]), True)
    if not ok or damaged:
        return report(unverified=unverified)
    try:  # the files agree with each other (counts of arrays, id maps, labels and the index)
        load_segment(folder, sid, mmap=True)
        live = count - len(load_state(folder, entry, man.checksums, count).removed)
    except UserError as e:
        damaged.append(str(e))
        return report(unverified=unverified)
    return report(live, unverified)


def check_index(index_dir: str | Path, full: bool = True) -> CheckReport:
    """Verify every file the live generation references against the checksums recorded at commit (``full``:
    every byte; else sizes, and the small files' bytes) and the counts they must agree on; damaged files are
    listed, not raised. A folder with no readable manifest raises."""
    folder = IndexFolder(index_dir)
    gen = folder.generation()
    man = IndexManifest.load(IndexFolder.manifest_file(gen))
    damaged: list[str] = []
    unverified: list[str] = []
    read = 0
    live = 0
    for sid, count in man.segments:
        seg = segment_damage(folder, man, sid, count, full)
        damaged += seg.damaged
        unverified += seg.unverified
        read += seg.bytes_read
        live += seg.products
    for src in man.sources:
        if not folder.resolve(src.path, man.origin).exists():
            damaged.append(f"{src.path}: source file of {gen.name} is missing (its pictures cannot be shown)")
    return CheckReport(gen.name, live, read, tuple(damaged), tuple(unverified))


def check_folder(index_dir: str | Path) -> tuple[str, int]:
    """``(live generation, live products)`` after checking sizes, small files and counts of everything the live
    generation references; a :class:`Damaged` error naming the first damaged file otherwise. Reads no model."""
    r = check_index(index_dir, full=False)
    if r.damaged:
        raise Damaged(r.damaged[0])
    return r.generation, r.products
