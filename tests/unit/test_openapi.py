"""gateway/openapi.json is a valid OpenAPI 3.1 document and describes exactly what the app mounts.

The meta-schema is the OpenAPI Initiative's 3.1 schema (2022-10-07) as the locked Schemathesis ships
it (offline); Schema Objects, which it leaves unchecked, are checked against JSON Schema 2020-12.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_31
from starlette.routing import BaseRoute, Mount, Route

from gateway import errors
from gateway.app import create_app
from gateway.routes import capabilities
from gateway.routes.openapi import document_bytes
from gateway.settings import settings_from_dict

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "gateway" / "openapi.json"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return json.loads(DOCUMENT.read_text())


def settings(**extra: Any) -> Any:
    return settings_from_dict({"nodes": [{"name": "a", "ae_title": "A", "host": "127.0.0.1", "port": 104}],
                               **extra})


def normalise(path: str) -> str:
    """``/studies/{study}`` and ``/studies/{study_uid:str}`` name the same path."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def mounted(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every endpoint, through Mounts. Starlette adds HEAD to every GET route
    implicitly; the document says so once (info.description) rather than per operation."""
    for route in routes:
        if isinstance(route, Mount):
            yield from mounted(list(route.routes), prefix + route.path)
        elif isinstance(route, Route):
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    yield method.lower(), normalise(prefix + route.path)
        else:
            raise AssertionError(f"unexpected route type {type(route).__name__} at {prefix}")


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, normalise(path)) for path, item in doc["paths"].items() for method in item
            if method in METHODS}


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


def resolve(doc: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        pointer = node["$ref"]
        assert pointer.startswith("#/"), pointer
        node = doc
        for part in pointer[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def schema_objects(doc: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every Schema Object of the document (parameters, media types, headers, components)."""
    def walk(node: Any, where: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "schema" and isinstance(value, dict):
                    yield f"{where}/schema", value
                else:
                    yield from walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from walk(value, f"{where}/{i}")
    yield from walk(doc["paths"], "#/paths")
    yield from walk({k: v for k, v in doc["components"].items() if k != "schemas"}, "#/components")
    for name, schema in doc["components"].get("schemas", {}).items():
        yield f"#/components/schemas/{name}", schema


# ---------------------------------------------------------------------- valid OpenAPI 3.1


def test_document_validates_against_the_openapi_3_1_meta_schema(doc):
    assert doc["openapi"].startswith("3.1.")
    validator = jsonschema.Draft202012Validator(OPENAPI_31)
    problems = [f"{e.json_path}: {e.message[:200]}" for e in validator.iter_errors(doc)]
    assert not problems, "\n".join(problems[:20])


def test_schema_objects_are_json_schema_2020_12(doc):
    for where, schema in schema_objects(doc):
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise AssertionError(f"{where}: {exc.message}") from None
        for pattern in re.findall(r'"pattern": ("(?:[^"\\]|\\.)*")', json.dumps(schema)):
            re.compile(json.loads(pattern))


def test_every_reference_resolves_and_every_component_is_used(doc):
    text = json.dumps(doc)
    refs = set(re.findall(r'"\$ref": "([^"]+)"', text))
    for ref in refs:
        resolve(doc, {"$ref": ref})
    for kind, items in doc["components"].items():
        if kind == "securitySchemes":
            continue
        unused = [name for name in items if f"#/components/{kind}/{name}" not in refs]
        assert not unused, f"components.{kind} never referenced: {unused}"


def test_path_parameters_match_the_templates_and_operation_ids_are_unique(doc):
    seen: set[str] = set()
    for path, method, op in operations(doc):
        params = [resolve(doc, p) for p in op.get("parameters", [])]
        keys = [(p["name"], p["in"]) for p in params]
        assert len(keys) == len(set(keys)), f"{method} {path}: a parameter is declared twice"
        in_path = {p["name"] for p in params if p["in"] == "path"}
        assert in_path == set(re.findall(r"\{([^}]+)\}", path)), f"{method} {path}"
        assert all(p.get("required") for p in params if p["in"] == "path"), f"{method} {path}"
        assert op["operationId"] not in seen, op["operationId"]
        seen.add(op["operationId"])


# ---------------------------------------------------------------------- in step with the app


def test_every_mounted_route_is_documented_and_every_documented_one_is_mounted(doc):
    served = set(mounted(list(create_app(settings()).routes)))
    described = documented(doc)
    assert served - described == set(), "mounted but not in gateway/openapi.json"
    assert described - served == set(), "in gateway/openapi.json but not mounted"


def test_every_dicomweb_operation_is_also_documented_for_one_node(doc):
    federated = {(m, p[len("/dicom-web"):]) for m, p in documented(doc) if p.startswith("/dicom-web")}
    one_node = {(m, p[len("/nodes/{}/dicom-web"):]) for m, p in documented(doc)
                if p.startswith("/nodes/{}/dicom-web")}
    assert federated == one_node


def test_the_wadl_resources_are_documented(doc):
    described = documented(doc)
    for path, methods in capabilities._RESOURCES:
        for method in methods:
            assert (method.lower(), normalise(f"/dicom-web/{path}")) in described, (method, path)


def test_every_error_status_is_documented(doc):
    """Each class of the error tree (gateway/errors.py) has its status among the documented
    responses, with the JSON error body."""
    documented_errors: dict[int, dict[str, Any]] = {}
    for _, _, op in operations(doc):
        for code, response in op["responses"].items():
            if code.isdigit() and int(code) >= 400:
                documented_errors[int(code)] = resolve(doc, response)
    for name, cls in errors._tree(errors.GatewayError).items():
        if cls is errors.CacheError:
            continue   # never rendered: logged where raised
        status = cls.status_code
        assert status in documented_errors, f"{name} ({status}) is not documented"
        media = documented_errors[status].get("content", {})
        assert resolve(doc, media["application/json"]["schema"]) == doc["components"]["schemas"]["Error"], name
    required = doc["components"]["schemas"]["Error"]["required"]
    assert set(required) == set(errors.GatewayError("x").to_json())


def test_error_body_schema_matches_what_the_error_tree_renders(doc):
    error_schema = doc["components"]["schemas"]["Error"]
    samples = [errors.BadRequest("bad").to_json(), errors.NodeUnreachable("down", node="n").to_json(),
               errors.DimseFailure("failed", node="n", status=0xC001).to_json()]
    for body in samples:
        jsonschema.validate(body, error_schema)


# ---------------------------------------------------------------------- served


def get(app: Any, path: str, **headers: str) -> httpx.Response:
    """One request through the ASGI app (no lifespan: the route needs no service)."""
    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get(path, headers=headers)
    return asyncio.run(call())


def test_the_document_is_served_as_shipped():
    r = get(create_app(settings()), "/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.content == document_bytes() == DOCUMENT.read_bytes()


def test_with_auth_on_the_document_needs_a_key():
    app = create_app(settings(auth={"mode": "api_key", "api_keys": ["k" * 32]}))
    denied = get(app, "/openapi.json")
    allowed = get(app, "/openapi.json", Authorization="Bearer " + "k" * 32)
    assert denied.status_code == 401 and denied.json()["error"] == "Unauthorized"
    assert allowed.status_code == 200 and allowed.json()["openapi"].startswith("3.1.")
