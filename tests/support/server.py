"""A real uvicorn server in a thread, for tests that need real HTTP (streaming, real clients)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.embedded import serve_in_thread
from gateway.settings import Settings


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_gateway(settings: Settings, **app_kwargs: object) -> Iterator[str]:
    """Start the gateway on a free loopback port; yields its root URL (http://127.0.0.1:PORT)."""
    with serve_in_thread(settings, port=free_port(), startup_timeout=15, **app_kwargs) as port:
        yield f"http://127.0.0.1:{port}"
