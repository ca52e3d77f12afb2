"""The gateway served from a background thread of this process (``pull``'s embedded demo, tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from gateway.app import create_app
from gateway.http import MAX_REQUEST_HEAD
from gateway.settings import Settings


@contextmanager
def serve_in_thread(settings: Settings, *, host: str = "127.0.0.1", port: int = 0,
                    startup_timeout: float = 30.0, **app_kwargs: Any) -> Iterator[int]:
    """Run uvicorn with the gateway app in a daemon thread; yields the bound port, stops on exit."""
    # log_config=None: the host process's logging decides where lines go (uvicorn would otherwise
    # install its own handlers); the access log is on, through the gateway's query-string filter.
    config = uvicorn.Config(create_app(settings, **app_kwargs), host=host, port=port, log_config=None,
                            log_level="info", access_log=True, lifespan="on", loop="asyncio",
                            h11_max_incomplete_event_size=MAX_REQUEST_HEAD)
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
