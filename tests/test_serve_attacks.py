"""The HTTP server against a stranger: forged Host and Origin (DNS rebinding), decompression bombs, too many
pictures, bodies refused before they are read (slow uploads, chunked bodies), a full queue, and /classify by id
leaving the product's own vote out. Real servers listen on 127.0.0.1 only."""
from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bson
import numpy as np
import pytest
from conftest import process_server, read_only, thread_server
from fastapi.testclient import TestClient

from retrieval.data.bsonio import iter_products
from retrieval.infer.indexdir.bundle import open_index
from retrieval.serve.api import MAX_PICTURES, MAX_UPLOAD, create_app
from retrieval.serve.guards import ServeSettings

LOCAL = "http://localhost"


def _png(w: int, h: int, colour_type: int = 0) -> bytes:
    """A blank PNG of ``w x h`` (grey, or RGBA with ``colour_type=6``) built with zlib: 6,324 x 6,324 grey is
    39 KB of bytes and 40 Mpx of pixels."""
    row = b"\0" + bytes(w * {0: 1, 2: 3, 6: 4}[colour_type])
    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * h, 9)) + \
        chunk(b"IEND", b"")


BOMB = _png(6324, 6324)


@pytest.fixture(scope="module")
def served(indexes, tmp_path_factory) -> Path:
    """A copy of the all-products index that this module's tests share: read-only (writes go to a copy)."""
    folder = tmp_path_factory.mktemp("attacks") / "index"
    shutil.copytree(indexes["all"], folder)
    read_only("served (test_serve_attacks.py)", folder)
    return folder


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served, ServeSettings(token="t0ken")), base_url=LOCAL) as c:
        yield c


def _first(small_data):
    return next(iter_products(small_data["train.bson"]))


_live = thread_server  # ``app`` under uvicorn in a thread on 127.0.0.1, on a socket bound first; yields its port


def _response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    """Status and raw bytes of the response on ``sock`` (read until the headers and a little body are in)."""
    sock.settimeout(timeout)
    data = b""
    end = time.monotonic() + timeout
    while b"\r\n\r\n" not in data and time.monotonic() < end:
        part = sock.recv(65536)
        if not part:
            break
        data += part
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data[9:12]), data


