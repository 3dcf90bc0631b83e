"""Candidates: per product, the classes the fused rule can rank first, with the head's probabilities, the
neighbours found in the index and the exact-duplicate labels."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from index import DuplicateTable, VectorIndex, duplicate_share
from index.rows import drop_removed

from ..pipeline.embed import ProductOutputs


def pad_columns(a: np.ndarray, width: int, fill: float) -> np.ndarray:
    """``a [R, M]`` widened to ``[R, width]`` with ``fill`` on the right (unchanged when already that wide)."""
    return a if a.shape[1] >= width else np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill)


HEAD_TOP = 20  # head classes kept per product besides the neighbours' classes
PROTO_TOP = 5  # classes of the nearest prototypes kept too, where prototypes are used


@dataclass
class Candidates:
    """Per product, the only classes the fused rule can rank first: the head's top ``m`` plus the neighbours'
    and exact duplicates' classes, and the nearest prototypes' where prototypes are used (sorted, deduplicated,
    -1 padded), with the head's exact probability for each. Fused scores over these equal the dense ``[P, C]``
    ones, so the top-m ranking never needs all C classes."""

    classes: np.ndarray    # [P, W] int32 class index, -1 = padding
    head: np.ndarray       # [P, W] float32 head probability of each candidate
    sims: np.ndarray       # [P, K] neighbour similarities
    labels: np.ndarray     # [P, K] neighbour class, -1 = none
    has_image: np.ndarray  # [P] bool
    dups: np.ndarray       # [P, D] class of each exactly matching indexed picture, -1 = none
    size: np.ndarray       # [P, W] float32 indexed products of each candidate class (0 on padding)
    proto: np.ndarray | None = None  # [P, W] float32 cosine to each candidate's class prototype (None: not used)
    proto_only: np.ndarray | None = None  # [P, W] bool: a candidate only because its prototype is among the nearest

    @classmethod
    def build(cls, p_head: np.ndarray, neighbours: tuple[np.ndarray, np.ndarray], has_image: np.ndarray,
              dups: np.ndarray | None = None, m: int = HEAD_TOP, sizes: np.ndarray | None = None,
              proto_sims: np.ndarray | None = None) -> "Candidates":
        """From dense head probabilities ``[P, C]``, neighbours ``(sims [P, K], labels [P, K])``, exact-match
        labels ``[P, D]``, the index's products per class ``sizes [C']`` (:func:`class_sizes`; None: unknown, all
        0) and the products' cosines to every class prototype ``proto_sims [P, C]`` (None: not used; else the
        :data:`PROTO_TOP` nearest prototypes' classes are candidates too)."""
        sims, labels = neighbours
        m = min(m, p_head.shape[1])
        dups = np.full((len(p_head), 1), -1, np.int32) if dups is None else np.asarray(dups, np.int32)
        top = np.argpartition(-p_head, m - 1, axis=1)[:, :m] if m < p_head.shape[1] else \
            np.broadcast_to(np.arange(m), (len(p_head), m))
        extra = [top, labels, dups]
        near = None
        if proto_sims is not None:
            mp = min(PROTO_TOP, proto_sims.shape[1])
            near = (np.argpartition(-proto_sims, mp - 1, axis=1)[:, :mp] if mp < proto_sims.shape[1] else
                    np.broadcast_to(np.arange(mp), (len(p_head), mp)))
            extra.append(near)
        cand = np.sort(np.concatenate(extra, 1), axis=1)
        cand[:, 1:][cand[:, 1:] == cand[:, :-1]] = -1
        head = np.where(cand >= 0, np.take_along_axis(p_head, np.maximum(cand, 0), 1), 0.0)
        size = np.zeros(cand.shape, np.float32)
        if sizes is not None and len(sizes):
            known = (cand >= 0) & (cand < len(sizes))
            size[known] = np.asarray(sizes)[cand[known]]
        proto = only = None
        if proto_sims is not None:
            known = (cand >= 0) & (cand < proto_sims.shape[1])
            proto = np.where(known, np.take_along_axis(proto_sims, np.where(known, cand, 0), 1), 0.0)
            proto = proto.astype(np.float32)
            others = np.concatenate(extra[:-1], 1)  # [P, m + K + D] the classes a rule without prototypes sees
            only = np.zeros(cand.shape, bool)
            for j in range(near.shape[1]):
                c_j = near[:, j:j + 1]
                only |= (cand == c_j) & ~(others == c_j).any(1, keepdims=True)
        return cls(cand.astype(np.int32), head.astype(np.float32), np.asarray(sims, np.float32),
                   np.asarray(labels, np.int32), np.asarray(has_image, bool), dups, size, proto, only)

    def __len__(self) -> int:
        return len(self.classes)

    @cached_property
    def dup_share(self) -> np.ndarray:
        """Share ``[P, W]`` of each candidate among the product's exact-duplicate labels (0 without a match)."""
        return duplicate_share(self.classes, self.dups)

    def rows(self, sl: slice | np.ndarray) -> "Candidates":
        pick = lambda a: None if a is None else a[sl]  # noqa: E731
        return Candidates(self.classes[sl], self.head[sl], self.sims[sl], self.labels[sl], self.has_image[sl],
                          self.dups[sl], self.size[sl], pick(self.proto), pick(self.proto_only))

    def without_proto(self) -> "Candidates":
        """The candidates a rule that does not weigh prototypes sees, as predict builds them for it: those that
        are candidates only through a nearest prototype become padding, and ``proto`` is dropped."""
        if self.proto_only is None:
            return self if self.proto is None else replace(self, proto=None)
        gone = self.proto_only
        return replace(self, classes=np.where(gone, -1, self.classes), head=np.where(gone, 0, self.head),
                       size=np.where(gone, 0, self.size), proto=None, proto_only=None)

    def for_rule(self, uses_prototypes: bool) -> "Candidates":
        """These candidates for a rule that weighs prototypes, or as :meth:`without_proto` for one that does not."""
        return self if uses_prototypes else self.without_proto()

    @property
    def proto_or_zero(self) -> np.ndarray:
        """``proto [P, W]``, zeros where prototypes were not computed."""
        return np.zeros(self.classes.shape, np.float32) if self.proto is None else self.proto

    def widened(self, width: int) -> "Candidates":
        """The same candidates with the per-candidate columns padded to ``width`` (parts of one width join)."""
        pad = lambda a, fill: None if a is None else pad_columns(a, width, fill)  # noqa: E731
        return Candidates(pad_columns(self.classes, width, -1), pad_columns(self.head, width, 0), self.sims,
                          self.labels, self.has_image, self.dups, pad_columns(self.size, width, 0),
                          pad(self.proto, 0), pad(self.proto_only, False))

    @classmethod
    def concat(cls, parts: list["Candidates"]) -> "Candidates":
        def stack(arrays: list[np.ndarray], fill: float) -> np.ndarray:
            width = max(a.shape[1] for a in arrays)
            return np.concatenate([pad_columns(a, width, fill) for a in arrays])
        with_proto = all(p.proto is not None for p in parts)
        with_only = all(p.proto_only is not None for p in parts)
        return cls(stack([p.classes for p in parts], -1), stack([p.head for p in parts], 0),
                   np.concatenate([p.sims for p in parts]), np.concatenate([p.labels for p in parts]),
                   np.concatenate([p.has_image for p in parts]), stack([p.dups for p in parts], -1),
                   stack([p.size for p in parts], 0), stack([p.proto for p in parts], 0) if with_proto else None,
                   stack([p.proto_only for p in parts], False) if with_only else None)


