"""HTTP API and web page over one index folder (FastAPI): similar products, categories, pictures, additions.

``create_app(index_dir, ServeSettings(...))`` opens the index once; :func:`~.server.run_server` (``python cli.py
serve``) runs it under uvicorn. A server is an input surface for strangers:

- every request is first judged from its headers alone by :class:`~.guards.RequestGuard` (Host allow-list
  against DNS rebinding, a write's Origin, token and read-only mode, body size, picture requests in flight):
  a refusal never reads the body;
- the event loop never runs torch or FAISS: ``POST /similar`` and ``POST /classify`` hand their pictures to the
  batch thread (:class:`~.batching.QueryBatcher`: decode, one forward, one search for all queries in flight; its
  queue is bounded, and a full queue is a 503 with ``Retry-After``) and await its future without holding a
  thread; the rest of their work and every other handler that touches the index runs in the thread pool;
- at most :data:`MAX_PICTURES` pictures a query, counted before any is decoded; pictures are decoded reduced
  to the model's size, and pixel caps are read from the header (``retrieval.data.images``);
- writes (``POST /products``, ``DELETE`` and ``PATCH /products/{id}``) need ``Authorization: Bearer <token>`` and
  are refused in read-only mode; one write runs at a time (the index folder's writer lock), it commits a new
  generation, and queries keep the generation they started with until the swap; a full disk is a 507 that
  changed nothing; error messages carry no server path.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import weakref
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..data.images import picture_hash
from ..errors import UserError
from ..infer.indexdir.bundle import IndexBundle, open_index
from ..infer.indexdir.changes import UnknownProducts
from ..infer.indexdir.folder import DiskFull, IndexFolder, WriterBusy
from ..infer.query import (
    UnknownProduct,
    classify_outputs,
    neighbours,
    neighbours_from,
    product_pictures,
    product_position,
    search_depth,
)
from ..infer.scoring.fused import load_fusion
from .batching import Busy, QueryBatcher, warm_up
from .guards import GuardLimits, RequestGuard, ServeSettings, check_exposure  # noqa: F401 (check_exposure: re-exported)
from .writes import add_write_routes, no_paths

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")
MAX_UPLOAD = 8 << 20       # bytes per request of pictures
MAX_PRODUCTS_UPLOAD = 256 << 20  # bytes of a BSON file added by POST /products
MAX_K = 100
MAX_OFFSET = 10_000
MAX_PICTURES = 8  # pictures per query (a Cdiscount product has at most 4)
MAX_BUSY = 32     # picture requests (POST /similar, /classify) let in at a time; the next gets 503


class _State:
    """The opened index (one generation), swapped whole under a lock when a generation commits: an add of this
    server's, or any other process's commit, which a watcher thread notices (a stat of ``CURRENT`` once a
    second, off the event loop) and opens beside the live one, reading only its new segments."""

    POLL_S = 1.0

    def __init__(self, folder: Path, runtime: str | None = None) -> None:
        self.folder, self.lock, self.runtime = folder, threading.Lock(), runtime
        self.writer = threading.Lock()  # adds queue here, one at a time (another process's add: 409)
        self.reload_lock = threading.Lock()  # one reopen at a time (the watcher's or an add's)
        self.nets: dict = {}  # the writer's own embedding runtime, loaded at the first add and kept
        self.bundle: IndexBundle = open_index(folder, runtime=runtime)
        self._seen = self._stamp()
        self._failed: tuple = (None, 0.0)  # (stamp of CURRENT that failed to open, when to try it again)
        self._stop = threading.Event()
        threading.Thread(target=_watch, args=(weakref.ref(self), self._stop), name="index-watcher",
                         daemon=True).start()

    def _stamp(self) -> tuple | None:
        try:
            st = IndexFolder(self.folder).current_file.stat()
            return st.st_ino, st.st_mtime_ns, st.st_size
        except OSError:
            return None

    def swap(self, fresh: IndexBundle) -> None:
        """Make a committed generation the one queries see (whole, under the lock), with the server's runtime."""
        fresh.tower = self.bundle.tower
        with self.lock:
            self.bundle = fresh

    def reload(self, _generation: str | None = None) -> bool:
        """Open the live generation (reusing the model and the segments already open) and swap to it if it is
        not the one served; True when it swapped."""
        with self.reload_lock:
            seen = self._stamp()  # taken before the open: a commit during it is seen at the next poll
            if IndexFolder(self.folder).current_name() == self.bundle.generation:
                self._seen = seen
                return False
            fresh = open_index(self.folder, runtime=self.runtime, reuse=self.bundle)  # refused: retried next poll
            self.swap(fresh)
            self._seen = seen
            log.info("serving generation %s (%d products)", fresh.generation, len(fresh.vectors))
            return True

    RETRY_S = 30.0  # a generation that could not be opened is tried again after this long (or at the next commit)

    def poll(self) -> None:
        """Reload when ``CURRENT`` changed since last seen (one stat); a generation that failed to open is tried
        again every :attr:`RETRY_S` seconds, not at every poll."""
        stamp = self._stamp()
        if stamp == self._seen or (stamp == self._failed[0] and time.monotonic() < self._failed[1]):
            return
        try:
            self.reload()
        except Exception:
            self._failed = (stamp, time.monotonic() + self.RETRY_S)
            raise

    def served(self) -> bool:
        """Whether the generation queries see is the folder's live one."""
        return IndexFolder(self.folder).current_name() == self.bundle.generation

    def close(self) -> None:
        self._stop.set()