def _raw(port: int, head: str, chunks: list[bytes] = (), timeout: float = 10.0) -> tuple[int, bytes]:
    """Send the request ``head`` (headers, CRLF lines), then ``chunks`` while the server lets us; the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        for c in chunks:
            try:
                s.sendall(c)
            except OSError:  # the server answered and closed: read what it said
                break
        return _response(s, timeout)


# ---- Host and Origin -------------------------------------------------------------------------------------

def test_a_forged_host_is_refused_on_reads_and_writes(served, small_data):
    """DNS rebinding: a foreign page's requests carry its own name in Host and Origin. Nothing is answered
    for that Host (reads included) and nothing is written, even though Origin matches Host."""
    p = _first(small_data)
    new = bson.encode({"_id": 556_000_001, "imgs": [{"picture": p.images[0]}], "category_id": p.category_id})
    with TestClient(create_app(served), base_url="http://evil.example:8000") as evil:  # writes open: no token
        assert evil.get("/health").status_code == 400
        assert evil.get(f"/products/{p.product_id}/images/0").status_code == 400
        r = evil.post("/similar", data={"product_id": p.product_id, "k": 2})
        assert r.status_code == 400 and "Host" in r.text and "results" not in r.text
        w = evil.post("/products", files={"file": ("n.bson", new)}, headers={"Origin": "http://evil.example:8000"})
        assert w.status_code in (400, 421)
        for host in ("127.0.0.1.evil.example", "localhost.evil.example:80", "evil.example@127.0.0.1", "::1"):
            assert evil.get("/health", headers={"Host": host}).status_code == 400, host
        for host in ("127.0.0.1:8000", "LOCALHOST", "[::1]:9", "localhost"):
            assert evil.get("/health", headers={"Host": host}).status_code == 200, host
        # a loopback Host with a foreign Origin: a write from another site
        bad = evil.post("/products", files={"file": ("n.bson", new)},
                        headers={"Host": "127.0.0.1:8000", "Origin": "http://evil.example:8000"})
        assert bad.status_code == 403 and "another site" in bad.text
        assert evil.post("/products", files={"file": ("n.bson", new)},
                         headers={"Host": "127.0.0.1", "Origin": "null"}).status_code == 403
        assert evil.get("/health", headers={"Host": "localhost"}).json()["products"] == \
            len(open_index(served).product_ids)
    assert 556_000_001 not in open_index(served).product_ids


def test_allowed_hosts_are_answered_and_their_origin_may_write(served, small_data, tmp_path):
    folder = tmp_path / "idx"
    shutil.copytree(served, folder)
    p = _first(small_data)
    new = bson.encode({"_id": 556_000_002, "imgs": [{"picture": p.images[0]}], "category_id": p.category_id})
    settings = ServeSettings(token="t0ken", allowed_hosts=("shop.example",))
    with TestClient(create_app(folder, settings), base_url="http://shop.example:8000") as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health", headers={"Host": "other.example"}).status_code == 400
        auth = {"Authorization": "Bearer t0ken"}
        r = c.post("/products", files={"file": ("n.bson", new)}, headers={**auth, "Origin": "https://shop.example"})
        assert r.status_code == 200 and r.json()["added"] == 1
        r = c.post("/products", files={"file": ("n.bson", new)}, headers={**auth, "Origin": "http://other.example"})
        assert r.status_code == 403


def test_the_served_address_is_allowed_unless_a_wildcard():
    from retrieval.serve.server import served_settings
    assert "10.1.2.3" in served_settings(ServeSettings(), "10.1.2.3").hosts()
    assert served_settings(ServeSettings(), "0.0.0.0").hosts() == ServeSettings().hosts() == \
        {"127.0.0.1", "localhost", "::1"}
    assert "::1" in served_settings(ServeSettings(), "::").hosts()


# ---- pictures: count, bombs, reduced decoding -------------------------------------------------------------

def test_too_many_pictures_and_bombs_are_a_4xx_before_decoding(client, small_data, monkeypatch):
    from retrieval.infer import query
    decoded = []
    real = query.picture_input
    monkeypatch.setattr(query, "picture_input", lambda *a: decoded.append(1) or real(*a))
    p = _first(small_data)
    for path in ("/similar", "/classify"):
        decoded.clear()
        many = [("images", (f"q{i}.jpg", p.images[0], "image/jpeg")) for i in range(MAX_PICTURES + 1)]
        r = client.post(path, files=many)
        assert r.status_code == 413 and f"at most {MAX_PICTURES}" in r.text
        bombs = [("images", (f"b{i}.png", BOMB, "image/png")) for i in range(200)]
        assert len(BOMB) < 40_000 and client.post(path, files=bombs).status_code == 413
        assert decoded == []  # refused on the count: nothing decoded
        r = client.post(path, files=bombs[:MAX_PICTURES])  # the most allowed: refused from each header
        assert r.status_code == 400 and "4,194,304-pixel limit" in r.text
        assert client.post(path, files=many[:MAX_PICTURES]).status_code == 200
    assert client.get("/health").status_code == 200


def test_pictures_are_decoded_reduced_and_caps_read_from_headers():
    import io

    from PIL import Image

    from retrieval.data.datasets import picture_input, to_model_input
    from retrieval.data.images import ImageDecodeError, decode_image
    y, x = np.mgrid[0:1500, 0:2000]
    smooth = np.stack([x * 255 // 2000, y * 255 // 1500, (x + y) * 255 // 3500], -1).astype(np.uint8)
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.fromarray(smooth).save(buf, fmt)
        small = decode_image(buf.getvalue(), min_size=64)
        # DCT-scaled (JPEG: 1/8 at most) or reduced (PNG: by 1500 // 64): at most 1/64 of the pixels, >= 64 a side
        assert min(small.shape[:2]) >= 64 and small.shape[0] * small.shape[1] <= (1500 // 8 + 1) * (2000 // 8 + 1)
        full = to_model_input(np.asarray(Image.open(buf)), 64, train=False).float()
        assert (picture_input(buf.getvalue(), 64).float() - full).abs().mean() < 3  # same picture, gray levels
    with pytest.raises(ImageDecodeError, match="4,194,304-pixel limit for a PNG"):
        decode_image(BOMB, min_size=32)
    buf = io.BytesIO()
    Image.new("RGB", (5000, 4000)).save(buf, "JPEG", progressive=True)  # coefficients held whole: capped
    with pytest.raises(ImageDecodeError, match="progressive or multi-scan JPEG"):
        decode_image(buf.getvalue(), min_size=32)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "TIFF")
    with pytest.raises(ImageDecodeError):
        decode_image(buf.getvalue())  # not a format a server opens


def _baseline_jpeg_with_a_scan_per_channel(w: int, h: int) -> bytes:
    """A sequential (SOF0) JPEG whose three channels come in three scans: every block decodes to flat gray."""
    def seg(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload
    out = b"\xff\xd8" + seg(0xDB, b"\x00" + b"\x01" * 64)
    out += seg(0xC0, struct.pack(">BHHB", 8, h, w, 3) + b"".join(bytes([i + 1, 0x11, 0]) for i in range(3)))
    out += seg(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00") + seg(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\x00")
    blocks = ((w + 7) // 8) * ((h + 7) // 8)
    for c in range(3):
        out += seg(0xDA, bytes([1, c + 1, 0x00, 0, 63, 0])) + b"\x00" * ((blocks * 2 + 7) // 8)
    return out + b"\xff\xd9"


def test_pictures_that_decode_whole_whatever_their_size_are_capped():
    """What an adversarial review found: a baseline JPEG with a scan per channel (libjpeg holds every
    coefficient: +229 MB at 6,300 x 6,300), a 702-byte lossless WebP of 4,096 x 4,096 (+260 MB) and a
    16,000,000 x 1 strip (no reduction toward a square input) are refused from their headers."""
    import io

    from PIL import Image

    from retrieval.data.images import ImageDecodeError, decode_image
    small = _baseline_jpeg_with_a_scan_per_channel(64, 64)
    assert min(decode_image(small, min_size=32).shape[:2]) >= 32  # small multi-scan pictures still decode
    with pytest.raises(ImageDecodeError, match="multi-scan JPEG"):
        decode_image(_baseline_jpeg_with_a_scan_per_channel(3000, 3000), min_size=32)
    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096)).save(buf, "WEBP", lossless=True)
    assert len(buf.getvalue()) < 4096
    with pytest.raises(ImageDecodeError, match="pixel limit for a WEBP"):
        decode_image(buf.getvalue(), min_size=32)
    with pytest.raises(ImageDecodeError, match="side over 16,384"):
        decode_image(_png(20_000, 1), min_size=32)
    buf = io.BytesIO()
    Image.new("RGB", (6300, 6300)).save(buf, "JPEG", quality=10)  # one scan: DCT-scaled, never whole
    assert max(decode_image(buf.getvalue(), min_size=32).shape[:2]) <= 6300 // 8 + 1


# ---- refusals decided from the headers --------------------------------------------------------------------

def test_writes_are_refused_before_their_body_is_sent(served, tmp_path):
    """A stranger's upload announced with a large Content-Length, then held back: the answer comes before a
    single byte of the body is sent (the token, read-only mode and the size are read from the headers)."""
    head = ("POST /products HTTP/1.1\nHost: 127.0.0.1\nContent-Type: multipart/form-data; boundary=x\n"
            "Content-Length: 100000000\n{extra}")
    with _live(create_app(served, ServeSettings(token="t0ken"))) as port:
        t = time.monotonic()
        status, data = _raw(port, head.format(extra=""))
        assert status == 401 and b"Bearer" in data and time.monotonic() - t < 5
        assert _raw(port, head.format(extra="Authorization: Bearer nope\n"))[0] == 403
        big = head.replace("100000000", str(300 << 20)).format(extra="Authorization: Bearer t0ken\n")
        assert _raw(port, big)[0] == 413
        status, data = _raw(port, "POST /similar HTTP/1.1\nHost: 127.0.0.1\nContent-Length: 99999999\n")
        assert status == 413 and b"request body over" in data
        assert _raw(port, "GET /health HTTP/1.1\nHost: evil.example\n")[0] == 400  # over a real socket too
        assert _raw(port, "GET /health HTTP/1.0\n")[0] == 400  # no Host at all
    with _live(create_app(served, ServeSettings(read_only=True))) as port:
        assert _raw(port, head.format(extra=""))[0] == 403


def test_a_chunked_body_over_its_limit_is_413(served):
    """No Content-Length: the body is counted as it streams in and refused with 413 (not a parse error) once
    past the limit, without the rest being read."""
    limit = MAX_UPLOAD + (1 << 20)
    head = ("POST /similar HTTP/1.1\nHost: 127.0.0.1\nTransfer-Encoding: chunked\n"
            "Content-Type: multipart/form-data; boundary=XyZ\n")
    part = b"--XyZ\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.jpg\"\r\n\r\n" + b"\xff" * (1 << 20)
    chunk = b"%x\r\n%s\r\n" % (len(part), part)
    with _live(create_app(served)) as port:
        status, data = _raw(port, head, [chunk] * (limit // len(part) + 3))
        assert status == 413 and b"request body over" in data
        unauth = head.replace("/similar", "/products")
        with _live(create_app(served, ServeSettings(token="t0ken"))) as port2:
            assert _raw(port2, unauth)[0] == 401  # and a chunked write is refused from its headers
        import httpx
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            assert c.get("/health").status_code == 200  # still serving


# ---- a busy server --------------------------------------------------------------------------------------

def test_a_full_queue_refuses_at_once():
    from retrieval.serve.batching import Busy, QueryBatcher
    gate = threading.Event()

    class Stuck:  # an index whose stored vectors are read slowly: the batch thread waits on the first query
        def vector(self, pos):
            gate.wait(10)
            raise RuntimeError("released")

    batcher = QueryBatcher(max_queued=2)
    bundle = Stuck()
    first = batcher.submit(bundle, 1, position=0)
    time.sleep(0.2)  # taken by the batch thread
    queued = [batcher.submit(bundle, 1, position=i) for i in (1, 2)]
    with pytest.raises(Busy):
        batcher.submit(bundle, 1, position=3)
    gate.set()
    for f in (first, *queued):
        with pytest.raises(RuntimeError, match="released"):
            f.result(timeout=10)


def test_busy_is_503_with_retry_after(served, small_data):
    from retrieval.serve.batching import Busy, QueryBatcher

    class Full(QueryBatcher):
        def _put(self, job):
            raise Busy("full")

    p = _first(small_data)
    with TestClient(create_app(served, batcher=Full()), base_url=LOCAL) as c:
        for path in ("/similar", "/classify"):
            r = c.post(path, files=[("images", ("q.jpg", p.images[0], "image/jpeg"))])
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1


def test_picture_requests_past_the_admission_cap_get_503():
    import httpx

    from retrieval.serve.guards import GuardLimits, RequestGuard
    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = RequestGuard(slow_app, ServeSettings(), GuardLimits(1 << 20, busy_paths=("/similar",), max_busy=2))

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url=LOCAL) as c:
            held = [asyncio.create_task(c.post("/similar", content=b"x", headers=MULTIPART)) for _ in range(2)]
            await asyncio.sleep(0.1)
            third = await c.post("/similar", content=b"x", headers=MULTIPART)
            other = asyncio.create_task(c.post("/elsewhere", content=b"x"))  # not a picture route: let in
            by_id = asyncio.create_task(c.post("/similar", data={"product_id": "4"}))  # uploads no picture: let in
            release.set()
            return third, [await t for t in held], await other, await by_id
    third, held, other, by_id = asyncio.run(run())
    assert third.status_code == 503 and third.headers["Retry-After"] == "1"
    assert [r.status_code for r in held] == [200, 200] and other.status_code == 200 and by_id.status_code == 200
    assert guard.busy == 0


MULTIPART = {"content-type": "multipart/form-data; boundary=X"}


def test_a_slow_body_gets_408_and_gives_its_admission_back():
    import httpx

    from retrieval.serve.guards import GuardLimits, RequestGuard

    async def reading_app(scope, receive, send):  # reads the whole body, then answers
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = RequestGuard(reading_app, ServeSettings(), GuardLimits(1 << 20, busy_paths=("/similar",), max_busy=1,
                                                                   body_seconds=0.3))

    async def trickle(pause: float):
        yield b"--X\r\n"
        await asyncio.sleep(pause)
        yield b"the rest"

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url=LOCAL) as c:
            slow = await c.post("/similar", content=trickle(1.0), headers=MULTIPART)
            busy_after = guard.busy
            quick = await c.post("/similar", content=trickle(0.0), headers=MULTIPART)
            return slow, busy_after, quick
    slow, busy_after, quick = asyncio.run(run())
    assert slow.status_code == 408 and "did not arrive within" in slow.json()["detail"]
    assert busy_after == 0 and quick.status_code == 200  # the slot came back: the next upload is admitted


def test_a_repeated_origin_or_token_header_is_refused(served):
    from fastapi.testclient import TestClient

    from retrieval.serve.api import create_app
    with TestClient(create_app(served), base_url=LOCAL) as c:
        for name in ("origin", "authorization"):
            r = c.post("/products", headers=[(name, "http://evil.example"), (name, "http://localhost")],
                       files={"file": ("a.bson", b"x")})
            assert r.status_code == 400 and name in r.json()["detail"]


# ---- /classify by id leaves the product out ----------------------------------------------------------------

def test_classify_by_id_leaves_its_own_vector_and_pictures_out(client, served, small_data):
    """Checked against a brute-force expectation: a cosine scan over every stored vector but the product's
    own, and exact picture matches found by hashing every other product's pictures."""
    from retrieval.data.images import picture_hash
    from retrieval.infer.query import embed_pictures, product_pictures
    from retrieval.infer.scoring.candidates import Candidates
    from retrieval.infer.scoring.fused import load_fusion
    b = open_index(served)
    n = len(b.product_ids)
    hashes = [{picture_hash(x) for x in product_pictures(b, i)} for i in range(n)]
    # a product none of whose pictures another product re-lists: with itself left out, no exact match is left
    own = next(i for i in range(n) if not any(hashes[i] & hashes[j] for j in range(n) if j != i))
    pid = int(b.product_ids[own])
    clf = load_fusion(b.run, b.fallback_class)
    assert not clf.uses_prototypes  # this brute force leaves prototypes out
    emb, probs, _ = embed_pictures(b, product_pictures(b, own))
    vecs = np.stack([b.vector(i) for i in range(n)])
    sims = vecs @ emb
    sims[own] = -np.inf
    top = np.argsort(-sims, kind="stable")[:clf.k]
    labels = np.asarray(b.vectors.labels)
    others = np.delete(labels, own)
    sizes = np.array([np.sum(others == k) for k in range(labels.max() + 1)], np.float32)  # its class, less itself
    c = Candidates.build(probs[None], (sims[top][None], labels[top][None]), np.ones(1, bool),
                         np.full((1, 16), -1, np.int32), sizes=sizes)
    scores = clf.candidate_scores(c, clf.features(c, clf.candidate_votes(c)))[0]
    expected = [int(b.categories.ids[c.classes[0, j]]) for j in np.argsort(-scores, kind="stable")[:5]
                if np.isfinite(scores[j])]
    got = client.post("/classify", data={"product_id": pid, "top": 5}).json()["categories"]
    assert len(expected) >= 2 and [x["category_id"] for x in got] == expected  # a ranking, not an empty list
    np.testing.assert_allclose([x["score"] for x in got], np.sort(scores[np.isfinite(scores)])[::-1][:5], atol=1e-4)
    assert all(x["duplicate"] == 0.0 for x in got)  # its own pictures did not vote
    with_self = client.post("/classify", data={"product_id": pid, "top": 5, "include_self": True}).json()
    assert with_self["categories"][0]["duplicate"] == 1.0  # they do when asked
    assert [x["score"] for x in with_self["categories"]] != [x["score"] for x in got]


