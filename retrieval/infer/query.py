"""One query against an index folder: similar products (by product id or pictures), the fused top categories
of a product's pictures, and a contact sheet. Shared by the CLI and the HTTP API."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from index.rows import drop_removed

from ..data.datasets import picture_input
from ..data.images import ImageDecodeError, decode_image, picture_hash
from ..data.offsets import RecordReader
from ..errors import UserError
from .indexdir.bundle import IndexBundle, check_source, open_index
from .pipeline.embed import embed_images
from .scoring.candidates import Candidates, class_sizes, neighbour_labels
from .scoring.fused import FEATURES, FusedClassifier

log = logging.getLogger(__name__)


class UnknownProduct(UserError):
    """A product id that is not in the index."""


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


def product_position(bundle: IndexBundle, product_id: int) -> int:
    """Index position of ``product_id``; a clear error if it is not indexed."""
    pos = bundle.position_of(product_id)
    if pos is None:
        raise UnknownProduct(f"product _id {product_id} is not in the index")
    return pos


# A picture query is embedded together with its mirror image (one more forward per query, nothing at index
# time): on grocery, a mirrored and cropped copy of an indexed photo found its product at rank 1 in 0.847 of
# cases without, 0.903 with; the nearest product's category, 0.810 and 0.813 (bench_real, 300 and 600 queries).
QUERY_MIRROR = True


def mirrored(bundle: IndexBundle, mirror: bool = QUERY_MIRROR) -> bool:
    """Whether a picture query is embedded with its mirror image: if asked (the default), and always for an
    index built with ``mirror``."""
    return mirror or bundle.manifest.mirror


def product_pictures(bundle: IndexBundle, pos: int) -> list[bytes]:
    """The JPEG bytes of the indexed product at ``pos``, read from its BSON file."""
    a = bundle.arrays
    path = check_source(bundle, int(a["sources"][pos]))
    return RecordReader(path, table=np.empty(0)).read_at(int(a["offsets"][pos]), int(a["lengths"][pos])).images


SHEET_PX = 200  # pictures on a contact sheet are decoded (DCT-scaled) to at least this many pixels a side


def embed_pictures(bundle: IndexBundle, pictures: list[bytes], names: list[str] | None = None,
                   mirror: bool = QUERY_MIRROR, sheet: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """One product from its picture bytes: (embedding ``[D]``, head probabilities ``[C]``, decoded RGB pictures
    for a contact sheet, only if ``sheet``, else none). ``mirror`` averages each picture with its mirror image
    (always so for an index built with ``mirror``). A picture that does not decode is an error naming it."""
    x = picture_inputs(bundle, pictures, names)
    pics = [decode_image(data, min_size=SHEET_PX) for data in pictures] if sheet else []
    emb, probs = embed_images(bundle.net, x, torch.zeros(len(x), dtype=torch.long), 1,
                              mirrored(bundle, mirror))
    return emb[0].cpu().numpy(), probs[0].cpu().numpy(), pics


def picture_inputs(bundle: IndexBundle, pictures: list[bytes], names: list[str] | None = None) -> torch.Tensor:
    """Model inputs ``[N, 3, S, S]`` uint8 of one product's picture bytes, decoded exactly as indexing decodes;
    a picture that does not decode is an error naming it."""
    if not pictures:
        raise UserError("no picture given")
    inputs = []
    for i, data in enumerate(pictures):
        try:
            inputs.append(picture_input(data, bundle.net.cfg.image_size))
        except ImageDecodeError as e:
            raise UserError(f"{names[i] if names else f'picture {i}'}: not a readable image ({e})") from None
    return torch.stack(inputs)


def query_vector(bundle: IndexBundle, product_id: int | None = None, images: list[str | Path] | None = None
                 ) -> tuple[np.ndarray, list[np.ndarray]]:
    """The query embedding ``[D]`` and the query pictures (RGB arrays) for the sheet."""
    if (product_id is None) == (not images):
        raise UserError("give exactly one of a product id or image files")
    if product_id is not None:
        pos = product_position(bundle, product_id)
        return bundle.vector(pos), [_first_picture(bundle, pos)]
    for f in images:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f}: no such image file")
    emb, _, pics = embed_pictures(bundle, [Path(f).read_bytes() for f in images], [str(f) for f in images],
                                  sheet=True)
    return emb, pics


def _first_picture(bundle: IndexBundle, pos: int) -> np.ndarray | None:
    pictures = product_pictures(bundle, pos)
    try:
        return decode_image(pictures[0], min_size=SHEET_PX) if pictures else None
    except ImageDecodeError:
        return None


def neighbours(bundle: IndexBundle, vec: np.ndarray, k: int, category: int | None = None, offset: int = 0,
               exclude: int | None = None) -> tuple[list[Neighbour], np.ndarray]:
    """Results ``offset .. offset + k - 1`` of the search for ``vec [D]`` (within one category id, searched
    inside the index), and their index positions; ``exclude``: an index position left out (the query product's
    own, unless it is asked for)."""
    if k < 1 or offset < 0:
        raise UserError(f"k must be at least 1 and offset at least 0, got k={k}, offset={offset}")
    cats = bundle.categories
    allowed = None
    if category is not None:
        if category not in cats.ids:
            raise UserError(f"category {category} is not in the model's category table")
        allowed = [int(cats.encode([category])[0])]
    sims, pos = bundle.vectors.search(vec[None], search_depth(offset, k, exclude), allowed)
    return neighbours_from(bundle, sims[0], pos[0], offset, k, exclude)


def search_depth(offset: int, k: int, exclude: int | None) -> int:
    """How many results a page ``offset .. offset + k - 1`` needs: one more when a position is left out."""
    return offset + k + (exclude is not None)


def neighbours_from(bundle: IndexBundle, sims: np.ndarray, pos: np.ndarray, offset: int, k: int,
                    exclude: int | None = None) -> tuple[list[Neighbour], np.ndarray]:
    """Results ``offset .. offset + k - 1`` of a search's ``sims [K]``, ``pos [K]`` (-1 = none; :func:`search_depth`
    deep) without index position ``exclude``, as :class:`Neighbour` records, and their positions."""
    sims, pos, _ = drop_removed(sims[None], pos[None], np.array([] if exclude is None else [exclude], np.int64),
                                offset + k)
    sims, pos = sims[0][offset:], pos[0][offset:]
    cats = bundle.categories
    keep = pos >= 0
    id_to_class = bundle.class_of_id
    out = []
    for s, p in zip(sims[keep], pos[keep], strict=True):
        cid = int(bundle.arrays["category_ids"][p])
        names = cats.names[id_to_class[cid]] if cid in id_to_class else ("", "", "")
        out.append(Neighbour(int(bundle.arrays["product_ids"][p]), float(s), cid, *(n.strip() for n in names)))
    return out, pos[keep]


def classify_pictures(bundle: IndexBundle, clf: FusedClassifier, pictures: list[bytes], top: int = 5,
                      names: list[str] | None = None, exclude: int | None = None) -> list[dict]:
    """The ``top`` fused categories of one product's pictures, each with its head, kNN, exact-duplicate and
    prototype shares and fused score; ``exclude``: an index position left out of the vote (a product's own,
    when it is the query)."""
    emb, probs, _ = embed_pictures(bundle, pictures, names)
    return classify_outputs(bundle, clf, emb, probs, [picture_hash(p) for p in pictures], top, exclude)


def classify_outputs(bundle: IndexBundle, clf: FusedClassifier, emb: np.ndarray, probs: np.ndarray,
                     hashes: list[int], top: int = 5, exclude: int | None = None) -> list[dict]:
    """:func:`classify_pictures` from a product's embedding ``[D]``, head probabilities ``[C]`` and picture
    hashes: its neighbours and exact duplicates, less those at index position ``exclude``, vote with the head."""
    index = bundle.vectors
    sims, labels = neighbour_labels(index, emb[None], clf.k, np.ones(1, bool), exclude)
    dups = bundle.duplicates.product_labels(np.array(hashes, np.int64), np.zeros(len(hashes), np.int64), 1,
                                            index.labels, exclude=exclude)
    protos = None
    if clf.uses_prototypes:
        protos = emb[None] @ (bundle.prototypes if exclude is None else bundle.prototypes_without(exclude)).T
    sizes = class_sizes(index)
    own = -1 if exclude is None else int(index.labels[exclude])
    if own >= 0:  # its class's size without it, as for a product that is not indexed
        sizes = sizes.copy()
        sizes[own] -= 1
    c = Candidates.build(probs[None], (sims, labels), np.ones(1, bool), dups, sizes=sizes, proto_sims=protos)
    votes = clf.candidate_votes(c)
    feats = clf.features(c, votes)
    scores = clf.candidate_scores(c, feats)[0]
    probs = clf.probabilities(scores[None])[0]
    cats = bundle.categories
    out = []
    for j in np.argsort(-scores, kind="stable")[:top]:
        if not np.isfinite(scores[j]):
            break
        cls = int(c.classes[0, j])
        l1, l2, l3 = (n.strip() for n in cats.names[cls])
        out.append({"category_id": int(cats.ids[cls]), "level1": l1, "level2": l2, "level3": l3,
                    "head": float(c.head[0, j]), "knn": float(votes[0][0, j]), "duplicate": float(c.dup_share[0, j]),
                    "prototype": float(feats[0, j, FEATURES.index("proto_share")]),
                    "fused": float(probs[j]), "score": float(scores[j])})
    return out


def similar(index_dir: str | Path | IndexBundle, product_id: int | None = None,
            images: list[str | Path] | None = None, k: int = 10, category: int | None = None,
            sheet: str | Path | None = None, include_self: bool = False) -> list[Neighbour]:
    """The ``k`` products most similar to a product or to images, optionally within one category id. A query
    product is not its own neighbour unless ``include_self`` (as in ``POST /similar``). Picture queries are embedded
    by the bundle's runtime (``open_index(..., runtime=...)``; a folder: the index's own)."""
    bundle = index_dir if isinstance(index_dir, IndexBundle) else open_index(index_dir)
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    vec, pics = query_vector(bundle, product_id, images)
    own = None if product_id is None or include_self else product_position(bundle, product_id)
    out, positions = neighbours(bundle, vec, k, category, exclude=own)
    if sheet is not None:
        contact_sheet(bundle, pics, out, positions, sheet)
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
    for i, (nb, pos) in enumerate(zip(found, positions, strict=True)):
        ax = axes[1 + i // cols, i % cols]
        pic = _first_picture(bundle, int(pos))
        if pic is not None:
            ax.imshow(pic)
        ax.set_title(f"{nb.product_id}  {nb.similarity:.3f}\n{nb.level3[:28]}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return Path(path)
