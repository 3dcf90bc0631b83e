"""The fused classifier: the head's probabilities mixed with a kNN vote over the index and a vote of exactly
duplicated indexed pictures (one rule everywhere)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from index import class_shares, normalise_rows, vote_weights

from ...errors import UserError
from ...rundir import RunDir
from .candidates import Candidates

FEATURES = ("head", "knn", "dup", "log_head", "knn_x_sim", "nearest", "log_size", "knn_rare", "proto",
            "proto_share")
BASE_FEATURES = 6  # the first six; then two on the class's size and two on its prototype (the long-tail ones);
TAIL_FEATURES = 8  # a calibration saved before those existed holds fewer weights (the missing ones weigh 0)
PROTO_TAU = 0.05  # the prototype cosine is given as cos / PROTO_TAU (a weight near 1 is a softmax at this tau)
PROTO_SHARE_TAU = 0.02  # the prototype vote: softmax of cos / PROTO_SHARE_TAU over the candidates


@dataclass(frozen=True)
class FusedClassifier:
    """One rule: each candidate class scores ``sum_i w_i * feature_i`` and the best wins. Features per candidate
    (:data:`FEATURES`): the head's probability after temperature scaling (``p^(1/T)`` renormalised over the
    candidates) and its log; the kNN share (first ``k`` neighbours weighted ``exp(sim / tau)``); the kNN share
    times the nearest neighbour's similarity (so the kNN weighs more when neighbours are close); whether the
    class is the nearest neighbour's; the share of indexed pictures identical (byte for byte) to the product's;
    for the long tail, ``log(1 + n)`` of the class's ``n`` indexed products (a learnt weight on it is a logit
    adjustment, Menon et al. 2021) and the kNN share over ``sqrt(1 + n)`` (a kNN that counts more for small
    classes, whose few products rarely fill the neighbour list); the cosine to the class's prototype (the mean
    embedding of its indexed products: a nearest-class-mean vote, which a class of 3 products casts as well as
    one of 3,000), over :data:`PROTO_TAU`, and the prototype vote (:func:`proto_share`).

    Without ``weights`` the weights are ``(alpha, 1 - alpha, beta, 0, ..., gamma)``: the classic mix
    ``alpha * p_head + (1 - alpha) * p_knn + beta * p_dup``, plus ``gamma * p_proto`` where prototypes are used.
    ``evaluate`` either picks alpha/beta on a grid or learns ``weights`` (a conditional logistic regression),
    whichever wins on validation. Products without a decodable image get class ``fallback``."""

    alpha: float = 0.5
    k: int = 20
    tau: float = 0.07
    beta: float = 1.0
    fallback: int = 0
    temperature: float = 1.0
    weights: tuple[float, ...] | None = None
    gamma: float = 0.0  # the grid rule's weight of the prototype vote (``proto_share``)

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise UserError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.k < 1:
            raise UserError(f"k must be at least 1, got {self.k}")
        if not self.tau > 0:
            raise UserError(f"tau must be positive, got {self.tau}")
        if not self.beta >= 0:
            raise UserError(f"beta must be at least 0, got {self.beta}")
        if not self.gamma >= 0:
            raise UserError(f"gamma must be at least 0, got {self.gamma}")
        if not self.temperature > 0:
            raise UserError(f"temperature must be positive, got {self.temperature}")
        if self.weights is not None:
            if len(self.weights) != len(FEATURES) or not np.all(np.isfinite(self.weights)):
                raise UserError(f"fusion weights must be {len(FEATURES)} finite numbers ({', '.join(FEATURES)})")
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

    @property
    def rule(self) -> str:
        return "grid" if self.weights is None else "learnt"

    @property
    def uses_prototypes(self) -> bool:
        """Whether the rule weighs a prototype feature (then candidates need ``proto``)."""
        w = self.coefficients
        return bool(w[FEATURES.index("proto")] != 0 or w[FEATURES.index("proto_share")] != 0)

    @property
    def coefficients(self) -> np.ndarray:
        """The weight ``[F]`` of each of :data:`FEATURES`."""
        if self.weights is not None:
            return np.asarray(self.weights, np.float32)
        return np.asarray([self.alpha, 1 - self.alpha, self.beta] + [0] * (len(FEATURES) - 4) + [self.gamma],
                          np.float32)

    def params(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "fallback"}
        d["weights"] = list(self.weights) if self.weights is not None else None
        return {**d, "rule": self.rule}

    def candidate_votes(self, c: Candidates) -> tuple[np.ndarray, np.ndarray]:
        """kNN share ``[P, W]`` of each candidate class, and whether a product has any neighbour ``[P, 1]``."""
        w, lab = vote_weights(c.sims, c.labels, self.tau, self.k)
        return class_shares(c.classes, lab, w), w.sum(1, keepdims=True) > 0

    def features(self, c: Candidates, votes: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Features ``[P, W, F]`` of each product's candidate classes (0 on padding)."""
        knn, has_knn = votes if votes is not None else self.candidate_votes(c)
        head = normalise_rows(np.where(c.classes >= 0, np.maximum(c.head, 0.0), 0.0) ** (1.0 / self.temperature))
        top_sim = np.where(has_knn, np.nan_to_num(c.sims[:, :1], neginf=0.0), 0.0)
        nearest = (c.classes == c.labels[:, :1]) & (c.labels[:, :1] >= 0)
        feats = np.stack([head, knn, c.dup_share, np.log(head + 1e-6), knn * top_sim, nearest, np.log1p(c.size),
                          knn / np.sqrt(1.0 + c.size), c.proto_or_zero / PROTO_TAU, proto_share(c)], axis=-1)
        return np.where((c.classes >= 0)[..., None], feats, 0.0).astype(np.float32)

    def candidate_scores(self, c: Candidates, feats: np.ndarray | None = None) -> np.ndarray:
        """Fused scores ``[P, W]`` of each product's candidate classes (-inf on padding); ``feats`` reuses
        :meth:`features` of the same k, tau and temperature (they do not depend on the weights)."""
        fused = (self.features(c) if feats is None else feats) @ self.coefficients
        return np.where(c.classes >= 0, fused, -np.inf)

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """Scores ``[P, W]`` -> shares that sum to 1 over each product's candidates (softmax for a learnt rule,
        plain normalisation of the non-negative mix for the grid rule)."""
        finite = np.isfinite(scores)
        if self.weights is None:
            s = np.where(finite, np.maximum(scores, 0.0), 0.0)
        else:
            top = np.where(finite, scores, -np.inf).max(1, keepdims=True)
            s = np.where(finite, np.exp(scores - np.where(np.isfinite(top), top, 0.0)), 0.0)
        return normalise_rows(s)

    def predict_candidates(self, c: Candidates, top: int = 1, feats: np.ndarray | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
        """``(classes [P, top], scores [P, top])`` best first; column 0 is the prediction (fallback where a
        product has no image). ``feats``: as in :meth:`candidate_scores`."""
        scores = self.candidate_scores(c, feats)
        order = scores.argmax(1)[:, None] if top == 1 else np.argsort(-scores, axis=1, kind="stable")[:, :top]
        classes = np.take_along_axis(c.classes, order, 1).astype(np.int64)
        best = np.take_along_axis(scores, order, 1)
        classes[:, 0] = np.where(c.has_image, classes[:, 0], self.fallback)
        return classes, np.where(np.isfinite(best), best, 0.0)


def proto_share(c: Candidates) -> np.ndarray:
    """The prototype vote ``[P, W]``: softmax of ``cos / PROTO_SHARE_TAU`` over each product's candidates (0
    without prototypes, on padding and for products without an image)."""
    if c.proto is None:
        return np.zeros(c.classes.shape, np.float32)
    valid = (c.classes >= 0) & c.has_image[:, None]
    s = np.where(valid, c.proto / PROTO_SHARE_TAU, -np.inf)
    top = s.max(1, keepdims=True)
    e = np.where(valid, np.exp(s - np.where(np.isfinite(top), top, 0.0)), 0.0)
    return normalise_rows(e)


DEFAULT = FusedClassifier()  # used where no calibration exists


@dataclass(frozen=True)
class FusionOverrides:
    """Values a user sets over the calibration (None: the calibration's, else :data:`DEFAULT`'s); checked by
    :class:`FusedClassifier`. A given alpha, beta or gamma means the grid rule with those weights (the others from
    the calibration) and, unless ``peer_weight`` is given too, no peer propagation (:mod:`.peers`)."""

    alpha: float | None = None
    k: int | None = None
    tau: float | None = None
    beta: float | None = None
    peer_weight: float | None = None
    gamma: float | None = None  # the grid rule's prototype vote

    @property
    def grid_given(self) -> bool:
        """Whether a weight of the grid rule is given (then the grid rule, and no peers unless asked)."""
        return self.alpha is not None or self.beta is not None or self.gamma is not None


def load_fusion(run: RunDir, fallback: int, overrides: FusionOverrides = FusionOverrides()) -> FusedClassifier:
    """The run's calibration (from ``evaluate``) or the defaults, with any overridden value taking precedence."""
    alpha, k, tau, beta = overrides.alpha, overrides.k, overrides.tau, overrides.beta
    saved = run.read_calibration() or {}
    pick = lambda name, given: given if given is not None else saved.get(name, getattr(DEFAULT, name))  # noqa: E731
    weights = None if overrides.grid_given else saved.get("weights")
    if weights and len(weights) in (BASE_FEATURES, TAIL_FEATURES, len(FEATURES) - 1):  # older: 0 for later ones
        weights = list(weights) + [0.0] * (len(FEATURES) - len(weights))
    return FusedClassifier(float(pick("alpha", alpha)), int(pick("k", k)), float(pick("tau", tau)),
                           float(pick("beta", beta)), fallback, float(saved.get("temperature", 1.0)),
                           tuple(weights) if weights else None, float(pick("gamma", overrides.gamma)))
