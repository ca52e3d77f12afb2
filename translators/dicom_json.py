"""pydicom ``Dataset`` -> DICOM JSON Model (PS3.18 Annex F).

The encoder builds plain ``dict``/``list``/``str``/``int``/``float`` trees directly from the
data elements and serialises them with orjson. pydicom's own ``Dataset.to_json_dict`` is not
used: it does not sort keys (F.2.2), writes ``""`` where F.2.5 wants ``null``, raises on a
multi-valued PN containing an empty value, and is slow.

Character sets: all text comes out as Unicode, whatever the source's (0008,0005).
- Elements pydicom has already converted carry decoded ``str``/``PersonName`` values.
- Raw elements (``dcmread`` output not yet accessed, pynetdicom's C-FIND identifiers) of text
  and numeric VRs are decoded here, straight from their bytes, with the character set the
  dataset was read with (``Dataset.original_character_set``; sequence items inherit it),
  and are left raw in the dataset. Decoding follows pydicom's rules, except that ISO 2022
  code extensions are also reset at ``\\`` (and ``^``/``=`` in PN) as PS3.5 6.1.2.5.3
  requires. Other raw elements (sequences, binary, AT, implicit VR private) go through
  ``ds[tag]``, i.e. pydicom's conversion.
- Text values held as ``bytes`` are decoded with the nearest (0008,0005).

Nothing here does I/O, except that pydicom may read a *deferred* element from its file when
the element is accessed.
"""

from __future__ import annotations

import base64
import math
import struct
from array import array
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

import orjson
from pydicom import config
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.multival import MultiValue
from pydicom.valuerep import AMBIGUOUS_VR, TEXT_VR_DELIMS, PersonName

__all__ = [
    "BulkDataUriFn",
    "dataset_to_json",
    "datasets_to_json_bytes",
    "decode_text_value",
    "json_bytes",
]

BulkDataUriFn = Callable[[tuple[int, ...], DataElement], str | None]
"""Called with the tag path of a bulk element and the element; returns a BulkDataURI or None.

The path alternates tags and 0-based item indexes and ends with the element's own tag:
``(0x7FE00010,)`` at top level, ``(0x00540016, 0, 0x00281201)`` inside the first item of a
sequence.
"""

