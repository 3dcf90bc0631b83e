"""Remove and relabel indexed products (torch-free). Segments never change: a removal writes the segment's new
deletion set, a relabel its new relabel table, both aside under ``state/`` (fsynced), and one generation commit
lists them, so readers follow at their next open and a crash leaves the last committed state. Compaction drops
removed rows for good (``compact``)."""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ...data.categories import CategoryTable
from ...durable import fsync_path, write_file
from ...errors import UserError
from .compact import commit_manifest, live_manifest, maybe_compact
from .folder import IndexFolder
from .manifest import IndexManifest
from .segments import SegmentState, load_state, locate_ids

log = logging.getLogger(__name__)


class UnknownProducts(UserError):
    """Product ids that no live row of the index holds (nothing was changed)."""


@dataclass(frozen=True)
class Change:
    """What one operation committed: the products it touched and the new generation."""

    products: int
    generation: str


def segment_states(folder: IndexFolder, man: IndexManifest) -> dict[str, SegmentState]:
    """The live generation's state of every segment it changed (files checked against the manifest)."""
    counts = dict(man.segments)
    return {sid: load_state(folder, entry, man.checksums, counts[sid]) for sid, entry in man.segment_state.items()
            if sid in counts}


def _save(folder: IndexFolder, sid: str, kind: str, a: np.ndarray) -> str:
    f = folder.new_state_file(sid, kind)
    write_file(f, lambda p: np.save(p, a))
    fsync_path(f)
    return str(f.relative_to(folder.path))


def with_changes(folder: IndexFolder, man: IndexManifest, removed: dict[str, np.ndarray] | None = None,
                 relabels: dict[str, np.ndarray] | None = None) -> IndexManifest:
    """``man`` with more rows removed (``removed[sid]``: local positions) and relabelled (``relabels[sid]``:
    rows ``(local, category id, class)``, replacing earlier ones of the same row); the touched segments' new
    tables are written aside and fsynced here, and listed by the returned manifest (commit it to apply)."""
    removed, relabels = removed or {}, relabels or {}
    states = segment_states(folder, man)
    entries = dict(man.segment_state)
    for sid in set(removed) | set(relabels):
        old = states.get(sid, SegmentState())
        gone = np.union1d(old.removed, np.asarray(removed.get(sid, []), np.int64)).astype(np.int64)
        rel = old.relabels
        if sid in relabels:
            new = np.asarray(relabels[sid], np.int64).reshape(-1, 3)
            rel = np.concatenate([rel[~np.isin(rel[:, 0], new[:, 0])], new])
        rel = rel[~np.isin(rel[:, 0], gone)]
        rel = rel[np.argsort(rel[:, 0], kind="stable")]
        entry = {"removed_count": int(len(gone)), "relabel_count": int(len(rel))}
        if len(gone):
            entry["removed"] = _save(folder, sid, "removed", gone)
        if len(rel):
            entry["relabels"] = _save(folder, sid, "relabels", rel)
        entries[sid] = entry
    if folder.state.is_dir():
        fsync_path(folder.state)
    return replace(man, segment_state={sid: e for sid, e in entries.items() if e["removed_count"] or
                                       e["relabel_count"]})


