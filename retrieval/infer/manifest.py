"""The index folder's manifest: a frozen, versioned record of what the index was built from."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import UserError

MANIFEST_VERSION = 2


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
    tta_flip: bool
    store_key: dict
    parts: tuple[tuple[int, int], ...]
    sources: tuple[Source, ...]
    tuned_recall_at_10: float = 1.0
    decode: str = ""
    embedding: dict = field(default_factory=dict)
    metric: str = "inner_product (cosine on unit vectors)"
    version: int = MANIFEST_VERSION

    def with_added(self, parts: list[tuple[int, int]], source: Source) -> "IndexManifest":
        """The manifest after appending products from ``source`` in ``parts``."""
        return replace(self, parts=self.parts + tuple(tuple(p) for p in parts), sources=self.sources + (source,),
                       count=self.count + sum(n for _, n in parts))

    def save(self, folder: Path) -> None:
        (Path(folder) / "manifest.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, folder: Path) -> "IndexManifest":
        path = Path(folder) / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no manifest.json (not an index folder; run build-index)")
        d = json.loads(path.read_text())
        if d.get("version") != MANIFEST_VERSION:
            raise UserError(f"{folder}: index manifest version {d.get('version')}; this code reads version "
                            f"{MANIFEST_VERSION}: rebuild the index with build-index")
        d["parts"] = tuple(tuple(p) for p in d["parts"])
        d["sources"] = tuple(Source(**s) for s in d["sources"])
        try:
            return cls(**d)
        except TypeError as e:
            raise UserError(f"{path}: not a valid index manifest ({e})") from None
