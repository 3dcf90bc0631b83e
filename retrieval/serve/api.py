"""HTTP API and web page over one index folder (FastAPI): similar products, categories, pictures, additions.

``create_app(index_dir, ServeSettings(...))`` opens the index once; ``python cli.py serve`` runs it under
uvicorn. A server is an input surface for strangers:

- the event loop never runs torch or FAISS: ``POST /similar`` hands its query to the batch thread
  (:class:`~.batching.QueryBatcher`: decode, one forward, one search for all queries in flight) and awaits its
  future without holding a thread; every other handler that touches them is a plain ``def``, which FastAPI
  runs in its thread pool (``GET /health`` answers while products are added);
- writes (``POST /products``) need ``Authorization: Bearer <token>``, are refused in read-only mode, and are
  refused when the request's ``Origin`` is another site; one add runs at a time (the index folder's writer
  lock), it commits a new generation, and queries keep the generation they started with until the swap;
- request bodies are refused with 413 while they stream in (before the whole body is read), pictures over
  a pixel cap are refused before decoding, and error messages carry no server path.
"""
from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..errors import UserError
from ..infer.indexdir.build import add_to_index
from ..infer.indexdir.bundle import IndexBundle, open_index
from ..infer.indexdir.folder import IndexFolder, WriterBusy
from ..infer.pipeline.embed import LoaderSettings
from ..infer.query import (
    UnknownProduct,
    classify_pictures,
    embed_pictures,
    neighbours,
    neighbours_from,
    product_pictures,
    product_position,
)
from ..infer.scoring.fused import load_fusion
from .batching import QueryBatcher, warm_up

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")
MAX_UPLOAD = 8 << 20       # bytes per request of pictures
MAX_PRODUCTS_UPLOAD = 256 << 20  # bytes of a BSON file added by POST /products
MAX_K = 100
MAX_OFFSET = 10_000


@dataclass(frozen=True)
class ServeSettings:
    """Who may write: ``token`` (a bearer token every write must carry), or ``read_only``; with neither, writes
    are open, which :func:`check_exposure` allows on a loopback address only."""

    token: str | None = None
    read_only: bool = False


def check_exposure(host: str, settings: ServeSettings) -> None:
    """Refuse to serve writes without a token on an address other machines can reach."""
    loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    if not loopback and not settings.read_only and not settings.token:
        raise UserError(f"--host {host} exposes POST /products to the network without a credential; pass --token "
                        "(or set CDISCOUNT_TOKEN), or --read-only")


class _State:
    """The opened index (one generation), swapped whole under a lock when an add commits."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.lock = folder, threading.Lock()
        self.writer = threading.Lock()  # adds queue here, one at a time (another process's add: 409)
        self.bundle: IndexBundle = open_index(folder)

    def swap(self, fresh: IndexBundle) -> None:
        """Make a committed generation the one queries see (whole, under the lock)."""
        with self.lock:
            self.bundle = fresh


class _BodyLimit:
    """ASGI middleware: a body over its route's limit is answered 413 as soon as the limit is passed (or at once,
    from Content-Length), before the application reads or parses it."""

    def __init__(self, app, limits: dict[str, int], default: int) -> None:
        self.app, self.limits, self.default = app, limits, default

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope["path"], self.default)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _reject(send, limit)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _reject(send, limit)


class _TooLarge(Exception):
    pass


async def _reject(send, limit: int) -> None:
    body = f'{{"detail": "request body over {limit >> 20} MB"}}'.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


_PATH = re.compile(r"(?:/[\w.\-]+)+/([\w.\-]+)")


def _no_paths(message: str) -> str:
    """A message for a stranger: every absolute path reduced to its file name."""
    return _PATH.sub(r"\1", message)


def _checked(files: list[UploadFile], blobs: list[bytes]) -> tuple[list[bytes], list[str]]:
    names = []
    for f, blob in zip(files, blobs):
        if not blob:
            raise HTTPException(400, f"{f.filename or 'picture'}: empty file")
        names.append(Path(f.filename or f"picture {len(names)}").name)
    return blobs, names


def _pictures(files: list[UploadFile] | None) -> tuple[list[bytes], list[str]]:
    """The uploaded pictures' bytes and names (on a worker thread)."""
    return _checked(files or [], [f.file.read() for f in files or []])


async def _pictures_async(files: list[UploadFile] | None) -> tuple[list[bytes], list[str]]:
    """The same, on the event loop: from memory, or (a large upload spooled to disk) on a worker thread."""
    return _checked(files or [], [await f.read() for f in files or []])


def _check_one_query(product_id: int | None, data: list[bytes]) -> None:
    if (product_id is None) == (not data):
        raise HTTPException(400, "give exactly one of product_id or one or more images")


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown client"


def _authorise(request: Request, settings: ServeSettings) -> None:
    """Refuse a write (401/403) unless it may go ahead; every refusal is logged (the access log may be off)."""
    try:
        _check_write(request, settings)
    except HTTPException as e:
        log.warning("write refused (%d) for %s: %s", e.status_code, _client(request), e.detail)
        raise


