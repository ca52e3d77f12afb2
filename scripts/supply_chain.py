"""Supply-chain record of the locks: a CycloneDX SBOM and a vulnerability audit.

    .venv/bin/python scripts/supply_chain.py sbom --write   # regenerate sbom/runtime.cdx.json
    .venv/bin/python scripts/supply_chain.py sbom --check   # fail when it no longer matches the lock
    .venv/bin/python scripts/supply_chain.py audit          # fail on a fixable known vulnerability

The SBOM describes the runtime environment exactly as ``requirements/runtime.txt`` pins it (what
the Dockerfile and ``scripts/demo.sh`` install), generated reproducibly by ``cyclonedx-py``.

The audit runs ``pip-audit`` (PyPI's vulnerability data, the same as OSV's PyPA advisories) on both
locks without installing anything. It fails when a pinned version has a known vulnerability that a
released version fixes: the remedy is ``bash scripts/lock.sh --upgrade-package NAME``. A vulnerability
with no fix yet is reported, not failed on (nothing to move to). Where PyPI's per-release endpoint is
unavailable (some mirrors serve only the per-project document), the project document is used for
pins that are the newest release, since its ``vulnerabilities`` are the newest release's; any pin
that neither source could audit is listed, never silently counted as clean.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
TEST_LOCK = ROOT / "requirements" / "test.txt"
SBOM = ROOT / "sbom" / "runtime.cdx.json"
PYPI_JSON = "https://pypi.org/pypi/{name}/json"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)


@dataclass
class Finding:
    name: str
    version: str
    vuln_id: str
    fix_versions: list[str]


@dataclass
class AuditResult:
    fixable: list[Finding] = field(default_factory=list)
    unfixed: list[Finding] = field(default_factory=list)
    audited: set[str] = field(default_factory=set)
    not_audited: dict[str, str] = field(default_factory=dict)   # "name==version" -> why

    @property
    def failed(self) -> bool:
        return bool(self.fixable)


def pins(lock_text: str) -> dict[str, set[str]]:
    """name -> pinned versions (a universal lock may pin two, split by environment markers)."""
    out: dict[str, set[str]] = {}
    for name, version in _PIN.findall(lock_text):
        out.setdefault(name.lower(), set()).add(version)
    return out


def classify(report: dict[str, Any], result: AuditResult) -> list[tuple[str, str]]:
    """Fold one pip-audit JSON report into ``result``; return the (name, version) pairs it skipped."""
    skipped = []
    for dep in report.get("dependencies", []):
        name, version = dep["name"].lower(), dep.get("version", "")
        if "skip_reason" in dep:
            found = re.search(r"\(([^()]+)\)\s*$", dep["skip_reason"])
            skipped.append((name, version or (found.group(1) if found else "?")))
            continue
        result.audited.add(f"{name}=={version}")
        for vuln in dep.get("vulns", []):
            finding = Finding(name, version, vuln["id"], list(vuln.get("fix_versions") or []))
            (result.fixable if finding.fix_versions else result.unfixed).append(finding)
    return skipped


def audit_from_project_documents(skipped: list[tuple[str, str]], result: AuditResult,
                                 fetch: Any = None) -> None:
    """For pins pip-audit could not look up: a pin that is the newest release is audited from the
    per-project document (its ``vulnerabilities`` are the newest release's); others are listed."""
    fetch = fetch or _fetch_json
    for name, version in skipped:
        key = f"{name}=={version}"
        try:
            doc = fetch(PYPI_JSON.format(name=name))
        except (OSError, ValueError) as exc:
            result.not_audited[key] = f"PyPI unreachable ({exc})"
            continue
        newest = doc.get("info", {}).get("version")
        if newest != version:
            result.not_audited[key] = f"no per-release data on this index and {newest} is newer"
            continue
        result.audited.add(key)
        for vuln in doc.get("vulnerabilities") or []:
            fixed = [v for v in vuln.get("fixed_in") or [] if v != version]
            finding = Finding(name, version, vuln.get("id", "?"), fixed)
            (result.fixable if fixed else result.unfixed).append(finding)


def _fetch_json(url: str) -> Any:
    bundle = _https_env().get("REQUESTS_CA_BUNDLE")
    context = ssl.create_default_context(cafile=bundle) if bundle else None
    with urllib.request.urlopen(url, timeout=30, context=context) as response:
        return json.load(response)


SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def _https_env() -> dict[str, str]:
    """pip-audit's requests trusts certifi's bundle only; prefer the system's trust store (Debian's
    bundle includes whatever CA the site added, e.g. for a TLS-inspecting proxy)."""
    env = dict(os.environ)
    if "REQUESTS_CA_BUNDLE" not in env and SYSTEM_CA_BUNDLE.exists():
        env["REQUESTS_CA_BUNDLE"] = str(SYSTEM_CA_BUNDLE)
    return env


def run_pip_audit(lock: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "audit.json"
        proc = subprocess.run(
            [sys.executable, "-m", "pip_audit", "--disable-pip", "--no-deps", "--progress-spinner", "off",
             "--format", "json", "-o", str(out), "-r", str(lock)],
            capture_output=True, text=True, env=_https_env())
        if not out.exists():
            raise SystemExit(f"pip-audit failed on {lock.name} (exit {proc.returncode}):\n{proc.stderr}")
        report: dict[str, Any] = json.loads(out.read_text())
        return report


def audit(locks: list[Path]) -> AuditResult:
    result = AuditResult()
    skipped: list[tuple[str, str]] = []
    for lock in locks:
        skipped += classify(run_pip_audit(lock), result)
    audit_from_project_documents(sorted(set(skipped)), result)
    return result


def sbom_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sbom.json"
        subprocess.run(
            [sys.executable, "-m", "cyclonedx_py", "requirements",
             "--pyproject", str(ROOT / "pyproject.toml"), "--output-reproducible",
             "--of", "JSON", "-o", str(out), str(RUNTIME_LOCK)],
            check=True, capture_output=True, text=True, cwd=ROOT)
        return out.read_bytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="supply_chain.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sbom = sub.add_parser("sbom", help="the CycloneDX SBOM of the runtime lock")
    sbom.add_argument("--write", action="store_true", help=f"write {SBOM.relative_to(ROOT)}")
    sub.add_parser("audit", help="vulnerability audit of requirements/runtime.txt and test.txt")
    args = parser.parse_args(argv)

    if args.command == "sbom":
        fresh = sbom_bytes()
        if args.write:
            SBOM.parent.mkdir(exist_ok=True)
            SBOM.write_bytes(fresh)
            print(f"wrote {SBOM.relative_to(ROOT)}")
            return 0
        if not SBOM.exists() or SBOM.read_bytes() != fresh:
            print(f"{SBOM.relative_to(ROOT)} does not match requirements/runtime.txt: "
                  "run .venv/bin/python scripts/supply_chain.py sbom --write and commit it", file=sys.stderr)
            return 1
        print(f"{SBOM.relative_to(ROOT)} matches requirements/runtime.txt")
        return 0

    result = audit([RUNTIME_LOCK, TEST_LOCK])
    for f in result.unfixed:
        print(f"known, no fix released: {f.name}=={f.version} {f.vuln_id}")
    for key, why in sorted(result.not_audited.items()):
        print(f"NOT AUDITED: {key}: {why}")
    for f in result.fixable:
        print(f"VULNERABLE: {f.name}=={f.version} {f.vuln_id}, fixed in {', '.join(f.fix_versions)}: "
              f"bash scripts/lock.sh --upgrade-package {f.name}")
    print(f"audit: {len(result.audited)} pins audited, {len(result.not_audited)} not audited, "
          f"{len(result.fixable)} fixable and {len(result.unfixed)} unfixed vulnerabilities")
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
