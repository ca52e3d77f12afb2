"""The audit sinks: JSON lines, RFC 5424 syslog over UDP and TCP (RFC 6587 octet counting)."""

from __future__ import annotations

import json
import re
import socket

from gateway.audit import AuditSink, operation_of, uids_of
from gateway.settings import AuditSection

RECORD = {"EventIdentification": {"EventID": {"code": "110112"}}, "DicomwebGateway": {"node": "a"}}
RFC5424 = re.compile(rb"^<85>1 \d{4}-\d\d-\d\dT[\d:.]+Z \S+ dicomweb-gateway \d+ AUDIT - \xef\xbb\xbf(.*)$", re.S)


def test_json_lines_file(tmp_path):
    sink = AuditSink(AuditSection(file=str(tmp_path / "audit.jsonl")), "GW")
    sink.write(RECORD)
    sink.write(RECORD)
    sink.close()
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [RECORD, RECORD]


def test_syslog_udp_is_rfc5424_with_the_json_record():
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(5)
    sink = AuditSink(AuditSection(syslog_host="127.0.0.1", syslog_port=server.getsockname()[1]), "GW")
    sink.write(RECORD)
    datagram, _ = server.recvfrom(65536)
    sink.close()
    server.close()
    matched = RFC5424.match(datagram)
    assert matched and json.loads(matched.group(1)) == RECORD


def test_syslog_tcp_uses_octet_counting():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    sink = AuditSink(AuditSection(syslog_host="127.0.0.1", syslog_port=server.getsockname()[1],
                                  syslog_transport="tcp"), "GW")
    sink.write(RECORD)
    conn, _ = server.accept()
    conn.settimeout(5)
    data = b""
    while b" " not in data or len(data) < int(data.split(b" ", 1)[0]) + len(data.split(b" ", 1)[0]) + 1:
        chunk = conn.recv(65536)
        assert chunk
        data += chunk
    sink.close()
    conn.close()
    server.close()
    length, frame = data.split(b" ", 1)
    assert int(length) == len(frame)
    matched = RFC5424.match(frame)
    assert matched and json.loads(matched.group(1)) == RECORD


def test_operations_and_uids_from_paths():
    assert operation_of("GET", "/studies", "dicom-web") == "search"
    assert operation_of("GET", "/studies/1.2/series", "dicom-web") == "search"
    assert operation_of("GET", "/studies/1.2/series/3.4/metadata", "dicom-web") == "retrieve"
    assert operation_of("POST", "/studies", "dicom-web") == "store"
    assert operation_of("GET", "", "wado") == "retrieve"
    assert [u[2] for u in uids_of("/studies/1.2/series/3.4/instances/5.6/frames/1", {})] == ["1.2", "3.4", "5.6"]
    assert [u[0] for u in uids_of("", {"studyUID": "1.2", "objectUID": "5"})] == ["110180", "110182"]