def _watch(state_ref, stop: threading.Event) -> None:
    """The watcher thread: poll the folder's ``CURRENT`` every :attr:`_State.POLL_S` until the server stops (or
    its state is gone). A generation that cannot be opened is logged and retried at the next change."""
    while not stop.wait(_State.POLL_S):
        state = state_ref()
        if state is None:
            return
        try:
            state.poll()
        except Exception:
            log.exception("could not open the index folder's new generation; still serving %s",
                          state.bundle.generation)
        del state


def _count(files: list[UploadFile] | None) -> None:
    """Refuse a query of more than :data:`MAX_PICTURES` pictures (413), before any is read or decoded."""
    if files and len(files) > MAX_PICTURES:
        raise HTTPException(413, f"{len(files)} pictures: at most {MAX_PICTURES} a query")


async def _pictures(files: list[UploadFile] | None) -> tuple[list[bytes], list[str]]:
    """The uploaded pictures' bytes and names: from memory, or (a large upload spooled to disk) on a worker
    thread."""
    _count(files)
    blobs, names = [await f.read() for f in files or []], []
    for f, blob in zip(files or [], blobs):
        if not blob:
            raise HTTPException(400, f"{f.filename or 'picture'}: empty file")
        names.append(Path(f.filename or f"picture {len(names)}").name)
    return blobs, names


def _check_one_query(product_id: int | None, data: list[bytes]) -> None:
    if (product_id is None) == (not data):
        raise HTTPException(400, "give exactly one of product_id or one or more images")


def settle_heap() -> None:
    """Collect, then move every object alive now (imported modules, the model, the index: some 450,000) out of
    the collector's reach: a full collection over them took 0.2 s and stalled every request in flight then."""
    gc.collect()
    gc.freeze()


