"""PartStore: numbered (or content-keyed) part files of embedded products, written atomically, resumable."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from ...durable import fsync_path, read_json, write_atomic, write_json
from ...errors import UserError

log = logging.getLogger(__name__)


def _differences(old: dict, new: dict) -> str:
    """The settings that differ between two store keys, in words."""
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b)
            diffs += [f"{k}.{d}" for d in inner.split("; ")] if inner else []
        elif a != b:
            diffs.append(f"{k} {a} -> {b}")
    return "; ".join(diffs)


class PartStore:
    """Numbered ``part_XXXXX.npz`` files written atomically (each step a crash point of
    :func:`~retrieval.durable.crash_point`); a run started again skips finished parts.

    ``key`` (the settings the parts depend on) is saved in ``store.json``. A store made with another key
    is refused with the differing settings named, or wiped first with ``restart``.
    """

    def __init__(self, folder: str | Path, key: dict, restart: bool = False) -> None:
        self.folder = Path(folder)
        meta = self.folder / "store.json"
        if meta.exists():
            old = read_json(meta, "part store key", f"delete {self.folder} or choose another output")
            if old != key:
                if not restart:
                    raise UserError(f"{self.folder} holds unfinished work made with other settings "
                                    f"({_differences(old, key)}); pass --restart to discard it, or choose another "
                                    "output")
                log.warning("discarding %s (made with other settings)", self.folder)
                shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not meta.exists():  # written aside and renamed: never a half-written key
            write_json(meta, key)

    def __str__(self) -> str:  # the folder, wherever a message names it (never an object's repr)
        return str(self.folder)

    __repr__ = __str__

    def sync(self) -> None:
        """fsync the store's folder (its part files are fsynced as they are written): every part is durable."""
        fsync_path(self.folder)

    @staticmethod
    def part_file(folder: Path, i: int | str) -> Path:
        """A numbered part (``part_00007.npz``) or one keyed by what it holds (``part_<key>.npz``)."""
        return Path(folder) / (f"part_{i:05d}.npz" if isinstance(i, int) else f"part_{i}.npz")

    def path(self, i: int | str) -> Path:
        return self.part_file(self.folder, i)

    def done(self, i: int | str) -> bool:
        return self.path(i).exists()

    @staticmethod
    def embeddings_file(folder: Path, i: int | str) -> Path:
        """A part's embeddings ``[P, D]`` as a plain ``.npy`` beside it, for memory-mapped reads."""
        return PartStore.part_file(folder, i).with_suffix(".emb.npy")

    def write(self, i: int | str, **arrays: np.ndarray) -> None:
        """Written aside, fsynced, then renamed: a part file is whole or absent. An ``emb`` array is stored once,
        as :meth:`embeddings_file` (memory-mappable), written before the part file that marks the part done."""
        if "emb" in arrays:
            emb = np.asarray(arrays.pop("emb"), np.float32)
            write_atomic(self.embeddings_file(self.folder, i), lambda f: np.save(f, emb))
        write_atomic(self.path(i), lambda f: np.savez(f, **arrays))

    def read(self, i: int | str, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Part ``i``'s arrays, ``emb`` included where the part has one (only ``keys``, when given: the others
        are not read)."""
        emb_path = self.embeddings_file(self.folder, i)
        with np.load(self.path(i)) as z:
            out = {k: z[k] for k in (keys if keys is not None else z.files) if k != "emb"}
        if (keys is None or "emb" in keys) and emb_path.exists():
            out["emb"] = np.load(emb_path)
        return out
