"""Intake: check a received instance, and record it with its series.

The network edge (node.scp) calls `inspect_instance` on the decoded dataset, writes the
file to the spool, then calls `record_instance`, whose commit makes the instance durable.
Only after that commit may the sender hear Success.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.tag import Tag
from pydicom.uid import UID
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.dicom.contrast import classify
from pipeline.dicom.header import extract_header
from pipeline.dicom.values import InvalidUID, check_uid, int_or_none
from pipeline.redact import redact
from pipeline.spool import Spool
from pipeline.state.db import Instance, Job, JobState, Series, SeriesState, utcnow

log = logging.getLogger(__name__)

# Orientation cosines and pixel spacing of one series may differ by rounding only.
GEOMETRY_TOLERANCE = 1e-3


class RefusalKind(enum.StrEnum):
    """Why an instance was refused; node.scp maps each to a DICOM status."""

    INVALID = "invalid"  # required attribute missing or malformed
    UNDECODABLE = "undecodable"  # pixel data present but cannot be decoded
    INCONSISTENT = "inconsistent"  # disagrees with the series it claims to belong to


class InstanceRefused(Exception):
    def __init__(self, kind: RefusalKind, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class InstanceFacts:
    """What intake needs from one instance, read once from its dataset."""

    sop_instance_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    rows: int
    columns: int
    orientation: str | None
    pixel_spacing: str | None
    frame_of_reference_uid: str | None
    announced_count: int | None
    acquisition_number: int | None
    instance_number: int | None
    series_number: int | None
    description: str | None
    accession_number: str | None
    # Kept to extract the routing header from, which only a series' first instance needs:
    # extracting it costs more than every other check of an instance together.
    dataset: Dataset = field(repr=False, compare=False)
    header_keywords: tuple[str, ...] = ()

    def header(self) -> dict[str, Any]:
        """The header fields routing and classification read (see pipeline.dicom.header)."""
        return extract_header(self.dataset, self.header_keywords)

    def relative_path(self) -> Path:
        """Where the file goes under the spool; the UIDs were validated for this."""
        return Spool.instance_file(self.study_uid, self.series_uid, self.sop_instance_uid)


def inspect_instance(
    ds: Dataset,
    transfer_syntax_uid: str,
    extra_keywords: Iterable[str] = (),
    context_sop_class: str | None = None,
    request_sop_instance_uid: str | None = None,
) -> InstanceFacts:
    """Check ``ds`` can be stored and synthesized from; raise InstanceRefused if not.

    ``context_sop_class`` is the abstract syntax of the presentation context it came on,
    ``request_sop_instance_uid`` the C-STORE request's Affected SOP Instance UID: a data
    set of another SOP class, or another instance, does not match its request (PS3.4
    B.2.3, status A900), and acknowledging it would acknowledge what was not stored.
    """
    uids = {}
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID"):
        value = str(ds.get(keyword, "") or "").strip()
        if not value:
            raise InstanceRefused(RefusalKind.INVALID, f"{keyword} is missing")
        try:
            uids[keyword] = check_uid(value, f"{keyword} {Tag(keyword)}")
        except InvalidUID as error:
            raise InstanceRefused(RefusalKind.INVALID, str(error)) from None
    if context_sop_class is not None and uids["SOPClassUID"] != context_sop_class:
        sop_class = UID(uids["SOPClassUID"])
        named = sop_class if sop_class.name == sop_class else f"{sop_class.name} ({sop_class})"
        raise InstanceRefused(
            RefusalKind.INVALID,
            f"SOPClassUID differs from its context's {UID(context_sop_class).name}: {named}",
        )
    if request_sop_instance_uid is not None and uids["SOPInstanceUID"] != request_sop_instance_uid:
        raise InstanceRefused(
            RefusalKind.INVALID,
            "SOPInstanceUID differs from the request's Affected SOP Instance UID "
            f"{request_sop_instance_uid}",
        )
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InstanceRefused(RefusalKind.INVALID, "the instance has no pixel data")
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not rows or not columns:
        raise InstanceRefused(RefusalKind.INVALID, "Rows or Columns is missing or zero")
    _check_pixels_decode(ds)
    return InstanceFacts(
        sop_instance_uid=uids["SOPInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax_uid=transfer_syntax_uid,
        rows=int(rows),
        columns=int(columns),
        orientation=_joined(ds.get("ImageOrientationPatient")),
        pixel_spacing=_joined(ds.get("PixelSpacing")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or "") or None,
        announced_count=announced_count(ds),
        acquisition_number=int_or_none(ds.get("AcquisitionNumber")),
        instance_number=int_or_none(ds.get("InstanceNumber")),
        series_number=int_or_none(ds.get("SeriesNumber")),
        description=str(ds.get("SeriesDescription", "") or "")[:64] or None,
        accession_number=str(ds.get("AccessionNumber", "") or "").strip() or None,
        dataset=ds,
        header_keywords=tuple(extra_keywords),
    )


def _check_pixels_decode(ds: Dataset) -> None:
    """Prove the pixels are usable before the sender is told they are safe here."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and not syntax.is_compressed and "PixelData" in ds:
        # Uncompressed: the length says it all, and is far cheaper than a decode.
        bits = int(ds.get("BitsAllocated", 0) or 0)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = -(-int(ds.Rows) * int(ds.Columns) * samples * frames * bits // 8)
        if bits == 0 or len(ds.PixelData) < expected:
            raise InstanceRefused(
                RefusalKind.UNDECODABLE,
                f"pixel data cannot be decoded: {len(ds.PixelData)} bytes, "
                f"{expected} expected for its size",
            )
        return
    try:
        # Compressed: decoding also proves a decoder for the syntax is installed.
        ds.pixel_array  # noqa: B018
    except Exception as error:  # pydicom raises many types for corrupt pixel data
        raise InstanceRefused(
            RefusalKind.UNDECODABLE, f"pixel data cannot be decoded: {redact(str(error))}"
        ) from None
    except BaseException as error:
        # The RLE decoder is Rust: on some corrupt streams it panics, which pyo3 raises as a
        # PanicException, a BaseException. Anything else of that kind is not ours to stop.
        if type(error).__name__ != "PanicException":
            raise
        raise InstanceRefused(
            RefusalKind.UNDECODABLE, f"pixel data cannot be decoded: {redact(str(error))}"
        ) from None


def announced_count(ds: Dataset) -> int | None:
    """How many instances the series announces, from ImagesInAcquisition or its relatives."""
    value = int_or_none(ds.get("ImagesInAcquisition"))
    if value is None:
        # GE writes "Images in Series" in its private group 0025 (creator GEMS_SERS_01).
        block = _private_block(ds, 0x0025, "GEMS_SERS_01")
        if block is not None and 0x07 in block:
            value = int_or_none(block[0x07].value)
    return value if value and value > 0 else None


def _private_block(ds: Dataset, group: int, creator: str) -> Any:
    try:
        return ds.private_block(group, creator)
    except KeyError:
        return None


@dataclass(frozen=True)
class RecordOutcome:
    series_id: int
    duplicate: bool  # the instance was already stored; nothing changed
    reopened: bool  # a completed series received a late instance
    count_reached: bool  # the announced count is now reached: completion need not wait
    # For a duplicate that claims another study or series than the stored instance, the
    # new file lies elsewhere in the spool and nothing refers to it: the caller removes it.
    orphaned_file: bool = False
    # For a duplicate: where the instance stored first lies, relative to the spool root.
    stored_path: str | None = None


def record_instance(
    session: Session, facts: InstanceFacts, size: int, calling_ae: str, now: datetime | None = None
) -> RecordOutcome:
    """Record one stored instance and update its series; the caller commits.

    Raises InstanceRefused(INCONSISTENT) when the instance disagrees with its series.
    """
    now = now or utcnow()
    existing = session.execute(
        select(Instance.series_id, Instance.path).where(
            Instance.sop_instance_uid == facts.sop_instance_uid
        )
    ).first()
    if existing is not None:
        return RecordOutcome(
            existing.series_id,
            duplicate=True,
            reopened=False,
            count_reached=False,
            orphaned_file=existing.path != str(facts.relative_path()),
            stored_path=existing.path,
        )

    series = session.scalar(select(Series).where(Series.series_uid == facts.series_uid))
    reopened = False
    if series is None:
        series = _new_series(facts, calling_ae, now)
        session.add(series)
        session.flush()
        log.info(
            "series %s: new, from %s, contrast %s (%s)",
            series.series_uid,
            calling_ae,
            series.contrast,
            series.contrast_reason,
        )
    else:
        _check_consistent(series, facts)
        _update_count_announcement(series, facts)
        if series.state != SeriesState.RECEIVING:
            reopened = True
            _reopen(session, series)
        series.last_arrival = now
    series.instance_count += 1
    session.add(
        Instance(
            series_id=series.id,
            sop_instance_uid=facts.sop_instance_uid,
            sop_class_uid=facts.sop_class_uid,
            transfer_syntax_uid=facts.transfer_syntax_uid,
            path=str(facts.relative_path()),
            size=size,
            instance_number=facts.instance_number,
            calling_ae=calling_ae,
            received_at=now,
        )
    )
    count_reached = series.expected_count is not None and (
        series.instance_count >= series.expected_count
    )
    return RecordOutcome(series.id, False, reopened, count_reached)


def _new_series(facts: InstanceFacts, calling_ae: str, now: datetime) -> Series:
    header = facts.header()
    classification = classify(header)
    return Series(
        series_uid=facts.series_uid,
        study_uid=facts.study_uid,
        sop_class_uid=facts.sop_class_uid,
        calling_ae=calling_ae,
        description=facts.description,
        accession_number=facts.accession_number,
        series_number=facts.series_number,
        rows=facts.rows,
        columns=facts.columns,
        orientation=facts.orientation,
        pixel_spacing=facts.pixel_spacing,
        frame_of_reference_uid=facts.frame_of_reference_uid,
        expected_count=facts.announced_count,
        count_consistent=True,
        acquisition_number=facts.acquisition_number,
        instance_count=0,
        first_arrival=now,
        last_arrival=now,
        header=header,
        contrast=classification.contrast,
        contrast_reason=classification.reason,
        state=SeriesState.RECEIVING,
        generation=1,
    )


def _check_consistent(series: Series, facts: InstanceFacts) -> None:
    problems = []
    if facts.study_uid != series.study_uid:
        problems.append("belongs to another study than the rest of its series")
    if facts.sop_class_uid != series.sop_class_uid:
        problems.append(f"SOP class {facts.sop_class_uid} differs from the series'")
    if (facts.rows, facts.columns) != (series.rows, series.columns):
        problems.append(
            f"size {facts.columns}x{facts.rows} differs from the series' "
            f"{series.columns}x{series.rows}"
        )
    if not _close(facts.orientation, series.orientation):
        problems.append("ImageOrientationPatient differs from the series'")
    if not _close(facts.pixel_spacing, series.pixel_spacing):
        problems.append(f"PixelSpacing {facts.pixel_spacing} differs from {series.pixel_spacing}")
    if facts.frame_of_reference_uid != series.frame_of_reference_uid:
        problems.append("FrameOfReferenceUID differs from the series'")
    if problems:
        raise InstanceRefused(
            RefusalKind.INCONSISTENT,
            f"instance {facts.sop_instance_uid} of series {series.series_uid}: "
            + "; ".join(problems),
        )


def _update_count_announcement(series: Series, facts: InstanceFacts) -> None:
    # The announced count is trusted only while every instance announces the same number
    # for the same acquisition; otherwise completion falls back to the quiet time.
    if not series.count_consistent:
        return
    if (
        facts.announced_count != series.expected_count
        or facts.acquisition_number != series.acquisition_number
        or (series.expected_count is not None and series.instance_count >= series.expected_count)
    ):
        series.count_consistent = False
        series.expected_count = None


def _reopen(session: Session, series: Series) -> None:
    series.state = SeriesState.RECEIVING
    series.state_reason = f"re-opened by a late instance after generation {series.generation}"
    series.generation += 1
    series.completed_at = None
    # A job that has not started yet would only be replaced; one that runs is left to
    # finish, and the new job overwrites its output (same output UIDs).
    superseded = session.execute(
        update(Job)
        .where(Job.series_id == series.id, Job.state == JobState.QUEUED)
        .values(
            state=JobState.SUPERSEDED,
            reason="series re-opened by a late instance; a newer job replaces this one",
            updated_at=utcnow(),
        )
    ).rowcount
    log.info(
        "series %s: re-opened (generation %d), %d queued job(s) superseded",
        series.series_uid,
        series.generation,
        superseded,
    )


def _joined(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        return "\\".join(f"{float(v):.6g}" for v in value)
    return str(value)


def _close(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a == b
    left, right = a.split("\\"), b.split("\\")
    if len(left) != len(right):
        return False
    try:
        return all(
            abs(float(x) - float(y)) <= GEOMETRY_TOLERANCE for x, y in zip(left, right, strict=True)
        )
    except ValueError:
        return a == b


def recover_unrecorded(
    sessions: sessionmaker, storage: Path, extra_keywords: Iterable[str] = ()
) -> int:
    """Record every spool file whose row is missing; return how many were recovered.

    A file in the spool was fsynced before its sender heard Success; its row may have been
    lost with a power failure (the database does not flush every commit). Each file goes
    through the same checks and recording as when it arrived.
    """
    files = Spool(storage).received_files()
    if not files:
        return 0
    with sessions() as session:
        known = set(session.scalars(select(Instance.path)))
    recovered = 0
    for path in files:
        relative = str(path.relative_to(storage))
        if relative in known:
            continue
        try:
            ds = dcmread(path)
            facts = inspect_instance(ds, str(ds.file_meta.TransferSyntaxUID), extra_keywords)
            calling_ae = str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "UNKNOWN")
            with sessions.begin() as session:
                outcome = record_instance(session, facts, path.stat().st_size, calling_ae.strip())
        except Exception as error:  # a file that cannot be recorded must not stop the start
            log.error("spool file %s could not be recovered: %s", relative, error)
            continue
        if outcome.orphaned_file:
            path.unlink(missing_ok=True)
        else:
            recovered += not outcome.duplicate
    if recovered:
        log.warning("recovered %d received instance(s) whose rows were lost", recovered)
    return recovered
