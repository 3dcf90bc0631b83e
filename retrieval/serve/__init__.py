"""HTTP serving: the FastAPI app over an opened index folder and its web page (nothing else).

``run_server(index, settings, host, port, access_log)`` runs it; importing this package loads neither torch
nor FastAPI (``run_server`` sets the process up before they load)."""
from .guards import ServeSettings
from .server import run_server

__all__ = ["ServeSettings", "run_server"]
