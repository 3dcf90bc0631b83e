"""The index folder: its manifest (a frozen, versioned record of what the index was built from) and
:class:`IndexFolder`, the owner of every file in it (generations, atomic commit, the writer lock)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ...errors import UserError
from .integrity import json_digest, read_json

MANIFEST_VERSION = 4  # 4: a generation lists immutable segments; 3: generations, relative paths, content-keyed parts


@dataclass(frozen=True)
class Source:
    """A data file whose products are in the index, with its fingerprint (name, size, mtime) when indexed."""

    path: str
    fingerprint: dict


@dataclass(frozen=True)
class IndexManifest:
    """``manifest.json`` of a generation. ``segments`` lists ``(segment id, products)`` in position order (a
    segment's products take the positions after those of the segments before it); ``parts`` lists the embedded
    parts ``(part number or content key, products)`` of all segments, in the same order (provenance)."""

    model_file: str
    model_sha256: str
    run_dir: str
    backbone: str
    image_size: int
    dim: int
    factory: str
    count: int
    split: str
    mirror: bool
    store_key: dict
    parts: tuple[tuple[int | str, int], ...]  # (part number, or content key for added parts; products)
    sources: tuple[Source, ...]
    tuned_recall_at_10: float = 1.0
    decode: str = ""
    embedding: dict = field(default_factory=dict)
    metric: str = "inner_product (cosine on unit vectors)"
    origin: str = ""  # where the folder was built: relative paths are also tried from there (a copy elsewhere)
    # the runtime that embedded it (model.onnx_runtime.runtime_fingerprint): queries must use a compatible one
    runtime: dict = field(default_factory=lambda: {"runtime": "torch", "precision": "fp32"})
    segments: tuple[tuple[str, int], ...] = ()
    version: int = MANIFEST_VERSION
    # per segment whose products changed since it was sealed: {"removed": file, "removed_count": R, "relabels":
    # file, "relabel_count": M} (files under state/, written aside for this generation; the segment never changes)
    segment_state: dict = field(default_factory=dict)
    # [size, XXH3-64] of every file the generation references outside a segment's own folder (its state files,
    # each segment's segment.json, which holds the checksums of the segment's files), by path relative to the folder
    checksums: dict = field(default_factory=dict)
    index_memory: float = 0.0  # the memory budget (bytes) build-index chose the index type within (0: unknown)
    target_recall: float = 0.95  # the recall@10 an approximate segment is tuned to
    # the segment of the run's validation products (build-index of the run's own training file): searched by every
    # query, masked by evaluate, which reads their stored embeddings and head inputs instead of embedding them
    held_out: str | None = None

    @property
    def removed_count(self) -> int:
        return sum(int(st.get("removed_count", 0)) for st in self.segment_state.values())

    @property
    def live_count(self) -> int:
        """Products a query can find: every segment's rows less those removed."""
        return self.count - self.removed_count

    def with_segment(self, sid: str, parts: list[tuple[int | str, int]], source: Source) -> "IndexManifest":
        """The manifest after appending segment ``sid`` (its ``parts``) of products from ``source``."""
        n = sum(c for _, c in parts)
        return replace(self, parts=self.parts + tuple(tuple(p) for p in parts), sources=self.sources + (source,),
                       count=self.count + n, segments=self.segments + ((sid, n),))

    def save(self, path: Path) -> None:
        """Write the manifest with its own checksum (``digest``: damage to any value is refused at load)."""
        d = json.loads(json.dumps(asdict(self)))
        d["digest"] = json_digest(d)
        Path(path).write_text(json.dumps(d, indent=1))

    @classmethod
    def load(cls, path: Path) -> "IndexManifest":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no manifest (not an index folder; run build-index)")
        d = read_json(path, "index manifest ")
        d.pop("digest", None)
        if d.get("version") != MANIFEST_VERSION:
            raise UserError(f"{path}: index manifest version {d.get('version')}; this code reads version "
                            f"{MANIFEST_VERSION}: rebuild the index with build-index")
        try:
            d["parts"] = tuple(tuple(p) for p in d["parts"])
            d["sources"] = tuple(Source(**s) for s in d["sources"])
            d["segments"] = tuple(tuple(s) for s in d.get("segments", ()))
            return cls(**d)
        except (TypeError, KeyError, ValueError) as e:
            raise UserError(f"{path}: not a valid index manifest ({e})") from None
