"""Running the HTTP app: the process set-up ``python cli.py serve`` needs, as one library call."""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from ..errors import UserError
from .guards import WILDCARDS, ServeSettings, check_exposure

log = logging.getLogger(__name__)
# uvicorn answers 503 past this many connections and tasks at once (each picture request is bounded besides)
MAX_CONNECTIONS = 512


def served_settings(settings: ServeSettings, host: str) -> ServeSettings:
    """``settings`` with the address served on among the allowed hosts (unless it is a wildcard address)."""
    if host.strip("[]") in WILDCARDS or host in settings.allowed_hosts:
        return settings
    return replace(settings, allowed_hosts=(*settings.allowed_hosts, host))


def run_server(index: str | Path, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
               access_log: bool = False, fd: int | None = None) -> None:
    """Serve ``index`` on ``host:port`` until stopped: refuses an exposed address without a credential, gives
    the network every core but one, opens the index, moves what is alive now out of the collector's reach and
    runs uvicorn. Needs the serve extra (FastAPI, uvicorn)."""
    # idle OpenMP threads sleep instead of spinning on the core the event loop needs (read when torch and faiss
    # load, below); a value the user set wins
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    check_exposure(host, settings)
    try:
        import uvicorn

        from .api import create_app, settle_heap
        from .batching import compute_threads
    except ImportError as e:
        raise UserError(f"serve needs the serve extra: pip install -e '.[serve]' ({e})") from None
    settings = served_settings(settings, host)
    compute_threads()
    app = create_app(index, settings)
    settle_heap()
    log.info("serving %s on %s:%d; requests must carry Host: %s", index, host, port,
             ", ".join(sorted(settings.hosts())))
    uvicorn.run(app, host=host, port=port, fd=fd, log_level="info", access_log=access_log,
                limit_concurrency=MAX_CONNECTIONS)
