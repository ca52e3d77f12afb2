"""The replica-to-replica endpoint, on its own port (``cluster.internal_port``) that no Ingress exposes.

``GET /internal/instances/{node}/{sop}`` streams this replica's spooled copy of that node's instance,
as stored (404 when the spool does not hold it). Every request must carry
``Authorization: Bearer <cluster.shared_secret>``
(compared in constant time); anything else is 401. Followers of a retrieval copy the instances the
holder announced through it (:mod:`gateway.cluster.copies`).

The server is a second uvicorn server on the application's event loop, started and stopped by the
lifespan. It leaves the process's signals to the public server, which owns shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from typing import BinaryIO

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from cache.spool import Spool
from gateway.errors import NotFound, Unauthorized
from gateway.http import error_response
from translators.uids import is_uid

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def internal_app(spool: Spool, secret: str) -> Starlette:
    expected = f"Bearer {secret}".encode()

    async def instance(request: Request) -> Response:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return error_response(
                Unauthorized("replica-to-replica requests need the cluster's shared secret")
            )
        node, sop = request.path_params["node"], request.path_params["sop"]
        with spool.pinned(node, sop) if is_uid(sop) else contextlib.nullcontext() as entry:
            if entry is None:
                return error_response(NotFound("instance not in this replica's spool", node=node))
            # Open while pinned; an open file keeps its data even if the spool evicts it afterwards.
            fh: BinaryIO = await asyncio.to_thread(open, entry.path, "rb")
        size = os.fstat(fh.fileno()).st_size

        async def body() -> AsyncIterator[bytes]:
            try:
                while chunk := await asyncio.to_thread(fh.read, CHUNK):
                    yield chunk
            finally:
                fh.close()

        return StreamingResponse(
            body(), media_type="application/dicom", headers={"Content-Length": str(size)}
        )

    return Starlette(routes=[Route("/internal/instances/{node}/{sop}", instance, methods=["GET"])])


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The public server handles SIGTERM/SIGINT; its lifespan shutdown stops this one.
        yield


class InternalServer:
    def __init__(self, spool: Spool, secret: str, host: str, port: int) -> None:
        self.host = host
        self.port = port
        config = uvicorn.Config(
            internal_app(spool, secret),
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._server = _Server(config)
        self._task: asyncio.Future[None] | None = None

    async def start(self) -> None:
        # Binding here (not in uvicorn) turns a taken port into an exception at start-up, instead of
        # uvicorn's sys.exit inside a task.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family)
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the internal endpoint stopped during start-up")
            await asyncio.sleep(0.01)
        log.info("internal endpoint listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=5)
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._task = None


def advertised_url(host: str, port: int) -> str:
    """How other replicas reach this one: the bound address, or this host's address for a wildcard."""
    if host in ("", "0.0.0.0", "::"):
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
