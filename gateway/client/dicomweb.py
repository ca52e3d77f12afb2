"""Find a series by what a researcher knows, and pull it, through any DICOMweb root.

Only QIDO-RS and WADO-RS as PS3.18 defines them are used, over :mod:`httpx`, so the root can be
this gateway (``http://127.0.0.1:8080/dicom-web``), Orthanc's DICOMweb plugin, dcm4chee, a cloud
DICOM store, ...

>>> from gateway.client import find_series, pull_series
>>> root = "http://127.0.0.1:8080/dicom-web"
>>> [match] = find_series(root, patient_id="DGW0001", study_date="20230314",
...                       series_description="thorax*")                      # doctest: +SKIP
>>> datasets = pull_series(root, match.study_uid, match.series_uid,
...                        out_dir="thorax", progress=print)                  # doctest: +SKIP

Authentication or proxies: pass your own ``httpx.Client`` (``client=httpx.Client(headers=
{"Authorization": "Bearer ..."})``); it is used as is and not closed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset

from translators import multipart as mp

log = logging.getLogger(__name__)

__all__ = [
    "AmbiguousSeriesError",
    "DicomwebError",
    "NoSeriesFoundError",
    "Progress",
    "SeriesMatch",
    "find_series",
    "pull_series",
    "select_one",
]

DEFAULT_TIMEOUT = httpx.Timeout(30.0, read=300.0)
"""Connect/write/pool 30 s; a read may wait 300 s (a PACS behind a gateway can be slow to start)."""

QIDO_PAGE = 1000
DICOM_JSON = "application/dicom+json"
DICOM = "application/dicom"

Progress = Callable[[int, int | None], None]
"""``progress(received, expected)`` after each instance; ``expected`` is None when unknown."""

# DICOM JSON tags (PS3.18 Annex F keys).
_PATIENT_ID = "00100020"
_STUDY_UID = "0020000D"
_STUDY_DATE = "00080020"
_STUDY_TIME = "00080030"
_STUDY_DESCRIPTION = "00081030"
_ACCESSION = "00080050"
_SERIES_UID = "0020000E"
_SERIES_NUMBER = "00200011"
_SERIES_DESCRIPTION = "0008103E"
_MODALITY = "00080060"
_SERIES_INSTANCES = "00201209"

_STUDY_FIELDS = ",".join((_STUDY_DESCRIPTION, _ACCESSION, _STUDY_DATE, _STUDY_TIME))
_SERIES_FIELDS = ",".join((_SERIES_DESCRIPTION, _SERIES_NUMBER, _MODALITY, _SERIES_INSTANCES))


class DicomwebError(RuntimeError):
    """A DICOMweb request failed, or its answer is not what PS3.18 says it should be."""

    def __init__(self, message: str, *, status: int | None = None, url: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.url = url


class NoSeriesFoundError(LookupError):
    """No series matched the search; ``criteria`` says what was searched for."""

    def __init__(self, criteria: Mapping[str, str | None]) -> None:
        shown = ", ".join(f"{k}={v!r}" for k, v in criteria.items() if v is not None)
        super().__init__(f"no series matches {shown}")
        self.criteria = dict(criteria)


class AmbiguousSeriesError(LookupError):
    """Several series matched; ``candidates`` lists them (see :meth:`SeriesMatch.describe`)."""

    def __init__(self, candidates: list[SeriesMatch]) -> None:
        lines = "\n".join(f"  {c.describe()}" for c in candidates)
        super().__init__(f"{len(candidates)} series match; narrow the search:\n{lines}")
        self.candidates = list(candidates)


@dataclass(frozen=True)
class SeriesMatch:
    """One series found by :func:`find_series` (no patient name: only what identifies the series)."""

    study_uid: str
    series_uid: str
    patient_id: str
    study_date: str
    study_time: str
    study_description: str
    accession_number: str
    series_number: int | None
    series_description: str
    modality: str
    num_instances: int | None

    def describe(self) -> str:
        """One line for listing candidates: date, series number, description, modality, instances."""
        number = "?" if self.series_number is None else str(self.series_number)
        count = "?" if self.num_instances is None else str(self.num_instances)
        study = f" [{self.study_description}]" if self.study_description else ""
        return (f"study date {self.study_date or '?'}{study}  series {number}: "
                f"{self.series_description or '(no description)'!s}  {self.modality or '?'}  "
                f"{count} instances  (series UID {self.series_uid})")


# ------------------------------------------------------------------------------------------ helpers


def _value(item: Mapping[str, Any], tag: str) -> Any:
    element = item.get(tag) or {}
    values = element.get("Value") or []
    return values[0] if values else None


def _text(item: Mapping[str, Any], tag: str) -> str:
    value = _value(item, tag)
    if value is None:
        return ""
    if isinstance(value, dict):  # PN
        return str(value.get("Alphabetic", ""))
    return str(value)


def _int(item: Mapping[str, Any], tag: str) -> int | None:
    value = _value(item, tag)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def normalize_study_date(value: str | date) -> str:
    """``date``, ``YYYY-MM-DD`` or ``YYYYMMDD`` -> ``YYYYMMDD``; DICOM ranges (``A-B``) pass through."""
    if isinstance(value, date):
        return value.strftime("%Y%m%d")
    text = value.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return text.replace("-", "")
    if re.fullmatch(r"\d{4}\.\d{2}\.\d{2}", text):  # ACR-NEMA style, still seen in exports
        return text.replace(".", "")
    return text


def description_matcher(pattern: str) -> Callable[[str], bool]:
    """Case-insensitive match of a whole description; ``*`` any run of characters, ``?`` one.

    Surrounding whitespace is ignored on both sides (LO values are often space-padded).
    """
    regex = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern.strip())
    compiled = re.compile(regex, re.IGNORECASE | re.DOTALL)
    return lambda text: compiled.fullmatch(text.strip()) is not None


@contextmanager
def _http(client: httpx.Client | None) -> Iterator[httpx.Client]:
    if client is not None:
        yield client
        return
    with httpx.Client(timeout=DEFAULT_TIMEOUT, follow_redirects=True) as own:
        yield own


def _error(response: httpx.Response, what: str) -> DicomwebError:
    try:
        detail = response.read()[:500].decode("utf-8", "replace").strip()
    except httpx.HTTPError:
        detail = ""
    message = f"{what}: HTTP {response.status_code} from {response.request.url}"
    return DicomwebError(message + (f": {detail}" if detail else ""), status=response.status_code,
                         url=str(response.request.url))


def _qido(client: httpx.Client, url: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every result of a QIDO-RS search, page by page (``limit``/``offset``) until a short page."""
    results: list[dict[str, Any]] = []
    seen: set[str] = set()
    offset = 0
    while True:
        query = {**params, "limit": str(QIDO_PAGE), "offset": str(offset)}
        response = client.get(url, params=query, headers={"Accept": DICOM_JSON})
        if response.status_code == 204:
            break
        if response.status_code != 200:
            raise _error(response, "QIDO-RS search failed")
        try:
            page = response.json()
        except ValueError as exc:
            raise DicomwebError(f"QIDO-RS answer from {response.request.url} is not JSON: {exc}",
                                url=str(response.request.url)) from exc
        if not isinstance(page, list):
            raise DicomwebError(f"QIDO-RS answer from {response.request.url} is not a JSON array",
                                url=str(response.request.url))
        fresh = []
        for item in page:
            key = repr(sorted((k, repr(v)) for k, v in item.items()))
            if key not in seen:  # a server ignoring offset would loop forever otherwise
                seen.add(key)
                fresh.append(item)
        results.extend(fresh)
        if len(page) < QIDO_PAGE or not fresh:
            break
        offset += len(page)
    return results