def create_app(index_dir: str | Path, settings: ServeSettings | None = None,
               batcher: QueryBatcher | None = None) -> FastAPI:
    """The application serving ``index_dir`` (``settings``: who may write and from where, writes open to the
    loopback names by default; ``batcher``: the query batcher to use, a new one by default)."""
    settings = settings or ServeSettings()
    state = _State(Path(index_dir), settings.runtime)
    batcher = batcher or QueryBatcher()
    if warmed := warm_up(state.bundle, batcher.max_pictures):
        log.info("network run at %d batch sizes before serving (cuDNN plans each new shape once)", warmed)
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        state.close()  # the watcher thread stops with the server, not when the state is collected

    app = FastAPI(title="Cdiscount similar products", version="2", lifespan=lifespan,
                  description="Similar-product search and category prediction over one index folder. At most "
                              f"{MAX_PICTURES} pictures a query; a busy server answers 503 with Retry-After.")
    app.add_middleware(RequestGuard, settings=settings, limits=GuardLimits(
        MAX_UPLOAD + (1 << 20), per_path=(("/products", MAX_PRODUCTS_UPLOAD + (1 << 20)),), writes=("/products",),
        busy_paths=("/similar", "/classify"), max_busy=MAX_BUSY, retry_after=Busy.retry_after))
    app.state.index = state  # its watcher thread ends at shutdown (state.close())

    @app.exception_handler(Busy)
    async def _busy(_: Request, e: Busy) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(UnknownProduct)
    async def _unknown(_: Request, e: UnknownProduct) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=404)

    @app.exception_handler(UnknownProducts)
    async def _unknown_ids(_: Request, e: UnknownProducts) -> JSONResponse:
        return JSONResponse({"detail": no_paths(str(e))}, status_code=404)

    @app.exception_handler(DiskFull)
    async def _disk_full(_: Request, e: DiskFull) -> JSONResponse:
        return JSONResponse({"detail": "the server's disk is full; nothing was changed"}, status_code=507)

    @app.exception_handler(WriterBusy)
    async def _busy_writer(_: Request, e: WriterBusy) -> JSONResponse:
        return JSONResponse({"detail": "another write is running on this index; try again when it has finished"},
                            status_code=409)

    @app.exception_handler(UserError)
    async def _user_error(_: Request, e: UserError) -> JSONResponse:
        return JSONResponse({"detail": no_paths(str(e))}, status_code=400)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html",
                            headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; "
                                     "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'"})

    @app.get("/health")
    async def health() -> dict:
        """Whether the server is up, and what it serves (answered on the event loop, never behind work)."""
        b = state.bundle
        return {"status": "ok", "products": b.live_count, "categories": len(b.categories),
                "backbone": b.manifest.backbone, "index": b.vectors.factory, "writes": not settings.read_only,
                "generation": b.generation,
                "segments": [{"id": s.sid, "products": s.live_count, "removed": len(s.state.removed),
                              "relabelled": len(s.state.relabels), "factory": s.meta.get("factory", s.vectors.factory),
                              "tuned_recall_at_10": s.meta.get("tuned_recall_at_10")} for s in b.segments]}

    @app.post("/similar")
    async def similar(product_id: Annotated[int | None, Form(ge=0, le=2 ** 63 - 1)] = None,
                      images: Annotated[list[UploadFile] | None,
                                        File(description=f"query pictures (at most {MAX_PICTURES})")] = None,
                      k: Annotated[int, Form(ge=1, le=MAX_K)] = 12,
                      offset: Annotated[int, Form(ge=0, le=MAX_OFFSET)] = 0,
                      category: Annotated[int | None, Form(description="only this category id")] = None,
                      include_self: Annotated[bool, Form(description="list the query product itself")] = False
                      ) -> JSONResponse:
        """The products most similar to an indexed product or to uploaded pictures (at most 8), one result per
        product; ``offset`` pages on (``next_offset``), ``category`` restricts the search itself. A query product
        is not its own neighbour unless ``include_self``. 503 with ``Retry-After`` when the server is busy."""
        data, names = await _pictures(images)
        _check_one_query(product_id, data)
        b = state.bundle
        pos = None if data else product_position(b, product_id)
        own = None if include_self else pos
        depth = search_depth(offset, k, own)
        if category is None:  # the common query: batched with others in flight (one forward, one search); the
            # handler awaits the batch thread's future, so no thread is held and the event loop never blocks
            job = batcher.submit(b, depth, pictures=data or None, names=names, position=pos)
            found, _ = neighbours_from(b, *await asyncio.wrap_future(job), offset, k, own)
        else:  # pictures embedded on the batch thread (as every picture is), the filtered search in the pool
            vec = (await asyncio.wrap_future(batcher.embed(b, data, names)))[0] if data else None
            found = await run_in_threadpool(
                lambda: neighbours(b, b.vector(pos) if vec is None else vec, k, category, offset, own)[0])
        more = len(found) == k and offset + k <= MAX_OFFSET
        return JSONResponse({"query": {"product_id": product_id, "images": len(data), "category": category},
                             "offset": offset, "k": k, "next_offset": offset + k if more else None,
                             "results": [{**n.to_dict(), "path": n.path,
                                          "thumbnail": f"/products/{n.product_id}/images/0"} for n in found]})

    @app.post("/classify")
    async def classify(product_id: Annotated[int | None, Form(ge=0, le=2 ** 63 - 1)] = None,
                       images: Annotated[list[UploadFile] | None,
                                         File(description=f"pictures of one product (at most {MAX_PICTURES})")
                                         ] = None,
                       top: Annotated[int, Form(ge=1, le=20)] = 5,
                       include_self: Annotated[bool, Form(description="let an indexed product's own vector and "
                                                          "pictures vote")] = False) -> dict:
        """The top categories of one product (uploaded pictures, or an indexed product's own pictures) with
        head, kNN, exact-duplicate and prototype shares and the fused probability (summing to 1 over the
        candidates). By ``product_id``, the product's own vector and pictures do not vote unless ``include_self``."""
        data, names = await _pictures(images)
        _check_one_query(product_id, data)
        b = state.bundle
        pos = None if data else product_position(b, product_id)
        if pos is not None:
            data = (await run_in_threadpool(product_pictures, b, pos))[:MAX_PICTURES]
            if not data:
                raise HTTPException(400, f"product _id {product_id} has no picture to classify")
        vec, probs = await asyncio.wrap_future(batcher.embed(b, data, names or None))

        def vote() -> dict:
            clf = load_fusion(b.run, b.fallback_class)
            cats = classify_outputs(b, clf, vec, probs, [picture_hash(p) for p in data], top,
                                    exclude=None if include_self else pos)
            return {"calibration": clf.params(), "categories": cats}
        return await run_in_threadpool(vote)

    @app.get("/products/{product_id}/images/{n}", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}})
    def picture(product_id: int, n: int) -> Response:
        """Picture ``n`` (from 0) of an indexed product, as stored in its BSON file."""
        b = state.bundle
        pictures = product_pictures(b, product_position(b, product_id))
        if not 0 <= n < len(pictures):
            raise HTTPException(404, f"product _id {product_id} has {len(pictures)} pictures; no picture {n}")
        # private and short: a removed or replaced product's pictures must not outlive it in shared caches
        return Response(pictures[n], media_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})

    add_write_routes(app, state)
    return app
