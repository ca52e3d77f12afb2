"""``dicomweb-gateway``: serve | echo | probe | demo | pull."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import ipaddress
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.settings import ConfigError, PacsNode, Settings, load_settings, settings_from_dict

log = logging.getLogger("gateway")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _run_server(settings: Settings, host: str, port: int, allow_unauthenticated: bool,
                **app_kwargs: Any) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.embedded import preload_streaming
    from gateway.http import MAX_REQUEST_HEAD
    from gateway.startup import configure_logging

    if not _is_loopback(host) and settings.auth.mode == "none" and not allow_unauthenticated:
        print(f"refusing to serve on {host} without an auth section: patient data would be open to the "
              f"network. Bind to 127.0.0.1, configure auth, or pass --allow-unauthenticated "
              f"(e.g. behind an authenticating proxy).", file=sys.stderr)
        return 2
    configure_logging(settings.logging)   # the logging section (text | json), uvicorn's lines included
    if settings.auth.mode == "none":
        log.warning("no auth configured: serving without authentication on %s", host)
    # The effective address is part of the settings: the cluster advertises it to other replicas.
    settings = dataclasses.replace(settings, http=dataclasses.replace(settings.http, host=host, port=port))
    loop = settings.http.event_loop     # why asyncio by default: HttpSection.event_loop
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        print("http.event_loop is uvloop but uvloop is not installed", file=sys.stderr)
        return 2
    log.info("serving on %s:%d, event loop %s", host, port, loop)
    preload_streaming()
    uvicorn.run(create_app(settings, **app_kwargs), host=host, port=port, loop=loop, workers=1,
                lifespan="on", log_config=None, log_level=settings.logging.level, proxy_headers=False,
                h11_max_incomplete_event_size=MAX_REQUEST_HEAD,
                ssl_certfile=settings.http.tls_cert_file, ssl_keyfile=settings.http.tls_key_file)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if not settings.nodes:
        print("config error: nodes: at least one PACS node is required", file=sys.stderr)
        return 2
    if args.log_format:
        settings = dataclasses.replace(settings, logging=dataclasses.replace(settings.logging,
                                                                             format=args.log_format))
    return _run_server(settings, args.host or settings.http.host, args.port or settings.http.port,
                       args.allow_unauthenticated)


def _chosen_nodes(settings: Settings, name: str | None) -> Sequence[PacsNode] | None:
    """The node named on the command line, or every configured one; None (after saying why on
    stderr) when there is none to work on."""
    nodes: Sequence[PacsNode] = settings.nodes
    if name:
        node = settings.node(name)
        if node is None:
            print(f"no node named {name!r}; configured: {', '.join(n.name for n in nodes) or 'none'}",
                  file=sys.stderr)
            return None
        nodes = [node]
    if not nodes:
        print("no nodes configured", file=sys.stderr)
        return None
    return nodes


def cmd_echo(args: argparse.Namespace) -> int:
    from gateway.dimse.pacs import PynetdicomPacs
    from gateway.errors import GatewayError
    from gateway.startup import configure_process

    settings = load_settings(args.config)
    nodes = _chosen_nodes(settings, args.node)
    if nodes is None:
        return 2

    async def run() -> int:
        configure_process()
        client = PynetdicomPacs(settings)
        failures = 0
        try:
            for node in nodes:
                label = f"{node.name:<16} {node.ae_title}@{node.host}:{node.port}"
                try:
                    rtt = await client.echo(node)
                    print(f"OK    {label}  {rtt * 1000:.1f} ms")
                except GatewayError as exc:
                    failures += 1
                    print(f"FAIL  {label}  {type(exc).__name__}: {exc.detail}")
        finally:
            await client.close()
        return 1 if failures else 0

    return asyncio.run(run())


def cmd_probe(args: argparse.Namespace) -> int:
    """Profile the configured nodes' PACS now and print each profile (docs/architecture.md, "PACS
    profiles"): a table, or with ``--json`` the admin endpoint's JSON. Read-only; C-MOVE is not
    tested here (the running gateway's storage SCP owns the port). Names found while probing are
    never printed. Exit codes: 0 profiled, 1 a node could not be profiled, 2 usage."""
    from cache.memory import MemoryCache
    from gateway.dimse.pacs import PynetdicomPacs
    from gateway.profile import report
    from gateway.profile.service import NodeProfiles
    from gateway.startup import configure_process

    settings = load_settings(args.config)
    nodes = _chosen_nodes(settings, args.node)
    if nodes is None:
        return 2

    async def run() -> int:
        configure_process()
        client = PynetdicomPacs(settings)
        profiles = NodeProfiles(settings, client, MemoryCache())
        failures = 0
        reports = []
        try:
            for node in nodes:
                profile = await profiles.reprobe(node.name)
                failures += profile is None
                resolution = profiles.resolution(node.name)
                assert resolution is not None
                reports.append(report.as_json(node, profiles.state(node.name), profiles.error(node.name),
                                              profile, resolution))
        finally:
            await profiles.close()
            await client.close()
        if args.json:
            print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
        else:
            print("\n".join(report.as_text(r) for r in reports), end="")
        return 1 if failures else 0

    return asyncio.run(run())


def demo_settings(pacs_port: int, http_host: str, http_port: int) -> Settings:
    return settings_from_dict({
        "gateway": {"ae_title": "DICOMWEBGW", "dimse_port": 0},
        "http": {"host": http_host, "port": http_port, "cors_origins": ["*"]},
        "nodes": [{"name": "demo", "ae_title": "DEMOPACS", "host": "127.0.0.1", "port": pacs_port,
                   "retrieve": "get"}],
    })


def ohif_snippet(root: str) -> str:
    from gateway.ohif import data_source

    return json.dumps(data_source(root), indent=2)


_FETCH_OHIF = "\0fetch"  # --ohif given without DIR


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo_data import generate_demo_datasets
    from gateway.dimse.demo_pacs import DemoPacs

    ohif_dir: Path | None = None
    if args.ohif is not None:
        from gateway.ohif import fetch_ohif

        if args.ohif == _FETCH_OHIF:
            try:
                ohif_dir = fetch_ohif(log=lambda msg: print(msg, file=sys.stderr))
            except Exception as exc:  # npm missing, registry unreachable, ...
                print(f"cannot fetch the OHIF viewer ({exc}); pass --ohif DIR with a built OHIF dist/",
                      file=sys.stderr)
                return 2
        else:
            ohif_dir = Path(args.ohif).expanduser()
        if not (ohif_dir / "index.html").is_file():
            print(f"--ohif {ohif_dir}: not an OHIF dist directory (no index.html)", file=sys.stderr)
            return 2

    pacs = DemoPacs(generate_demo_datasets(), ae_title="DEMOPACS", port=args.pacs_port)
    pacs.start()
    try:
        settings = demo_settings(pacs.port, args.host, args.port)
        root = f"http://{args.host}:{args.port}/dicom-web"
        print(f"demo PACS (DEMOPACS) listening on 127.0.0.1:{pacs.port}")
        print(f"DICOMweb root: {root}")
        print(f"try: curl '{root}/studies'")
        print("OHIF data source (paste into app-config.js dataSources):")
        print(ohif_snippet(root))
        if ohif_dir is not None:
            print(f"OHIF viewer ({ohif_dir}): http://{args.host}:{args.port}/")
        sys.stdout.flush()
        return _run_server(settings, args.host, args.port, allow_unauthenticated=False, ohif_dir=ohif_dir)
    finally:
        pacs.stop()


def cmd_pull(args: argparse.Namespace) -> int:
    """Find one series by Patient ID, study date and description; pull it; report the volume.

    Exit codes: 0 pulled, 1 DICOMweb/network failure, 3 nothing matched, 4 several series matched.
    """
    import contextlib
    import re
    import time
    from collections.abc import Iterator

    import httpx

    from gateway.client import DicomwebError, InconsistentSeriesError, find_series, load_volume, pull_series

    logging.getLogger().setLevel(logging.WARNING)  # gateway/uvicorn/httpx INFO lines would break the bar

    @contextlib.contextmanager
    def embedded_demo() -> Iterator[str]:
        """The demo PACS and a gateway in this process, on free loopback ports; yields the root."""
        from gateway.demo_data import generate_demo_datasets
        from gateway.dimse.demo_pacs import DemoPacs
        from gateway.embedded import serve_in_thread

        with DemoPacs(generate_demo_datasets(), ae_title="DEMOPACS", port=0) as pacs, \
                serve_in_thread(demo_settings(pacs.port, "127.0.0.1", 0)) as port:
            yield f"http://127.0.0.1:{port}/dicom-web"

    printed = {"done": -1}

    def bar(done: int, total: int | None, started: float, final: bool = False) -> None:
        """A text progress bar on stderr: redrawn in place on a terminal, a line per 10 % otherwise."""
        tty = sys.stderr.isatty()
        width = 30
        filled = width if final else (int(width * done / total) if total else 0)
        shown = f"{done}/{total}" if total else f"{done}/?"
        line = (f"pulling [{'#' * filled}{'.' * (width - filled)}] {shown} instances "
                f"{time.monotonic() - started:5.1f} s")
        step = bool(total) and done * 10 // (total or 1) != (done - 1) * 10 // (total or 1)
        if tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
        elif done != printed["done"] and (final or done == 0 or step):
            sys.stderr.write(line + "\n")
            printed["done"] = done
        sys.stderr.flush()

    criteria = (f"PatientID={args.patient_id!r}, StudyDate={args.study_date!r}, "
                f"SeriesDescription={args.series_description!r}")
    with contextlib.ExitStack() as stack:
        if args.url:
            root = args.url.rstrip("/")
        else:
            print("no --url: pulling from the built-in demo PACS through an embedded gateway",
                  file=sys.stderr)
            root = stack.enter_context(embedded_demo())
        print(f"DICOMweb root: {root}", file=sys.stderr)
        try:
            matches = find_series(root, patient_id=args.patient_id, study_date=args.study_date,
                                  series_description=args.series_description)
        except (DicomwebError, httpx.HTTPError) as exc:
            print(f"search failed ({root}): {exc}", file=sys.stderr)
            return 1
        if not matches:
            print(f"no series matches {criteria}. The description is matched case-insensitively as a whole; "
                  f"use * for any text (e.g. --series-description '*thorax*').", file=sys.stderr)
            return 3
        if len(matches) > 1:
            print(f"{len(matches)} series match {criteria}; narrow --series-description (or --study-date):",
                  file=sys.stderr)
            for m in matches:
                print(f"  {m.describe()}", file=sys.stderr)
            return 4
        match = matches[0]
        print(f"series: {match.describe()}", file=sys.stderr)
        slug = re.sub(r"[^0-9A-Za-z.+-]+", "_", match.series_description).strip("_") or "series"
        out = Path(args.out) if args.out else Path.cwd() / f"{match.study_date}_{match.series_number}_{slug}"
        started = time.monotonic()
        try:
            datasets = pull_series(root, match.study_uid, match.series_uid, out_dir=out,
                                   expected=match.num_instances,
                                   progress=lambda done, total: bar(done, total, started))
        except (DicomwebError, httpx.HTTPError) as exc:
            sys.stderr.write("\n")
            print(f"retrieve failed: {exc}", file=sys.stderr)
            return 1
        bar(len(datasets), match.num_instances or len(datasets), started, final=True)
    print(f"output: {out.resolve()} ({len(datasets)} files)")
    try:
        volume = load_volume(datasets)
    except InconsistentSeriesError as exc:
        print(f"files written, but they do not form one volume: {exc}", file=sys.stderr)
        return 0
    z, y, x = volume.array.shape
    sz, sy, sx = volume.spacing
    print(f"volume: {z} x {y} x {x} (z, y, x) {volume.array.dtype}, spacing {sz:g} x {sy:g} x {sx:g} mm "
          f"(z, y, x), origin ({', '.join(f'{v:g}' for v in volume.origin)}) mm LPS")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomweb-gateway",
                                     description="DICOMweb (QIDO-RS/WADO-RS/STOW-RS) in front of DIMSE PACS")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="YAML config file (default: $GATEWAY_CONFIG)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="serve on a non-loopback address without auth (behind an authenticating proxy)")
    serve.add_argument("--log-format", choices=["text", "json"],
                       help="log lines as text or one JSON object each (default: logging.format)")
    serve.set_defaults(func=cmd_serve)

    echo = sub.add_parser("echo", help="C-ECHO the configured nodes")
    echo.add_argument("node", nargs="?")
    echo.add_argument("--config")
    echo.set_defaults(func=cmd_echo)

    probe = sub.add_parser("probe", help="profile the nodes' PACS (read-only) and print what was learned",
                           description="Probe each configured node's PACS with read-only operations "
                                       "(association, C-FIND, C-GET of one instance, timings) and print, "
                                       "per fact, how it was tested, the result, the behaviour the gateway "
                                       "chooses from it and whether the configuration overrides it. Exit "
                                       "codes: 0 profiled, 1 a node could not be reached, 2 usage.")
    probe.add_argument("node", nargs="?", help="one node's name (default: every node)")
    probe.add_argument("--config", help="YAML config file (default: $GATEWAY_CONFIG)")
    probe.add_argument("--json", action="store_true", help="the admin endpoint's JSON instead of a table")
    probe.set_defaults(func=cmd_probe)

    demo = sub.add_parser("demo", help="run against a built-in demo PACS (no Redis, no config)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--pacs-port", type=int, default=0, help="demo PACS DIMSE port (default: a free one)")
    demo.add_argument("--ohif", nargs="?", const=_FETCH_OHIF, default=None, metavar="DIR",
                      help="also serve the OHIF viewer at / on the same origin, from DIR (a built OHIF "
                           "dist/); without DIR, @ohif/app 3.13.x is fetched once with npm pack and cached "
                           "in ~/.cache/dicomweb-gateway/ohif ($OHIF_CACHE_DIR)")
    demo.set_defaults(func=cmd_demo)

    pull = sub.add_parser("pull", help="find one series by patient, date and description; pull it to disk",
                          description="Find the one series of PATIENT's study on DATE whose description "
                                      "matches TEXT (case-insensitive, * and ? wildcards) through a "
                                      "DICOMweb root, write its instances (PS3.10) to DIR and report the "
                                      "volume. Exit codes: 0 pulled, 1 request failed, 3 nothing matched, "
                                      "4 several series matched (they are listed).")
    pull.add_argument("--patient-id", required=True, metavar="ID")
    pull.add_argument("--study-date", required=True, metavar="DATE",
                      help="YYYYMMDD, YYYY-MM-DD or a DICOM range (20230101-20230331)")
    pull.add_argument("--series-description", required=True, metavar="TEXT")
    pull.add_argument("--out", metavar="DIR",
                      help="directory for the files (default: ./<date>_<series number>_<description>)")
    pull.add_argument("--url", metavar="ROOT",
                      help="DICOMweb root, e.g. http://127.0.0.1:8080/dicom-web (default: the built-in "
                           "demo PACS through an embedded gateway)")
    pull.set_defaults(func=cmd_pull)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
