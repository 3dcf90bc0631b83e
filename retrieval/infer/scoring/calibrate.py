"""Calibrating the fused classifier on validation products: the head's temperature, a grid over alpha, k, tau and
beta, a learnt fusion (conditional logistic regression over the candidates' features), and the choice between
the two by cross-validation on the same products (so the richer model does not win by fitting noise)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from .candidates import Candidates
from .fused import BASE_FEATURES, FEATURES, TAIL_FEATURES, FusedClassifier
from .sample import sample_rows

log = logging.getLogger(__name__)
ALPHAS = tuple(round(float(a), 2) for a in np.linspace(0, 1, 11))
KS = (5, 10, 20, 50)
TAUS = (0.02, 0.05, 0.07, 0.1)
BETAS = (0.0, 0.5, 1.0, 2.0)  # weight of the exact-duplicate vote
# weight of the prototype vote, where the index has prototypes; on equal validation accuracy the larger wins: a
# split with the training skew holds few products of small classes, which the vote is for (README, "Long tail")
GAMMAS = (0.0, 0.25, 0.5)
TEMPERATURES = tuple(float(t) for t in np.geomspace(0.25, 8.0, 31))
FOLDS = 5
BLOCK = 2048  # products per scoring block of the grid


def fit_temperature(c: Candidates, y: np.ndarray) -> float:
    """The temperature T minimising the head's negative log-likelihood of the true class, with the head's
    probabilities ``p^(1/T)`` renormalised over each product's candidates (products whose class is not a
    candidate are left out). 1.0 when no product qualifies."""
    hit = (c.classes == y[:, None]) & (c.classes >= 0)
    keep = hit.any(1) & c.has_image
    if not keep.any():
        return 1.0
    logp = np.log(np.clip(np.where(c.classes >= 0, c.head, 0.0), 1e-12, None))[keep]
    valid, true = (c.classes >= 0)[keep], hit[keep].argmax(1)

    def nll(t: float) -> float:
        s = np.where(valid, logp / t, -np.inf)
        top = s.max(1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(s - top).sum(1))
        return float((lse - s[np.arange(len(s)), true]).mean())

    return min(TEMPERATURES, key=nll)


def fit_weights(clf: FusedClassifier, c: Candidates, y: np.ndarray, l2: float = 1e-3, seed: int = 0,
                use: int = len(FEATURES)) -> tuple[float, ...]:
    """Weights of :data:`FEATURES` maximising the likelihood of the true class under a softmax over each
    product's candidates (L-BFGS, L2 penalty ``l2``), starting from ``clf``'s own weights; only the first
    ``use`` features are fitted, the others weigh 0."""
    keep = np.flatnonzero(((c.classes == y[:, None]) & (c.classes >= 0)).any(1) & c.has_image)
    keep = keep[sample_rows(len(keep), seed)]
    sub = c.rows(keep) if len(keep) else None
    unused = (0.0,) * (len(FEATURES) - use)
    if sub is None:
        return tuple(float(w) for w in clf.coefficients[:use]) + unused
    x = torch.from_numpy(clf.features(sub)[..., :use]).double()
    valid = torch.from_numpy(sub.classes >= 0)
    true = torch.from_numpy((sub.classes == y[keep][:, None]).argmax(1))
    w = torch.tensor(clf.coefficients[:use], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        s = (x @ w).masked_fill(~valid, -torch.inf)
        loss = torch.nn.functional.cross_entropy(s, true) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return tuple(float(v) for v in w.detach()) + unused


def _grid_correct(seen: dict[float, Candidates], y: np.ndarray, fold: np.ndarray, base: FusedClassifier
                  ) -> dict[tuple, np.ndarray]:
    """Correct predictions per fold ``[FOLDS]`` of every (alpha, k, tau, beta, gamma), scored block by block on
    the candidates each gamma sees (``seen``: with the prototypes' classes where gamma > 0); beta only where some
    product has an exact duplicate in the index."""
    betas = BETAS if any((c.dups >= 0).any() for c in seen.values()) else (0.0,)
    correct = {(a, k, t, b, g): np.zeros(FOLDS, np.int64)
               for k in KS for t in TAUS for a in ALPHAS for b in betas for g in seen}
    for lo in range(0, len(y), BLOCK):
        yb, fb = y[lo:lo + BLOCK], fold[lo:lo + BLOCK]
        for g, c in seen.items():
            block = c.rows(slice(lo, lo + BLOCK))
            for k in KS:
                for t in TAUS:
                    clf = replace(base, alpha=0.5, k=k, tau=t, beta=0.0, gamma=g)
                    feats = clf.features(block)  # shared by every alpha and beta
                    for a in ALPHAS:
                        for b in betas:
                            pred = replace(clf, alpha=a, beta=b).predict_candidates(block, 1, feats)[0][:, 0]
                            correct[(a, k, t, b, g)] += np.bincount(fb, weights=pred == yb,
                                                                    minlength=FOLDS).astype(np.int64)
    return correct


RULES = ("grid", "learnt", "learnt_tail", "learnt_proto")  # simplest first: a richer rule must win by cross-validation


@dataclass(frozen=True)
class Calibration:
    """The chosen classifier, the grid (accuracy of every combination on all products), and for each of
    :data:`RULES` its cross-validated accuracy and out-of-fold predictions ``[N]`` (by category size in evaluate):
    the grid, the learnt fusion of the first :data:`BASE_FEATURES` features, the learnt fusion with the
    long-tail ones (class size: logit adjustment, a kNN weighted up for small classes), and with the class
    prototypes too (only where the candidates carry them)."""

    classifier: FusedClassifier
    grid: list[dict]
    cv: dict[str, float]
    oof: dict[str, np.ndarray]
    temperature: float
    chosen: str
    gamma: float = 0.0  # the best grid row's prototype vote weight

    @property
    def cv_grid(self) -> float:
        return self.cv["grid"]

    @property
    def cv_learnt(self) -> float:
        return max(v for r, v in self.cv.items() if r != "grid")

    def best(self, **fixed) -> dict:
        """The best grid row among those with the given values (e.g. ``alpha=0, beta=0, gamma=0``: kNN alone);
        on equal accuracy the larger prototype vote."""
        return max((g for g in self.grid if all(g[k] == v for k, v in fixed.items())),
                   key=lambda g: (g["accuracy"], g["gamma"]))


def calibrate(c: Candidates, y: np.ndarray, fallback: int, seed: int = 0) -> Calibration:
    """Temperature, grid and learnt fusions on validation candidates ``c`` with classes ``y [N]``; the rule of
    :data:`RULES` with the highest cross-validated accuracy wins (ties to the simpler) and is refitted on all
    products."""
    n = len(y)
    fold = np.random.default_rng(seed).permutation(n) % FOLDS
    full, c = c, c.without_proto()  # the rules without prototypes see the candidates predict gives them
    temp = fit_temperature(c, y)
    base = FusedClassifier(fallback=fallback, temperature=temp)
    grid_seen = {g: (full if g else c) for g in (GAMMAS if full.proto is not None else (0.0,))}
    correct = _grid_correct(grid_seen, y, fold, base)
    total = {key: v.sum() for key, v in correct.items()}
    grid = [{"alpha": a, "k": k, "tau": t, "beta": b, "gamma": g, "accuracy": total[(a, k, t, b, g)] / n}
            for (a, k, t, b, g) in correct]
    best = max(grid, key=lambda r: (r["accuracy"], r["gamma"]))
    grid_clf = replace(base, alpha=best["alpha"], k=best["k"], tau=best["tau"], beta=best["beta"], gamma=best["gamma"])
    uses = {"learnt": BASE_FEATURES, "learnt_tail": TAIL_FEATURES, "learnt_proto": len(FEATURES)}
    if full.proto is None:  # no prototypes: that rule is not a choice
        uses.pop("learnt_proto")
    seen = {r: full if r == "learnt_proto" else c for r in uses}
    rules = tuple(r for r in RULES if r == "grid" or r in uses)
    oof = {r: np.full(n, fallback, np.int64) for r in rules}
    for f in range(FOLDS):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        if len(te) == 0:
            continue
        a, k, t, b, g = max(correct, key=lambda key: (total[key] - correct[key][f], key[4]))  # without fold f
        oof["grid"][te] = replace(base, alpha=a, k=k, tau=t, beta=b, gamma=g).predict_candidates(
            grid_seen[g].rows(te))[0][:, 0]
        cf = replace(grid_clf, temperature=fit_temperature(c.rows(tr), y[tr]))
        for rule, use in uses.items():
            learnt = replace(cf, weights=fit_weights(cf, seen[rule].rows(tr), y[tr], seed=seed, use=use))
            oof[rule][te] = learnt.predict_candidates(seen[rule].rows(te))[0][:, 0]
    cv = {r: float((p == y).mean()) if n else 0.0 for r, p in oof.items()}
    chosen = max(rules, key=lambda r: (cv[r], -RULES.index(r)))
    clf = grid_clf if chosen == "grid" else \
        replace(grid_clf, weights=fit_weights(grid_clf, seen[chosen], y, seed=seed, use=uses[chosen]), gamma=0.0)
    log.info("fusion: %s rule chosen (cross-validated accuracy: %s; head temperature %.3g)", chosen,
             ", ".join(f"{r} {v:.4f}" for r, v in cv.items()), temp)
    return Calibration(clf, grid, cv, oof, temp, chosen, best["gamma"])


__all__ = ["ALPHAS", "BETAS", "FEATURES", "GAMMAS", "KS", "RULES", "TAUS", "Calibration", "calibrate",
           "fit_temperature", "fit_weights"]