# --------------------------------------------------------------------------------------- find_series


def find_series(
    root: str,
    *,
    patient_id: str | None,
    study_date: str | date | None,
    series_description: str,
    client: httpx.Client | None = None,
) -> list[SeriesMatch]:
    """Series of the patient's studies on that date whose description matches.

    QIDO-RS ``/studies?PatientID=&StudyDate=``, then ``/studies/{uid}/series`` of each study; the
    description is matched here, case-insensitively, with ``*`` and ``?`` wildcards (``"thorax*"``,
    ``"*B30f"``, ``"*"`` for every series), because PACS disagree on case sensitivity. ``study_date``
    takes ``YYYYMMDD``, ``YYYY-MM-DD``, a :class:`datetime.date` or a DICOM range (``20230101-20230331``);
    ``None`` leaves a key out of the study search.

    Returns the matches sorted by study date/time, then series number; raises :class:`DicomwebError`
    when a search fails.

    >>> matches = find_series("http://127.0.0.1:8080/dicom-web", patient_id="DGW0001",
    ...                       study_date="2023-03-14", series_description="thorax*")  # doctest: +SKIP
    >>> [m.describe() for m in matches]                                               # doctest: +SKIP
    ['study date 20230314 [CT CHEST W/O CONTRAST]  series 2: Thorax 2.5mm B30f  CT  24 instances  (...)']
    """
    root = root.rstrip("/")
    study_params: dict[str, str] = {"includefield": _STUDY_FIELDS}
    if patient_id is not None:
        study_params["PatientID"] = patient_id
    if study_date is not None:
        study_params["StudyDate"] = normalize_study_date(study_date)
    matches = description_matcher(series_description)
    found: list[SeriesMatch] = []
    with _http(client) as http:
        studies = _qido(http, f"{root}/studies", study_params)
        for study in studies:
            study_uid = _text(study, _STUDY_UID)
            if not study_uid:
                continue
            series = _qido(http, f"{root}/studies/{study_uid}/series", {"includefield": _SERIES_FIELDS})
            for item in series:
                description = _text(item, _SERIES_DESCRIPTION)
                if not matches(description):
                    continue
                found.append(SeriesMatch(
                    study_uid=study_uid,
                    series_uid=_text(item, _SERIES_UID),
                    patient_id=_text(study, _PATIENT_ID),
                    study_date=_text(study, _STUDY_DATE),
                    study_time=_text(study, _STUDY_TIME),
                    study_description=_text(study, _STUDY_DESCRIPTION),
                    accession_number=_text(study, _ACCESSION),
                    series_number=_int(item, _SERIES_NUMBER),
                    series_description=description.strip(),
                    modality=_text(item, _MODALITY),
                    num_instances=_int(item, _SERIES_INSTANCES),
                ))
    found.sort(key=lambda m: (m.study_date, m.study_time, m.study_uid,
                              m.series_number if m.series_number is not None else 1 << 31, m.series_uid))
    return found


