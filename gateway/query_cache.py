"""The QIDO cache, two layers (docs/architecture.md, "Search" and "Cache").

* **Answers** (:class:`ResponseCache`): the whole QIDO-RS answer of one normalised request over
  its nodes, as the DICOM JSON bytes the route sends, with a placeholder where each RetrieveURL's
  base goes, plus the service's warnings. A repeated request costs one cache round trip (the
  generations and the value together, :meth:`cache.base.Cache.get_versioned`) and one byte
  substitution of the request's base: no Dataset is decoded or encoded. The key is the normalised
  request *after* parsing (level, match keys, includefield, limit/offset, path UIDs) plus every
  node's configuration, so anything that shapes the answer is in it, and what does not (unknown
  parameters, their order, ``fuzzymatching``) is not; the request's own parse warnings are added
  per request.
* **C-FIND results** (:class:`CachedFinder`): one entry per node and normalised identifier, so
  another page, another includefield or another request sharing a C-FIND (emulated counts, the
  Patient Root look-ups) still skips the PACS. Values are DICOM JSON (our encoder) with the
  truncation flag; anything that does not decode is a miss.

Keys carry the generations they were computed under (``cache.keys``): a STOW bumps them, so every
cached answer and result the new instances could change is skipped from then on (and expires by
TTL). No patient data in key names: digests only.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import orjson
from pydicom.dataset import Dataset

from cache import keys
from cache.base import Cache, VersionedKey
from gateway.instances import PLACEHOLDER
from gateway.pacs import FindResult, Pacs, QueryModel
from gateway.settings import PacsNode, Settings
from translators import qido as q
from translators import qido_results as qr
from translators.dicom_json import dataset_to_json, datasets_to_json_bytes
from translators.dicom_json_decode import dataset_from_json

log = logging.getLogger(__name__)

# Set per request by SearchService.search: True when the client sent Cache-Control: no-cache.
BYPASS: ContextVar[bool] = ContextVar("qido_cache_bypass", default=False)


def _normalise(ds: Dataset) -> list[object]:
    out: list[object] = []
    for elem in sorted(ds, key=lambda e: int(e.tag)):
        if elem.VR == "SQ":
            out.append([int(elem.tag), "SQ", [_normalise(item) for item in elem.value]])
        else:
            value = elem.value
            if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
                value = "\\".join(str(v) for v in value)
            out.append([int(elem.tag), elem.VR, "" if value is None else str(value)])
    return out


def identifier_digest(ds: Dataset, model: str, max_results: int | None) -> str:
    """What makes two C-FINDs the same: the normalised identifier, the query model and the cap."""
    payload = orjson.dumps([_normalise(ds), model, max_results])
    return hashlib.sha256(payload).hexdigest()


def single_study(ident: Dataset) -> str | None:
    """The identifier's one StudyInstanceUID (a UID list or universal matching: None)."""
    study = qr.text_value(ident, q.STUDY_UID)
    return study if study and "\\" not in study else None


@dataclass
class Lookups:
    """Served from the cache (a whole answer or one C-FIND's results) vs C-FINDs that went on to the
    PACS: ``dwg_cache_lookups_total{cache="qido"}``."""

    hits: int = 0
    misses: int = 0


