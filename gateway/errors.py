"""The gateway's one error tree, and its mapping to HTTP.

Every lower-layer failure (pynetdicom outcome, bad query, cache outage) is translated once, at
its boundary, into one of these; routes never look at raw DIMSE statuses::

    GatewayError                      500
    ├── InternalError                 500   a bug (logged with its traceback; the body says no more)
    ├── BadRequest                    400   malformed query / body
    │   └── TranslationError          400   query cannot be expressed as a C-FIND identifier
    ├── Unauthorized                  401   no or wrong credentials (with a WWW-Authenticate challenge)
    ├── Forbidden                     403   no grant for this node and operation
    ├── NotFound                      404
    ├── NotAcceptable                 406
    ├── PayloadTooLarge               413   a STOW-RS body past limits.max_stow_bytes / _parts
    ├── InsufficientStorage           507   the spool cannot hold an upload in progress
    ├── TooManyRequests               429   a client's concurrent requests past limits.max_requests_per_client
    ├── RequestHeadTooLarge           431   request line + headers past gateway.http.MAX_REQUEST_HEAD
    ├── ServiceBusy                   503   all requests past limits.max_requests_total
    ├── UnsupportedMediaType          415
    ├── PacsError                     502   (node named in the body)
    │   ├── NodeUnreachable           502   TCP connect / association refused
    │   ├── AssociationRejected       502
    │   ├── AssociationAborted        502
    │   ├── DimseFailure(status)      502   final failure status from the PACS
    │   └── DimseTimeout              504
    └── CacheError                    --    logged, never fatal (caught where raised)

The JSON body is ``{"error": <class name>, "detail": <text>, "node": <name or null>}``; it is made
only by :meth:`GatewayError.to_json` and rendered only by ``gateway.http.error_response``. The same
body is the wire format between replicas: :func:`from_json` turns it back into the same class.
"""

from __future__ import annotations


class GatewayError(Exception):
    status_code = 500

    def __init__(self, detail: str, *, node: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.node = node

    headers: dict[str, str] = {}

    def to_json(self) -> dict[str, object]:
        return {"error": type(self).__name__, "detail": self.detail, "node": self.node}


class InternalError(GatewayError):
    pass


class Unauthorized(GatewayError):
    """No or bad credentials. ``error``/``description`` go into the RFC 6750 §3 challenge."""

    status_code = 401

    def __init__(self, detail: str, *, error: str | None = None) -> None:
        super().__init__(detail)
        challenge = 'Bearer realm="dicomweb-gateway"'
        if error:
            escaped = detail.replace("\\", "").replace('"', "'")
            challenge += f', error="{error}", error_description="{escaped}"'
        self.headers = {"WWW-Authenticate": challenge}


class Forbidden(GatewayError):
    """Authenticated, but without the right for this node and operation (unknown nodes look the same)."""

    status_code = 403


class BadRequest(GatewayError):
    status_code = 400


class TranslationError(BadRequest):
    pass


class NotFound(GatewayError):
    status_code = 404


class NotAcceptable(GatewayError):
    status_code = 406


class PayloadTooLarge(GatewayError):
    status_code = 413


class InsufficientStorage(GatewayError):
    status_code = 507
    headers = {"Retry-After": "30"}


class TooManyRequests(GatewayError):
    status_code = 429
    headers = {"Retry-After": "1"}


class RequestHeadTooLarge(GatewayError):
    status_code = 431


class ServiceBusy(GatewayError):
    status_code = 503
    headers = {"Retry-After": "1"}


class UnsupportedMediaType(GatewayError):
    status_code = 415


class PacsError(GatewayError):
    status_code = 502


class NodeUnreachable(PacsError):
    pass


class AssociationRejected(PacsError):
    pass


class AssociationAborted(PacsError):
    pass


class DimseFailure(PacsError):
    def __init__(self, detail: str, *, node: str | None = None, status: int | None = None) -> None:
        super().__init__(detail, node=node)
        self.status = status

    def to_json(self) -> dict[str, object]:
        body = super().to_json()
        if self.status is not None:
            body["status"] = f"{self.status:04X}"
        return body


class ModelRefused(DimseFailure):
    """The PACS accepted the association but not the Q/R information model asked for: the C-FIND,
    C-GET or C-MOVE model of the root tried (Study Root to a Patient Root only PACS, or the reverse;
    C-GET to a PACS without it): the node's ``query_model`` or ``retrieve`` is wrong or not known yet
    (docs/architecture.md, "PACS profiles")."""


class DimseTimeout(PacsError):
    status_code = 504


class CacheError(GatewayError):
    pass


def _tree(cls: type[GatewayError]) -> dict[str, type[GatewayError]]:
    out = {cls.__name__: cls}
    for sub in cls.__subclasses__():
        out.update(_tree(sub))
    return out


def from_json(body: dict[str, object], default: type[GatewayError] = PacsError) -> GatewayError:
    """The error another replica reported with :meth:`GatewayError.to_json` (unknown names: ``default``)."""
    cls = _tree(GatewayError).get(str(body.get("error", "")), default)
    node = body.get("node")
    detail = str(body.get("detail") or "failed")
    if cls is DimseFailure:
        status = body.get("status")
        return DimseFailure(detail, node=str(node) if node else None,
                            status=int(str(status), 16) if status else None)
    return cls(detail, node=str(node) if node else None)
