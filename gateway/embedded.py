"""The gateway served from a background thread of this process (``pull``'s embedded demo, tests)."""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from gateway.app import create_app
from gateway.http import MAX_REQUEST_HEAD
from gateway.settings import Settings


def preload_streaming() -> None:
    """Import what the first streamed response needs before serving: Starlette's StreamingResponse
    runs its body in an anyio task group, and anyio imports its asyncio backend lazily, on first use
    (~40-60 ms on a loaded machine). Without this the first cold retrieve of a fresh process paid it
    between the first arrival and its first byte (tests/bench/bench_cold.py, the TTFB row)."""
    importlib.import_module("anyio._backends._asyncio")


@contextmanager
def serve_in_thread(settings: Settings, *, host: str = "127.0.0.1", port: int = 0,
                    startup_timeout: float = 30.0, **app_kwargs: Any) -> Iterator[int]:
    """Run uvicorn with the gateway app in a daemon thread; yields the bound port, stops on exit."""
    # log_config=None: the host process's logging decides where lines go (uvicorn would otherwise
    # install its own handlers); the access log is on, through the gateway's query-string filter.
    config = uvicorn.Config(create_app(settings, **app_kwargs), host=host, port=port, log_config=None,
                            log_level="info", access_log=True, lifespan="on", loop="asyncio",
                            h11_max_incomplete_event_size=MAX_REQUEST_HEAD)
    preload_streaming()
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="gateway-embedded", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the embedded gateway did not start")
        time.sleep(0.02)
    try:
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout=15)
