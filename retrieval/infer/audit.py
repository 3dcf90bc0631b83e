"""Find labels to correct: every indexed product whose own category disagrees with what the index predicts for it
with itself left out (the rule ``POST /classify`` by id uses: its own vector, pictures, class-size share and
prototype share do not vote), ranked by the fused probability of the other category. The CSV it writes
(``_id,category_id`` = the suggested category, then the names and scores) is accepted by ``relabel`` as it is."""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.images import picture_hash
from ..errors import UserError
from .indexdir.bundle import IndexBundle, open_index
from .pipeline.embed import embed_images
from .query import classify_outputs, mirrored, picture_inputs, product_pictures
from .scoring.fused import load_fusion

log = logging.getLogger(__name__)
BATCH_PRODUCTS = 32  # products embedded in one forward pass


@dataclass(frozen=True)
class Suspect:
    """An indexed product whose label the index disagrees with."""

    product_id: int
    category_id: int  # its label now
    suggested_id: int  # what the index predicts for it, itself left out
    p_suggested: float  # fused probability of the suggestion
    p_own: float  # fused probability of its label (0 when not among the candidates)


def _name(bundle: IndexBundle, cat_id: int) -> str:
    cls = bundle.class_of_id.get(int(cat_id))
    return " / ".join(n.strip() for n in bundle.categories.names[cls]) if cls is not None else "?"


def audit_index(index_dir: str | Path, max_products: int | None = None) -> list[Suspect]:
    """Every labelled live product whose top fused category (itself left out) is another one, most confident
    first. ``max_products``: audit only the first that many live products (a sample of a large catalogue)."""
    bundle = open_index(index_dir)
    clf = load_fusion(bundle.run, bundle.fallback_class)
    positions = bundle.live_positions
    positions = positions[bundle.vectors.labels[positions] >= 0][:max_products]
    if not len(positions):
        raise UserError(f"{index_dir}: no labelled products to audit")
    out: list[Suspect] = []
    cats = bundle.categories
    for lo in tqdm(range(0, len(positions), BATCH_PRODUCTS), desc="auditing", unit="batches"):
        batch = positions[lo:lo + BATCH_PRODUCTS]
        pics = [product_pictures(bundle, int(p)) for p in batch]
        has = [i for i, p in enumerate(pics) if p]
        if not has:
            continue
        x = torch.cat([picture_inputs(bundle, pics[i]) for i in has])
        owner = torch.cat([torch.full((len(pics[i]),), j, dtype=torch.long) for j, i in enumerate(has)])
        with torch.inference_mode():
            emb, probs = embed_images(bundle.net, x, owner, len(has), mirrored(bundle))
        emb, probs = emb.cpu().numpy(), probs.cpu().numpy()
        for j, i in enumerate(has):
            pos = int(batch[i])
            top = classify_outputs(bundle, clf, emb[j], probs[j], [picture_hash(p) for p in pics[i]], top=20,
                                   exclude=pos)
            own = int(cats.ids[int(bundle.vectors.labels[pos])])
            if top and top[0]["category_id"] != own:
                p_own = next((c["fused"] for c in top if c["category_id"] == own), 0.0)
                out.append(Suspect(int(bundle.product_ids[pos]), own, top[0]["category_id"], top[0]["fused"], p_own))
    out.sort(key=lambda s: -s.p_suggested)
    log.info("%d of %d audited products disagree with the index", len(out), len(positions))
    return out


def write_audit(index_dir: str | Path, suspects: list[Suspect], out_csv: str | Path,
                sheet: str | Path | None = None, sheet_rows: int = 24) -> None:
    """The audit as a CSV ``relabel`` accepts (``_id,category_id`` first: the suggested category), and an optional
    contact sheet of the first ``sheet_rows`` suspects (their first picture, current -> suggested)."""
    bundle = open_index(index_dir)
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["_id", "category_id", "p_suggested", "current_category_id", "p_current", "current_name",
                    "suggested_name"])
        for s in suspects:
            w.writerow([s.product_id, s.suggested_id, f"{s.p_suggested:.4f}", s.category_id, f"{s.p_own:.4f}",
                        _name(bundle, s.category_id), _name(bundle, s.suggested_id)])
    if sheet and suspects:
        _sheet(bundle, suspects[:sheet_rows], Path(sheet))


def _sheet(bundle: IndexBundle, suspects: list[Suspect], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data.images import decode_image
    cols = 6
    rows = (len(suspects) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 3.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat[:len(suspects)], suspects, strict=True):
        pics = product_pictures(bundle, bundle.position_of(s.product_id))
        if pics:
            ax.imshow(decode_image(pics[0]))
        ax.set_title(f"{s.product_id}\n{_name(bundle, s.category_id).split(' / ')[-1][:22]}\n-> "
                     f"{_name(bundle, s.suggested_id).split(' / ')[-1][:22]} ({s.p_suggested:.2f})", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
