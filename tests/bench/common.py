"""Helpers the benchmarks share: association counting, DIMSE engine selection, DCMTK storescp, verdicts.

Imported as ``tests.bench.common`` (each script puts the repository root on ``sys.path`` first).

- :class:`CountingProxy`: a loopback TCP proxy in front of a PACS that counts the connections, i.e.
  the associations, opened through it, each classified by the SOP classes its A-ASSOCIATE-RQ proposes
  (PS3.8 §9.3.2). Counting at the PACS's door needs nothing from the PACS (Orthanc's log and
  ``/statistics`` do not count associations) and sees every association whatever opened it.
- :func:`engine_variants`: the config overrides that select the gateway's DIMSE engines ("fast" and
  "pynetdicom"), found by asking ``gateway.settings`` which keys it accepts, so a benchmark runs against
  whichever gateway revision is checked out and says what it could not select.
- :class:`StoreScp`: DCMTK's ``storescp`` as a C-MOVE destination (``movescu`` rows).
- :func:`metrics_of`: a gateway's ``/metrics`` as a dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.integration.peers import HOST, PeerError, dcmtk_tool, dicom_echo, free_port

# ------------------------------------------------------------------------ association counting

_QR_PREFIX = "1.2.840.10008.5.1.4.1.2."     # Query/Retrieve SOP classes: ...<model>.<1 find|2 move|3 get>
_QR_KIND = {"1": "find", "2": "move", "3": "get"}
_VERIFICATION = "1.2.840.10008.1.1"
_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1."
_KIND_ORDER = ("get", "move", "find", "echo", "store")


def abstract_syntaxes(body: bytes) -> list[str]:
    """Abstract syntaxes proposed by an A-ASSOCIATE-RQ PDU body (after its 6-byte header).

    PS3.8 §9.3.2: 68 fixed bytes (version, reserved, called and calling AE titles, reserved), then
    variable items; a Presentation Context item (0x20) holds a context id, 3 reserved bytes and
    sub-items, the Abstract Syntax sub-item being 0x30.
    """
    found: list[str] = []
    i = 68
    while i + 4 <= len(body):
        item, _, length = struct.unpack_from(">BBH", body, i)
        if item == 0x20:
            j, end = i + 8, min(i + 4 + length, len(body))
            while j + 4 <= end:
                sub, _, sub_len = struct.unpack_from(">BBH", body, j)
                if sub == 0x30:
                    found.append(body[j + 4:j + 4 + sub_len].decode("ascii", "replace").rstrip("\0 "))
                j += 4 + sub_len
        i += 4 + length
    return found


def association_kind(pdu_type: int, body: bytes) -> str:
    """``get``, ``move``, ``find``, ``echo``, ``store`` or ``other`` (the first that any context names)."""
    if pdu_type != 0x01:
        return "other"
    kinds = set()
    for uid in abstract_syntaxes(body):
        if uid.startswith(_QR_PREFIX):
            kinds.add(_QR_KIND.get(uid.rsplit(".", 1)[-1], "other"))
        elif uid == _VERIFICATION:
            kinds.add("echo")
        elif uid.startswith(_STORAGE_PREFIX):
            kinds.add("store")
    return next((k for k in _KIND_ORDER if k in kinds), "other")


@dataclass
class Connection:
    opened: float          # time.monotonic() at accept
    kind: str = "?"        # set once the A-ASSOCIATE-RQ has been read
    closed: float | None = None


@dataclass
class CountingProxy:
    """TCP proxy 127.0.0.1:<port> -> ``upstream``; runs its own asyncio loop in a daemon thread.

    ``opened_since(t)`` lists the connections accepted at or after ``t`` (``time.monotonic()``);
    ``active`` is how many are open now. Every byte is forwarded unchanged, TCP_NODELAY on both legs.
    """

    upstream_host: str
    upstream_port: int
    port: int = 0
    connections: list[Connection] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> CountingProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(self._handle, HOST, 0))
                self.port = int(self._server.sockets[0].getsockname()[1])
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="bench-counting-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            raise PeerError(f"counting proxy did not start: {failure[:1]}")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not loop.is_running():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def active(self) -> int:
        with self._lock:
            return sum(1 for c in self.connections if c.closed is None)

    def opened_since(self, since: float) -> list[Connection]:
        with self._lock:
            return [c for c in self.connections if c.opened >= since]

    @staticmethod
    def by_kind(connections: list[Connection]) -> dict[str, int]:
        return dict(Counter(c.kind for c in connections))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(time.monotonic())
        with self._lock:
            self.connections.append(conn)
        upstream: asyncio.StreamWriter | None = None
        try:
            _nodelay(writer)
            try:
                header = await reader.readexactly(6)
                pdu_type, _, length = struct.unpack(">BBI", header)
                body = await reader.readexactly(length) if length <= 1 << 20 else b""
            except asyncio.IncompleteReadError:
                conn.kind = "closed before A-ASSOCIATE-RQ"
                return
            conn.kind = association_kind(pdu_type, body) if body or not length else "other"
            up_reader, upstream = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            _nodelay(upstream)
            upstream.write(header + body)
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()
            conn.closed = time.monotonic()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(1 << 18):
            dst.write(data)
            await dst.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if dst.can_write_eof():
                dst.write_eof()


# ------------------------------------------------------------------------ DIMSE engines


@dataclass(frozen=True)
class Variant:
    """One way of configuring the gateway: overrides for its node and ``gateway:`` sections."""

    name: str                                   # "fast", "pynetdicom", "default"
    label: str
    node: dict[str, Any] = field(default_factory=dict)
    gateway: dict[str, Any] = field(default_factory=dict)


def _accepted(raw: dict[str, Any]) -> bool:
    from gateway.settings import ConfigError, settings_from_dict

    try:
        settings_from_dict(raw)
    except ConfigError:
        return False
    return True


def _node_probe(extra: dict[str, Any]) -> dict[str, Any]:
    return {"nodes": [{"name": "probe", "ae_title": "PROBE", "host": HOST, "port": 104, **extra}]}


def requestor_engine(engine: str) -> Variant | None:
    """Overrides selecting ``engine`` for the gateway's DIMSE requestor (C-FIND/C-GET/C-MOVE/C-STORE):
    the per-node ``engine`` key, else a global ``gateway.dimse_engine``; None when neither exists."""
    if _accepted(_node_probe({"engine": engine})):
        return Variant(engine, f"engine {engine}", node={"engine": engine})
    if _accepted({"gateway": {"dimse_engine": engine}, **_node_probe({})}):
        return Variant(engine, f"engine {engine}", gateway={"dimse_engine": engine})
    return None


def scp_engine(engine: str) -> dict[str, Any] | None:
    """``gateway:`` overrides selecting ``engine`` for the storage SCP (C-MOVE destination), or None."""
    if _accepted({"gateway": {"scp_engine": engine}, **_node_probe({})}):
        return {"scp_engine": engine}
    return None


def engine_variants(*, storage_scp: bool = False) -> tuple[list[Variant], list[str]]:
    """The gateway configurations to compare, the one the targets apply to first, and notes.

    "fast" then "pynetdicom" when the checked-out gateway can select them; otherwise its default
    engine alone (named so in the report). With ``storage_scp`` a variant also selects the storage
    SCP's engine (``gateway.scp_engine``) alongside the requestor's.
    """
    variants: list[Variant] = []
    notes: list[str] = []
    for engine in ("fast", "pynetdicom"):
        requestor = requestor_engine(engine)
        scp = scp_engine(engine) if storage_scp else None
        if requestor is None and scp is None:
            continue
        node = dict(requestor.node) if requestor else {}
        gateway = {**(requestor.gateway if requestor else {}), **(scp or {})}
        parts = ([f"engine {engine}"] if requestor else []) + ([f"storage SCP {engine}"] if scp else [])
        variants.append(Variant(engine, ", ".join(parts), node=node, gateway=gateway))
        if storage_scp and scp is None:
            notes.append(f"the gateway has no `gateway.scp_engine` setting: its storage SCP ran with its "
                         f"default engine in the '{engine}' row")
        if storage_scp and requestor is None:
            notes.append(f"the gateway has no DIMSE engine setting: its requestor ran with its default "
                         f"engine in the '{engine}' row")
    if not any(v.name == "fast" for v in variants):
        notes.append("the gateway cannot select a 'fast' DIMSE engine (no `nodes[].engine` or "
                     "`gateway.dimse_engine` setting): the targets apply to its default engine")
    if not any(v.name == "pynetdicom" for v in variants):
        variants.append(Variant("default", "default engine"))
    return variants, notes


# ------------------------------------------------------------------------ DCMTK storescp


class StoreScp:
    """DCMTK ``storescp`` on a free loopback port writing every instance it receives to ``out``."""

    def __init__(self, workdir: Path, ae_title: str = "BENCHSTORESCP", max_pdu: int = 131072) -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.workdir = Path(workdir)
        self.out = self.workdir / "received"
        self.max_pdu = max_pdu
        self.log_path = self.workdir / "storescp.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> StoreScp:
        self.out.mkdir(parents=True, exist_ok=True)
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "TERM"] if setpriv else []
        self._log = self.log_path.open("ab")
        # +B: files written exactly as received (no re-encoding), as getscu's +B in bench_wado.
        self.proc = subprocess.Popen(
            [*prefix, dcmtk_tool("storescp"), "-aet", self.ae_title, "-pdu", str(self.max_pdu), "+B",
             "-od", str(self.out), str(self.port)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=dict(os.environ, TCP_NODELAY="1"), start_new_session=True)
        deadline = time.monotonic() + 15
        while not dicom_echo(HOST, self.port, self.ae_title, timeout=2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise PeerError(f"storescp did not answer C-ECHO on port {self.port}")
            time.sleep(0.1)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def clear(self) -> None:
        for path in self.out.iterdir():
            path.unlink(missing_ok=True)

    def files(self) -> list[Path]:
        return [p for p in self.out.iterdir() if p.is_file()]

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None


def dcmtk_version() -> str:
    try:
        done = subprocess.run([dcmtk_tool("getscu"), "--version"], capture_output=True, text=True, timeout=10,
                              check=False)
    except (PeerError, OSError, subprocess.TimeoutExpired):
        return "?"
    first = (done.stdout or done.stderr).strip().splitlines()[:1]
    return first[0].strip("$ ").replace("dcmtk: ", "") if first else "?"


# ------------------------------------------------------------------------ gateway


def metrics_of(root: str) -> dict[str, float]:
    """A gateway's ``/metrics`` (Prometheus text) as {series: value}."""
    r = httpx.get(f"{root}/metrics", timeout=10)
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out
