"""IndexFolder: the owner of every file in an index folder (segments, generations, atomic commit, garbage, the
writer lock); its writes go through :mod:`retrieval.durable`."""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ...durable import fsync_path, fsync_tree, rename, write_file
from ...errors import UserError
from .integrity import json_digest

log = logging.getLogger(__name__)
UPLOAD_GRACE_S = 600  # an unreferenced upload younger than this may still be on its way into an add


class WriterBusy(UserError):
    """Another process (or thread) is writing the same index folder."""


def _disk_full(e: BaseException) -> bool:
    """Whether ``e`` says the disk (or the quota) is full: an OSError, or FAISS's RuntimeError around one."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and ("No space left" in str(e) or "Disk quota" in str(e))


class DiskFull(UserError):
    """A write of the index folder ran out of space (ENOSPC): nothing was committed, the attempt's files are gone."""


class IndexFolder:
    """``IDX/``, and every file name in it (nothing else spells one):

    - ``CURRENT``: the name of the live generation, replaced by one atomic rename when a change commits;
    - ``generations/<g>/manifest.json``: a generation is a manifest listing immutable segments;
    - ``segments/<s>/``: one segment (``segments`` module): its FAISS index, per-product arrays, id map,
      duplicate table and the embeddings it owns; never changed once renamed into place;
    - ``work/build/``: build-index's embedded parts (resumable; segments hard-link what they keep of them),
      ``work/<other>/``: parts of an add, removed once it commits or dies;
    - ``uploads/``: BSON files added over HTTP (sources of later generations);
    - ``state/<segment>.<nonce>.removed.npy`` / ``.relabels.npy``: a generation's deletion set and relabel table of
      one segment (written aside, never changed; a later change writes new ones);
    - ``.writer.lock``: held by the one writer.

    Before ``CURRENT`` moves, every file the new generation references is fsynced with its folder. The writer
    removes garbage (generations past the last :attr:`KEEP`, segments none of them lists, dead work, unreferenced
    uploads) after each commit and when it takes the lock; never a file a kept generation references.
    Paths inside a manifest are stored relative to the folder, so a folder moved with its data still opens."""

    KEEP = 2  # committed generations kept (readers may still be loading the previous one)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:  # the folder, wherever a message names it (never an object's repr)
        return str(self.path)

    __repr__ = __str__

    uploads = property(lambda self: self.path / "uploads")
    segments = property(lambda self: self.path / "segments")
    state = property(lambda self: self.path / "state")
    work = property(lambda self: self.path / "work")
    build_parts = property(lambda self: self.path / "work" / "build")
    embeddings = build_parts  # the parts build-index embeds into (never read by a generation)
    current_file = property(lambda self: self.path / "CURRENT")
    _generations = property(lambda self: self.path / "generations")

    def exists(self) -> bool:
        return self.current_file.exists()

    def current_name(self) -> str:
        return self.current_file.read_text().strip()

    def generation(self) -> Path:
        """The live generation's folder; a clear error for a folder that holds none."""
        if not self.current_file.exists():
            raise FileNotFoundError(f"{self.path}: no index here (no CURRENT generation: not an index folder, or "
                                    "its build never finished; run build-index)")
        gen = self._generations / self.current_name()
        if not gen.is_dir():
            raise UserError(f"{self.path}: generation {gen.name} named by CURRENT is missing; rebuild the index")
        return gen

    @staticmethod
    def manifest_file(gen: Path) -> Path:
        return gen / "manifest.json"

    def segment(self, sid: str) -> Path:
        return self.segments / sid

    def new_state_file(self, sid: str, kind: str) -> Path:
        """A fresh file name for segment ``sid``'s ``kind`` ("removed" or "relabels") table."""
        if not self.state.is_dir():
            self.state.mkdir(parents=True)
            fsync_path(self.path)  # the new folder's entry is durable before a generation names a file in it
        return self.state / f"{sid}.{time.time_ns():020d}.{kind}.npy"

    def add_parts(self, key: str) -> Path:
        """The work folder of an add's parts (``key``: what it holds)."""
        return self.work / f"add-{key}"

    def relative(self, target: str | Path) -> str:
        """``target`` as stored in a manifest: relative to the folder (absolute where no relative path exists)."""
        try:
            return os.path.relpath(Path(target).resolve(), self.path.resolve())
        except ValueError:  # another drive
            return str(Path(target).resolve())

    def resolve(self, stored: str, origin: str = "") -> Path:
        """A path from a manifest, back to a usable path: relative ones are taken from the folder (which was
        moved together with its data), else from where it was built (a copy of the folder alone)."""
        p = Path(stored)
        if p.is_absolute():
            return p
        here = (self.path / p).resolve()
        there = (Path(origin) / p).resolve() if origin else here
        return here if here.exists() or not there.exists() else there

    def new_segment_dir(self) -> tuple[str, Path]:
        """A fresh segment id and the hidden folder to write it in (renamed into place by :meth:`seal`)."""
        self.segments.mkdir(parents=True, exist_ok=True)
        sid = f"s{time.time_ns():020d}"
        tmp = self.segments / f".new-{sid}"
        tmp.mkdir()
        return sid, tmp

    def seal(self, tmp: Path, sid: str) -> Path:
        """fsync a written segment folder and rename it into place (immutable from now on)."""
        fsync_tree(tmp)
        final = self.segment(sid)
        rename(tmp, final)
        fsync_path(self.segments)
        return final

    def commit(self, write: Callable[[Path], None]) -> Path:
        """Write a new generation with ``write(folder)`` aside, fsync it, and make it current atomically (the
        segments it lists are sealed already). Garbage is collected after; an error there is only logged."""
        self._generations.mkdir(parents=True, exist_ok=True)
        newest = max((int(p.name[1:]) for p in self._generations.iterdir() if p.name[1:].isdigit()), default=0)
        name = f"g{max(time.time_ns(), newest + 1):020d}"  # names sort in commit order, whatever the clock does
        tmp = self._generations / f".new-{name}"
        tmp.mkdir()
        try:
            write(tmp)
            fsync_tree(tmp)
            rename(tmp, self._generations / name)
            fsync_path(self._generations)
            cur = self.path / ".CURRENT.tmp"
            write_file(cur, lambda p: p.write_text(name))
            fsync_path(cur)
            rename(cur, self.current_file)
            fsync_path(self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:  # CURRENT has moved: the change is committed whatever happens next
            self.collect()
        except Exception:
            log.exception("%s: garbage collection after commit %s failed (retried at the next write)", self.path,
                          name)
        return self._generations / name

    def _kept(self) -> list[Path]:
        if not self._generations.is_dir():
            return []
        live = self.current_name() if self.exists() else None
        # a generation newer than the live one is a commit that failed before CURRENT moved: dead
        gens = sorted(p for p in self._generations.iterdir() if p.name.startswith("g") and (live is None or
                                                                                            p.name <= live))
        return [p for p in gens if p in gens[-self.KEEP:] or p.name == live]

    def referenced(self) -> tuple[set[str], set[Path], set[str]] | None:
        """Segment ids, upload paths and state file names that the kept generations reference, or None when
        ``CURRENT`` names no generation here or one of their manifests is unreadable or fails its own checksum
        (then nothing is collected: damage is refused by readers, never made permanent by the collector)."""
        sids, sources, states = set(), set(), set()
        if self.exists() and not (self._generations / self.current_name()).is_dir():
            return None
        for gen in self._kept():
            try:
                d = json.loads(self.manifest_file(gen).read_text())
                if "digest" in d and d["digest"] != json_digest(d):
                    return None
                sids |= {s[0] for s in d.get("segments", [])}
                origin = d.get("origin", "")
                sources |= {self.resolve(s["path"], origin) for s in d.get("sources", [])}
                for st in d.get("segment_state", {}).values():
                    states |= {Path(st[k]).name for k in ("removed", "relabels") if st.get(k)}
            except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
                return None
        return sids, sources, states

    def collect(self) -> None:
        """Remove what no kept generation references (the caller holds the writer lock): older generations, dead
        writes (``.new-*``), unlisted segments, add work, and uploads past :data:`UPLOAD_GRACE_S`."""
        refs = self.referenced()
        if refs is None:
            log.warning("%s: CURRENT or a kept generation's manifest is missing or damaged; nothing is collected "
                        "(run `cli.py check`)", self.path)
            return
        sids, sources, states = refs
        kept = {p.name for p in self._kept()}
        doomed = []
        if self._generations.is_dir():
            doomed += [p for p in self._generations.iterdir() if p.name not in kept]
        if self.segments.is_dir():
            doomed += [p for p in self.segments.iterdir() if p.name not in sids]
        if self.state.is_dir():
            doomed += [p for p in self.state.iterdir() if p.name not in states]
        if self.work.is_dir():
            doomed += [p for p in self.work.iterdir() if p != self.build_parts]
        if self.uploads.is_dir():
            names = {p.name for p in sources if p.parent == self.uploads.resolve()}
            now = time.time()
            for p in self.uploads.iterdir():
                base = p.name.split(".bson")[0] + ".bson" if ".bson" in p.name else p.name
                if base not in names and now - p.stat().st_mtime > UPLOAD_GRACE_S:
                    doomed.append(p)
        for p in doomed:
            log.debug("collecting %s", p)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        if doomed:
            log.info("%s: removed %d unreferenced entries (old generations, segments, work, uploads)", self.path,
                     len(doomed))

    @contextmanager
    def writer(self):
        """Hold the folder's writer lock (an advisory ``flock``); a second writer is refused at once. Garbage
        left by a writer that died is collected on the way in."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WriterBusy(f"{self.path}: another process is writing this index (build-index, add-to-index, "
                                 "compact or a server's add); wait for it to finish") from None
            if self.exists():
                try:
                    self.collect()
                except Exception:
                    log.exception("%s: garbage collection failed", self.path)
            before = self.current_name() if self.exists() else None
            try:
                yield self
            except BaseException as e:
                self._after_failure()
                if _disk_full(e):
                    after = self.current_name() if self.exists() else None
                    if after != before:  # CURRENT had moved: the change is live, a step after it failed
                        raise DiskFull(f"{self.path}: no space left on the disk after the change was committed "
                                       f"(generation {after} is live); free some space") from None
                    raise DiskFull(f"{self.path}: no space left on the disk; nothing was changed (the live "
                                   "generation is as before; free some space and try again)") from None
                raise
        finally:
            os.close(fd)

    def _after_failure(self) -> None:
        """Remove a failed write's files at once (the writer lock is still held): unlisted segments and state,
        dead generations, add work."""
        try:
            if self.exists():
                self.collect()
        except Exception:  # the next writer collects them
            log.exception("%s: could not remove a failed write's files", self.path)
