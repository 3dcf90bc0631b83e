"""What evaluate keeps of a part of scored products, and the held-out segment's products scored from what
build-index stored (embeddings, and per picture the head's inputs and hash): no picture read, no backbone run."""
from __future__ import annotations

import hashlib
from dataclasses import fields
from pathlib import Path
from typing import Iterator

import numpy as np

from ..data.images import DecodeStats
from ..errors import UserError
from .indexdir.bundle import IndexBundle
from .indexdir.segments import Segment, held_out_file
from .pipeline.embed import ProductOutputs, head_outputs
from .pipeline.parts import PartWork, decode_counts, reduce_groups
from .pipeline.store import PartStore
from .scoring.calibrate import KS
from .scoring.candidates import HEAD_TOP, PROTO_TOP, Candidates, candidates_for

GROUP = 4096  # products searched and reduced together (never a whole part's [P, C] head probabilities at once)
CANDIDATE_FIELDS = tuple(f.name for f in fields(Candidates))


def score_part(bundle: IndexBundle, outs: list, y: np.ndarray) -> dict[str, np.ndarray]:
    """Candidates, the head's argmax and per-image correctness of one part's products (``y``: their classes)."""
    c = candidates_for(bundle.vectors, bundle.duplicates, outs, max(KS), bundle.prototypes)
    o = ProductOutputs.concat(outs)
    c = c.widened(HEAD_TOP + max(KS) + c.dups.shape[1] + PROTO_TOP)  # one width for all: groups join into a part
    return {**{f: getattr(c, f) for f in CANDIDATE_FIELDS}, "emb": o.emb, "head_pred": o.probs.argmax(1),
            "img_ok": o.image_pred == y[o.image_owner], "n_images": o.n_images}


def held_out_segment(bundle: IndexBundle) -> Segment | None:
    """The held-out segment as its generation sees it (relabels applied, removed rows marked), or None."""
    sid = bundle.manifest.held_out
    if sid is None:
        return None
    return next(s.unmasked for s in bundle.segments if s.sid == sid)


def has_head_inputs(seg: Segment) -> bool:
    return all(held_out_file(seg.path, k).exists() for k in range(len(seg.parts)))


def stored_parts(bundle: IndexBundle, seg: Segment, scratch: Path, max_products: int | None, seed: int
                  ) -> tuple[PartStore, list[int], DecodeStats, np.ndarray]:
    """The held-out segment's live products scored as :func:`_embed_parts` scores embedded ones, from what the
    build stored: product embeddings, and per picture the head's inputs (probabilities made by the head alone,
    :func:`~.pipeline.embed.head_outputs`) and hash. Returns the scratch store, products per part, decode
    counts and the products' classes ``y``."""
    # the truth is the file's label as indexed (a relabel changes what predict answers, not what is scored) and
    # the products still in the catalogue
    labels = np.asarray((seg.base or seg).vectors.labels)
    live = seg.live_mask() & (labels >= 0)
    if bundle.live_count == 0:
        raise UserError(f"{bundle.folder}: every product but the held-out ones is removed; nothing to vote")
    if max_products is not None and live.sum() > max_products:
        pick = np.sort(np.random.default_rng(seed).choice(np.flatnonzero(live), max_products, replace=False))
        live = np.isin(np.arange(len(live)), pick)
    if not live.any():
        raise UserError(f"{bundle.folder}: no labelled held-out product left to evaluate")
    key = {"model": bundle.manifest.model_sha256, "count": len(bundle.vectors), "held_out": seg.sid,
           "rows": hashlib.sha1(np.flatnonzero(live).tobytes()).hexdigest(), "with": "emb+size+proto+only"}
    store = PartStore(scratch, key, restart=True)
    starts = np.cumsum([0] + [n for _, n in seg.parts])
    sizes = []
    for k in range(len(seg.parts)):  # scratch parts numbered from 0 over the segment's parts with a product kept
        keep = live[starts[k]:starts[k + 1]]
        if not keep.any():
            continue
        y = labels[starts[k]:starts[k + 1]][keep]
        work = PartWork(lambda outs, y=y: score_part(bundle, outs, y[np.concatenate([o.rows for o in outs])]),
                        group=GROUP)
        store.write(len(sizes), **reduce_groups(work, _stored_outputs(bundle, seg, k, keep)))
        sizes.append(int(keep.sum()))
    return store, sizes, decode_counts(store, list(range(len(sizes)))), labels[live]


def _stored_outputs(bundle: IndexBundle, seg: Segment, k: int, keep: np.ndarray, batch: int = 512
                    ) -> Iterator[ProductOutputs]:
    """Part ``k`` of a held-out segment as :class:`ProductOutputs` batches of its products in ``keep [n_k]``
    (``rows``: their positions among those kept), head probabilities made from the stored head inputs."""
    emb = seg.embeddings(k)
    with np.load(held_out_file(seg.path, k)) as z:
        head_in, owner, hashes = z["head_in"], z["img_owner"], z["img_hash"]
        n_images, failed = z["n_images"], z["failed"]
    kept = np.flatnonzero(keep)
    for lo in range(0, len(kept), batch):
        prods = kept[lo:lo + batch]
        local = np.full(len(keep), -1)
        local[prods] = np.arange(len(prods))
        img = np.flatnonzero(local[owner] >= 0)
        probs, img_pred = head_outputs(bundle.loaded.net, head_in[img], local[owner[img]], len(prods))  # torch's
        yield ProductOutputs(np.arange(lo, lo + len(prods)), np.asarray(emb[prods], np.float32), probs,
                             n_images[prods], failed[prods], img_pred, local[owner[img]], hashes[img])
