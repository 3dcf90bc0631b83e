"""Peer propagation: products classified together (a test file, a validation split) smooth their fused class
distributions over their nearest neighbours among themselves (label propagation, Zhou et al. 2004).

Photos of one item, or of near-identical items, tend to sit together in a test file; where the head and the kNN
over the index make the same mistake, the product's peers often do not. The weight ``mu`` (0 = off) and the
graph (``k`` peers, weights ``exp(sim / tau)`` normalised per product) are chosen on validation by ``evaluate``.
Distributions stay sparse: each product keeps its ``keep`` most likely classes, so memory is ``O(P * keep)``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np

from index import normalise_rows, take_rows, vote

from ...errors import UserError
from ...rundir import RunDir
from .candidates import Candidates, pad_columns
from .fused import FusedClassifier
from .graph import PeerGraph, PeerLinks, peer_graph
from .sample import SAMPLE_CAP, sample_rows

log = logging.getLogger(__name__)
MUS = (0.0, 0.3, 0.5, 0.7, 0.9)
PEER_KS = (5, 10)
PEER_TAUS = (0.05, 0.1)
__all__ = ["PeerGraph", "PeerSettings", "peer_graph", "propagate", "top_classes", "first_stage", "choose_peers",
           "calibrate_peers", "load_peers"]
MIN_GAIN = 0.005  # validation accuracy propagation must add before it is turned on


@dataclass(frozen=True)
class PeerSettings:
    """``F = (1 - mu) * B + mu * W @ F``, ``iters`` times, from the first-stage distributions ``B``."""

    mu: float = 0.0
    k: int = 10
    tau: float = 0.05
    iters: int = 10
    keep: int = 10

    def __post_init__(self) -> None:
        if not 0 <= self.mu < 1:
            raise UserError(f"peer weight mu must be in [0, 1), got {self.mu}")
        if self.k < 1 or self.iters < 1 or self.keep < 1:
            raise UserError("peer k, iterations and classes kept must be at least 1")
        if not self.tau > 0:
            raise UserError(f"peer tau must be positive, got {self.tau}")

    @property
    def on(self) -> bool:
        return self.mu > 0

    def params(self) -> dict:
        return asdict(self)


def top_classes(classes: np.ndarray, values: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``values [R, M]`` per class within each row of ``classes [R, M]`` (-1 = padding) and keep each row's
    ``keep`` largest sums: ``(classes, values)`` ``[R, keep]``, best first (class -1 and value 0 as padding).
    Row-wise sorts only: cost ``O(R * M log M)``, whatever the number of classes."""
    r, m = classes.shape
    values = np.where((classes >= 0) & (values > 0), values, 0.0)
    classes = np.where(values > 0, classes, -1)
    order = np.argsort(classes, axis=1, kind="stable")
    c = np.take_along_axis(classes, order, 1)
    v = np.take_along_axis(values, order, 1)
    start = np.ones((r, m), bool)
    start[:, 1:] = c[:, 1:] != c[:, :-1]  # first entry of each run of one class in a row
    flat = np.flatnonzero(start.ravel())
    sums = np.add.reduceat(v.ravel(), flat)  # one sum per (row, class) run
    total = np.zeros(r * m)
    total[flat] = sums
    total = np.where((c.ravel() >= 0) & start.ravel(), total, 0.0).reshape(r, m)
    top = np.argsort(-total, axis=1, kind="stable")[:, :keep]
    out_v = np.take_along_axis(total, top, 1)
    out_c = np.where(out_v > 0, np.take_along_axis(c, top, 1), -1)
    if out_c.shape[1] < keep:
        out_c, out_v = pad_columns(out_c, keep, -1), pad_columns(out_v, keep, 0)
    return out_c.astype(np.int16 if classes.dtype == np.int16 else np.int32), out_v.astype(np.float32)


