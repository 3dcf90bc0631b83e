"""An opened index folder: :class:`IndexBundle` (one generation, its model, vectors and per-product arrays) and
:func:`open_index`; build-index and add-to-index (in ``folder``) write what this reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from torch import nn

from index import DuplicateTable, JoinedDuplicates, SegmentedIndex, prototypes

from ...data.categories import CategoryTable
from ...data.offsets import file_fingerprint
from ...errors import UserError
from ...model.export import LoadedModel, load_model_file
from ...model.runtime import best_device
from ...rundir import RunDir
from .folder import IndexFolder
from .manifest import IndexManifest
from .segments import ARRAYS, Segment, load_segment, load_state, meta_file

__all__ = ["ARRAYS", "IndexBundle", "open_index", "query_tower", "check_source", "refuse_runtime_on"]


class Joined:
    """Per-segment arrays ``[n_i]`` read as one column ``[N]`` by global position, without copying them:
    ``col[i]`` and ``col[positions]``; ``np.asarray(col)`` joins them (for whole-column work)."""

    def __init__(self, pieces: list[np.ndarray]) -> None:
        self.pieces = pieces
        self.starts = np.cumsum([0] + [len(p) for p in pieces])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            if not -len(self) <= i < len(self):
                raise IndexError(f"position {i} out of {len(self)}")
            i = int(i) % len(self)
            s = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self.pieces[s][i - self.starts[s]]
        pos = np.arange(len(self))[i] if isinstance(i, slice) else np.asarray(i)
        if pos.dtype == bool:
            if pos.shape != (len(self),):
                raise IndexError(f"a mask of {pos.shape} for a column of {len(self)}")
            pos = np.flatnonzero(pos)
        pos = pos.astype(np.int64)
        if len(pos) and (pos.min() < -len(self) or pos.max() >= len(self)):
            raise IndexError(f"positions out of {len(self)}")
        pos = pos % max(len(self), 1)
        seg = np.searchsorted(self.starts, pos, side="right") - 1
        out = np.empty(pos.shape, self.dtype)
        for s in np.unique(seg):
            m = seg == s
            out[m] = np.asarray(self.pieces[s])[pos[m] - self.starts[s]]
        return out

    @property
    def dtype(self) -> np.dtype:
        return np.result_type(*[p.dtype for p in self.pieces])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __eq__(self, other):  # a mask, as an array's ==
        return np.asarray(self) == other

    __hash__ = None

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        joined = np.concatenate([np.asarray(p) for p in self.pieces])
        return joined if dtype is None else joined.astype(dtype)


@dataclass
class IndexBundle:
    """An opened index folder at one generation: manifest, its segments searched as one index (``vectors``),
    per-product arrays ``[N]`` in position order, the model, and the exact-duplicate table (global positions).
    A reader keeps the generation it opened; nothing here is written back."""

    folder: Path
    manifest: IndexManifest
    segments: list[Segment]
    loaded: LoadedModel
    tower: nn.Module | None = None  # the runtime that embeds queries (model.onnx_runtime), None: the torch net
    generation: str = ""
    vectors: SegmentedIndex = field(init=False)
    arrays: dict[str, np.ndarray] = field(init=False)
    duplicates: DuplicateTable = field(init=False)  # picture hashes of indexed products (exact-duplicate vote)

    def __post_init__(self) -> None:
        segs = self.segments
        self.vectors = SegmentedIndex([s.vectors for s in segs])
        if len(segs) == 1:  # as built: the segment's own arrays and table (memory-mapped ones stay mapped)
            self.arrays, self.duplicates = dict(segs[0].arrays), segs[0].duplicates
            return
        # a large segment and its additions are read in place: no copy of the catalogue's arrays at each add
        self.arrays = {k: Joined([s.arrays[k] for s in segs]) for k in ARRAYS}
        self.duplicates = JoinedDuplicates([s.duplicates for s in segs], self.vectors.offsets[:-1].tolist())

    @property
    def live_count(self) -> int:
        """Products a query can find (every segment's rows less those this generation removed)."""
        return sum(s.live_count for s in self.segments)

    @property
    def layout(self) -> IndexFolder:
        return IndexFolder(self.folder)

    @cached_property
    def product_ids(self) -> np.ndarray:
        """All product ids ``[N]`` in position order (joined once, where the bundle has several segments)."""
        return np.asarray(self.arrays["product_ids"])

    @cached_property
    def live_positions(self) -> np.ndarray:
        """Positions ``[L]`` of the products this generation serves (removed ones left out), ascending."""
        return np.concatenate([np.flatnonzero(s.live_mask()) + off
                               for s, off in zip(self.segments, self.vectors.offsets[:-1], strict=True)])

    @property
    def live_product_ids(self) -> np.ndarray:
        """The ids ``[L]`` of the products this generation serves."""
        return self.product_ids[self.live_positions]

    @property
    def net(self):
        """What embeds pictures for this index: the runtime it was opened with (torch's network by default)."""
        return self.tower if self.tower is not None else self.loaded.net

    @property
    def runtime(self) -> dict:
        """The fingerprint of the runtime that embeds this bundle's queries (model.onnx_runtime)."""
        return self.tower.fingerprint if self.tower is not None else {"runtime": "torch", "precision": "fp32"}

    def refuse_runtime_on(self, distributed: bool) -> None:
        """See :func:`refuse_runtime_on` (this bundle's query runtime)."""
        refuse_runtime_on(self.runtime["runtime"], distributed)

    @property
    def categories(self) -> CategoryTable:
        return self.loaded.categories

    @property
    def run(self) -> RunDir:
        return RunDir(self.layout.resolve(self.manifest.run_dir, self.manifest.origin))

    @cached_property
    def class_sums(self) -> np.ndarray:
        """Sum ``[C, D]`` (float64) of each class's indexed embeddings over every segment."""
        total = np.zeros((len(self.categories.ids), self.manifest.dim))
        for c in (s.class_sums() for s in self.segments):
            total[:len(c)] += c[:len(total)]
        return total

    @cached_property
    def prototypes(self) -> np.ndarray:
        """Unit class prototypes ``[C, D]``: the mean embedding of each class's indexed products over every
        segment, normalised (a zero row for a class without products)."""
        return prototypes(self.class_sums)

    def prototypes_without(self, position: int) -> np.ndarray:
        """:attr:`prototypes` with the indexed product at ``position`` left out of its class's mean (a product
        queried as itself must not vote for its own class through its own embedding)."""
        label = int(self.vectors.labels[position])
        if label < 0:
            return self.prototypes
        out = self.prototypes.copy()
        out[label] = prototypes((self.class_sums[label] - self.vector(position))[None])[0]
        return out

    @cached_property
    def class_of_id(self) -> dict[int, int]:
        """Category id -> class index of the model (built once per opened generation)."""
        return {int(c): i for i, c in enumerate(self.categories.ids)}

    @cached_property
    def fallback_class(self) -> int:
        """The most frequent class among indexed products (for products with no decodable image)."""
        lab = self.vectors.labels[self.vectors.labels >= 0]
        return int(np.bincount(lab).argmax()) if len(lab) else 0

    def position_of(self, product_id: int) -> int | None:
        """Index position of ``product_id`` (a binary search in each segment's stored id map), or None."""
        for seg, off in zip(self.segments, self.vectors.offsets[:-1], strict=True):
            local = seg.find(product_id)
            if local is not None:
                return int(off) + local
        return None

    def vector(self, position: int) -> np.ndarray:
        """The stored embedding ``[D]`` of the product at ``position`` (read from its segment's own files)."""
        s, local = self.vectors.locate(position)
        return self.segments[s].vector(local)


def refuse_runtime_on(runtime: str, distributed: bool) -> None:
    """An ONNX runtime runs in this process on the CPU: refuse it for a run over several devices or nodes."""
    if distributed and runtime != "torch":
        raise UserError(f"--runtime {runtime} runs in one process on the CPU; drop --devices and --num-nodes, or "
                        "use --runtime torch")


def load_index_model(layout: IndexFolder, man: IndexManifest, device) -> LoadedModel:
    """The model file a manifest names (read and hashed once), refused when missing or changed."""
    model_file = layout.resolve(man.model_file, man.origin)
    if not model_file.exists():
        raise FileNotFoundError(f"{layout.path}: its model file {model_file} is missing (moved without its "
                                "run folder? keep the run beside the index, or rebuild)")
    loaded = load_model_file(model_file, device)
    if loaded.sha256 != man.model_sha256:
        raise UserError(f"{layout.path}: model file {model_file} changed since the index was built (sha256 "
                        "differs); rebuild the index")
    return loaded


def open_index(folder: str | Path, mmap: bool = False, runtime: str | None = None,
               reuse: IndexBundle | None = None, hold_out: bool = False) -> IndexBundle:
    """Open an index folder's live generation and its model file (read and hashed once), refusing one whose
    model changed or whose files disagree. ``runtime`` (torch, onnx, onnx-int8; default: the one that built the
    index) embeds queries; one whose embeddings would disagree with the index's is refused. ``reuse``: an opened
    bundle of the same folder whose model and segments are taken as they are (only new segments are read; its
    query runtime is kept). ``hold_out``: the held-out segment's products (the run's validation products, where
    the build made one) are left out of every search, vote, prototype and class size, as in an index of the
    training split alone (evaluate's view)."""
    layout = IndexFolder(folder)
    gen = layout.generation()
    man = IndexManifest.load(IndexFolder.manifest_file(gen))
    if reuse is not None and reuse.manifest.model_sha256 == man.model_sha256:
        loaded = reuse.loaded
    else:
        reuse = None
        loaded = load_index_model(layout, man, best_device())
    segs = open_segments(layout, man, mmap, reuse)
    if hold_out and man.held_out is not None:
        at = [s.sid for s in segs].index(man.held_out)
        segs[at] = segs[at].held_out()
    if not segs or [len(s) for s in segs] != [n for _, n in man.segments] or man.count != sum(map(len, segs)):
        raise UserError(f"{layout.path}: manifest count {man.count} and its segments disagree; rebuild the index")
    bundle = IndexBundle(layout.path, man, segs, loaded, generation=gen.name)
    bundle.tower = reuse.tower if reuse is not None else query_tower(bundle, runtime)
    return bundle


def open_segments(layout: IndexFolder, man: IndexManifest, mmap: bool = False,
                  reuse: IndexBundle | None = None) -> list[Segment]:
    """The segments ``man`` lists, as its generation sees them (deletion sets and relabels applied); segments
    ``reuse`` has open are taken as they are (their view too, where the generation did not change them)."""
    old = reuse.manifest.segment_state if reuse is not None else {}
    have = {s.sid: s for s in reuse.segments} if reuse is not None else {}
    out = []
    for sid, _ in man.segments:
        entry = man.segment_state.get(sid)
        seg = have.get(sid)
        if seg is not None and old.get(sid) == entry:
            out.append(seg)
            continue
        base = (seg.base or seg) if seg is not None else load_segment(layout, sid, mmap,
                                                                    man.checksums.get(meta_file(sid)))
        out.append(base.with_state(load_state(layout, entry, man.checksums, len(base))))
    return out


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
