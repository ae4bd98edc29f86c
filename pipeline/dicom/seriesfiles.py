"""Finding DICOM series in folders, as a PACS export or a scanner would write them.

Files are grouped by SeriesInstanceUID read from each header, never by folder or file
names; what is not DICOM is listed with the reason, not silently dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from pipeline.dicom.header import extract_header


@dataclass
class SeriesFiles:
    series_uid: str
    study_uid: str
    folder: Path  # the folder holding the first file found
    header: dict[str, Any]  # from the first file, as intake records it
    files: list[Path] = field(default_factory=list)


@dataclass
class FoundSeries:
    series: list[SeriesFiles]
    unreadable: list[tuple[Path, str]]


def scan_series(roots: Sequence[Path], extra_keywords: Iterable[str] = ()) -> FoundSeries:
    """Every series under ``roots`` (files or folders, searched recursively)."""
    by_uid: dict[str, SeriesFiles] = {}
    unreadable = []
    for path in _files(roots):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as error:
            unreadable.append((path, f"not a readable DICOM file ({error})"))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            unreadable.append((path, "no SeriesInstanceUID"))
            continue
        if uid not in by_uid:
            by_uid[uid] = SeriesFiles(
                series_uid=uid,
                study_uid=str(ds.get("StudyInstanceUID", "") or ""),
                folder=path.parent,
                header=extract_header(ds, extra_keywords),
            )
        by_uid[uid].files.append(path)
    series = sorted(by_uid.values(), key=lambda s: (str(s.folder), s.series_uid))
    return FoundSeries(series, unreadable)


def _files(roots: Sequence[Path]) -> Iterable[Path]:
    for root in roots:
        if root.is_file():
            yield root
        elif root.is_dir():
            found = (p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
            yield from sorted(found)