def _check_write(request: Request, settings: ServeSettings) -> None:
    if settings.read_only:
        raise HTTPException(403, "this server is read-only")
    origin = request.headers.get("origin")
    if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host", ""):
        raise HTTPException(403, f"writes from another site ({origin}) are refused")
    if settings.token:
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer "):
            raise HTTPException(401, "this write needs Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given[7:].encode(), settings.token.encode()):
            raise HTTPException(403, "wrong token")


def settle_heap() -> None:
    """Collect, then move every object alive now (imported modules, the model, the index: some 450,000) out of
    the collector's reach: a full collection over them took 0.2 s and stalled every request in flight then."""
    gc.collect()
    gc.freeze()


def create_app(index_dir: str | Path, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The application serving ``index_dir``."""
    state = _State(Path(index_dir))
    batcher = QueryBatcher()
    if warmed := warm_up(state.bundle, batcher.max_batch):
        log.info("network run at %d batch sizes before serving (cuDNN plans each new shape once)", warmed)
    app = FastAPI(title="Cdiscount similar products", version="2",
                  description="Similar-product search and category prediction over one index folder.")
    app.add_middleware(_BodyLimit, limits={"/products": MAX_PRODUCTS_UPLOAD + (1 << 20)},
                       default=MAX_UPLOAD + (1 << 20))

    @app.exception_handler(UnknownProduct)
    async def _unknown(_: Request, e: UnknownProduct) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=404)

    @app.exception_handler(UserError)
    async def _user_error(_: Request, e: UserError) -> JSONResponse:
        return JSONResponse({"detail": _no_paths(str(e))}, status_code=400)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html",
                            headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; "
                                     "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'"})

    @app.get("/health")
    async def health() -> dict:
        """Whether the server is up, and what it serves (answered on the event loop, never behind work)."""
        b = state.bundle
        return {"status": "ok", "products": len(b.product_ids), "categories": len(b.categories),
                "backbone": b.manifest.backbone, "index": b.manifest.factory, "writes": not settings.read_only}

    @app.post("/similar")
    async def similar(product_id: Annotated[int | None, Form(ge=0, le=2 ** 63 - 1)] = None,
                      images: Annotated[list[UploadFile] | None, File(description="query pictures")] = None,
                      k: Annotated[int, Form(ge=1, le=MAX_K)] = 12,
                      offset: Annotated[int, Form(ge=0, le=MAX_OFFSET)] = 0,
                      category: Annotated[int | None, Form(description="only this category id")] = None,
                      include_self: Annotated[bool, Form(description="list the query product itself")] = False
                      ) -> JSONResponse:
        """The products most similar to an indexed product or to uploaded pictures, one result per product;
        ``offset`` pages on (``next_offset``), ``category`` restricts the search itself. A query product is
        not its own neighbour unless ``include_self``."""
        data, names = await _pictures_async(images)
        _check_one_query(product_id, data)
        b = state.bundle
        depth = offset + k + 1  # one more: the query product may be among them
        if category is None:  # the common query: batched with others in flight (one forward, one search); the
            # handler awaits the batch thread's future, so no thread is held and the event loop never blocks
            pos = None if data else product_position(b, product_id)
            job = batcher.submit(b, depth, pictures=data or None, names=names, position=pos)
            found, _ = neighbours_from(b, *await asyncio.wrap_future(job))
        else:
            def search() -> list:
                vec = embed_pictures(b, data, names)[0] if data else b.vector(product_position(b, product_id))
                return neighbours(b, vec, depth, category)[0]
            found = await run_in_threadpool(search)
        if product_id is not None and not include_self:
            found = [n for n in found if n.product_id != product_id]
        found = found[offset:offset + k]
        more = len(found) == k and offset + k <= MAX_OFFSET
        return JSONResponse({"query": {"product_id": product_id, "images": len(data), "category": category},
                             "offset": offset, "k": k, "next_offset": offset + k if more else None,
                             "results": [{**n.to_dict(), "path": n.path,
                                          "thumbnail": f"/products/{n.product_id}/images/0"} for n in found]})

    @app.post("/classify")
    def classify(product_id: Annotated[int | None, Form(ge=0, le=2 ** 63 - 1)] = None,
                 images: Annotated[list[UploadFile] | None, File(description="pictures of one product")] = None,
                 top: Annotated[int, Form(ge=1, le=20)] = 5) -> dict:
        """The top categories of one product (uploaded pictures, or an indexed product's own pictures) with
        head, kNN and exact-duplicate shares and the fused probability (summing to 1 over the candidates)."""
        data, names = _pictures(images)
        _check_one_query(product_id, data)
        b = state.bundle
        pictures = data if data else product_pictures(b, product_position(b, product_id))
        clf = load_fusion(b.run, b.fallback_class)
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
    def add_products(request: Request,
                     file: Annotated[UploadFile, File(description="BSON file of products to add")]) -> dict:
        """Add the products of an uploaded BSON file to the index as a new generation (needs the token)."""
        _authorise(request, settings)
        uploads = IndexFolder(state.folder).uploads
        uploads.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=uploads, suffix=".bson", delete=False) as tmp:
            while chunk := file.file.read(1 << 20):
                tmp.write(chunk)
        added = 0
        try:
            with state.writer:
                # the writer embeds with its own copy of the model: sharing the serving one with the query
                # thread stalled the event loop (soak test: /health p99 0.10-0.20 s, over its 0.1 s bound)
                added, already = add_to_index(state.folder, tmp.name, LoaderSettings(workers=0),
                                              on_commit=state.swap)
        except WriterBusy:
            raise HTTPException(409, "another add is running on this index; try again when it has finished") from None
        except UserError as e:
            msg = _no_paths(str(e).replace(tmp.name, file.filename or "upload"))
            raise HTTPException(400, f"upload {file.filename}: {msg}") from None
        finally:
            if not added:  # a refused or empty upload leaves nothing behind (its offset cache neither)
                for leftover in uploads.glob(Path(tmp.name).name + "*"):
                    leftover.unlink(missing_ok=True)
        total = len(state.bundle.product_ids)
        log.info("POST /products from %s: %s, %d added, %d already indexed; %d products", _client(request),
                 file.filename, added, len(already), total)
        return {"added": added, "already_indexed": already[:100], "products": total}

    return app
