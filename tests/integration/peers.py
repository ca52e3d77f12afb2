"""Real DIMSE peers for integration tests: Orthanc and DCMTK's dcmqrscp as subprocesses.

Each peer writes its own configuration, listens on free ports on 127.0.0.1 (Orthanc's DICOM port
listens on all interfaces: it has no bind-address option), keeps its log in a file and tears its
process group down on ``stop()``. A missing binary raises ``PeerError`` naming it and the script that
installs it: integration tests fail loudly, they never skip.

Facts that shaped this module:

- Debian's DCMTK, also inside Orthanc, only sets TCP_NODELAY when the environment says
  ``TCP_NODELAY=1``; without it every DIMSE exchange can wait ~40 ms for a delayed ACK. Peers take
  ``tcp_nodelay`` (default True); loading always runs with it so fixtures start fast.
- pynetdicom installs console scripts called ``storescu``/``echoscu`` that can shadow DCMTK's on PATH;
  ``dcmtk_tool`` only accepts native executables.
- dcmqrscp rejects RLE unless started with ``+xr``, and DCMTK's storescu proposes a compressed transfer
  syntax only when asked (``-R -xr``) and cannot decompress RLE itself, so ``load`` groups files by
  transfer syntax.
- Processes get ``setpriv --pdeathsig TERM`` so they die with the test run even if it is killed.
- DICOM TLS (PS3.15 Annex B.1): a peer given a :class:`PeerTls` (Orthanc's ``DicomTls*`` options)
  listens with TLS only; its readiness C-ECHO then goes over TLS with the client certificate.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from pydicom.filereader import read_file_meta_info

HOST = "127.0.0.1"
INSTALL_HINT = "install the test dependencies with scripts/install-test-deps.sh"

# A peer known to another peer as a C-MOVE destination: name -> (AE title, host, port).
Modalities = Mapping[str, Sequence[str | int]]

_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
_RLE = "1.2.840.10008.1.2.5"


class PeerError(RuntimeError):
    """A peer could not be found, started, or loaded."""


@dataclass(frozen=True)
class PeerTls:
    """DICOM TLS for a peer: its certificate and key, the CA bundle it trusts for its peers' (the
    gateway's) certificates, and the client certificate its readiness C-ECHO presents."""

    certificate: Path
    private_key: Path
    trusted: Path
    client_certificate: Path | None = None
    client_private_key: Path | None = None
    remote_certificate_required: bool = True

    def probe_context(self) -> ssl.SSLContext:
        """For readiness probes only: presents the client certificate, checks nothing of the peer's
        (a peer may be started with an expired or foreign certificate on purpose)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if self.client_certificate is not None:
            context.load_cert_chain(self.client_certificate, self.client_private_key)
        return context


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (bind to port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def find_executable(name: str, package: str) -> str:
    # Debian installs Orthanc in /usr/sbin, which a non-root PATH usually lacks.
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        raise PeerError(f"{name!r} not found on PATH (Debian package {package!r}); {INSTALL_HINT}")
    return path


def _is_native(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def dcmtk_tool(name: str) -> str:
    """Path of DCMTK's ``name``, skipping same-named scripts (pynetdicom apps, pyenv shims)."""
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]
    for directory in dirs:
        candidate = Path(directory or ".") / name
        if os.access(candidate, os.X_OK) and _is_native(candidate):
            return str(candidate)
    raise PeerError(f"DCMTK's {name!r} not found on PATH (Debian package 'dcmtk'); {INSTALL_HINT}")


def redis_ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING (RESP inline command, no client library)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def dicom_echo(host: str, port: int, ae_title: str, timeout: float = 5.0,
               tls: ssl.SSLContext | None = None) -> bool:
    """One C-ECHO through pynetdicom (over TLS with ``tls``); True when the peer answered Success."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="PEERCHECK")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=(tls, host) if tls is not None else None)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0x0000
    finally:
        assoc.release()


def _env(tcp_nodelay: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if tcp_nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def _service_user(name: str) -> pwd.struct_passwd | None:
    """The package's service account when we are root and may drop privileges to it."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


