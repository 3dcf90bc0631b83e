"""The index folder: its manifest (a frozen, versioned record of what the index was built from) and
:class:`IndexFolder`, the owner of every file in it (generations, atomic commit, the writer lock)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ...errors import UserError

MANIFEST_VERSION = 3  # 3: generations, paths relative to the folder, parts keyed by content


@dataclass(frozen=True)
class Source:
    """A data file whose products are in the index, with its fingerprint (name, size, mtime) when indexed."""

    path: str
    fingerprint: dict


@dataclass(frozen=True)
class IndexManifest:
    """``manifest.json`` of an index folder. ``parts`` lists ``(part number, products)`` in position order."""

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
    version: int = MANIFEST_VERSION

    def with_added(self, parts: list[tuple[int, int]], source: Source) -> "IndexManifest":
        """The manifest after appending products from ``source`` in ``parts``."""
        return replace(self, parts=self.parts + tuple(tuple(p) for p in parts), sources=self.sources + (source,),
                       count=self.count + sum(n for _, n in parts))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "IndexManifest":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no manifest (not an index folder; run build-index)")
        try:
            d = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"{path}: unreadable index manifest; rebuild the index") from None
        if d.get("version") != MANIFEST_VERSION:
            raise UserError(f"{path}: index manifest version {d.get('version')}; this code reads version "
                            f"{MANIFEST_VERSION}: rebuild the index with build-index")
        d["parts"] = tuple(tuple(p) for p in d["parts"])
        d["sources"] = tuple(Source(**s) for s in d["sources"])
        try:
            return cls(**d)
        except TypeError as e:
            raise UserError(f"{path}: not a valid index manifest ({e})") from None