class CachedFinder:
    def __init__(self, settings: Settings, pacs: Pacs, cache: Cache, lookups: Lookups | None = None) -> None:
        self.settings = settings
        self.pacs = pacs
        self.cache = cache
        self.lookups = lookups or Lookups()

    @property
    def hits(self) -> int:
        return self.lookups.hits

    @property
    def misses(self) -> int:
        return self.lookups.misses

    def _ttl(self, ident: Dataset) -> float:
        ttl = self.settings.cache.ttl
        level = str(ident.get("QueryRetrieveLevel", "STUDY"))
        return {"SERIES": ttl.series, "IMAGE": ttl.instance}.get(level, ttl.study)

    async def find(self, node: PacsNode, ident: Dataset, *, model: QueryModel | None = None,
                   max_results: int | None = None, use_cache: bool = True) -> FindResult:
        model = model or node.query_model
        # The key (with the generations) is read before the C-FIND: a STOW meanwhile files this
        # result under the old generation, where no later reader looks.
        key = keys.qido_result(node.name, single_study(ident), identifier_digest(ident, model, max_results))
        versioned = await self.cache.get_versioned(key)
        if use_cache and not BYPASS.get() and versioned.value is not None:
            result = _decode(node.name, versioned.value)
            if result is not None:
                self.lookups.hits += 1
                return result
        self.lookups.misses += 1
        result = await self.pacs.find(node, ident, model=model, max_results=max_results)
        if versioned.key is not None:
            await self.cache.set(versioned.key, _encode(result), self._ttl(ident))
        # The search decorates what it gets (RetrieveAETitle, RetrieveURL, computed counts), and a
        # coalesced result is shared with the flight's other callers (gateway/coalescing.py).
        return private_copy(result)


def private_copy(result: FindResult) -> FindResult:
    """A copy of ``result`` its caller may change: new data sets and elements (values are
    immutable or replaced wholesale; sequences are copied deeply)."""
    datasets = []
    for ds in result.datasets:
        own = Dataset()
        for elem in ds:
            own.add(copy.deepcopy(elem) if elem.VR == "SQ" else copy.copy(elem))
        datasets.append(own)
    return FindResult(result.node, datasets, result.truncated, list(result.warnings))


def _encode(result: FindResult) -> bytes:
    items = [dataset_to_json(ds, omit_pixel_data_without_uri=True) for ds in result.datasets]
    return orjson.dumps({"t": result.truncated, "d": items})


def _decode(node: str, data: bytes) -> FindResult | None:
    try:
        body = orjson.loads(data)
        datasets = [dataset_from_json(item) for item in body["d"]]
        return FindResult(node=node, datasets=datasets, truncated=bool(body["t"]))
    except Exception:  # noqa: BLE001 - corrupt or foreign values are misses, never errors
        log.warning("ignoring an undecodable cached query result")
        return None


# ---------------------------------------------------------------------------------- answers

BASE_PLACEHOLDER = PLACEHOLDER
"""The base URL the answer is computed against; each response puts its own base in its place."""

# Where a RetrieveURL (0008,1190) value starts in our encoder's output (translators.dicom_json:
# keys in order, "vr" before "Value"). Only this spot is substituted, so a PACS value that happens
# to contain the placeholder text stays as it is: inside a JSON string every '"' is escaped, so
# these bytes can only be the structure itself.
_URL_START = b'"%08X":{"vr":"UR","Value":["' % q.RETRIEVE_URL
_TEMPLATE_MARK = _URL_START + BASE_PLACEHOLDER.encode()
_FORMAT = b"qido-answer/1\n"    # a value written by another format is a miss


@dataclass(frozen=True)
class Answer:
    """A QIDO-RS answer ready to send: the DICOM JSON array (None: no match, 204) and the warnings."""

    body: bytes | None
    warnings: list[str]