class _PeerProcess:
    """A subprocess in its own session with its log in ``log_path``."""

    name = "peer"
    host = HOST
    tls: PeerTls | None = None

    def __init__(self, workdir: Path, ae_title: str, tcp_nodelay: bool, startup_timeout: float) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.tcp_nodelay = tcp_nodelay
        self.startup_timeout = startup_timeout
        self.dicom_port = free_port()
        self.http_port: int | None = None
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.ae_title}@{self.host}:{self.dicom_port}>"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the process and wait until it answers C-ECHO; on any failure nothing is left running."""
        if self.running:
            return
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        raise NotImplementedError

    def _spawn(self, argv: list[str], user: pwd.struct_passwd | None = None) -> None:
        setpriv = shutil.which("setpriv")
        prefix: list[str] = []
        if setpriv:
            prefix = [setpriv, "--pdeathsig", "TERM"]
            if user is not None:
                prefix += [f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        elif user is not None:
            raise PeerError(f"'setpriv' (util-linux) is needed to run {self.name} as {user.pw_name!r}")
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            prefix + argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=_env(self.tcp_nodelay),
            cwd=self.workdir,
            start_new_session=True,
        )

    def _wait_until(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise PeerError(f"{self.name} exited with code {self._proc.returncode}{self.log_tail()}")
            if ready():
                return
            time.sleep(0.1)
        raise PeerError(f"{self.name} not {what} after {self.startup_timeout:.0f} s{self.log_tail()}")

    def _wait_dicom(self) -> None:
        # C-ECHO only: a bare TCP probe makes dcmqrscp log a DUL state-machine error.
        context = self.tls.probe_context() if self.tls is not None else None
        self._wait_until(
            lambda: dicom_echo(self.host, self.dicom_port, self.ae_title, tls=context),
            f"answering C-ECHO{' over TLS' if context else ''} on port {self.dicom_port}",
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"\n--- last lines of {self.log_path} ---\n" + "\n".join(text)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                # The whole session: dcmqrscp forks one child per association.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._cleanup()

    def _cleanup(self) -> None:
        pass


def orthanc_dicomweb_plugin() -> str:
    """Path of the orthanc-dicomweb plugin, from ``dpkg -L`` or the usual install locations."""
    candidates: list[str] = []
    if shutil.which("dpkg"):
        listing = subprocess.run(
            ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False
        ).stdout
        candidates = [line for line in listing.splitlines() if "libOrthancDicomWeb.so" in line]
    candidates += ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"]
    for candidate in sorted(candidates, key=lambda p: not p.endswith(".so")):
        if Path(candidate).is_file():
            return candidate
    raise PeerError(
        f"Orthanc's DICOMweb plugin not found (Debian package 'orthanc-dicomweb'); {INSTALL_HINT}"
    )


class OrthancPeer(_PeerProcess):
    """Orthanc with its own JSON config, the DICOMweb plugin and permissive DICOM access rules.

    ``modalities`` become ``DicomModalities`` (the C-MOVE destinations Orthanc knows);
    ``extra_config`` is merged last, for per-test overrides (e.g. ``MaximumPduLength``, or
    ``DicomModalities`` entries in object form with ``"UseDicomTls": true``). With ``tls`` its DICOM
    port speaks TLS only (Orthanc's ``DicomTls*`` options); it also uses them as a client (C-MOVE).
    """

    name = "orthanc"

    def __init__(
        self,
        workdir: Path,
        *,
        ae_title: str = "ORTHANC",
        modalities: Modalities | None = None,
        tcp_nodelay: bool = True,
        dicomweb: bool = True,
        extra_config: Mapping[str, Any] | None = None,
        tls: PeerTls | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        super().__init__(workdir, ae_title, tcp_nodelay, startup_timeout)
        self.tls = tls
        self.executable = find_executable("Orthanc", "orthanc")
        self.http_port = free_port()
        self.modalities = dict(modalities or {})
        self.plugin = orthanc_dicomweb_plugin() if dicomweb else None
        self.extra_config = dict(extra_config or {})
        self._user = _service_user("orthanc")
        self._rundir: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web"

    def config(self, storage: Path) -> dict[str, Any]:
        config: dict[str, Any] = {
            "Name": f"test-{self.ae_title}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {name: list(entry) for name, entry in self.modalities.items()},
            "MaximumPduLength": 131072,
            "SynchronousCMove": True,
            "OverwriteInstances": True,
            "SaveJobs": False,
            "Plugins": [self.plugin] if self.plugin else [],
            "DicomWeb": {"Enable": self.plugin is not None, "Root": "/dicom-web/", "EnableWado": True},
        }
        if self.tls is not None:
            tls_dir = storage.parent / "tls"   # copied by _start, readable by Orthanc's service user
            config.update({
                "DicomTlsEnabled": True,
                "DicomTlsCertificate": str(tls_dir / "cert.pem"),
                "DicomTlsPrivateKey": str(tls_dir / "key.pem"),
                "DicomTlsTrustedCertificates": str(tls_dir / "trusted.pem"),
                "DicomTlsRemoteCertificateRequired": self.tls.remote_certificate_required,
            })
        config.update(self.extra_config)
        return config

    def _start(self) -> None:
        # Orthanc runs as the package's 'orthanc' user; pytest's tmp dirs are private to root, so
        # its config and storage live in a directory of its own (the log stays in workdir).
        base = None if self._user is not None else self.workdir
        self._rundir = Path(tempfile.mkdtemp(prefix="orthanc-peer-", dir=base))
        storage = self._rundir / "storage"
        storage.mkdir()
        owned = [self._rundir, storage]
        if self.tls is not None:
            tls_dir = self._rundir / "tls"
            tls_dir.mkdir()
            owned.append(tls_dir)
            for name, source in (("cert.pem", self.tls.certificate), ("key.pem", self.tls.private_key),
                                 ("trusted.pem", self.tls.trusted)):
                shutil.copyfile(source, tls_dir / name)
                owned.append(tls_dir / name)
        config_path = self._rundir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(storage), indent=2))
        owned.append(config_path)
        if self._user is not None:
            for path in owned:
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        self._spawn([self.executable, str(config_path)], user=self._user)
        self._wait_until(self._http_ready, f"answering HTTP on port {self.http_port}")
        self._wait_dicom()

    def _http_ready(self) -> bool:
        try:
            status, body = self.request("GET", "/plugins" if self.plugin else "/system")
        except OSError:
            return False
        if status != 200:
            return False
        if self.plugin and "dicom-web" not in json.loads(body):
            raise PeerError(f"Orthanc started without the DICOMweb plugin {self.plugin}{self.log_tail()}")
        return True

    def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 30.0
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.http_port, timeout=timeout)
        try:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def load(self, paths: Iterable[Path]) -> int:
        """Upload Part 10 files with REST ``POST /instances`` over one keep-alive connection."""
        conn = http.client.HTTPConnection(self.host, self.http_port, timeout=60)
        count = 0
        try:
            for path in paths:
                conn.request(
                    "POST",
                    "/instances",
                    body=Path(path).read_bytes(),
                    headers={"Content-Type": "application/dicom"},
                )
                response = conn.getresponse()
                payload = response.read()
                status = json.loads(payload).get("Status") if response.status == 200 else None
                if status not in ("Success", "AlreadyStored"):
                    raise PeerError(f"Orthanc refused {path}: HTTP {response.status} {payload[:300]!r}")
                count += 1
        finally:
            conn.close()
        return count

    def _cleanup(self) -> None:
        if self._rundir is not None:
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._rundir = None


