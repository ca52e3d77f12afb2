"""The JS ``dicomweb-client@0.10.4`` (OHIF's copy) against the gateway on the demo PACS, under Node.

Runs ``tests/js/client.test.mjs`` with ``node --test``: QIDO (with OHIF's study-list filters), series
and study metadata, frames with OHIF's Accept headers (parts split by the client's own
``multipartDecode``), bulkdata, thumbnails, instance and series retrieve, and STOW of PS3.10 files
generated here. ``npm ci`` runs once into ``tests/js/node_modules`` (kept between runs; reinstalled
when the installed version does not match the lock). Node.js >= 18 and npm are required: a missing
one fails the test, it never skips.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from gateway.demo_data import DEMO_STUDIES, generate_demo_datasets
from gateway.dimse.demo_pacs import DemoPacs
from gateway.settings import settings_from_dict
from tests.support.server import running_gateway

JS_DIR = Path(__file__).resolve().parents[1] / "js"
CLIENT_VERSION = "0.10.4"
INSTALL_HINT = "install Node.js >= 18 and npm (Debian: apt-get install nodejs npm)"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"'{name}' not on PATH: the JS dicomweb-client tests need it; {INSTALL_HINT}",
                    pytrace=False)
    return path


def _installed_version() -> str | None:
    manifest = JS_DIR / "node_modules" / "dicomweb-client" / "package.json"
    try:
        return str(json.loads(manifest.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def node_modules() -> Path:
    node, npm = _tool("node"), _tool("npm")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    match = re.match(r"v(\d+)", version)
    if match is None or int(match.group(1)) < 18:
        pytest.fail(f"node {version} has no built-in test runner; {INSTALL_HINT}", pytrace=False)
    if _installed_version() != CLIENT_VERSION:
        command = "ci" if (JS_DIR / "package-lock.json").exists() else "install"
        result = subprocess.run([npm, command, "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, f"npm {command} in {JS_DIR} failed:\n{result.stdout}\n{result.stderr}"
    assert _installed_version() == CLIENT_VERSION, "dicomweb-client@0.10.4 is not in tests/js/node_modules"
    return JS_DIR / "node_modules"


@pytest.fixture(scope="module")
def gateway_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with DemoPacs(generate_demo_datasets(), ae_title="JSPACS") as pacs:
        settings = settings_from_dict({
            "spool": {"path": str(tmp_path_factory.mktemp("spool"))},
            "http": {"cors_origins": ["*"]},
            "nodes": [{"name": "demo", "ae_title": "JSPACS", "host": "127.0.0.1", "port": pacs.port,
                       "retrieve": "get"}],
        })
        with running_gateway(settings) as url:
            yield url + "/dicom-web"


@pytest.fixture(scope="module")
def stow_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two PS3.10 CT instances of a new study (own patient, so demo-data searches are unaffected)."""
    ct = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2303140011")
    wanted = set(ct["series"][1]["sop_instance_uids"][:2])
    sources = [ds for ds in generate_demo_datasets() if ds.SOPInstanceUID in wanted]
    study, series = generate_uid(), generate_uid()
    directory = tmp_path_factory.mktemp("stow")
    paths = []
    for n, src in enumerate(sources, 1):
        ds = copy.deepcopy(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID, ds.AccessionNumber = "Stow^Node", "JSSTOW01", "JSSTOW01"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20991231"
        path = directory / f"stow{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_js_dicomweb_client_against_the_gateway(node_modules, gateway_root, stow_files):
    env = dict(os.environ, GATEWAY_URL=gateway_root, STOW_FILES=os.pathsep.join(map(str, stow_files)))
    result = subprocess.run([_tool("node"), "--test", "--test-reporter=tap", "client.test.mjs"], cwd=JS_DIR,
                            env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    summary = dict(re.findall(r"^# (tests|pass|fail|cancelled|skipped|todo) (\d+)$", output, re.MULTILINE))
    assert result.returncode == 0, f"node --test failed (exit {result.returncode}):\n{output[-12000:]}"
    assert int(summary.get("tests", 0)) >= 13, output[-4000:]
    assert summary.get("pass") == summary["tests"], output[-4000:]
    assert (summary.get("fail"), summary.get("cancelled"), summary.get("skipped")) == ("0", "0", "0"), output