# ---- a real server process: memory under bombs and 32 clients ----------------------------------------------

def _rss_kb(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


@pytest.fixture(scope="module")
def process(served, tmp_path_factory):
    """``cli.py serve`` (so :func:`run_server`) in its own process on 127.0.0.1, on a socket bound here, with a
    token and an allowed host; yields (pid, url). At most 120 s to start on a busy machine."""
    log = tmp_path_factory.mktemp("srv") / "server.log"
    with process_server(served, "--token", "t0ken", "--allowed-host", "shop.example", log=log) as (server, url):
        yield server.pid, url


@pytest.mark.slow
def test_bomb_requests_leave_a_real_server_alive_and_small(process, small_data):
    import httpx
    pid, url = process
    p = _first(small_data)
    with httpx.Client(base_url=url, timeout=120) as c:
        assert c.post("/similar", data={"k": 3}, files=[("images", ("q.jpg", p.images[0]))]).status_code == 200
        assert c.get("/health", headers={"Host": "shop.example:1"}).status_code == 200  # --allowed-host
        assert c.get("/health", headers={"Host": "evil.example"}).status_code == 400
        before = _rss_kb(pid)["VmRSS"]
        bombs = [("images", (f"b{i}.png", BOMB, "image/png")) for i in range(200)]
        for path in ("/classify", "/similar"):
            r = c.post(path, files=bombs)
            assert 400 <= r.status_code < 500, r.text[:300]
            r = c.post(path, files=bombs[:MAX_PICTURES])
            assert r.status_code == 400, r.text[:300]
        assert c.get("/health").json()["status"] == "ok"
        grown = (_rss_kb(pid)["VmHWM"] - before) / 1024
    print(f"\nbomb requests (200 and {MAX_PICTURES} blank 6,324 x 6,324 PNGs of {len(BOMB):,} bytes): peak RSS "
          f"{grown:.0f} MB over the resting RSS")
    assert grown < 1536


@pytest.mark.slow
def test_32_clients_sending_the_largest_request_get_200_or_503(process, small_data):
    import httpx
    pid, url = process
    big = _png(2048, 2048, 6)  # RGBA at the full-decode cap: 16 MiB of pixels, the most one picture may take
    files = [("images", (f"p{i}.png", big, "image/png")) for i in range(MAX_PICTURES)]
    before = _rss_kb(pid)["VmRSS"]

    def one(i: int) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=300) as c:
            return c.post("/similar" if i % 2 else "/classify", data={"top": 3} if i % 2 == 0 else {"k": 3},
                          files=files)

    t = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(32)))
    took = time.monotonic() - t
    codes = [r.status_code for r in got]
    assert set(codes) <= {200, 503}, [r.text[:200] for r in got if r.status_code not in (200, 503)]
    assert len(codes) == 32 and codes.count(200) >= 1, codes  # refusing everyone is not serving
    assert all("Retry-After" in r.headers for r in got if r.status_code == 503)
    assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok"
    grown = (_rss_kb(pid)["VmHWM"] - before) / 1024
    print(f"\n32 clients x {MAX_PICTURES} RGBA 4,096 x 4,096 PNGs: {codes.count(200)} x 200, {codes.count(503)} x 503 "
          f"in {took:.1f} s; peak RSS {grown:.0f} MB over the resting RSS")
    assert grown < 1536
