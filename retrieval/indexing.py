"""build-index and add-to-index: product embeddings into a FAISS index folder with a manifest."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from index import VectorIndex, choose_factory, exact_topk

from .offsets import RecordReader, file_fingerprint, load_offsets
from .categories import CategoryTable
from .embed import ChunkStore, embed_products
from .images import DecodeStats
from .model import EmbeddingNet, load_checkpoint, net_from_checkpoint, read_checkpoint
from .train import best_checkpoint

log = logging.getLogger(__name__)
ARRAYS = ("product_ids", "category_ids", "offsets", "lengths", "sources")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _on_device(loaded: tuple[EmbeddingNet, CategoryTable, dict]) -> tuple[EmbeddingNet, CategoryTable, dict]:
    net, cats, info = loaded
    return (net.cuda() if torch.cuda.is_available() else net), cats, info


def load_model(checkpoint: str | Path) -> tuple[EmbeddingNet, CategoryTable, dict]:
    """The checkpoint's network on the best available device."""
    return _on_device(load_checkpoint(checkpoint))


@dataclass
class IndexBundle:
    """An opened index folder: manifest, FAISS index and per-product arrays (position order)."""

    folder: Path
    manifest: dict
    index: VectorIndex
    arrays: dict[str, np.ndarray]

    @property
    def product_ids(self) -> np.ndarray:
        return self.arrays["product_ids"]

    @cached_property
    def _checkpoint(self) -> dict:
        return read_checkpoint(self.manifest["checkpoint"])  # read once for both the model and the categories

    @cached_property
    def model(self) -> tuple[EmbeddingNet, CategoryTable, dict]:
        return _on_device(net_from_checkpoint(self._checkpoint, self.manifest["checkpoint"]))

    @cached_property
    def categories(self) -> CategoryTable:
        return CategoryTable.from_dict(self._checkpoint["categories"])

    def vector(self, position: int) -> np.ndarray:
        """The stored embedding ``[D]`` of the product at ``position``."""
        counts = np.cumsum([c for _, c in self.manifest["parts"]])
        k = int(np.searchsorted(counts, position, side="right"))
        part, _ = self.manifest["parts"][k]
        start = 0 if k == 0 else int(counts[k - 1])
        with np.load(self.folder / "embeddings" / f"part_{part:05d}.npz") as z:
            return z["emb"][position - start]

    def save(self) -> None:
        self.index.save(self.folder / "faiss")
        for k in ARRAYS:
            np.save(self.folder / f"{k}.npy", self.arrays[k])
        self.manifest["count"] = len(self.index)
        (self.folder / "manifest.json").write_text(json.dumps(self.manifest, indent=1))


def open_index(folder: str | Path, mmap: bool = False) -> IndexBundle:
    """Open an index folder, refusing one whose checkpoint changed since it was built."""
    f = Path(folder)
    if not (f / "manifest.json").exists():
        raise FileNotFoundError(f"{f}: no manifest.json (not an index folder; run build-index)")
    man = json.loads((f / "manifest.json").read_text())
    ck = Path(man["checkpoint"])
    if not ck.exists():
        raise FileNotFoundError(f"{f}: the index's checkpoint {ck} is missing")
    if sha256_file(ck) != man["checkpoint_sha256"]:
        raise ValueError(f"{f}: checkpoint {ck} changed since the index was built (sha256 differs); rebuild the index")
    vi = VectorIndex.load(f / "faiss", mmap=mmap)
    arrays = {k: np.load(f / f"{k}.npy") for k in ARRAYS}
    if len(arrays["product_ids"]) != len(vi) or man["count"] != len(vi):
        raise ValueError(f"{f}: manifest count {man['count']} and stored arrays disagree with the index ({len(vi)})")
    return IndexBundle(f, man, vi, arrays)


def check_source(bundle: IndexBundle, source: int) -> str:
    """Path of data file ``source``, refusing it if it changed since indexing."""
    src = bundle.manifest["sources"][source]
    if file_fingerprint(src["path"]) != src["fingerprint"]:
        raise ValueError(f"{src['path']} changed since it was indexed (size/mtime differ); rebuild the index")
    return src["path"]


def _embed_to_store(net, reader, rows, store: ChunkStore, first_part: int, chunk: int, batch: int, workers: int,
                    tta: bool, stats: DecodeStats, desc: str) -> tuple[list[list[int]], float]:
    """Embed ``rows`` into numbered parts; returns the parts and the seconds spent embedding."""
    parts, seconds = [], 0.0
    bar = tqdm(total=len(rows), unit="products", desc=desc)
    for i, lo in enumerate(range(0, len(rows), chunk)):
        part, sub = first_part + i, rows[lo:lo + chunk]
        if not store.done(part):
            t = time.perf_counter()
            out = [o for o in embed_products(net, reader, sub, batch, workers, tta, stats)]
            store.write(part, rows=np.concatenate([o.rows for o in out]), emb=np.concatenate([o.emb for o in out]))
            seconds += time.perf_counter() - t
        else:
            log.info("part %d already embedded; resuming after it", part)
        parts.append([part, len(sub)])
        bar.update(len(sub))
    bar.close()
    return parts, seconds