def select_one(matches: list[SeriesMatch], criteria: Mapping[str, str | None]) -> SeriesMatch:
    """The only match; :class:`NoSeriesFoundError` or :class:`AmbiguousSeriesError` otherwise."""
    if not matches:
        raise NoSeriesFoundError(criteria)
    if len(matches) > 1:
        raise AmbiguousSeriesError(matches)
    return matches[0]


# --------------------------------------------------------------------------------------- pull_series


def _count_instances(client: httpx.Client, root: str, study_uid: str, series_uid: str) -> int | None:
    """NumberOfSeriesRelatedInstances from a series search, or None if the server will not say."""
    try:
        items = _qido(client, f"{root}/studies/{study_uid}/series",
                      {"SeriesInstanceUID": series_uid, "includefield": _SERIES_INSTANCES})
    except (DicomwebError, httpx.HTTPError) as exc:
        log.debug("instance count unavailable: %s", exc)
        return None
    for item in items:
        if _text(item, _SERIES_UID) == series_uid:
            return _int(item, _SERIES_INSTANCES)
    return None


class _PartWriter:
    """Collects the parts of the multipart body one at a time and turns each into a Dataset."""

    def __init__(self, out_dir: Path | None, on_instance: Callable[[Dataset], None]) -> None:
        self.out_dir = out_dir
        self.on_instance = on_instance
        self._part: bytearray | None = None
        self._headers: dict[str, str] = {}
        self.truncated: mp.Truncated | None = None
        self.count = 0

    def apply(self, events: list[mp.Event]) -> None:
        for event in events:
            if isinstance(event, mp.PartStart):
                self._part, self._headers = bytearray(), event.headers
            elif isinstance(event, mp.PartData):
                if self._part is not None:
                    self._part += event.data
            elif isinstance(event, mp.PartEnd):
                if self._part is not None:
                    self.instance(bytes(self._part), self._headers.get("content-type", ""))
                self._part = None
            else:
                self.truncated = event

    def instance(self, raw: bytes, content_type: str) -> None:
        media = mp.parse_media_type(content_type)[0] if content_type else DICOM
        if media != DICOM:
            raise DicomwebError(f"a part of the series retrieve is {media!r}, not {DICOM}")
        try:
            ds = dcmread(BytesIO(raw), force=True)
        except Exception as exc:  # pydicom raises a zoo of exception types on garbage
            raise DicomwebError(f"a part of the series retrieve is not a DICOM instance: {exc}") from exc
        if "SOPInstanceUID" not in ds:
            raise DicomwebError("a part of the series retrieve has no SOP Instance UID")
        if self.out_dir is not None:
            name = re.sub(r"[^0-9A-Za-z.]", "_", str(ds.SOPInstanceUID)) + ".dcm"
            target = self.out_dir / name
            tmp = target.with_name(f".{name}.part")
            tmp.write_bytes(raw)  # the bytes as received: no re-encoding
            os.replace(tmp, target)
            ds.filename = str(target)
        self.count += 1
        self.on_instance(ds)


