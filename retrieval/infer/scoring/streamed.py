"""Scoring a validation split of any size part by part: only a random sample of products is held whole (to
calibrate on), and each part's candidates are read, scored and dropped, so memory grows with ``keep`` numbers
per product, never with the candidates' width or the number of classes."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Sequence

import numpy as np

from .candidates import Candidates
from .fused import FusedClassifier
from .peers import first_stage, top_classes


def gather(read_part: Callable[[int], Candidates], sizes: Sequence[int], rows: np.ndarray) -> Candidates:
    """The candidates of products at positions ``rows`` (sorted) of the parts read one at a time
    (``sizes[i]`` products in part ``i``)."""
    got, lo = [], 0
    for i, n in enumerate(sizes):
        sel = rows[(rows >= lo) & (rows < lo + n)] - lo
        if len(sel):
            got.append(read_part(i).rows(sel))
        lo += n
    return Candidates.concat(got)


@dataclass
class Scores:
    """Per product ``[N]``: the kNN's and the fusion-without-duplicates' first class, whether it has an image and
    an exact duplicate in the index; and the fused distribution's ``keep`` likeliest classes and probabilities
    ``[N, keep]`` (the first stage, before peer propagation)."""

    knn: np.ndarray
    no_dup: np.ndarray
    has_image: np.ndarray
    has_dup: np.ndarray
    classes: np.ndarray
    probs: np.ndarray

    @classmethod
    def concat(cls, parts: list["Scores"]) -> "Scores":
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


def score_part(c: Candidates, fused: FusedClassifier, knn: FusedClassifier, no_dup: FusedClassifier, keep: int
               ) -> Scores:
    """:class:`Scores` of one part's candidates (each rule scores those predict would give it)."""
    classes, probs = top_classes(*first_stage(fused, c.for_rule(fused.uses_prototypes)), keep)
    return Scores(knn.predict_candidates(c.for_rule(knn.uses_prototypes), 1)[0][:, 0],
                  no_dup.predict_candidates(c.for_rule(no_dup.uses_prototypes), 1)[0][:, 0],
                  c.has_image.copy(), (c.dups >= 0).any(1), classes, probs)


def score_parts(read_part: Callable[[int], Candidates], n_parts: int, fused: FusedClassifier, knn: FusedClassifier,
                no_dup: FusedClassifier, keep: int) -> Scores:
    """:func:`score_part` over every part, read one at a time: at most one part's candidates in memory."""
    return Scores.concat([score_part(read_part(i), fused, knn, no_dup, keep) for i in range(n_parts)])