_FAST_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR", "DS", "IS"})
_FAST_CHARSET_VRS = frozenset({"SH", "LO", "UC", "ST", "LT", "UT", "PN"})
_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
_SINGLE_VALUED_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_INT_VRS = frozenset({"SL", "SS", "UL", "US", "SV", "UV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
_STRUCT_FORMATS = {"SL": "l", "SS": "h", "UL": "L", "US": "H", "SV": "q", "UV": "Q", "FL": "f", "FD": "d"}
_WORD_SIZES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_ARRAY_CODES = {array(code).itemsize: code for code in ("Q", "L", "I", "H")}  # size -> typecode
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
# Delimiters at which ISO 2022 code extensions revert to the first character set (PS3.5 6.1.2.5.3)
_TEXT_DELIMS = set(TEXT_VR_DELIMS)
_MULTI_TEXT_DELIMS = _TEXT_DELIMS | {0x5C}
_PN_DELIMS = _MULTI_TEXT_DELIMS | {0x3D, 0x5E}
_PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_SPECIFIC_CHARACTER_SET = 0x00080005
_MAX_EXACT_INT = 2**53


class _Options:
    """The keyword options of one encoding run, bundled to keep the recursion's signature short."""

    __slots__ = ("bulk_data_uri", "inline_threshold", "exclude_group_0002", "omit_pixel_data")

    def __init__(
        self,
        bulk_data_uri: BulkDataUriFn | None,
        inline_threshold: int,
        exclude_group_0002: bool,
        omit_pixel_data: bool,
    ) -> None:
        self.bulk_data_uri = bulk_data_uri
        self.inline_threshold = inline_threshold
        self.exclude_group_0002 = exclude_group_0002
        self.omit_pixel_data = omit_pixel_data


# ---------------------------------------------------------------------------------------------
# Public API


def dataset_to_json(
    ds: Dataset,
    *,
    bulk_data_uri: BulkDataUriFn | None = None,
    inline_threshold: int = 4096,
    exclude_group_0002: bool = True,
    omit_pixel_data_without_uri: bool = True,
) -> dict[str, Any]:
    """Encode one dataset as a DICOM JSON object (PS3.18 F.2.2-F.2.7).

    - Keys are 8-digit uppercase hex tags in ascending order (F.2.2); group length elements
      (gggg,0000) are left out, and so is group 0002 unless ``exclude_group_0002`` is False.
    - Each attribute has ``"vr"`` and at most one of ``Value``/``BulkDataURI``/``InlineBinary``
      (F.2.2); value types per Table F.2.3-1; empty elements are ``{"vr": ..}`` and empty
      values within a multi-valued attribute are ``null`` (F.2.5); PN per F.2.4.
    - OB/OD/OF/OL/OV/OW/UN (F.2.7): ``InlineBinary`` (little endian) up to ``inline_threshold``
      bytes, above it ``BulkDataURI`` from ``bulk_data_uri``; when the callback is missing or
      returns None the value is inlined anyway. Pixel Data, Float and Double Float Pixel Data
      are never inlined while ``omit_pixel_data_without_uri`` is True: without a URI they are
      left out of the object.
    - DS/IS are numbers (DS as int when integral); a value that is not a valid finite number
      is kept as its string. FL/FD NaN and infinities, which JSON cannot represent, become null.
    """
    options = _Options(bulk_data_uri, inline_threshold, exclude_group_0002, omit_pixel_data_without_uri)
    return _encode_dataset(ds, options, (), [ds])


def datasets_to_json_bytes(
    datasets: Iterable[Dataset],
    *,
    bulk_data_uri: BulkDataUriFn | None = None,
    inline_threshold: int = 4096,
    exclude_group_0002: bool = True,
    omit_pixel_data_without_uri: bool = True,
) -> bytes:
    """Encode datasets as one UTF-8 JSON array of dataset objects (PS3.18 F.2.1).

    Options are those of :func:`dataset_to_json`.
    """
    options = _Options(bulk_data_uri, inline_threshold, exclude_group_0002, omit_pixel_data_without_uri)
    return orjson.dumps([_encode_dataset(ds, options, (), [ds]) for ds in datasets])


def json_bytes(obj: Any) -> bytes:
    """Serialise already-built DICOM JSON (e.g. a list of dataset objects) as UTF-8 (F.2.1)."""
    return orjson.dumps(obj)


def decode_text_value(raw: bytes, vr: str, charsets: list[str]) -> str:
    """Decode the raw value field of a text element to Unicode (PS3.18 F.2.1, PS3.5 6.1).

    ``charsets`` are the Defined Terms of (0008,0005), e.g. ``["", "ISO 2022 IR 87"]``; empty
    means the default repertoire. ISO 2022 code extensions are reset to the first character set
    at every delimiter (PS3.5 6.1.2.5.3): CR, LF, TAB, FF, and for multi-valued VRs ``\\``,
    for PN also ``^`` and ``=``. Values stay ``\\``-joined; padding (spaces, NULs) is removed
    from the end of each value (of the whole value for PN, as pydicom does).
    """
    text = _decode(raw, vr, convert_encodings(list(charsets) or None))
    if vr in _SINGLE_VALUED_TEXT_VRS or vr == "PN":
        return text.rstrip("\x00 ")
    return "\\".join(v.rstrip("\x00 ") for v in text.split("\\"))


# ---------------------------------------------------------------------------------------------
# Datasets and elements


def _encode_dataset(
    ds: Dataset, options: _Options, prefix: tuple[int, ...], ancestors: list[Dataset]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # Raw elements are decoded here without pydicom's conversion unless a reading callback is set.
    fast = config.data_element_callback is None
    encodings: list[str] | None = None
    for tag, stored in sorted(ds.items(), key=_int_key):
        if not tag & 0xFFFF:  # group length (gggg,0000)
            continue
        group = tag >> 16
        if (group == 0x0002 and options.exclude_group_0002) or group == 0xFFFE:
            continue
        attr: dict[str, Any] | None = None
        if isinstance(stored, RawDataElement):
            if fast and (stored.value is not None or not stored.length):  # not a deferred read
                if encodings is None:
                    encodings = _read_encodings(ds, ancestors)
                attr = _encode_raw_fast(stored, encodings)
            if attr is None:
                elem = _element(ds, tag)
                if isinstance(elem, RawDataElement):
                    attr = _encode_raw(elem, ancestors)
                else:
                    attr = _encode_element(elem, options, prefix, ancestors)
        else:
            attr = _encode_element(stored, options, prefix, ancestors)
        if attr is not None:
            out[f"{tag:08X}"] = attr
    return out


def _int_key(item: tuple[int, object]) -> int:
    return int(item[0])  # BaseTag's own __lt__ is a slow Python method


def _element(ds: Dataset, tag: int) -> DataElement | RawDataElement:
    """Return the converted element, falling back to whatever is stored if conversion fails.

    ``ds[tag]`` converts a raw element (decoding text with the dataset's character set) and
    corrects an ambiguous VR; either can raise on malformed data. The fallback is the stored
    element: converted but still ambiguous, or raw if the conversion itself failed.
    """
    try:
        return ds[tag]
    except Exception:
        stored = ds.get_item(tag)
        if stored is None:
            raise
        if isinstance(stored, RawDataElement) and stored.value is None and stored.length:
            raise  # a deferred read that failed: an I/O problem, not a data problem
        return stored


def _encode_element(
    elem: DataElement, options: _Options, prefix: tuple[int, ...], ancestors: list[Dataset]
) -> dict[str, Any] | None:
    vr = str(elem.VR)
    value = elem.value
    if isinstance(value, str) and vr in _STRING_VRS:  # the common case, kept short
        return {"vr": vr, "Value": [str(value)]} if value else {"vr": vr}  # str(): UID is a subclass
    if vr in AMBIGUOUS_VR:
        elem = _resolve_ambiguous(elem, ancestors)
        vr, value = str(elem.VR), elem.value

    if vr == "SQ":
        items = value or ()
        if not items:
            return {"vr": "SQ"}
        seq_prefix = (*prefix, elem.tag)
        return {
            "vr": "SQ",
            "Value": [
                _encode_dataset(item, options, (*seq_prefix, i), [item, *ancestors])
                for i, item in enumerate(items)
            ],
        }
    if vr in _BINARY_VRS:
        return _encode_binary(elem, vr, value, options, prefix, ancestors[0])

    values = _as_list(value)
    if not values:
        return {"vr": vr}
    if vr in _STRING_VRS:
        encoded: list[Any] = _string_values(values, vr, ancestors)
    elif vr == "PN":
        encoded = [_pn_value(v, ancestors) for v in values]
    elif vr == "DS":
        encoded = [_ds_value(v) for v in values]
    elif vr == "IS":
        encoded = [_is_value(v) for v in values]
    elif vr in _INT_VRS or vr in _FLOAT_VRS:
        encoded = _number_values(values, vr, ancestors[0])
    elif vr == "AT":
        encoded = [_at_value(v) for v in values]
    else:  # not a VR we know: keep its text rather than fail
        encoded = _string_values(values, vr, ancestors)
    if len(encoded) == 1 and encoded[0] is None:
        return {"vr": vr}
    return {"vr": vr, "Value": encoded}


def _encode_raw(raw: RawDataElement, ancestors: list[Dataset]) -> dict[str, Any]:
    """Last resort for an element pydicom could not convert: text VRs are decoded here, any
    other value is passed on as UN bytes."""
    vr = str(raw.VR) if raw.VR else "UN"
    data = raw.value or b""
    if not data:
        return {"vr": vr}
    if vr in _STRING_VRS or vr in ("PN", "DS", "IS"):
        text = decode_text_value(data, vr, _charsets(ancestors))
        parts = [text] if vr in _SINGLE_VALUED_TEXT_VRS else text.split("\\")
        if vr == "PN":
            return {"vr": vr, "Value": [_pn_value(p, ancestors) for p in parts]}
        conv = _ds_value if vr == "DS" else _is_value if vr == "IS" else _str_or_none
        return {"vr": vr, "Value": [conv(p) for p in parts]}
    return {"vr": "UN", "InlineBinary": base64.b64encode(data).decode("ascii")}


def _encode_raw_fast(raw: RawDataElement, encodings: list[str]) -> dict[str, Any] | None:
    """Encode a raw (undecoded) text or numeric element straight from its bytes, or return None
    to leave the element to pydicom (sequences, binary, AT, private or UN elements, ...).

    Mirrors pydicom's ``convert_raw_data_element`` for these VRs (same decoding and padding
    rules, see ``pydicom.values``) but skips building pydicom value objects, which dominates
    the cost of encoding C-FIND responses. Values are not validated.
    """
    vr = raw.VR
    tag = raw.tag
    if vr is None:
        if tag >> 16 & 1:  # implicit VR private element: needs its private creator
            return None
        vr = _dictionary_vr(tag)
        if vr is None:
            return None
    value = raw.value or b""
    if vr in _FAST_ASCII_VRS:
        if not value:
            return {"vr": vr}
        text = value.decode("latin-1")
        if vr == "AE":
            parts = [v.strip() for v in text.split("\\")]
        elif vr == "UR":
            parts = [text.rstrip()]
        elif vr == "DS" or vr == "IS":
            parts = text.strip().rstrip(" \x00").split("\\")
        else:
            parts = text.rstrip(" \x00").split("\\")
    elif vr in _FAST_CHARSET_VRS:
        if not value:
            return {"vr": vr}
        text = _decode(value, vr, encodings)
        if vr in _SINGLE_VALUED_TEXT_VRS:
            parts = [text.rstrip("\x00 ")]
        elif vr == "PN":
            parts = text.split("\\")
        else:
            parts = [v.rstrip("\x00 ") for v in text.split("\\")]
    elif vr in _STRUCT_FORMATS:
        if not value:
            return {"vr": vr}
        fmt = _STRUCT_FORMATS[vr]
        size = struct.calcsize("<" + fmt)
        if len(value) % size:
            return None
        endian = "<" if raw.is_little_endian else ">"
        return {"vr": vr, "Value": list(struct.unpack(f"{endian}{len(value) // size}{fmt}", value))}
    else:
        return None

    encoded: list[Any]
    if vr == "PN":
        encoded = [_pn_value(v, []) for v in parts]
    elif vr == "DS":
        encoded = [_ds_value(v) for v in parts]
    elif vr == "IS":
        encoded = [_is_value(v) for v in parts]
    else:
        encoded = [v or None for v in parts]
    if len(encoded) == 1 and encoded[0] is None:
        return {"vr": vr}
    return {"vr": vr, "Value": encoded}


_VR_CACHE: dict[int, str | None] = {}


def _dictionary_vr(tag: int) -> str | None:
    """The data dictionary VR of a public tag (None if unknown), memoised: pydicom's lookup
    costs more than the rest of decoding a short value."""
    tag = int(tag)  # a plain int key: BaseTag.__eq__ is a slow Python method
    try:
        return _VR_CACHE[tag]
    except KeyError:
        pass
    try:
        vr: str | None = str(dictionary_VR(tag))
    except KeyError:
        vr = None
    if len(_VR_CACHE) < 8192:
        _VR_CACHE[tag] = vr
    return vr


def _read_encodings(ds: Dataset, ancestors: list[Dataset]) -> list[str]:
    """Python codec names for a dataset's raw text: the character set it was read with (pydicom
    sets it from (0008,0005), or the parent's for sequence items), as pydicom itself uses."""
    read = ds.original_character_set
    if not read:
        return convert_encodings(_charsets(ancestors) or None)
    return [read] if isinstance(read, str) else list(read)


def _resolve_ambiguous(elem: DataElement, ancestors: list[Dataset]) -> DataElement:
    """Resolve 'US or SS', 'OB or OW', ... on a copy (the caller's dataset is left alone), with
    pydicom's rules (PixelRepresentation, BitsAllocated, ...), else from the value itself."""
    clone = DataElement(elem.tag, elem.VR, elem.value, is_undefined_length=elem.is_undefined_length)
    little = ancestors[0].original_encoding[1] is not False
    try:
        corrected = correct_ambiguous_vr_element(clone, ancestors[0], little, ancestors)
    except Exception:
        corrected = clone
    resolved = corrected if isinstance(corrected, DataElement) else clone
    if str(resolved.VR) not in AMBIGUOUS_VR:
        return resolved
    candidates = str(resolved.VR).split(" or ")
    value = resolved.value
    if isinstance(value, bytes | bytearray | memoryview):
        binary = [c for c in candidates if c in _BINARY_VRS]
        if binary:
            vr = "OB" if "OB" in binary and (clone.is_undefined_length or len(value) % 2) else binary[-1]
        else:
            vr = candidates[0]
    else:
        numbers = _as_list(value)
        negative = any(isinstance(v, int) and v < 0 for v in numbers)
        vr = "SS" if negative and "SS" in candidates else candidates[0]
    return DataElement(elem.tag, vr, value, is_undefined_length=elem.is_undefined_length)


# ---------------------------------------------------------------------------------------------
# Values


def _as_list(value: Any) -> list[Any]:
    """The element's values as a list; ``[]`` for an empty element."""
    if value is None:
        return []
    if isinstance(value, str | bytes):
        return [value] if value else []
    if isinstance(value, int | float | PersonName):
        return [value]
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    tolist = getattr(value, "tolist", None)  # numpy arrays (config.use_DS_numpy)
    if callable(tolist):
        converted = tolist()
        return converted if isinstance(converted, list) else [converted]
    return [value]


def _str_or_none(value: str) -> str | None:
    return value or None


def _string_values(values: list[Any], vr: str, ancestors: list[Dataset]) -> list[str | None]:
    out: list[str | None] = []
    for v in values:
        if isinstance(v, str):
            out.append(str(v) or None)
        elif isinstance(v, bytes):
            out.append(decode_text_value(v, vr, _charsets(ancestors)) or None)
        else:  # None, or DA/DT/TM objects (config.datetime_conversion) whose str() is their text
            out.append(None if v is None else str(v) or None)
    return out


def _pn_value(value: Any, ancestors: list[Dataset]) -> dict[str, str] | None:
    """One PN value as an object with the non-empty component groups (F.2.4), or None."""
    if value is None:
        return None
    if isinstance(value, PersonName):
        groups: tuple[str, ...] | list[str] = value.components
    elif isinstance(value, bytes):
        groups = decode_text_value(value, "PN", _charsets(ancestors)).split("=")
    else:
        groups = str(value).split("=")
    obj = {key: group for key, group in zip(_PN_GROUPS, groups, strict=False) if group}
    return obj or None


def _ds_value(value: Any) -> int | float | str | None:
    """A DS value as a JSON number (int when integral), or its text when not a finite number."""
    if isinstance(value, float | int | Decimal) and not isinstance(value, bool):  # before "== ''": slow
        number = float(value)
        if math.isfinite(number):
            return int(number) if number.is_integer() and abs(number) < _MAX_EXACT_INT else number
        return getattr(value, "original_string", None) or str(value)
    if value is None:
        return None
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text or None
    if not math.isfinite(number):
        return text
    return int(number) if number.is_integer() and abs(number) < _MAX_EXACT_INT else number


def _is_value(value: Any) -> int | str | None:
    """An IS value as a JSON integer, or its text when it is not an integer."""
    if isinstance(value, int) and not isinstance(value, bool):  # before "== ''": IS.__eq__ is slow
        return int(value)
    if value is None or value == "":
        return None
    if isinstance(value, float) and value.is_integer():  # pydicom's ISfloat, e.g. "1.0"
        return int(value)
    original = getattr(value, "original_string", None)
    text = (original if isinstance(original, str) else str(value)).strip()
    try:
        return int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            return text or None
        return int(number) if number.is_integer() else text


def _number_values(values: list[Any], vr: str, ds: Dataset) -> list[Any]:
    if len(values) == 1 and isinstance(values[0], bytes | bytearray):
        # a numeric VR whose value pydicom left as bytes: unpack per PS3.5 byte order
        endian = ">" if ds.original_encoding[1] is False else "<"
        fmt = _STRUCT_FORMATS[vr]
        data = bytes(values[0])
        size = struct.calcsize(endian + fmt)
        count = len(data) // size
        values = list(struct.unpack(f"{endian}{count}{fmt}", data[: count * size]))
    if vr in _FLOAT_VRS:
        return [None if v is None or v == "" else float(v) for v in values]
    return [None if v is None or v == "" else int(v) for v in values]


def _at_value(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return f"{value:08X}" if isinstance(value, int) else str(value).upper()


def _encode_binary(
    elem: DataElement,
    vr: str,
    value: Any,
    options: _Options,
    prefix: tuple[int, ...],
    ds: Dataset,
) -> dict[str, Any] | None:
    """OB/OD/OF/OL/OV/OW/UN as InlineBinary or BulkDataURI (PS3.18 F.2.7)."""
    data = _binary_bytes(value, vr, ds)
    if not data:
        return {"vr": vr}
    is_pixel_data = elem.tag in _PIXEL_DATA_TAGS and options.omit_pixel_data
    if is_pixel_data or len(data) > options.inline_threshold:
        uri = options.bulk_data_uri((*prefix, elem.tag), elem) if options.bulk_data_uri else None
        if uri is not None:
            return {"vr": vr, "BulkDataURI": uri}
        if is_pixel_data:
            return None
    return {"vr": vr, "InlineBinary": base64.b64encode(data).decode("ascii")}


def _binary_bytes(value: Any, vr: str, ds: Dataset) -> bytes:
    """The value field as little endian bytes (encapsulated pixel data is passed as is)."""
    if value is None:
        return b""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, bytearray | memoryview):
        data = bytes(value)
    elif hasattr(value, "tobytes"):  # numpy array
        data = bytes(value.tobytes())
    else:
        data = str(value).encode("latin-1", "replace")
    size = _WORD_SIZES.get(vr)
    if size and ds.original_encoding[1] is False and len(data) % size == 0:
        words = array(_ARRAY_CODES[size], data)
        words.byteswap()
        data = words.tobytes()
    return data


# ---------------------------------------------------------------------------------------------
# Character sets


def _decode(raw: bytes, vr: str, encodings: list[str]) -> str:
    """Decode escape-aware before splitting: a multi-byte character may contain 0x5C or 0x3D."""
    if vr == "PN":
        raw = raw.rstrip(b"\x00 ")
    if raw.isascii() and b"\x1b" not in raw:
        return raw.decode("ascii")
    if vr == "PN":
        return decode_bytes(raw, encodings, _PN_DELIMS)
    if vr in _SINGLE_VALUED_TEXT_VRS:
        return decode_bytes(raw, encodings, _TEXT_DELIMS)
    return decode_bytes(raw, encodings, _MULTI_TEXT_DELIMS)


def _charsets(ancestors: list[Dataset]) -> list[str]:
    """The Defined Terms of the nearest (0008,0005), for text values still held as bytes."""
    for ds in ancestors:
        if _SPECIFIC_CHARACTER_SET in ds:
            value = ds[_SPECIFIC_CHARACTER_SET].value
            if value:
                return [value] if isinstance(value, str) else [str(v) for v in value]
    return []