def _accept(transfer_syntax: str | None) -> str:
    value = f'multipart/related; type="{DICOM}"'
    return value + (f"; transfer-syntax={transfer_syntax}" if transfer_syntax else "")


def pull_series(
    root: str,
    study_uid: str,
    series_uid: str,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    expected: int | None = None,
    transfer_syntax: str | None = "*",
    client: httpx.Client | None = None,
) -> list[Dataset]:
    """Every instance of a series, by one WADO-RS series retrieve, parsed while it streams in.

    The response (``multipart/related; type="application/dicom"``) is decoded part by part as bytes
    arrive: each instance is parsed (and written, and reported) as soon as its part ends, and only that
    one part is buffered, never the whole body. With ``out_dir`` each instance is also written there as
    received (``<SOPInstanceUID>.dcm``, PS3.10 bytes unchanged); the directory is created.
    ``progress(received, expected)`` is called with 0 before the request and after each instance;
    ``expected`` comes from the argument, else from a series search (NumberOfSeriesRelatedInstances),
    else is None.

    ``transfer_syntax="*"`` (default) asks for the stored encoding (no transcoding on the server; pydicom
    decodes RLE/JPEG/JPEG-LS/JPEG 2000 locally); a server answering ``406`` is asked again without a
    transfer syntax. ``None`` asks for the server's default (Explicit VR Little Endian for lossless data).

    Returns the datasets in the order received (use :func:`gateway.client.load_volume` to sort them
    by position). Raises :class:`DicomwebError` on an HTTP error, a body that ends before its close
    delimiter (the gateway cuts a stream when the PACS fails mid-way) or a part that is not DICOM.

    >>> datasets = pull_series("http://127.0.0.1:8080/dicom-web", study_uid, series_uid,
    ...                        out_dir="thorax",
    ...                        progress=lambda n, total: print(n, "/", total))   # doctest: +SKIP
    """
    root = root.rstrip("/")
    target = Path(out_dir) if out_dir is not None else None
    if target is not None:
        target.mkdir(parents=True, exist_ok=True)
    url = f"{root}/studies/{study_uid}/series/{series_uid}"
    datasets: list[Dataset] = []
    with _http(client) as http:
        total = expected
        if total is None and progress is not None:
            total = _count_instances(http, root, study_uid, series_uid)

        def on_instance(ds: Dataset) -> None:
            datasets.append(ds)
            if progress is not None:
                progress(len(datasets), total)

        if progress is not None:
            progress(0, total)
        syntaxes = [transfer_syntax] if transfer_syntax is None else [transfer_syntax, None]
        for attempt, syntax in enumerate(syntaxes):
            with http.stream("GET", url, headers={"Accept": _accept(syntax)}) as response:
                if response.status_code == 406 and attempt + 1 < len(syntaxes):
                    log.info("%s refused transfer-syntax=%s (406); asking for its default", url, syntax)
                    continue
                if response.status_code == 204:
                    return datasets
                if response.status_code != 200:
                    raise _error(response, "WADO-RS series retrieve failed")
                _read_body(response, _PartWriter(target, on_instance))
                break
    if total is not None and len(datasets) != total:
        log.warning("series %s: received %d instances, the server counted %d", series_uid,
                    len(datasets), total)
    return datasets


def _read_body(response: httpx.Response, writer: _PartWriter) -> None:
    content_type = response.headers.get("content-type", "")
    media, _ = mp.parse_media_type(content_type)
    if media == DICOM:  # single-part answer (allowed for one instance; tolerated for a series)
        writer.instance(response.read(), content_type)
        return
    if media != "multipart/related":
        raise DicomwebError(f"WADO-RS series retrieve answered {content_type!r}, not multipart/related",
                            url=str(response.request.url))
    try:
        decoder = mp.MultipartDecoder(mp.boundary_from_content_type(content_type))
        for chunk in response.iter_bytes():
            writer.apply(decoder.feed(chunk))
        writer.apply(decoder.close())
    except mp.MultipartError as exc:
        raise DicomwebError(f"WADO-RS series retrieve: malformed multipart body: {exc}",
                            url=str(response.request.url)) from exc
    except httpx.HTTPError as exc:
        raise DicomwebError(f"WADO-RS series retrieve: the connection failed after {writer.count} "
                            f"instances ({exc}): the series is incomplete",
                            url=str(response.request.url)) from exc
    if writer.truncated is not None:
        raise DicomwebError(f"WADO-RS series retrieve: {writer.truncated.reason} (the server cut the "
                            f"stream: the series is incomplete)", url=str(response.request.url))
