"""What a request may do, decided from its headers alone, before the application reads a byte of its body.

:class:`RequestGuard` is a pure ASGI middleware (FastAPI never sees, spools or parses a refused body):

- ``Host`` must name an allowed host (the loopback names, the address served on, ``--allowed-host``): a page on a
  foreign name whose DNS now points here (DNS rebinding) sends ``Host: evil.example``, and is refused (400);
- a write's ``Origin``, when sent, must name an allowed host too (never compared with the request's own
  ``Host``, which a rebinding page controls);
- a write to a write route is refused in read-only mode (403) and without the token (401/403);
- a body over its route's limit is refused (413): at once from ``Content-Length``, or, sent chunked, as soon as
  the bytes read pass the limit (the application's own answer to the cut body is replaced by the 413);
- at most ``max_busy`` picture requests at a time are let in: the next gets 503 with ``Retry-After``.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import UserError

log = logging.getLogger(__name__)
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("", "0.0.0.0", "::")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass(frozen=True)
class ServeSettings:
    """Who may write: ``token`` (a bearer token every write must carry), or ``read_only``; with neither, writes
    are open, which :func:`check_exposure` allows on a loopback address only. ``allowed_hosts``: host names
    (besides the loopback ones) that requests may carry in ``Host``, and writes in ``Origin``. ``runtime``: what
    embeds picture queries (torch, onnx, onnx-int8; default: the one that built the index)."""

    token: str | None = None
    read_only: bool = False
    allowed_hosts: tuple[str, ...] = ()
    runtime: str | None = None

    def hosts(self) -> frozenset[str]:
        """Every allowed host name, lower case, IPv6 without brackets."""
        return frozenset(h.strip().lower().strip("[]") for h in (*LOOPBACK_NAMES, *self.allowed_hosts))


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine only."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, settings: ServeSettings) -> None:
    """Refuse to serve writes without a token on an address other machines can reach."""
    if not is_loopback(host) and not settings.read_only and not settings.token:
        raise UserError(f"--host {host} exposes POST /products to the network without a credential; pass --token "
                        "(or set CDISCOUNT_TOKEN), or --read-only")


def host_name(authority: str) -> str | None:
    """The host of a ``Host`` header or URL authority (``[::1]:8000`` -> ``::1``, ``A.b:80`` -> ``a.b``); None
    when it is malformed (an unbracketed IPv6 address, a port that is not a number, user info)."""
    v = authority.strip().lower()
    if "@" in v:
        return None
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        return host if host and (not rest or rest[:1] == ":" and rest[1:].isdigit()) else None
    host, sep, port = v.partition(":")
    return host if host and (not sep or port.isdigit()) else None


def origin_host(origin: str) -> str | None:
    """The host of an ``Origin`` header (``http://127.0.0.1:8000`` -> ``127.0.0.1``); None for ``null``, for
    another scheme and for anything malformed."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or parts.path not in ("", "/") or parts.query:
        return None
    return host_name(parts.netloc)


class Refusal(Exception):
    """An answer decided from the headers: status, message and extra headers."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


SINGLE = (b"host", b"origin", b"authorization", b"content-type", b"content-length")  # at most once a request
BODY_SECONDS = 30.0  # a request body must arrive whole within this time of its headers (else 408)


@dataclass(frozen=True)
class GuardLimits:
    """What :class:`RequestGuard` admits. ``per_path``: body bytes per path (``default`` else); ``writes``: the
    paths whose unsafe methods change the index; ``busy_paths``: the picture routes whose uploads (multipart
    bodies) are admitted ``max_busy`` at a time (503 with ``Retry-After: retry_after`` past that); every body must
    arrive within ``body_seconds`` of its headers (a slow body would otherwise hold its admission)."""

    default: int
    per_path: tuple[tuple[str, int], ...] = ()
    writes: tuple[str, ...] = ("/products",)
    busy_paths: tuple[str, ...] = ()
    max_busy: int = 16
    retry_after: int = 1
    body_seconds: float = BODY_SECONDS


class RequestGuard:
    """ASGI middleware: Host and Origin allow-list, write credentials, body limits and admission, all decided
    before the application runs (see the module's docstring and :class:`GuardLimits`)."""

    def __init__(self, app, settings: ServeSettings, limits: GuardLimits) -> None:
        self.app, self.settings, self.limits, self.default = app, settings, dict(limits.per_path), limits.default
        self.body_seconds = limits.body_seconds
        self.hosts, self.writes, self.busy_paths = settings.hosts(), limits.writes, limits.busy_paths
        self.max_busy, self.retry_after, self.busy = limits.max_busy, limits.retry_after, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope["path"], self.default)
        try:
            self._check(scope, limit)
        except Refusal as r:
            return await _answer(send, r)
        content_type = next((v for k, v in scope.get("headers") or [] if k == b"content-type"), b"")
        admitted = scope["method"] == "POST" and scope["path"] in self.busy_paths and \
            content_type.lower().startswith(b"multipart/")  # pictures; a query by id uploads none
        if admitted:
            if self.busy >= self.max_busy:
                return await _answer(send, Refusal(503, f"{self.busy} picture requests are running; try again "
                                                   "shortly", {"Retry-After": str(self.retry_after)}))
            self.busy += 1  # the event loop is one thread: no lock needed
        try:
            await self._limited(scope, receive, send, limit)
        finally:
            if admitted:
                self.busy -= 1

    def _check(self, scope, limit: int) -> None:
        """Raise the :class:`Refusal` this request gets from its headers, if any."""
        headers = scope.get("headers") or []
        names = [k for k, _ in headers]
        repeated = [n.decode() for n in SINGLE if n != b"host" and names.count(n) > 1]
        if repeated:
            raise Refusal(400, f"a request carries {repeated[0]} once at most")
        hosts = [v.decode("latin-1") for k, v in headers if k == b"host"]
        if len(hosts) != 1 or host_name(hosts[0]) not in self.hosts:
            log.warning("request refused for %s: Host %s is not allowed", _client(scope), hosts or "missing")
            raise Refusal(400, "this server does not answer for that Host (start it with --allowed-host NAME)")
        get = {k: v.decode("latin-1") for k, v in headers}.get
        if scope["method"] not in SAFE_METHODS:
            try:
                self._check_write(scope, get)
            except Refusal as r:
                log.warning("write refused (%d) for %s: %s", r.status, _client(scope), r.detail)
                raise
        length = get(b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > limit):
            raise Refusal(413, _too_large(limit))

    def _check_write(self, scope, get) -> None:
        s = self.settings
        path = scope["path"]
        # /products and /products/{id}; and any DELETE, PATCH or PUT whatever its path (a mounted root path must
        # never turn a write into a read)
        write = scope["method"] in ("DELETE", "PATCH", "PUT") or any(path == w or path.startswith(w + "/")
                                                                    for w in self.writes)
        if write and s.read_only:
            raise Refusal(403, "this server is read-only")
        origin = get(b"origin")
        if origin is not None and origin_host(origin) not in self.hosts:
            raise Refusal(403, f"writes from another site ({origin[:100]}) are refused")
        if write and s.token:
            given = get(b"authorization") or ""
            if not given.startswith("Bearer "):
                raise Refusal(401, "this write needs Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(given[7:].encode(), s.token.encode()):
                raise Refusal(403, "wrong token")

    async def _limited(self, scope, receive, send, limit: int) -> None:
        """Run the application with the body counted as it streams in: past ``limit``, the application's own
        answer (to a body cut short) is dropped and a 413 goes out instead."""
        seen, over, slow, started, complete = 0, False, False, False, False
        deadline = asyncio.get_running_loop().time() + self.body_seconds

        async def counted():
            nonlocal seen, over, slow, complete
            if complete:  # the body is in: later reads wait for a disconnect, for as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                slow = True
                raise _TooSlow from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise _TooLarge
            return message

        async def sending(message) -> None:
            nonlocal started
            if (over or slow) and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except Exception:
            if not (over or slow):
                raise
        if slow and not started:
            log.warning("request body not in after %.0f s: refused for %s", self.body_seconds, _client(scope))
            await _answer(send, Refusal(408, f"the request body did not arrive within {self.body_seconds:.0f} s"))
            return
        if over and not started:
            log.warning("request body over %d bytes refused for %s", limit, _client(scope))
            await _answer(send, Refusal(413, _too_large(limit)))


def _too_large(limit: int) -> str:
    return f"request body over {limit >> 20} MB"


def _client(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unknown client"


async def _answer(send, r: Refusal) -> None:
    body = json.dumps({"detail": r.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in r.headers.items()),
               (b"connection", b"close")]  # a body left unread is never drained
    await send({"type": "http.response.start", "status": r.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
