"""translators.media: WADO-RS Accept negotiation (PS3.18 §8.7.8) and the multipart encoder."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from translators import media
from translators import multipart as mp
from translators.media import EXPLICIT_VR_LE, negotiate


def neg(category, header=None, param=None, single=False):
    return negotiate(category, accept_param=param, accept_header=header, single_item=single)


@pytest.mark.parametrize("header", [
    'multipart/related; type="application/octet-stream"; transfer-syntax="*"',
    "multipart/related; type=application/octet-stream; transfer-syntax=*",
    'multipart/related ; type = "application/octet-stream" ; transfer-syntax = *',
])
def test_ohif_frame_accepts_quoted_and_unquoted(header):
    sel = neg("frames", header)
    assert sel == media.Selection(True, "application/octet-stream", "*", True)


def test_defaults_and_wildcards():
    assert neg("frames", None).transfer_syntax == "*"
    assert neg("instance", None) == media.Selection(True, "application/dicom", EXPLICIT_VR_LE, False)
    assert neg("instance", "*/*").media_type == "application/dicom"
    assert neg("frames", 'multipart/related; type="*/*"').transfer_syntax == "*"   # Python client
    assert neg("metadata", "application/dicom+json, application/json").media_type == "application/dicom+json"
    assert neg("rendered", "image/*").media_type == "image/jpeg"


def test_query_param_beats_header():
    sel = neg("rendered", 'multipart/related; type="application/octet-stream"', param="image/png")
    assert sel.media_type == "image/png"
    sel = neg("instance", "multipart/related; type=application/dicom",
              param='multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.5')
    assert sel.transfer_syntax == "1.2.840.10008.1.2.5" and sel.explicit_ts


def test_q_values_order_choices():
    header = ('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.5; q=0.5, '
              'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1; q=0.9')
    assert neg("instance", header).transfer_syntax == "1.2.840.10008.1.2.1"
    assert neg("instance", 'multipart/related; type="application/dicom"; q=0, */*').media_type \
        == "application/dicom"


def test_single_part_only_for_single_items():
    assert not neg("instance", "application/dicom", single=True).multipart
    with pytest.raises(media.NotAcceptableMedia):
        neg("instance", "application/dicom", single=False)
    assert not neg("frames", "application/octet-stream", single=True).multipart
    with pytest.raises(media.NotAcceptableMedia):
        neg("frames", "application/octet-stream", single=False)


def test_compressed_types_and_ohif_aliases():
    assert neg("frames", 'multipart/related; type="image/jls"').transfer_syntax == "1.2.840.10008.1.2.4.80"
    sel = neg("frames", "multipart/related; type=image/dicom+jpeg; transfer-syntax=1.2.840.10008.1.2.4.51")
    assert sel.media_type == "image/jpeg" and sel.transfer_syntax == "1.2.840.10008.1.2.4.51"


@pytest.mark.parametrize("category, header", [("instance", "image/png"), ("metadata", "application/dicom"),
                                              ("frames", 'multipart/related; type="application/dicom"'),
                                              ("rendered", "application/dicom")])
def test_not_acceptable(category, header):
    with pytest.raises(media.NotAcceptableMedia):
        neg(category, header)


@given(st.lists(st.sampled_from(["*/*", "application/dicom", "image/jpeg", "text/html",
                                 'multipart/related; type="application/dicom"']), min_size=1, max_size=4))
def test_negotiation_never_crashes(ranges):
    try:
        neg("instance", ", ".join(ranges))
    except media.NotAcceptableMedia:
        pass


def test_multipart_layout_is_byte_exact():
    b = "BOUND"
    body = (mp.part_header(b, "application/dicom", transfer_syntax="1.2.840.10008.1.2.1",
                           location="http://x/a", first=True) + b"DATA1"
            + mp.part_header(b, "application/dicom", transfer_syntax="1.2.840.10008.1.2.1") + b"DATA2"
            + mp.closing(b))
    assert body == (b"--BOUND\r\nContent-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n"
                    b"Content-Location: http://x/a\r\n\r\nDATA1"
                    b"\r\n--BOUND\r\nContent-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n"
                    b"\r\nDATA2\r\n--BOUND--\r\n")
    assert mp.content_type("application/dicom", b) == 'multipart/related; type="application/dicom"; boundary=BOUND'
    assert mp.new_boundary() != mp.new_boundary() and len(mp.new_boundary()) > 30
