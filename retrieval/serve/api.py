"""HTTP API and web page over one index folder (FastAPI): similar products, categories, pictures, additions.

``create_app(index_dir)`` opens the index once; ``python cli.py serve`` runs it under uvicorn. Queries take
either a product id or uploaded pictures; bad input is a 4xx with a message, never a crash of the server.
"""
from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from ..errors import UserError
from ..infer.fused import calibrated
from ..infer.folder import IndexBundle, add_to_index, open_index
from ..infer.manifest import IndexFolder
from ..infer.parts import LoaderSettings
from ..infer.query import (UnknownProduct, classify_pictures, embed_pictures, neighbours, product_pictures,
                      product_position)

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")
MAX_UPLOAD = 8 << 20       # bytes per request of pictures
MAX_PRODUCTS_UPLOAD = 256 << 20  # bytes of a BSON file added by POST /products
MAX_K = 100


class _State:
    """The opened index, swapped whole (under a lock) when products are added."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.lock = folder, threading.Lock()
        self.bundle: IndexBundle = open_index(folder)

    def reload(self) -> None:
        self.bundle = open_index(self.folder)


async def _pictures(files: list[UploadFile] | None) -> tuple[list[bytes], list[str]]:
    data, names, total = [], [], 0
    for f in files or []:
        blob = await f.read(MAX_UPLOAD + 1 - total)
        total += len(blob)
        if total > MAX_UPLOAD:
            raise HTTPException(413, f"pictures over {MAX_UPLOAD >> 20} MB in all")
        data.append(blob)
        names.append(f.filename or f"picture {len(names)}")
    return data, names


def _check_one_query(product_id: int | None, data: list[bytes]) -> None:
    if (product_id is None) == (not data):
        raise HTTPException(400, "give exactly one of product_id or one or more images")


def _query_pictures(bundle: IndexBundle, product_id: int | None, data: list[bytes]) -> list[bytes]:
    _check_one_query(product_id, data)
    return data if data else product_pictures(bundle, product_position(bundle, product_id))


def create_app(index_dir: str | Path) -> FastAPI:
    """The application serving ``index_dir``."""
    state = _State(Path(index_dir))
    app = FastAPI(title="Cdiscount similar products", version="1",
                  description="Similar-product search and category prediction over one index folder.")

    @app.exception_handler(UnknownProduct)
    async def _unknown(_: Request, e: UnknownProduct) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=404)

    @app.exception_handler(UserError)
    async def _user_error(_: Request, e: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=400)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    def health() -> dict:
        """Whether the server is up, and what it serves."""
        b = state.bundle
        return {"status": "ok", "products": len(b.product_ids), "categories": len(b.categories),
                "backbone": b.manifest.backbone, "index": b.manifest.factory}

    @app.post("/similar")
    async def similar(product_id: Annotated[int | None, Form()] = None,
                      images: Annotated[list[UploadFile] | None, File(description="query pictures")] = None,
                      k: Annotated[int, Form(ge=1, le=MAX_K)] = 12,
                      offset: Annotated[int, Form(ge=0, le=10_000)] = 0,
                      category: Annotated[int | None, Form(description="only this category id")] = None) -> dict:
        """The products most similar to an indexed product or to uploaded pictures, one result per product;
        ``offset`` pages on (``next_offset``), ``category`` restricts the search itself."""
        data, names = await _pictures(images)
        b = state.bundle
        _check_one_query(product_id, data)
        vec = embed_pictures(b, data, names)[0] if data else b.vector(product_position(b, product_id))
        found, _ = neighbours(b, vec, k, category, offset)
        return {"query": {"product_id": product_id, "images": len(data), "category": category},
                "offset": offset, "k": k, "next_offset": offset + len(found) if len(found) == k else None,
                "results": [{**n.to_dict(), "path": n.path, "thumbnail": f"/products/{n.product_id}/images/0"}
                            for n in found]}

    @app.post("/classify")
    async def classify(product_id: Annotated[int | None, Form()] = None,
                       images: Annotated[list[UploadFile] | None, File(description="pictures of one product")] = None,
                       top: Annotated[int, Form(ge=1, le=20)] = 5) -> dict:
        """The top categories of one product (uploaded pictures, or an indexed product's own pictures) with
        head, kNN, exact-duplicate and fused scores."""
        data, names = await _pictures(images)
        b = state.bundle
        pictures = _query_pictures(b, product_id, data)
        clf = calibrated(b.run, b.fallback_class)
        return {"calibration": clf.params(), "categories": classify_pictures(b, clf, pictures, top, names or None)}

    @app.get("/products/{product_id}/images/{n}", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}})
    def picture(product_id: int, n: int) -> Response:
        """Picture ``n`` (from 0) of an indexed product, as stored in its BSON file."""
        b = state.bundle
        pictures = product_pictures(b, product_position(b, product_id))
        if not 0 <= n < len(pictures):
            raise HTTPException(404, f"product _id {product_id} has {len(pictures)} pictures; no picture {n}")
        return Response(pictures[n], media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/products")
    async def add_products(file: Annotated[UploadFile, File(description="BSON file of products to add")]) -> dict:
        """Add the products of an uploaded BSON file to the index (like add-to-index)."""
        uploads = IndexFolder(state.folder).uploads
        uploads.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=uploads, suffix=".bson", delete=False) as tmp:
            size = 0
            while chunk := await file.read(1 << 20):
                size += len(chunk)
                if size > MAX_PRODUCTS_UPLOAD:
                    tmp.close()
                    Path(tmp.name).unlink()
                    raise HTTPException(413, f"upload over {MAX_PRODUCTS_UPLOAD >> 20} MB")
                tmp.write(chunk)
        with state.lock:
            try:
                added, already = add_to_index(state.folder, tmp.name, LoaderSettings(workers=0))
            except UserError as e:
                Path(tmp.name).unlink()
                raise HTTPException(400, f"upload {file.filename}: {e}") from None
            if not added:
                Path(tmp.name).unlink()
            state.reload()
        return {"added": added, "already_indexed": already[:100], "products": len(state.bundle.product_ids)}

    return app
