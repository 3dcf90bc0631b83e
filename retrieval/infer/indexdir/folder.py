"""IndexFolder: the owner of every file in an index folder (generations, atomic commit, the writer lock)."""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ...errors import UserError


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriterBusy(UserError):
    """Another process (or thread) is writing the same index folder."""


class IndexFolder:
    """``IDX/``, and every file name in it (nothing else spells one):

    - ``CURRENT``: the name of the live generation, replaced by one atomic rename when a change commits;
    - ``generations/<name>/``: ``manifest.json``, ``faiss/`` (the vector index), ``duplicates.npz`` and the
      per-product arrays ``<name>.npy``. A generation is never changed once committed: a change writes a new
      one aside, fsyncs it and swaps ``CURRENT``, so a crash at any instant leaves the old or the new one;
    - ``embeddings/``: embedded parts (immutable once written, shared by generations);
    - ``uploads/``: BSON files added over HTTP (sources of later generations);
    - ``.writer.lock``: held by the one writer.

    Paths inside a manifest (model file, run folder, sources) are stored relative to the folder, so a folder
    moved together with its data still opens."""

    KEEP = 2  # committed generations kept (readers may still be loading the previous one)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    embeddings = property(lambda self: self.path / "embeddings")
    uploads = property(lambda self: self.path / "uploads")
    _current = property(lambda self: self.path / "CURRENT")
    _generations = property(lambda self: self.path / "generations")

    def exists(self) -> bool:
        return self._current.exists()

    def generation(self) -> Path:
        """The live generation's folder; a clear error for a folder that holds none."""
        if not self._current.exists():
            raise FileNotFoundError(f"{self.path}: no index here (no CURRENT generation: not an index folder, or "
                                    "its build never finished; run build-index)")
        gen = self._generations / self._current.read_text().strip()
        if not gen.is_dir():
            raise UserError(f"{self.path}: generation {gen.name} named by CURRENT is missing; rebuild the index")
        return gen

    @staticmethod
    def manifest_file(gen: Path) -> Path:
        return gen / "manifest.json"

    @staticmethod
    def vectors(gen: Path) -> Path:
        return gen / "faiss"

    @staticmethod
    def duplicates_file(gen: Path) -> Path:
        return gen / "duplicates.npz"

    @staticmethod
    def array_file(gen: Path, name: str) -> Path:
        return gen / f"{name}.npy"

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

    def commit(self, write: Callable[[Path], None]) -> Path:
        """Write a new generation with ``write(folder)`` aside, fsync it, and make it current atomically."""
        self._generations.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=self._generations))
        try:
            write(tmp)
            for root, _, files in os.walk(tmp):
                for f in files:
                    _fsync(Path(root) / f)
                _fsync(Path(root))
            name = f"g{time.time_ns():020d}"
            tmp.rename(self._generations / name)
            _fsync(self._generations)
            cur = self.path / ".CURRENT.tmp"
            cur.write_text(name)
            _fsync(cur)
            os.replace(cur, self._current)
            _fsync(self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._collect()
        return self._generations / name

    def _collect(self) -> None:
        """Remove generations older than the last :attr:`KEEP` and leftovers of writes that died."""
        live = self._current.read_text().strip()
        gens = sorted(p for p in self._generations.iterdir() if p.name.startswith("g"))
        keep = {p.name for p in gens[-self.KEEP:]} | {live}
        for p in self._generations.iterdir():
            if p.name not in keep:  # called by the writer, under its lock: a ".new-" folder here is a dead write's
                shutil.rmtree(p, ignore_errors=True)

    @contextmanager
    def writer(self):
        """Hold the folder's writer lock (an advisory ``flock``); a second writer is refused at once."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WriterBusy(f"{self.path}: another process is writing this index (build-index, add-to-index or "
                                 "a server's add); wait for it to finish") from None
            yield self
        finally:
            os.close(fd)