class DcmqrscpPeer(_PeerProcess):
    """DCMTK's dcmqrscp with one storage AE; ``modalities`` become its HostTable (C-MOVE targets).

    Started with ``+xr`` so it stores RLE Lossless as received (by default it accepts only
    uncompressed transfer syntaxes). Mind its quota: beyond ``max_studies`` it silently deletes the
    oldest study.
    """

    name = "dcmqrscp"

    def __init__(
        self,
        workdir: Path,
        *,
        ae_title: str = "DCMQRSCP",
        modalities: Modalities | None = None,
        tcp_nodelay: bool = True,
        single_process: bool = False,
        max_studies: int = 200,
        max_pdu: int = 131072,
        startup_timeout: float = 20.0,
    ) -> None:
        super().__init__(workdir, ae_title, tcp_nodelay, startup_timeout)
        self.executable = dcmtk_tool("dcmqrscp")
        self.modalities = dict(modalities or {})
        self.single_process = single_process
        self.max_studies = max_studies
        self.max_pdu = max_pdu
        self.storage = self.workdir / "storage"
        self.config_path = self.workdir / "dcmqrscp.cfg"

    def config(self) -> str:
        hosts = "\n".join(
            f"{name} = ({entry[0]}, {entry[1]}, {entry[2]})" for name, entry in self.modalities.items()
        )
        return (
            f"NetworkTCPPort  = {self.dicom_port}\n"
            f"MaxPDUSize      = {self.max_pdu}\n"
            "MaxAssociations = 16\n\n"
            f"HostTable BEGIN\n{hosts}\nHostTable END\n\n"
            "VendorTable BEGIN\nVendorTable END\n\n"
            "AETable BEGIN\n"
            f"{self.ae_title}  {self.storage}  RW  ({self.max_studies}, 1024mb)  ANY\n"
            "AETable END\n"
        )

    def _start(self) -> None:
        if " " in str(self.storage):
            raise PeerError(f"dcmqrscp cannot use a storage path with spaces: {self.storage}")
        self.storage.mkdir(exist_ok=True)
        self.config_path.write_text(self.config())
        # +xr: accept RLE when loading; -xr: propose RLE (and uncompressed) on its outgoing C-MOVE and
        # C-GET sub-associations, else it cannot send the RLE series it stores (it cannot decode RLE).
        argv = [self.executable, "-c", str(self.config_path), "+xr", "-xr"]
        if self.single_process:
            argv.append("--single-process")
        self._spawn(argv)
        self._wait_dicom()

    def load(self, paths: Iterable[Path], batch: int = 500) -> int:
        """C-STORE files with DCMTK's storescu, proposing only the contexts the files need (``-R``).

        Uncompressed files go as they are; RLE files need ``-xr`` (storescu cannot decompress them).
        """
        storescu = dcmtk_tool("storescu")
        groups: dict[str, list[str]] = {}
        for path in paths:
            syntax = str(read_file_meta_info(path).TransferSyntaxUID)
            if syntax in _UNCOMPRESSED:
                groups.setdefault("", []).append(str(path))
            elif syntax == _RLE:
                groups.setdefault("-xr", []).append(str(path))
            else:
                raise PeerError(f"dcmqrscp peer accepts uncompressed and RLE only, not {syntax}: {path}")
        count = 0
        for option, files in groups.items():
            extra = ["-R", option] if option else ["-R"]
            for start in range(0, len(files), batch):
                chunk = files[start : start + batch]
                argv = [
                    storescu,
                    "-aet",
                    "LOADER",
                    "-aec",
                    self.ae_title,
                    "-pdu",
                    str(self.max_pdu),
                    *extra,
                    self.host,
                    str(self.dicom_port),
                    *chunk,
                ]
                done = subprocess.run(argv, capture_output=True, text=True, env=_env(True), check=False)
                if done.returncode != 0:
                    tail = done.stderr[-3000:]
                    raise PeerError(f"storescu into {self} failed ({done.returncode}):\n{tail}")
                count += len(chunk)
        return count