def live_positions(folder: IndexFolder, man: IndexManifest, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(segment number [M], local position [M])`` of ``ids`` among the live rows; -1 where not indexed."""
    states = segment_states(folder, man)
    return locate_ids(folder, [sid for sid, _ in man.segments], ids, {s: st.removed for s, st in states.items()})


def _refuse_unknown(folder: IndexFolder, ids: np.ndarray, seg: np.ndarray) -> None:
    unknown = ids[seg < 0]
    if len(unknown):
        shown = ", ".join(str(i) for i in unknown[:20].tolist()) + (" ..." if len(unknown) > 20 else "")
        raise UnknownProducts(f"{folder.path}: {len(unknown)} of {len(ids)} product ids are not in the index "
                              f"({shown}); nothing was changed")


def _by_segment(man: IndexManifest, seg: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    return {man.segments[s][0]: rows[seg == s] for s in np.unique(seg)}


def after_commit(folder: IndexFolder, on_commit: Callable[[str], None] | None) -> None:
    """What follows a committed change (the writer lock still held): compaction where it is due, then the
    caller's hook. An error here is logged, never raised: the change has succeeded."""
    try:
        maybe_compact(folder)
    except Exception:
        log.exception("%s: compaction after a change failed (the change is committed)", folder.path)
    if on_commit is not None:
        try:
            on_commit(folder.current_name())
        except Exception:
            log.exception("%s: the change is committed, but its hook failed", folder.path)


def _commit(folder: IndexFolder, man: IndexManifest, on_commit: Callable[[str], None] | None) -> str:
    name = commit_manifest(folder, man)
    after_commit(folder, on_commit)
    return name


def remove_products(index_dir: str | Path, ids: Iterable[int],
                    on_commit: Callable[[str], None] | None = None) -> Change:
    """Remove products from the index in one generation commit; unknown ids refuse the whole call."""
    folder = IndexFolder(index_dir)
    ids = np.unique(np.asarray(list(ids), np.int64))
    if not len(ids):
        raise UserError("no product ids to remove")
    with folder.writer():
        man = live_manifest(folder)
        seg, local = live_positions(folder, man, ids)
        _refuse_unknown(folder, ids, seg)
        name = _commit(folder, with_changes(folder, man, removed=_by_segment(man, seg, local)), on_commit)
    log.info("%s: %d products removed (generation %s)", folder.path, len(ids), name)
    return Change(len(ids), name)


def run_categories(folder: IndexFolder, man: IndexManifest) -> CategoryTable:
    """The category table readers decode with: the one inside the index's model file (checked against the
    manifest's hash; a run folder's categories.json is not covered by it)."""
    from .bundle import load_index_model  # torch, only for a relabel
    return load_index_model(folder, man, "cpu").categories


def relabel_products(index_dir: str | Path, corrections: dict[int, int],
                     on_commit: Callable[[str], None] | None = None) -> Change:
    """Give products new categories (``{product id: category id}``) in one generation commit: they vote for the
    new class at once, without retraining. Unknown products or categories refuse the whole call."""
    folder = IndexFolder(index_dir)
    if not corrections:
        raise UserError("no corrections to apply")
    ids = np.fromiter(corrections, np.int64, len(corrections))
    cat_ids = np.asarray([corrections[int(i)] for i in ids], np.int64)
    with folder.writer():
        man = live_manifest(folder)
        cats = run_categories(folder, man)
        bad = sorted({int(c) for c in cat_ids} - {int(c) for c in cats.ids})
        if bad:
            raise UserError(f"{len(bad)} category ids are not in the run's category table ({', '.join(map(str, bad[:20]))})"
                            "; nothing was changed")
        seg, local = live_positions(folder, man, ids)
        _refuse_unknown(folder, ids, seg)
        rows = np.stack([local, cat_ids, cats.encode(cat_ids).astype(np.int64)], 1)
        rel = {man.segments[s][0]: rows[seg == s] for s in np.unique(seg)}
        name = _commit(folder, with_changes(folder, man, relabels=rel), on_commit)
    log.info("%s: %d products relabelled (generation %s)", folder.path, len(ids), name)
    return Change(len(ids), name)


def read_ids(path: str | Path) -> list[int]:
    """Product ids from a file: one per line, or a CSV whose first column is ``_id`` (a header is skipped)."""
    out = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip() or (n == 1 and not row[0].strip().lstrip("-").isdigit()):
                continue
            try:
                out.append(int(row[0]))
            except ValueError:
                raise UserError(f"{path}: line {n}: {row[0][:40]!r} is not a product id") from None
    return out


def read_corrections(path: str | Path) -> dict[int, int]:
    """``{_id: category_id}`` from a CSV with those two columns (a header naming them, or none); other columns
    (an audit's names and scores) are ignored. A product given twice must agree with itself."""
    out: dict[int, int] = {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    cols = (0, 1)
    if rows and rows[0] and not rows[0][0].strip().isdigit():
        head = [c.strip() for c in rows[0]]
        if "_id" not in head or "category_id" not in head:
            raise UserError(f"{path}: the header needs the columns _id and category_id (got {', '.join(head[:6])})")
        cols, rows = (head.index("_id"), head.index("category_id")), rows[1:]
    for n, row in enumerate(rows, 2 if cols != (0, 1) else 1):
        if not row:
            continue
        try:
            pid, cat = int(row[cols[0]]), int(row[cols[1]])
        except (ValueError, IndexError):
            raise UserError(f"{path}: line {n}: expected _id,category_id, got {','.join(row)[:60]!r}") from None
        if out.get(pid, cat) != cat:
            raise UserError(f"{path}: product {pid} is given two categories ({out[pid]} and {cat})")
        out[pid] = cat
    return out
