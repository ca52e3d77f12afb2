"""A series in memory from what a researcher knows: Patient ID, exam date, series description.

Works through any DICOMweb root (this gateway, Orthanc, dcm4chee, a cloud DICOM store) with QIDO-RS
and WADO-RS only::

    from gateway.client import open_series

    vol = open_series("http://127.0.0.1:8080/dicom-web", patient_id="DGW0001",
                      study_date="2023-03-14", series_description="thorax*")
    vol.array.shape      # (24, 128, 128): (z, y, x), Hounsfield units (int16)
    vol.spacing          # (12.5, 2.734375, 2.734375): (z, y, x) mm
    vol.origin           # (-173.6328, -173.6328, -287.5): LPS mm of voxel [0, 0, 0]
    vol.direction        # rows: row, column and normal direction cosines (LPS)
    vol.datasets[0]      # pydicom Datasets sorted along the slice normal

Step by step (to choose among several matches, keep the files, show progress)::

    from gateway.client import find_series, load_volume, pull_series

    matches = find_series(root, patient_id="DGW0001", study_date="20230314", series_description="*")
    for m in matches:
        print(m.describe())
    datasets = pull_series(root, matches[1].study_uid, matches[1].series_uid, out_dir="thorax",
                           progress=lambda n, total: print(f"{n}/{total}"))
    vol = load_volume(datasets)

The same from a shell: ``dicomweb-gateway pull --patient-id DGW0001 --study-date 2023-03-14
--series-description 'thorax*' --out thorax [--url ROOT]`` (without ``--url`` it pulls from the
built-in demo PACS).
"""

from __future__ import annotations

import os
from datetime import date

import httpx

from gateway.client.dicomweb import (
    AmbiguousSeriesError,
    DicomwebError,
    NoSeriesFoundError,
    Progress,
    SeriesMatch,
    find_series,
    pull_series,
    select_one,
)
from gateway.client.volume import InconsistentSeriesError, Volume, load_volume

__all__ = [
    "AmbiguousSeriesError",
    "DicomwebError",
    "InconsistentSeriesError",
    "NoSeriesFoundError",
    "Progress",
    "SeriesMatch",
    "Volume",
    "find_series",
    "load_volume",
    "open_series",
    "pull_series",
    "select_one",
]


def open_series(
    root: str,
    patient_id: str | None,
    study_date: str | date | None,
    series_description: str,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    strict: bool = True,
    client: httpx.Client | None = None,
) -> Volume:
    """Find the one matching series (:func:`find_series`), pull it (:func:`pull_series`) and stack it
    (:func:`load_volume`).

    Raises :class:`NoSeriesFoundError` when nothing matches, :class:`AmbiguousSeriesError` (with
    ``.candidates``) when several series do, :class:`DicomwebError` when the server fails and
    :class:`InconsistentSeriesError` when the instances do not form one volume.

    >>> vol = open_series("http://127.0.0.1:8080/dicom-web", "DGW0001", "20230314",
    ...                   "Thorax 2.5mm B30f")                                    # doctest: +SKIP
    >>> vol.array.shape, vol.spacing                                              # doctest: +SKIP
    ((24, 128, 128), (12.5, 2.734375, 2.734375))
    """
    criteria = {"PatientID": patient_id, "StudyDate": None if study_date is None else str(study_date),
                "SeriesDescription": series_description}
    match = select_one(find_series(root, patient_id=patient_id, study_date=study_date,
                                   series_description=series_description, client=client), criteria)
    datasets = pull_series(root, match.study_uid, match.series_uid, out_dir=out_dir, progress=progress,
                           expected=match.num_instances, client=client)
    return load_volume(datasets, strict=strict)
