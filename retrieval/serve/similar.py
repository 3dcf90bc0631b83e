"""Similar-product lookup over an index folder, by product id or by image files, and a contact sheet."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.datasets import to_model_input
from ..data.images import ImageDecodeError, decode_image
from ..data.offsets import RecordReader
from ..errors import UserError
from .embed import embed_images
from .indexing import IndexBundle, check_source, open_index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Neighbour:
    """One similar product."""

    product_id: int
    similarity: float
    category_id: int
    level1: str
    level2: str
    level3: str

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def path(self) -> str:
        """``level1 > level2 > level3``, or "unknown" for a category the model does not know."""
        names = [n for n in (self.level1, self.level2, self.level3) if n]
        return " > ".join(names) if names else "unknown"


def query_vector(bundle: IndexBundle, product_id: int | None = None, images: list[str | Path] | None = None
                 ) -> tuple[np.ndarray, list[np.ndarray]]:
    """The query embedding ``[D]`` and the query pictures (RGB arrays) for the sheet."""
    if (product_id is None) == (not images):
        raise UserError("give exactly one of a product id or image files")
    if product_id is not None:
        hit = np.flatnonzero(bundle.product_ids == product_id)
        if len(hit) == 0:
            raise UserError(f"product _id {product_id} is not in the index {bundle.folder}")
        pos = int(hit[0])
        return bundle.vector(pos), [_first_picture(bundle, pos)]
    net = bundle.net
    pics = []
    for f in images:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such image file")
        try:
            pics.append(decode_image(p.read_bytes()))
        except ImageDecodeError as e:
            raise UserError(f"{p}: {e}") from None
    x = torch.stack([to_model_input(rgb, net.cfg.image_size, train=False) for rgb in pics])
    emb, _ = embed_images(net, x, torch.zeros(len(x), dtype=torch.long), 1, tta_flip=bundle.manifest.tta_flip)
    return emb[0].cpu().numpy(), pics


def _first_picture(bundle: IndexBundle, pos: int) -> np.ndarray | None:
    a = bundle.arrays
    path = check_source(bundle, int(a["sources"][pos]))
    prod = RecordReader(path, table=np.empty(0)).read_at(int(a["offsets"][pos]), int(a["lengths"][pos]))
    try:
        return decode_image(prod.images[0]) if prod.images else None
    except ImageDecodeError:
        return None


def similar(index_dir: str | Path | IndexBundle, product_id: int | None = None,
            images: list[str | Path] | None = None, k: int = 10, category: int | None = None,
            sheet: str | Path | None = None) -> list[Neighbour]:
    """The ``k`` products most similar to a product or to images, optionally within one category id."""
    bundle = index_dir if isinstance(index_dir, IndexBundle) else open_index(index_dir)
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    vec, pics = query_vector(bundle, product_id, images)
    cats = bundle.categories
    allowed = None
    if category is not None:
        if category not in cats.ids:
            raise UserError(f"category {category} is not in the model's category table")
        allowed = [int(cats.encode([category])[0])]
    sims, pos = bundle.index.search(vec[None], k, allowed)
    out = []
    id_to_class = {c: i for i, c in enumerate(cats.ids)}
    for s, p in zip(sims[0], pos[0]):
        if p < 0:
            continue
        cid = int(bundle.arrays["category_ids"][p])
        names = cats.names[id_to_class[cid]] if cid in id_to_class else ("", "", "")
        out.append(Neighbour(int(bundle.product_ids[p]), float(s), cid, *(n.strip() for n in names)))
    if sheet is not None:
        contact_sheet(bundle, pics, out, pos[0][pos[0] >= 0], sheet)
    return out


def contact_sheet(bundle: IndexBundle, query: list[np.ndarray], found: list[Neighbour], positions: np.ndarray,
                  path: str | Path) -> Path:
    """A PNG: the query pictures on the first row, then each neighbour's first picture with score and name."""
    from matplotlib.figure import Figure
    cols = max(5, len(query))
    rows = 1 + int(np.ceil(len(found) / cols))
    fig = Figure(figsize=(2.2 * cols, 2.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for j, pic in enumerate(query):
        if pic is not None:
            axes[0, j].imshow(pic)
        axes[0, j].set_title("query", fontsize=8)
    for i, (nb, pos) in enumerate(zip(found, positions)):
        ax = axes[1 + i // cols, i % cols]
        pic = _first_picture(bundle, int(pos))
        if pic is not None:
            ax.imshow(pic)
        ax.set_title(f"{nb.product_id}  {nb.similarity:.3f}\n{nb.level3[:28]}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return Path(path)