def propagate(classes: np.ndarray, probs: np.ndarray, graph: PeerGraph | PeerLinks | None, s: PeerSettings
              ) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed distributions from first-stage ones (``classes [P, W]``, ``probs [P, W]`` summing to 1 per
    product; class -1 = padding): ``(classes [P, keep], probs [P, keep])``, each row best first, summing to 1
    (a product without peers keeps its own distribution, truncated). ``graph``: the peer graph or its
    :meth:`~.graph.PeerGraph.links`. The inputs are only read, block by block (memory-mapped arrays are fine:
    besides the graph, two ``[P, keep]`` distributions are held); int16 classes stay int16 (half the memory)."""
    n = len(classes)
    step = vote.CHUNK_ROWS
    blocks = [slice(lo, min(lo + step, n)) for lo in range(0, n, step)]
    dtype = np.int16 if classes.dtype == np.int16 else np.int32

    def first(sl: slice) -> tuple[np.ndarray, np.ndarray]:  # a block's own distribution, its keep classes
        c, v = top_classes(np.asarray(classes[sl]), np.asarray(probs[sl], np.float64), s.keep)
        return c.astype(dtype, copy=False), v

    f_c, f_v = np.empty((n, s.keep), dtype), np.empty((n, s.keep), np.float32)
    for sl in blocks:  # block by block: the sort's temporaries never span the whole file
        f_c[sl], f_v[sl] = first(sl)
    if not s.on:
        return f_c, normalise_rows(f_v)
    links = graph if isinstance(graph, PeerLinks) else graph.links(s.tau, s.k)
    pos, w = links.pos, links.w
    own = np.where(w.sum(1, keepdims=True) == 0, 1.0, 1 - s.mu).astype(np.float32)  # no peer: all on its own
    new_c, new_v = np.empty_like(f_c), np.empty_like(f_v)
    for _ in range(s.iters):
        for sl in blocks:
            m = sl.stop - sl.start
            b_c, b_v = first(sl)
            nb_c = f_c[pos[sl]].reshape(m, -1)  # [m, k * keep] the peers' current classes
            nb_v = (f_v[pos[sl]] * (s.mu * w[sl])[..., None]).reshape(m, -1)
            cat_c = np.concatenate([b_c, nb_c], 1)
            cat_v = np.concatenate([b_v * own[sl], nb_v], 1)
            c, v = top_classes(cat_c, cat_v.astype(np.float64), s.keep)
            new_c[sl], new_v[sl] = c, v
            total = new_v[sl].sum(1, keepdims=True)
            np.divide(new_v[sl], total, out=new_v[sl], where=total > 0)  # normalised in place, block by block
        f_c, f_v, new_c, new_v = new_c, new_v, f_c, f_v  # two buffers, swapped: never a third
    return f_c, f_v


def first_stage(clf: FusedClassifier, c: Candidates) -> tuple[np.ndarray, np.ndarray]:
    """The fused classifier's distribution over each product's candidates: ``(classes [P, W], probs [P, W])``;
    a product without an image puts all its mass on ``clf.fallback``."""
    probs = clf.probabilities(clf.candidate_scores(c))
    flat = probs.sum(1) <= 0  # nothing scored above 0 (e.g. the kNN alone, no neighbour): candidates tie
    probs[flat] = (c.classes[flat] >= 0) / np.maximum((c.classes[flat] >= 0).sum(1, keepdims=True), 1)
    classes = c.classes.copy()
    classes[~c.has_image] = -1
    classes[~c.has_image, 0] = clf.fallback
    probs[~c.has_image] = 0.0
    probs[~c.has_image, 0] = 1.0
    return classes, probs


def calibrate_peers(classes: np.ndarray, probs: np.ndarray, graph: PeerGraph, y: np.ndarray
                    ) -> tuple[PeerSettings, list[dict]]:
    """The peer settings with the best accuracy on labelled products ``y [P]`` (a grid over :data:`MUS`,
    :data:`PEER_KS`, :data:`PEER_TAUS`), and the grid. Propagation stays off (mu 0) unless the best setting
    beats it by :data:`MIN_GAIN` and by two products at least: the best of 17 settings on a few hundred
    products would otherwise win by noise alone."""
    grid = []
    for mu in MUS:
        for k in PEER_KS if mu > 0 else PEER_KS[:1]:
            for tau in PEER_TAUS if mu > 0 else PEER_TAUS[:1]:
                s = PeerSettings(mu, k, tau)
                hits = propagate(classes, probs, graph, s)[0][:, 0] == y
                grid.append({**s.params(), "accuracy": float(hits.mean())})
    best = max(grid, key=lambda g: g["accuracy"])  # first of equals: the smaller mu
    if best["accuracy"] - grid[0]["accuracy"] < max(MIN_GAIN, 2 / max(len(y), 1)):
        best = grid[0]
    return PeerSettings(**{k: v for k, v in best.items() if k != "accuracy"}), grid


def choose_peers(classes: np.ndarray, probs: np.ndarray, graph: PeerGraph, blocks: Sequence[np.ndarray],
                 has_image: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[PeerSettings, list[dict]]:
    """:func:`calibrate_peers` over ``graph``, the peer graph of all validation products (at least
    ``max(PEER_KS)`` peers each); beyond :data:`~.sample.SAMPLE_CAP` products, over a random sample of them and its own
    graph from their embeddings (``blocks [n_i, D]`` in product order; sparser than the whole: propagation can
    only look less useful, never more)."""
    if len(y) <= SAMPLE_CAP:
        return calibrate_peers(classes, probs, graph, y)
    rows = sample_rows(len(y), seed)
    sample = peer_graph([take_rows(blocks, rows)], has_image[rows], max(PEER_KS))
    return calibrate_peers(classes[rows], probs[rows], sample, y[rows])


def load_peers(run: RunDir, weight: float | None = None, off: bool = False) -> PeerSettings:
    """The run's peer settings (from ``evaluate``; off without one), ``weight`` overriding its mu; ``off``
    (a user-given alpha or beta: a plain mix was asked for) turns them off unless ``weight`` is given."""
    saved = (run.read_calibration() or {}).get("peers") or {}
    s = PeerSettings(**saved) if saved else PeerSettings()
    if weight is not None:
        return replace(s, mu=float(weight))
    return replace(s, mu=0.0) if off else s
