"""The write routes of the HTTP API: ``POST /products`` (add, or replace with ``?replace=true``), ``DELETE`` and
``PATCH /products/{id}``. Each needs the token (the request guard checks it, and read-only mode, from the
headers, before the body is read), runs one at a time behind the server's writer lock and the index folder's, and
commits one generation the server swaps to before answering; a full disk is a 507 that changed nothing."""
from __future__ import annotations

import errno
import logging
import re
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as Path_

from ..errors import UserError
from ..infer.indexdir.build import add_to_index
from ..infer.indexdir.changes import relabel_products, remove_products
from ..infer.indexdir.folder import DiskFull, IndexFolder, WriterBusy
from ..infer.pipeline.embed import LoaderSettings

log = logging.getLogger(__name__)
_PATH = re.compile(r"(?:/[\w.\-]+)+/([\w.\-]+)")


def no_paths(message: str) -> str:
    """A message for a stranger: every absolute path reduced to its file name."""
    return _PATH.sub(r"\1", message)


def client_name(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown client"


def _check_served(state, what: str) -> None:
    """After a committed write: refuse to say it is live when this server could not open the new generation."""
    if not state.served():
        raise HTTPException(503, f"{what} is committed, but this server could not open the new generation (it is "
                                 f"still serving {state.bundle.generation} and retries); run `cli.py check`",
                            headers={"Retry-After": "30"})


def add_write_routes(app: FastAPI, state) -> None:
    """Register the write routes on ``app`` over the served index ``state`` (``api._State``)."""

    @app.delete("/products/{product_id}")
    def remove_product(request: Request, product_id: Annotated[int, Path_(ge=0, le=2 ** 63 - 1)]) -> dict:
        """Remove an indexed product (needs the token): one generation commit; it is never found or voting from
        the next query on. 404 for a product that is not indexed."""
        with state.writer:
            change = remove_products(state.folder, [product_id], on_commit=state.reload)
        log.info("DELETE /products/%d from %s: generation %s", product_id, client_name(request), change.generation)
        _check_served(state, f"the removal of {product_id}")
        return {"removed": product_id, "generation": change.generation, "products": state.bundle.live_count}

    @app.patch("/products/{product_id}")
    def relabel_product(request: Request, product_id: Annotated[int, Path_(ge=0, le=2 ** 63 - 1)],
                        category_id: Annotated[int, Form(ge=0, le=2 ** 63 - 1,
                                                         description="the product's correct category id")]) -> dict:
        """Give an indexed product another category (needs the token; the category must be in the run's table):
        it votes for it from the next query on, without retraining."""
        with state.writer:
            change = relabel_products(state.folder, {product_id: category_id}, on_commit=state.reload)
        log.info("PATCH /products/%d -> %d from %s: generation %s", product_id, category_id, client_name(request),
                 change.generation)
        _check_served(state, f"the relabel of {product_id}")
        return {"product_id": product_id, "category_id": category_id, "generation": change.generation}

    @app.post("/products")
    def add_products(request: Request,
                     file: Annotated[UploadFile, File(description="BSON file of products to add")],
                     replace: Annotated[bool, Query(description="give products already indexed the file's pictures "
                                                                "and category (else they are skipped)")] = False
                     ) -> dict:
        """Add the products of an uploaded BSON file to the index as a new generation (needs the token; the
        request guard has checked it, and the read-only mode, before the body was read)."""
        layout = IndexFolder(state.folder)
        layout.uploads.mkdir(exist_ok=True)
        tmp = tempfile.NamedTemporaryFile(dir=layout.uploads, suffix=".bson", delete=False)
        try:
            with tmp:
                while chunk := file.file.read(1 << 20):
                    tmp.write(chunk)
        except OSError as e:
            Path(tmp.name).unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull("upload") from None
            raise
        added, already, upload = 0, [], Path(tmp.name)
        try:
            with state.writer:
                # the writer embeds with its own copy of the model (kept in state.nets): sharing the serving one
                # with the query thread stalled the event loop (soak test: /health p99 over its 0.1 s bound)
                added, already = add_to_index(state.folder, upload, LoaderSettings(workers=0),
                                              on_commit=state.reload, nets=state.nets, replace=replace)
        except (WriterBusy, DiskFull):
            raise
        except UserError as e:
            msg = no_paths(str(e).replace(tmp.name, file.filename or "upload"))
            raise HTTPException(400, f"upload {file.filename}: {msg}") from None
        finally:
            refs = layout.referenced()  # a source of a kept generation stays (CURRENT has moved: it succeeded)
            if refs is not None and upload.resolve() not in refs[1]:
                for leftover in layout.uploads.glob(upload.name + "*"):
                    leftover.unlink(missing_ok=True)
        total = state.bundle.live_count
        log.info("POST /products from %s: %s, %d added, %d already indexed%s; %d products", client_name(request),
                 file.filename, added, len(already), " (replaced)" if replace else "", total)
        if added:
            _check_served(state, f"the add of {added} products")
        key = "replaced" if replace else "already_indexed"
        return {"added": added, key: already[:100], "products": total}