@dataclass(frozen=True)
class AnswerTemplate:
    """An answer with :data:`BASE_PLACEHOLDER` where each RetrieveURL's base goes, and the service's
    warnings (the request's parse warnings are not part of it: they come with each request)."""

    body: bytes | None
    warnings: tuple[str, ...]
    substitutable: bool = True   # every placeholder sits at a RetrieveURL's start (see render)

    @classmethod
    def render(cls, datasets: Sequence[Dataset], warnings: Sequence[str]) -> AnswerTemplate:
        """Encode datasets whose RetrieveURLs were built against :data:`BASE_PLACEHOLDER`."""
        if not datasets:
            return cls(None, tuple(warnings))
        body = datasets_to_json_bytes(datasets)
        urls = sum(1 for ds in datasets if qr.text_value(ds, q.RETRIEVE_URL).startswith(BASE_PLACEHOLDER))
        # The encoder laid a RetrieveURL out differently than _URL_START expects: substitute the
        # plain placeholder for this request, never cache it.
        return cls(body, tuple(warnings), substitutable=body.count(_TEMPLATE_MARK) == urls)

    def answer(self, base_url: str, parse_warnings: Sequence[str] = ()) -> Answer:
        warnings = [*parse_warnings, *self.warnings]
        if self.body is None:
            return Answer(None, warnings)
        base = orjson.dumps(base_url)[1:-1]    # JSON-escaped, as the encoder would have written it
        if self.substitutable:
            return Answer(self.body.replace(_TEMPLATE_MARK, _URL_START + base), warnings)
        return Answer(self.body.replace(BASE_PLACEHOLDER.encode(), base), warnings)

    def encode(self) -> bytes:
        return _FORMAT + orjson.dumps(list(self.warnings)) + b"\n" + (self.body or b"")

    @classmethod
    def decode(cls, data: bytes) -> AnswerTemplate | None:
        if not data.startswith(_FORMAT):
            return None
        header, sep, body = data[len(_FORMAT):].partition(b"\n")
        try:
            warnings = orjson.loads(header)
        except orjson.JSONDecodeError:
            return None
        if not sep or not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
            return None
        return cls(body or None, tuple(warnings))


class ResponseCache:
    """Whole QIDO-RS answers, keyed by the normalised request and versioned by every node's
    generation (and the study's, for a request within one study)."""

    def __init__(self, settings: Settings, cache: Cache, lookups: Lookups) -> None:
        self.settings = settings
        self.cache = cache
        self.lookups = lookups
        ttl = settings.cache.ttl
        # An answer draws on C-FINDs of every level (fan-out, emulated counts): it is kept no longer
        # than the shortest of their TTLs.
        self.ttl = min(ttl.study, ttl.series, ttl.instance)
        self._fingerprints: dict[str, str] = {}

    def key(self, query: q.QidoQuery, nodes: Sequence[PacsNode]) -> VersionedKey:
        limits = self.settings.limits
        payload = orjson.dumps([
            query.level, query.relational, query.study_uid, query.series_uid,
            sorted((m.path, m.values) for m in query.matches),
            sorted(query.includefields), query.include_all,
            query.limit, query.offset, limits.query_cap, limits.max_emulation_queries,
            [self._fingerprint(node) for node in nodes],
        ])
        digest = hashlib.sha256(payload).hexdigest()
        return keys.qido_response([n.name for n in nodes], request_study(query), digest)

    def _fingerprint(self, node: PacsNode) -> str:
        """The node's whole configuration (quirks, cap, model, address) as a digest: replicas or
        restarts with another configuration never share answers."""
        found = self._fingerprints.get(node.name)
        if found is None:
            raw = orjson.dumps(dataclasses.asdict(node), default=str)
            found = self._fingerprints[node.name] = hashlib.sha256(raw).hexdigest()[:16]
        return found

    def hit(self, value: bytes | None) -> AnswerTemplate | None:
        if value is None:
            return None
        template = AnswerTemplate.decode(value)
        if template is None:
            log.warning("ignoring an undecodable cached QIDO answer")
            return None
        self.lookups.hits += 1
        return template

    async def store(self, key: str | None, template: AnswerTemplate) -> None:
        if key is not None and template.substitutable:
            await self.cache.set(key, template.encode(), self.ttl)


def request_study(query: q.QidoQuery) -> str | None:
    """The one study a request is scoped to (path, or a single StudyInstanceUID match), if any."""
    if query.study_uid:
        return query.study_uid
    match = query.match_value(q.STUDY_UID)
    return match.values[0] if match is not None and len(match.values) == 1 and match.values[0] else None