def build_index(train_path: str | Path, run_dir: str | Path, out_dir: str | Path, split: str = "train",
                index_type: str = "auto", batch_size: int = 256, tta_flip: bool = False, workers: int = 2,
                chunk_products: int = 50_000, memory_budget: float = 8e9, target_recall: float = 0.95) -> dict:
    """Embed every product of ``split`` ("train": the run's training split, "all": every labelled product),
    build a FAISS index and write INDEX_DIR. Re-running after an interruption resumes from the last part."""
    if split not in ("train", "all"):
        raise ValueError(f"split must be 'train' or 'all', got {split!r}")
    train_path, out = Path(train_path), Path(out_dir)
    ckpt = best_checkpoint(run_dir)
    net, cats, info = load_model(ckpt)
    table = load_offsets(train_path)
    fp = file_fingerprint(train_path)
    if split == "train":
        if info.get("train_file") != fp:
            raise ValueError(f"{train_path} is not the file run {run_dir} was trained on ({info.get('train_file')}); "
                             "--split train needs the run's own training file")
        rows = np.load(Path(run_dir) / "split.npz")["train_rows"]
    else:
        rows = np.flatnonzero(table["category_id"] >= 0)
    if len(rows) == 0:
        raise ValueError(f"{train_path}: no labelled products to index")
    ck_hash = sha256_file(ckpt)
    key = {"checkpoint_sha256": ck_hash, "data": fp, "split": split, "tta_flip": tta_flip, "chunk": chunk_products}
    store = ChunkStore(out / "embeddings", key)
    stats = DecodeStats()
    parts, embed_s = _embed_to_store(net, RecordReader(train_path, table), rows, store, 0, chunk_products,
                                     batch_size, workers, tta_flip, stats, "embedding")
    dim = net.cfg.embed_dim
    factory = choose_factory(len(rows), dim, memory_budget) if index_type == "auto" else index_type
    vi = VectorIndex.create(dim, factory)
    blocks = lambda: (store.read(p)["emb"] for p, _ in parts)  # noqa: E731
    if not vi.index.is_trained:
        rng = np.random.default_rng(0)
        sample = np.concatenate([b[rng.random(len(b)) < min(1.0, 200_000 / len(rows))] for b in blocks()])
        vi.train(sample)
    labels = cats.encode(table["category_id"][rows])

    def added_blocks():  # each part is read once here: added to the index, then scored exactly for tuning
        start = 0
        for b in tqdm(blocks(), total=len(parts), desc="adding to index", unit="parts"):
            vi.add(b, labels[start:start + len(b)])
            start += len(b)
            yield b

    recall = 1.0
    if vi.ivf is not None or vi.hnsw is not None:
        q = store.read(parts[0][0])["emb"][:1000]
        truth = exact_topk(q, added_blocks(), 10)[1]
        recall = vi.tune(q, truth, target_recall)
    else:
        for _ in added_blocks():
            pass
    manifest = {
        "version": 1, "checkpoint": str(ckpt.resolve()), "checkpoint_sha256": ck_hash,
        "run_dir": str(Path(run_dir).resolve()), "backbone": net.cfg.backbone, "image_size": net.cfg.image_size,
        "dim": dim, "metric": "inner_product (cosine on unit vectors)", "factory": factory, "count": len(rows),
        "split": split, "tta_flip": tta_flip, "tuned_recall_at_10": recall, "store_key": key, "parts": parts,
        "sources": [{"path": str(train_path.resolve()), "fingerprint": fp}], "decode": stats.summary(),
        "embedding": {"seconds": round(embed_s, 3), "images": stats.decoded}}
    arrays = {"product_ids": table["product_id"][rows], "category_ids": table["category_id"][rows],
              "offsets": table["offset"][rows], "lengths": table["length"][rows].astype(np.int64),
              "sources": np.zeros(len(rows), np.int16)}
    IndexBundle(out, manifest, vi, arrays).save()
    log.info("index of %d products (%s) written to %s; %s", len(rows), factory, out, stats.summary())
    return manifest


def add_to_index(index_dir: str | Path, new_path: str | Path, batch_size: int = 256, workers: int = 2
                 ) -> tuple[int, list[int]]:
    """Embed the products of ``new_path`` and append them; returns (added, ids already indexed)."""
    bundle = open_index(index_dir)
    net, cats, _ = bundle.model
    new_path = Path(new_path)
    table = load_offsets(new_path)
    known = np.isin(table["product_id"], bundle.product_ids)
    _, first = np.unique(table["product_id"], return_index=True)
    fresh = np.zeros(len(table), bool)
    fresh[first] = True
    rows = np.flatnonzero(fresh & ~known)
    dups = table["product_id"][known | ~fresh].tolist()
    if dups:
        log.warning("%d products of %s are already in the index and were skipped (e.g. %s)", len(dups), new_path,
                    dups[:5])
    if len(rows) == 0:
        return 0, dups
    cat_ids = table["category_id"][rows]
    ok = np.isin(cat_ids, np.asarray(cats.ids))
    labels = np.full(len(rows), -1, np.int64)
    labels[ok] = cats.encode(cat_ids[ok])
    if (~ok).any():
        log.warning("%d new products have no known category: findable by `similar`, but they do not vote", (~ok).sum())
    man = bundle.manifest
    store = ChunkStore(bundle.folder / "embeddings", man["store_key"])
    first_part = max(p for p, _ in man["parts"]) + 1
    parts, _ = _embed_to_store(net, RecordReader(new_path, table), rows, store, first_part, 10 ** 9, batch_size,
                               workers, man["tta_flip"], DecodeStats(), "embedding new products")
    bundle.index.add(store.read(parts[0][0])["emb"], labels)
    src = len(man["sources"])
    man["sources"].append({"path": str(new_path.resolve()), "fingerprint": file_fingerprint(new_path)})
    man["parts"] += parts
    new = {"product_ids": table["product_id"][rows], "category_ids": cat_ids, "offsets": table["offset"][rows],
           "lengths": table["length"][rows].astype(np.int64), "sources": np.full(len(rows), src, np.int16)}
    bundle.arrays = {k: np.concatenate([bundle.arrays[k], new[k]]) for k in ARRAYS}
    bundle.save()
    return len(rows), dups
