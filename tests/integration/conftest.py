"""Session fixtures: demo data, real PACS peers (Orthanc, dcmqrscp) loaded with it, and Redis.

Peers and Redis are started once per session and stopped at its end, also when tests fail.
A missing binary fails the fixture with a message naming it (scripts/install-test-deps.sh
installs them): integration tests never skip.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.demo_data import write_demo_files
from gateway.dimse.process import configure_pynetdicom

from .peers import INSTALL_HINT, DcmqrscpPeer, OrthancPeer, PeerError, free_port, redis_ping

GATEWAY_AE_TITLE = "DICOMWEBGW"
DEFAULT_REDIS = ("127.0.0.1", 6379)


@pytest.fixture(scope="session")
def gateway_scp_port() -> int:
    """The port the gateway's storage SCP will listen on; peers know it as a C-MOVE destination."""
    return free_port()


@pytest.fixture(scope="session")
def gateway_modality(gateway_scp_port: int) -> dict[str, list[str | int]]:
    return {"gateway": [GATEWAY_AE_TITLE, "127.0.0.1", gateway_scp_port]}


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_demo_files(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def orthanc(
    tmp_path_factory: pytest.TempPathFactory,
    demo_files: list[Path],
    gateway_modality: dict[str, list[str | int]],
) -> Iterator[OrthancPeer]:
    # Orthanc answers C-FIND in its DefaultEncoding (Latin-1 by default: Japanese names come back
    # garbled whatever the query asks); UTF-8 is what a multilingual site configures.
    peer = OrthancPeer(tmp_path_factory.mktemp("orthanc"), modalities=gateway_modality,
                       extra_config={"DefaultEncoding": "Utf8"})
    try:
        peer.start()
        peer.load(demo_files)
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="session")
def dcmqrscp(
    tmp_path_factory: pytest.TempPathFactory,
    demo_files: list[Path],
    gateway_modality: dict[str, list[str | int]],
) -> Iterator[DcmqrscpPeer]:
    peer = DcmqrscpPeer(tmp_path_factory.mktemp("dcmqrscp"), modalities=gateway_modality)
    try:
        peer.start()
        peer.load(demo_files)
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Database 15 of a Redis on 6379 if one answers, else a private redis-server on a free port."""
    if redis_ping(*DEFAULT_REDIS):
        yield "redis://127.0.0.1:6379/15"
        return
    executable = shutil.which("redis-server")
    if executable is None:
        raise PeerError(f"no Redis on 127.0.0.1:6379 and 'redis-server' not on PATH; {INSTALL_HINT}")
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    log_path = workdir / "redis.log"
    argv = [
        executable,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--logfile",
        str(log_path),
    ]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not redis_ping("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                raise PeerError(f"redis-server did not answer PING on port {port}:\n{tail}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/15"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ------------------------------------------------------------------ no patient data in the logs

# The demo patients' names and IDs (gateway.demo_data), as they would appear in a log line.
PHI_MARKERS = re.compile(
    r"DGW000\d|\b(?:doe|smith|m(?:ü|ue)ller|(?:ø|o)sterg(?:å|aa)rd|yamada)\b|19610412|19780930|19900105",
    re.IGNORECASE)
# What the gateway process logs: its own modules and the libraries it drives (in-process servers).
GATEWAY_LOGGERS = ("gateway", "cache", "translators", "uvicorn", "pynetdicom")


class _LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.leaks: list[str] = []
        self.seen = 0

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(GATEWAY_LOGGERS):
            return
        self.seen += 1
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is checked by its template
            line = str(record.msg)
        if PHI_MARKERS.search(line) and len(self.leaks) < 20:
            self.leaks.append(f"{record.name}: {line[:300]}")


@pytest.fixture(scope="session", autouse=True)
def no_patient_data_in_logs() -> Iterator[None]:
    """Every log line the in-process gateways write during the integration tests, at INFO and above
    (uvicorn's access log included), is checked for the demo patients' names and IDs: the operational
    log must stay free of patient identifiers (docs/architecture.md, "HTTP edge")."""
    # What every gateway process does at start-up; the tests' own pynetdicom clients in this process
    # share pynetdicom's switches, so a raw test C-FIND before any gateway started logs no identifier.
    configure_pynetdicom()
    lines = _LogLines()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(lines)
    root.setLevel(min(previous, logging.INFO))
    access = logging.getLogger("uvicorn.access")
    access_level = access.level
    access.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(lines)
        root.setLevel(previous)
        access.setLevel(access_level)
    assert lines.seen > 0, "the log guard saw no gateway log line at all"
    assert not lines.leaks, "patient data in the gateway's log:\n" + "\n".join(lines.leaks)
