"""An opened index folder: :class:`IndexBundle` (one generation, its model, vectors and per-product arrays) and
:func:`open_index`; build-index and add-to-index (in ``folder``) write what this reads."""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
from torch import nn

from index import DuplicateTable, VectorIndex

from ...data.categories import CategoryTable
from ...data.offsets import file_fingerprint
from ...errors import UserError
from ...model.export import LoadedModel, load_model_file
from ...model.runtime import best_device
from ...rundir import RunDir
from ..pipeline.store import PartStore
from .folder import IndexFolder
from .manifest import IndexManifest

ARRAYS = ("product_ids", "category_ids", "offsets", "lengths", "sources")


@dataclass
class IndexBundle:
    """An opened index folder at one generation: manifest, FAISS index, per-product arrays (position order),
    the model, and the exact-duplicate table. A reader keeps the generation it opened."""

    folder: Path
    manifest: IndexManifest
    vectors: VectorIndex  # the FAISS layer (index.VectorIndex)
    arrays: dict[str, np.ndarray]
    loaded: LoadedModel
    duplicates: DuplicateTable  # picture hashes of indexed products (exact-duplicate vote)
    tower: nn.Module | None = None  # the runtime that embeds queries (model.onnx_runtime), None: the torch net

    @property
    def layout(self) -> IndexFolder:
        return IndexFolder(self.folder)

    @property
    def product_ids(self) -> np.ndarray:
        return self.arrays["product_ids"]

    @property
    def net(self):
        """What embeds pictures for this index: the runtime it was opened with (torch's network by default)."""
        return self.tower if self.tower is not None else self.loaded.net

    @property
    def runtime(self) -> dict:
        """The fingerprint of the runtime that embeds this bundle's queries (model.onnx_runtime)."""
        return self.tower.fingerprint if self.tower is not None else {"runtime": "torch", "precision": "fp32"}

    def refuse_runtime_on(self, distributed: bool) -> None:
        """An ONNX runtime runs in this process on the CPU: refuse it for a run over several devices."""
        if distributed and self.tower is not None:
            raise UserError(f"--runtime {self.runtime['runtime']} runs in one process on the CPU; drop --devices "
                            "and --num-nodes, or use --runtime torch")

    @property
    def categories(self) -> CategoryTable:
        return self.loaded.categories

    @property
    def run(self) -> RunDir:
        return RunDir(self.layout.resolve(self.manifest.run_dir, self.manifest.origin))

    @cached_property
    def class_of_id(self) -> dict[int, int]:
        """Category id -> class index of the model (built once per opened generation)."""
        return {int(c): i for i, c in enumerate(self.categories.ids)}

    @cached_property
    def fallback_class(self) -> int:
        """The most frequent class among indexed products (for products with no decodable image)."""
        lab = self.vectors.labels[self.vectors.labels >= 0]
        return int(np.bincount(lab).argmax()) if len(lab) else 0

    @cached_property
    def _id_order(self) -> np.ndarray:
        return np.argsort(self.product_ids, kind="stable")

    def position_of(self, product_id: int) -> int | None:
        """Index position of ``product_id`` (binary search over the sorted ids), or None."""
        order = self._id_order
        i = int(np.searchsorted(self.product_ids, product_id, sorter=order))
        return int(order[i]) if i < len(order) and self.product_ids[order[i]] == product_id else None

    @cached_property
    def _part_starts(self) -> np.ndarray:
        return np.cumsum([c for _, c in self.manifest.parts])

    def vector(self, position: int) -> np.ndarray:
        """The stored embedding ``[D]`` of the product at ``position``."""
        counts = self._part_starts
        k = int(np.searchsorted(counts, position, side="right"))
        part = self.manifest.parts[k][0]
        start = 0 if k == 0 else int(counts[k - 1])
        return np.array(self._vectors(part)[position - start])

    def _vectors(self, part: int | str) -> np.ndarray:
        """A part's embeddings, memory-mapped once (only the rows asked for are read)."""
        maps = self.__dict__.setdefault("_maps", {})
        if part not in maps:
            maps[part] = np.load(PartStore.vectors_file(self.layout.embeddings, part), mmap_mode="r")
        return maps[part]

    def commit(self) -> None:
        """Write this state as the folder's new generation (atomically; the caller holds the writer lock)."""
        self.manifest = replace(self.manifest, count=len(self.vectors))

        def write(gen: Path) -> None:
            self.vectors.save(IndexFolder.vectors(gen))
            for k in ARRAYS:
                np.save(IndexFolder.array_file(gen, k), self.arrays[k])
            self.duplicates.save(IndexFolder.duplicates_file(gen))
            self.manifest.save(IndexFolder.manifest_file(gen))

        self.layout.commit(write)


def open_index(folder: str | Path, mmap: bool = False, runtime: str | None = None) -> IndexBundle:
    """Open an index folder's live generation and its model file (read and hashed once), refusing one whose
    model changed or whose files disagree. ``runtime`` (torch, onnx, onnx-int8; default: the one that built the
    index) embeds queries; one whose embeddings would disagree with the index's is refused."""
    layout = IndexFolder(folder)
    gen = layout.generation()
    man = IndexManifest.load(IndexFolder.manifest_file(gen))
    model_file = layout.resolve(man.model_file, man.origin)
    if not model_file.exists():
        raise FileNotFoundError(f"{layout.path}: its model file {model_file} is missing (moved without its run "
                                "folder? keep the run beside the index, or rebuild)")
    loaded = load_model_file(model_file, best_device())
    if loaded.sha256 != man.model_sha256:
        raise UserError(f"{layout.path}: model file {model_file} changed since the index was built (sha256 differs); "
                        "rebuild the index")
    vi = VectorIndex.load(IndexFolder.vectors(gen), mmap=mmap)
    arrays = {k: np.load(IndexFolder.array_file(gen, k)) for k in ARRAYS}
    if len(arrays["product_ids"]) != len(vi) or man.count != len(vi):
        raise UserError(f"{layout.path}: manifest count {man.count} and stored arrays disagree with the index "
                        f"({len(vi)})")
    bundle = IndexBundle(layout.path, man, vi, arrays, loaded, DuplicateTable.load(IndexFolder.duplicates_file(gen)))
    bundle.tower = query_tower(bundle, runtime)
    return bundle


def query_tower(bundle: IndexBundle, runtime: str | None) -> nn.Module | None:
    """The runtime that embeds ``bundle``'s queries (None: torch), refused when it disagrees with the index's."""
    runtime = runtime or bundle.manifest.runtime.get("runtime", "torch")
    if runtime == "torch" and bundle.manifest.runtime.get("precision", "fp32") == "fp32":
        return None
    from ...model.onnx_runtime import load_runtime, runtime_fingerprint, runtime_mismatch
    tower = load_runtime(bundle.loaded, runtime, bundle.run.path)
    why = runtime_mismatch(bundle.manifest.runtime, runtime_fingerprint(tower))
    if why:
        raise UserError(f"{bundle.folder}: {why}")
    return None if runtime == "torch" else tower


def check_source(bundle: IndexBundle, source: int) -> Path:
    """Path of data file ``source``, refusing it if it is missing or changed since indexing."""
    src = bundle.manifest.sources[source]
    path = bundle.layout.resolve(src.path, bundle.manifest.origin)
    if not path.exists():
        raise UserError(f"{bundle.folder}: indexed data file {src.path} is missing (looked for {path}); move data "
                        "files together with the index folder")
    if file_fingerprint(path) != src.fingerprint:
        raise UserError(f"{path} changed since it was indexed (size/mtime differ); rebuild the index")
    return path
