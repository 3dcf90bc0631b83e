"""Small helpers shared by the benchmark scripts (timing and table printing)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def best_time(fn: Callable[[], object], repeat: int = 3) -> float:
    """Fastest wall time of ``repeat`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def print_table(rows: list[tuple], header: tuple) -> None:
    """Print rows as a Markdown table."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(f"{c:,.3g}" if isinstance(c, float) else str(c) for c in r) + " |")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, log: Path, *args: str, seconds: float = 120) -> tuple[subprocess.Popen, str]:
    """``cli.py serve --index INDEX`` with ``args`` on a free port of 127.0.0.1, its output in ``log``; returns
    the process and its URL once /health answers. A server that exits, or does not answer within ``seconds``,
    is an error quoting its log (and is stopped)."""
    import httpx
    port = free_port()
    with open(log, "w") as f:
        server = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", "--index", str(index), "--port",
                                   str(port), *args], stdout=f, stderr=subprocess.STDOUT)
    url, end = f"http://127.0.0.1:{port}", time.monotonic() + seconds
    while time.monotonic() < end and server.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"the server did not come up (exit code {server.poll()}); its log ends:\n"
                       + Path(log).read_text()[-3000:])
