"""Cached C-FIND results: one entry per node and normalised identifier (docs/architecture.md, "Search").

Key: ``qido:{node}:{node generation}.{study generation}:{sha256 of the normalised identifier}`` (no
patient data in key names). STOW bumps the node's generation (and the study's), so every cached
answer the new instances could change is skipped from then on and expires by TTL. Values are DICOM
JSON (our encoder) wrapped with the truncation flag; anything that does not decode is a miss.
"""

from __future__ import annotations

import hashlib
import logging
from contextvars import ContextVar

import orjson
from pydicom.dataset import Dataset

from cache import keys
from cache.base import Cache
from gateway.pacs import FindResult, Pacs, QueryModel
from gateway.settings import PacsNode, Settings
from translators.dicom_json import dataset_to_json
from translators.dicom_json_decode import dataset_from_json
from translators.uids import StudyId

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
    payload = orjson.dumps([_normalise(ds), model, max_results])
    return hashlib.sha256(payload).hexdigest()


class CachedFinder:
    def __init__(self, settings: Settings, pacs: Pacs, cache: Cache) -> None:
        self.settings = settings
        self.pacs = pacs
        self.cache = cache
        self.hits = 0
        self.misses = 0

    def _ttl(self, ident: Dataset) -> float:
        ttl = self.settings.cache.ttl
        level = str(ident.get("QueryRetrieveLevel", "STUDY"))
        return {"SERIES": ttl.series, "IMAGE": ttl.instance}.get(level, ttl.study)

    async def _key(self, node: PacsNode, ident: Dataset, model: str, max_results: int | None) -> str:
        gen = await self.cache.get_int(keys.node_generation(node.name))
        study = str(ident.get("StudyInstanceUID", "") or "")
        study_gen = 0
        if study and "\\" not in study:
            study_gen = await self.cache.get_int(keys.study_generation(StudyId(node.name, study)))
        return keys.qido_result(node.name, f"{gen}.{study_gen}", identifier_digest(ident, model, max_results))

    async def find(self, node: PacsNode, ident: Dataset, *, model: QueryModel | None = None,
                   max_results: int | None = None, use_cache: bool = True) -> FindResult:
        model = model or node.query_model
        cache_key = await self._key(node, ident, model, max_results)
        if use_cache and not BYPASS.get():
            cached = await self.cache.get(cache_key)
            if cached is not None:
                result = _decode(node.name, cached)
                if result is not None:
                    self.hits += 1
                    return result
        self.misses += 1
        result = await self.pacs.find(node, ident, model=model, max_results=max_results)
        await self.cache.set(cache_key, _encode(result), self._ttl(ident))
        return result


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
