"""Class-balanced classifiers on a fine-tuned model's embeddings, for bench_real's long-tail table.

Both read the unit product embeddings an index folder stores (no new forward pass over the training set):
  - NCM: the nearest class mean (the prototypes the fused rule's ``proto`` feature uses), cosine over unit means;
  - cRT (Kang et al., ICLR 2020): a linear softmax classifier re-trained on the frozen fine-tuned embeddings with
    class-balanced sampling (every class drawn equally often), its L2 chosen on the validation set;
  - a kNN vote weighted by category size: each neighbour's exp(similarity / tau) divided by its category's
    number of training products to the power p (p 0 is the plain vote; p 1 gives every category the same total
    weight in expectation).
Written with plain numpy / torch, apart from the library's scoring, so they check it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.infer.indexdir.build import IndexSettings, build_index, open_index


def stored_embeddings(idx: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every indexed product's stored unit embedding ``[N, D]`` and class index ``[N]`` (-1: unknown), in
    position order."""
    b = open_index(idx)
    emb = np.concatenate([s.embeddings(k) for s in b.segments for k in range(len(s.parts))])
    return emb.astype(np.float32), np.asarray(b.vectors.labels, np.int64)


def embed_file(path: Path, run: Path, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``[N, D]`` and class indices ``[N]`` of every product of ``path`` (through a new index folder
    ``out``: one left by an earlier model would hold other embeddings)."""
    shutil.rmtree(out, ignore_errors=True)
    build_index(path, run, out, IndexSettings("all"))
    return stored_embeddings(out)


def ncm_predict(tx: np.ndarray, ty: np.ndarray, qx: np.ndarray, n_classes: int) -> np.ndarray:
    """Nearest class mean: the class whose unit mean embedding has the highest cosine -> class index ``[Q]``."""
    sums = np.zeros((n_classes, tx.shape[1]))
    np.add.at(sums, ty, tx)
    norm = np.linalg.norm(sums, axis=1, keepdims=True)
    protos = np.divide(sums, norm, out=np.zeros_like(sums), where=norm > 0)
    return np.where(norm[:, 0] > 0, qx @ protos.T, -np.inf).argmax(1)


def crt_fit(tx: np.ndarray, ty: np.ndarray, n_classes: int, wd: float, steps: int = 1500, batch: int = 256,
            seed: int = 0) -> torch.nn.Linear:
    """A linear classifier on unit embeddings, batches drawn class-balanced (a class, then one of its products)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(tx), torch.from_numpy(ty)
    present = torch.unique(y)
    members = [torch.nonzero(y == c).flatten() for c in present.tolist()]
    lin = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        cls = torch.randint(len(members), (batch,), generator=g)
        rows = torch.stack([members[c][torch.randint(len(members[c]), (1,), generator=g)][0] for c in cls.tolist()])
        loss = F.cross_entropy(lin(x[rows] * 16.0), y[rows])  # unit vectors scaled (a cosine classifier's scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return lin


def crt_predict(lin: torch.nn.Linear, qx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return lin(torch.from_numpy(qx) * 16.0).argmax(1).numpy()


def knn_by_size(tx: np.ndarray, ty: np.ndarray, qx: np.ndarray, n_classes: int, power: float, k: int = 20,
                tau: float = 0.05) -> np.ndarray:
    """Cosine kNN over unit embeddings, neighbour weights ``exp(sim / tau) / size[c] ** power`` -> class ``[Q]``."""
    size = np.bincount(ty, minlength=n_classes).astype(np.float64)
    sims = qx @ tx.T
    top = np.argsort(-sims, axis=1)[:, :k]
    s = np.take_along_axis(sims, top, 1)
    w = np.exp((s - s[:, :1]) / tau) / size[ty[top]] ** power
    votes = np.zeros((len(qx), n_classes))
    np.add.at(votes, (np.repeat(np.arange(len(qx)), top.shape[1]), ty[top].ravel()), w.ravel())
    return votes.argmax(1)


def balanced_classifiers(run: Path, train_idx: Path, val_path: Path, test_path: Path, work: Path,
                         crt_steps: int = 1500) -> dict[str, np.ndarray | str]:
    """Correct ``[Q]`` per test product of NCM, cRT (L2 chosen on ``val_path``) and the size-weighted kNN (p 0.5
    and 1), and the validation figures."""
    tx, ty = stored_embeddings(train_idx)
    keep = ty >= 0
    tx, ty = tx[keep], ty[keep]
    vx, vy = embed_file(val_path, run, work / "val_emb")
    qx, qy = embed_file(test_path, run, work / "test_emb")
    n = int(max(ty.max(), vy.max(), qy.max())) + 1
    fits = {wd: crt_fit(tx, ty, n, wd, crt_steps) for wd in (1e-4, 1e-2)}
    val_acc = {wd: float((crt_predict(lin, vx) == vy).mean()) for wd, lin in fits.items()}
    wd = max(val_acc, key=val_acc.get)
    ncm_val = float((ncm_predict(tx, ty, vx, n) == vy).mean())
    knn_val = {p: float((knn_by_size(tx, ty, vx, n, p) == vy).mean()) for p in (0.0, 0.5, 1.0)}
    return {"ncm": ncm_predict(tx, ty, qx, n) == qy, "crt": crt_predict(fits[wd], qx) == qy,
            "knn_p05": knn_by_size(tx, ty, qx, n, 0.5) == qy, "knn_p1": knn_by_size(tx, ty, qx, n, 1.0) == qy,
            "what": f"val.bson: NCM {ncm_val:.3f}, cRT {val_acc[wd]:.3f} (weight decay {wd}), kNN by size "
                    + ", ".join(f"p {p}: {v:.3f}" for p, v in knn_val.items())}