_SIZES: tuple[weakref.ref, np.ndarray] | None = None  # (the labels array counted, its counts): one index at a time


def class_sizes(index: VectorIndex) -> np.ndarray:
    """Indexed products per class ``[C']`` (``bincount`` of the index's labels >= 0), counted once per labels
    array: an index's labels are only ever replaced, never changed in place. The cache does not keep the labels
    alive (a closed index frees them)."""
    global _SIZES
    got, lab = _SIZES, index.labels
    if got is None or got[0]() is not lab:
        got = _SIZES = (weakref.ref(lab), np.bincount(np.asarray(lab)[np.asarray(lab) >= 0]).astype(np.float32))
    return got[1]


def candidates_for(index: VectorIndex, duplicates: DuplicateTable, outs: list, k: int,
                   prototypes: np.ndarray | None = None) -> Candidates:
    """Candidates of embedded batches ``outs`` (:class:`~..pipeline.embed.ProductOutputs`): one search of ``k``
    neighbours for all their products, and the exact-duplicate lookup of all their pictures; with unit class
    ``prototypes [C, D]``, each product's cosine to them (and their nearest classes as candidates)."""
    o = ProductOutputs.concat(outs)
    has = o.n_images > 0
    sims, labels = neighbour_labels(index, o.emb, k, has)
    dups = duplicates.product_labels(o.image_hash, o.image_owner, len(o.emb), index.labels)
    proto_sims = None if prototypes is None else np.where(has[:, None], o.emb @ prototypes.T, 0.0)
    return Candidates.build(o.probs, (sims, labels), has, dups, sizes=class_sizes(index), proto_sims=proto_sims)


def neighbour_labels(index: VectorIndex, emb: np.ndarray, k: int, has_image: np.ndarray, exclude: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ``(sims [P, k], class labels [P, k])``; missing neighbours and products without image get -1.
    ``exclude``: an index position that is no one's neighbour (a query product's own; searched one deeper)."""
    sims, pos = index.search(emb, k + (exclude is not None))
    sims, pos, _ = drop_removed(sims, pos, np.array([] if exclude is None else [exclude], np.int64), k)
    labels = np.where(pos >= 0, index.labels[np.maximum(pos, 0)], -1)
    labels[~has_image] = -1
    return sims, labels
