"""The audit trail: one structured record per access to patient data, to a sink of its own.

Separate from the operational log (which never carries patient identifiers): audit records do name
what was accessed, by whom, from where, and the outcome, because that is their purpose. One record
per DICOMweb request (search, retrieve, metadata, frames, rendered, WADO-URI, store), denied ones
(401/403) included, written when its response has been sent (so the outcome and the bytes are
known). Fields follow the DICOM audit message schema (PS3.15 A.5, IHE ATNA), as JSON:

    EventIdentification       EventID (DCM 110112 Query | 110104 DICOM Instances Transferred |
                              110114 User Authentication), EventActionCode (E | R | C),
                              EventDateTime, EventOutcomeIndicator (0 | 4 | 8 | 12)
    ActiveParticipant[]       the requestor (UserID = subject, AlternativeUserID = client id,
                              UserIsRequestor, NetworkAccessPointID = source address) and the
                              gateway itself (UserID = its AE title)
    AuditSourceIdentification AuditSourceID (dicomweb-gateway/<AE title>)
    ParticipantObjectIdentification[]  the study / series / instance UIDs of the URL (110180,
                              110181, 110182 ... DCM codes), and for a search its query
                              (ParticipantObjectQuery, base64 as PS3.15 A.5.3.2 asks)
    DicomwebGateway           node, operation, method, path, status, bytes, duration_ms, request_id

Sinks (``audit``): a JSON-lines file and/or syslog (RFC 5424 over UDP or TCP, RFC 6587 octet
counting for TCP). A sink that fails is logged (without the record) and never fails the request.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import re
import secrets
import socket
import threading
import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.authz import Principal
from gateway.settings import AuditSection

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_DICOMWEB = re.compile(r"^(?:/nodes/(?P<node>[^/]+))?/(?P<root>dicom-web|wado)(?P<rest>/.*)?$")
_UID_CODES = {"studies": ("110180", "Study Instance UID"), "series": ("110181", "Series Instance UID"),
              "instances": ("110182", "SOP Instance UID")}
_OUTCOME = {2: "0", 3: "0", 4: "4", 5: "8"}
_EVENTS = {"search": ("110112", "Query", "E"), "retrieve": ("110104", "DICOM Instances Transferred", "R"),
           "store": ("110104", "DICOM Instances Transferred", "C"),
           "authenticate": ("110114", "User Authentication", "E")}


def operation_of(method: str, rest: str, root: str) -> str:
    """search | retrieve | store for a DICOMweb path below its root."""
    if method == "POST":
        return "store"
    if root == "wado":
        return "retrieve"
    parts = [p for p in rest.split("/") if p]
    if not parts:
        return "retrieve"            # WADO-URI on the DICOMweb root
    return "search" if parts[-1] in ("studies", "series", "instances") else "retrieve"


def uids_of(rest: str, query: dict[str, str]) -> list[tuple[str, str, str]]:
    """(code, display name, UID) for each UID in the path (or the WADO-URI query)."""
    parts = [p for p in rest.split("/") if p]
    found = [(*_UID_CODES[kind], uid) for kind, uid in zip(parts, parts[1:], strict=False)
             if kind in _UID_CODES]
    for key, kind in (("studyUID", "studies"), ("seriesUID", "series"), ("objectUID", "instances")):
        if key in query:
            found.append((*_UID_CODES[kind], query[key]))
    return found


class AuditSink:
    def __init__(self, section: AuditSection, source_id: str) -> None:
        self.section = section
        self.source_id = source_id
        self._lock = threading.Lock()
        self._file = open(section.file, "ab") if section.file else None  # noqa: SIM115 - closed by close()
        self._socket: socket.socket | None = None
        self.written = 0
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return self._file is not None or self.section.syslog_host is not None

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def write(self, record: dict[str, Any]) -> None:
        line = orjson.dumps(record)
        with self._lock:
            try:
                if self._file is not None:
                    self._file.write(line + b"\n")
                    self._file.flush()
                if self.section.syslog_host is not None:
                    self._syslog(line)
                self.written += 1
            except OSError as exc:
                self.failures += 1
                log.warning("writing an audit record failed: %s", type(exc).__name__)
                if self._socket is not None:
                    self._socket.close()
                    self._socket = None

    def _syslog(self, message: bytes) -> None:
        # RFC 5424: <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG; facility authpriv (10),
        # severity notice (5) for the audit of an access.
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        header = f"<{10 * 8 + 5}>1 {now} {socket.gethostname()[:255]} dicomweb-gateway {os.getpid()} AUDIT - "
        frame = header.encode() + b"\xef\xbb\xbf" + message
        section = self.section
        assert section.syslog_host is not None
        if section.syslog_transport == "udp":
            if self._socket is None:
                family = socket.AF_INET6 if ":" in section.syslog_host else socket.AF_INET
                self._socket = socket.socket(family, socket.SOCK_DGRAM)
            self._socket.sendto(frame, (section.syslog_host, section.syslog_port))
            return
        if self._socket is None:
            self._socket = socket.create_connection((section.syslog_host, section.syslog_port), timeout=2)
        self._socket.sendall(str(len(frame)).encode() + b" " + frame)      # RFC 6587 octet counting


class AuditTrail:
    """ASGI middleware: a request id for every request (``X-Request-ID``, accepted when well formed,
    else made, echoed in the response), and an audit record for every DICOMweb request."""

    def __init__(self, app: ASGIApp, sink: AuditSink, gateway_ae: str, include_query: bool = True) -> None:
        self.app = app
        self.sink = sink
        self.gateway_ae = gateway_ae
        self.include_query = include_query

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = b""
        for name, value in scope.get("headers") or []:
            if name == REQUEST_ID_HEADER:
                offered = value   # the last one, as a dict of the headers would keep
        request_id = offered.decode() if _REQUEST_ID.fullmatch(offered) else secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        matched = _DICOMWEB.match(scope["path"]) if self.sink.enabled else None
        started = time.monotonic()
        status = 500
        sent = 0
        node_header: str | None = None

        async def sending(message: Message) -> None:
            nonlocal status, sent, node_header
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                node_header = next(
                    (v.decode("latin-1") for k, v in headers if k.lower() == b"x-gateway-node"), None)
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if matched is not None:
                elapsed = time.monotonic() - started
                self._record(scope, matched, status, sent, node_header, request_id, elapsed)

    def _record(self, scope: Scope, matched: re.Match[str], status: int, sent: int, node: str | None,
                request_id: str, duration: float) -> None:
        method = scope["method"]
        if method == "OPTIONS":
            return
        rest = matched.group("rest") or ""
        raw_query = scope.get("query_string", b"").decode("latin-1")
        query = dict(p.split("=", 1) for p in raw_query.split("&") if "=" in p)
        operation = operation_of(method, rest, matched.group("root"))
        event = "authenticate" if status == 401 else operation
        code, name, action = _EVENTS[event]
        principal = scope.get("state", {}).get("principal")
        who = principal if isinstance(principal, Principal) else None
        client = scope.get("client")
        objects: list[dict[str, Any]] = [
            {"ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3",
             "ParticipantObjectIDTypeCode": {"code": c, "codeSystemName": "DCM", "displayName": n},
             "ParticipantObjectID": uid}
            for c, n, uid in uids_of(rest, query)]
        if operation == "search" and self.include_query and raw_query:
            objects.append({"ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "24",
                            "ParticipantObjectIDTypeCode": {"code": "110112", "codeSystemName": "DCM",
                                                            "displayName": "Query"},
                            "ParticipantObjectQuery": base64.b64encode(raw_query.encode()).decode()})
        record = {
            "EventIdentification": {
                "EventID": {"code": code, "codeSystemName": "DCM", "displayName": name},
                "EventActionCode": action,
                "EventDateTime": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                "EventOutcomeIndicator": _OUTCOME.get(status // 100, "12"),
            },
            "ActiveParticipant": [
                {"UserID": who.subject if who else "unauthenticated",
                 "AlternativeUserID": who.client if who else None,
                 "UserIsRequestor": True,
                 "NetworkAccessPointID": str(client[0]) if client else None,
                 "NetworkAccessPointTypeCode": "2"},
                {"UserID": self.gateway_ae, "UserIsRequestor": False},
            ],
            "AuditSourceIdentification": {"AuditSourceID": f"dicomweb-gateway/{self.gateway_ae}"},
            "ParticipantObjectIdentification": objects,
            "DicomwebGateway": {
                "node": node or matched.group("node"), "operation": operation,
                "authentication": who.method if who else None, "method": method, "path": scope["path"],
                "status": status, "bytes": sent, "duration_ms": round(duration * 1000, 1),
                "request_id": request_id,
            },
        }
        self.sink.write(record)
