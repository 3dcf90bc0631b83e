"""A lean HTTP/1.1 load generator (asyncio, raw sockets, keep-alive, requests encoded once), so that on a small
machine the client's own CPU does not decide the server's measured throughput (as wrk or hey would not)."""
from __future__ import annotations

import asyncio
import time
import uuid
from urllib.parse import urlencode

import numpy as np


def form_request(host: str, path: str, fields: dict[str, object]) -> bytes:
    """A POST of url-encoded form fields, ready to send."""
    body = urlencode({k: str(v) for k, v in fields.items()}).encode()
    return _request(host, path, "application/x-www-form-urlencoded", body)


def multipart_request(host: str, path: str, fields: dict[str, object], files: list[tuple[str, str, bytes]]) -> bytes:
    """A POST of multipart/form-data: ``fields`` and ``files`` as (field name, file name, bytes)."""
    b = uuid.uuid4().hex
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts += [f'--{b}\r\nContent-Disposition: form-data; name="{name}"; filename="{fn}"\r\n'
              f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n" for name, fn, data in files]
    return _request(host, path, f"multipart/form-data; boundary={b}", b"".join(parts) + f"--{b}--\r\n".encode())


def get_request(host: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def _request(host: str, path: str, content_type: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one response (Content-Length framed); returns its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def _run(host: str, port: int, requests: list[bytes], n: int, concurrency: int) -> tuple[np.ndarray, float]:
    lat = np.zeros(n)
    next_i = iter(range(n))
    conns = [await asyncio.open_connection(host, port) for _ in range(concurrency)]

    async def worker(reader, writer):
        for i in next_i:
            t = time.perf_counter()
            writer.write(requests[i % len(requests)])
            status = await _read_response(reader)
            lat[i] = time.perf_counter() - t
            if status != 200:
                raise RuntimeError(f"request {i} answered {status}")

    # one warm-up request per connection, then the timed run
    for reader, writer in conns:
        writer.write(requests[0])
        await _read_response(reader)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(r, w) for r, w in conns))
    wall = time.perf_counter() - t0
    for _, writer in conns:
        writer.close()
    return lat, wall


def load(host: str, port: int, requests: list[bytes], n: int, concurrency: int) -> tuple[np.ndarray, float]:
    """Latencies ``[n]`` (s) of ``n`` requests (cycling through ``requests``) with ``concurrency`` connections
    each keeping one request in flight, and the wall time of the run; any status but 200 is an error."""
    return asyncio.run(_run(host, port, requests, n, concurrency))
