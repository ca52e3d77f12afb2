"""The locks, the SBOM and the audit's decision (scripts/supply_chain.py), without the network."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("supply_chain", ROOT / "scripts" / "supply_chain.py")
assert spec and spec.loader
supply_chain = importlib.util.module_from_spec(spec)
sys.modules["supply_chain"] = supply_chain
spec.loader.exec_module(supply_chain)

RUNTIME = (ROOT / "requirements" / "runtime.txt").read_text()
TEST = (ROOT / "requirements" / "test.txt").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(n: str) -> str:
    return re.sub(r"[-_.]+", "-", n).lower()


def test_every_pin_carries_a_hash():
    for lock in (RUNTIME, TEST):
        entries = re.split(r"\n(?=[A-Za-z0-9])", lock.split("\n", 2)[2])
        for entry in entries:
            if "==" in entry:
                assert "--hash=sha256:" in entry, entry.splitlines()[0]


def test_runtime_lock_pins_the_same_versions_as_the_test_lock():
    runtime, test = supply_chain.pins(RUNTIME), supply_chain.pins(TEST)
    assert runtime, "empty runtime lock"
    for name, versions in runtime.items():
        assert versions == test.get(name), name


@pytest.mark.parametrize("group", ["runtime", "test", "audit", "build"])
def test_each_declared_dependency_is_locked_within_its_range(group):
    if group == "runtime":
        reqs, lock = PYPROJECT["project"]["dependencies"], RUNTIME
    elif group == "build":
        reqs, lock = PYPROJECT["build-system"]["requires"], RUNTIME
    else:
        reqs, lock = PYPROJECT["project"]["optional-dependencies"][group], TEST
    pinned = {_name(k): v for k, v in supply_chain.pins(lock).items()}
    for text in reqs:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate():
            continue
        versions = pinned.get(_name(req.name))
        assert versions, f"{req.name} is not in the lock"
        assert any(req.specifier.contains(v, prereleases=True) for v in versions), (req, versions)


def test_sbom_lists_exactly_the_runtime_lock():
    sbom = json.loads((ROOT / "sbom" / "runtime.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    assert sbom["metadata"]["component"]["name"] == "dicomweb-gateway"
    listed = {(_name(c["name"]), c["version"]) for c in sbom["components"]}
    locked = {(_name(n), v) for n, vs in supply_chain.pins(RUNTIME).items() for v in vs}
    assert listed == locked


def _report(*deps):
    return {"dependencies": list(deps), "fixes": []}


def test_a_fixable_vulnerability_fails_the_audit():
    result = supply_chain.AuditResult()
    skipped = supply_chain.classify(_report(
        {"name": "Jinja2", "version": "2.10", "vulns": [{"id": "PYSEC-2019-217", "fix_versions": ["2.10.1"]}]},
        {"name": "six", "version": "1.17.0", "vulns": []}), result)
    assert skipped == [] and result.failed
    assert [(f.name, f.vuln_id) for f in result.fixable] == [("jinja2", "PYSEC-2019-217")]
    assert result.audited == {"jinja2==2.10", "six==1.17.0"}


def test_a_vulnerability_without_a_fix_is_reported_not_failed():
    result = supply_chain.AuditResult()
    supply_chain.classify(_report({"name": "x", "version": "1", "vulns": [{"id": "V", "fix_versions": []}]}), result)
    assert not result.failed and [f.vuln_id for f in result.unfixed] == ["V"]


def test_pins_pip_audit_skipped_are_audited_from_the_project_document_or_listed():
    result = supply_chain.AuditResult()
    skipped = supply_chain.classify(_report(
        {"name": "newest", "skip_reason": "Dependency not found on PyPI and could not be audited: newest (2.0)"},
        {"name": "older", "skip_reason": "Dependency not found on PyPI and could not be audited: older (1.0)"},
        {"name": "gone", "skip_reason": "Dependency not found on PyPI and could not be audited: gone (3.0)"}),
        result)
    assert skipped == [("newest", "2.0"), ("older", "1.0"), ("gone", "3.0")]
    docs = {
        "newest": {"info": {"version": "2.0"}, "vulnerabilities": [{"id": "GHSA-1", "fixed_in": ["2.0.1"]}]},
        "older": {"info": {"version": "1.5"}, "vulnerabilities": []},
    }

    def fetch(url):
        name = url.split("/")[-2]
        if name not in docs:
            raise OSError("unreachable")
        return docs[name]

    supply_chain.audit_from_project_documents(skipped, result, fetch)
    assert result.failed and [f.name for f in result.fixable] == ["newest"]
    assert set(result.not_audited) == {"older==1.0", "gone==3.0"}
    assert "1.5 is newer" in result.not_audited["older==1.0"]


def test_dockerfile_installs_from_the_runtime_lock():
    text = (ROOT / "Dockerfile").read_text()
    assert "COPY requirements/runtime.txt" in text
    assert re.search(r"pip install [^\n]*--require-hashes[^\n]*-r requirements/runtime\.txt", text)
    assert re.search(r"pip install [^\n]*--no-deps[^\n]*--no-build-isolation \.", text)
