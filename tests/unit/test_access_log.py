"""The access log keeps what an operator needs (the API's words, UIDs, node names) and nothing a
client typed elsewhere: no query string, no free text in path segments."""

import logging

import pytest

from gateway.startup import NoQueryStrings, _masked


@pytest.mark.parametrize("path, shown", [
    ("/dicom-web/studies/1.2.3/series/4.5/instances/6.7/frames/1,2", "/dicom-web/studies/1.2.3/series/4.5/instances/6.7/frames/1,2"),
    ("/nodes/orthanc/dicom-web/studies", "/nodes/orthanc/dicom-web/studies"),
    ("/dicom-web/studies/DGW0001/metadata", "/dicom-web/studies/…/metadata"),
    ("/dicom-web/studies/Doe%5EJohn", "/dicom-web/studies/…"),
    ("/dicom-web/studies/1.2/series/3/instances/4/bulkdata/0040a730.0.0040a160",
     "/dicom-web/studies/1.2/series/3/instances/4/bulkdata/0040a730.0.0040a160"),
])
def test_paths_are_masked_outside_the_apis_vocabulary(path, shown):
    assert _masked(path) == shown


def test_query_strings_are_dropped_from_access_records():
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/dicom-web/studies?PatientName=Doe*", "1.1", 200), None)
    assert NoQueryStrings().filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "GET /dicom-web/studies?… HTTP/1.1" 200'
