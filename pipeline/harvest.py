"""Pairs to learn from: every study that brought a T1 and a T2 becomes a training pair.

With ``[harvest] enabled = true`` a scheduler tick of `serve` records each study holding a
complete T1 and a complete T2 series on one frame of reference, and keeps their files under
the spool's ``harvest/pair-<id>/`` as hard links to the received files (a copy where links
are impossible): the clean stage's deletions then leave them, with no second copy on disk.
Beyond ``max_pairs`` or ``max_gib`` the oldest pairs' files go first. The patient is named
only by a pseudonym salted with the node's own salt (``harvest.salt`` in the spool), so a
model card trained on them (`dicomnode train --harvested`) names no one another site could
look up.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Annotated, Any

import pydicom
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.dicom.contrast import Contrast
from pipeline.files import make_folders, write_new
from pipeline.spool import HARVEST, HARVEST_SALT, Spool
from pipeline.state.db import HarvestedPair, Instance, Series, SeriesState, utcnow

log = logging.getLogger(__name__)

COMPLETE = (SeriesState.ROUTED, SeriesState.IGNORED)


class HarvestSettings(BaseModel):
    """``[harvest]`` in config.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    max_pairs: Annotated[int, Field(ge=1)] = 200
    max_gib: Annotated[float, Field(gt=0)] = 50.0
    check_interval_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0


def salted_pseudonym(patient_id: str, salt: str) -> str:
    """A patient's name in harvest lists and model cards: unlinkable without the salt."""
    return "patient-" + hashlib.sha256(f"{salt}\0{patient_id}".encode()).hexdigest()[:12]


def node_salt(storage: Path) -> str:
    """The node's harvest salt, made (durably) on first use."""
    path = Spool(storage).path(HARVEST_SALT)
    if not path.exists():
        make_folders(path.parent)
        # Never replaced: a second node starting at the same moment keeps the first salt.
        write_new(path, secrets.token_hex(16).encode())
    return path.read_text().strip()


def harvest_root(storage: Path) -> Path:
    """The folder `dicomnode train --harvested` reads pairs from."""
    return Spool(storage).path(HARVEST)


def harvest_due_pairs(sessions: sessionmaker, storage: Path, settings: HarvestSettings) -> int:
    """Record and keep every new pair, then keep within the caps; return how many new."""
    if not settings.enabled:
        return 0
    spool = Spool(storage)
    with sessions() as session:
        due = _due_studies(session)
    added = 0
    for t1_id, t2_id in due:
        if _harvest(sessions, spool, t1_id, t2_id):
            added += 1
    _keep_within_caps(sessions, spool, settings)
    return added


def _due_studies(session: Session) -> list[tuple[int, int]]:
    harvested = select(HarvestedPair.study_uid)
    candidates = session.scalars(
        select(Series).where(
            Series.state.in_(COMPLETE),
            Series.purged_at.is_(None),
            Series.contrast.in_([Contrast.T1, Contrast.T2]),
            Series.study_uid.not_in(harvested),
        )
    ).all()
    by_study: dict[tuple[str, str | None], dict[str, Series]] = {}
    for series in sorted(candidates, key=lambda s: s.id):  # the latest of a contrast wins
        key = (series.study_uid, series.frame_of_reference_uid)
        by_study.setdefault(key, {})[series.contrast] = series
    return [
        (found[Contrast.T1].id, found[Contrast.T2].id)
        for found in by_study.values()
        if Contrast.T1 in found and Contrast.T2 in found
    ]


def _harvest(sessions: sessionmaker, spool: Spool, t1_id: int, t2_id: int) -> bool:
    with sessions() as session:
        files = {
            name: list(session.scalars(select(Instance).where(Instance.series_id == series_id)))
            for name, series_id in (("t1", t1_id), ("t2", t2_id))
        }
        study_uid = session.get(Series, t1_id).study_uid
    first = spool.path(files["t1"][0].path)
    patient_id = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["PatientID"])
    patient = salted_pseudonym(str(patient_id.get("PatientID", "")), node_salt(spool.root))
    try:
        with sessions.begin() as session:
            row = HarvestedPair(
                study_uid=study_uid,
                t1_series_id=t1_id,
                t2_series_id=t2_id,
                patient=patient,
                files=sum(len(f) for f in files.values()),
                size=sum(i.size for f in files.values() for i in f),
                harvested_at=utcnow(),
            )
            session.add(row)
            session.flush()
            pair_id = row.id
            # Linked inside the transaction: a pair recorded has its files.
            for name, instances in files.items():
                folder = spool.path(Spool.harvest_folder(pair_id) / name)
                make_folders(folder)
                for instance in instances:
                    _link(spool.path(instance.path), folder / Path(instance.path).name)
    except IntegrityError:  # another node harvested the study first
        return False
    log.info("harvest: pair %d of %s recorded (%d files)", pair_id, patient, row.files)
    return True


def _link(source: Path, target: Path) -> None:
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: a copy then
        shutil.copyfile(source, target)


def _keep_within_caps(sessions: sessionmaker, spool: Spool, settings: HarvestSettings) -> None:
    with sessions.begin() as session:
        kept = session.scalars(
            select(HarvestedPair)
            .where(HarvestedPair.released_at.is_(None))
            .order_by(HarvestedPair.harvested_at, HarvestedPair.id)
        ).all()
        size = sum(pair.size for pair in kept)
        count = len(kept)
        for pair in kept:
            if count <= settings.max_pairs and size <= settings.max_gib * 2**30:
                break
            shutil.rmtree(spool.path(Spool.harvest_folder(pair.id)), ignore_errors=True)
            pair.released_at = utcnow()
            count -= 1
            size -= pair.size
            log.info("harvest: pair %d released, oldest beyond the cap", pair.id)


def list_harvested(sessions: sessionmaker) -> dict[str, Any]:
    """Kept and released pairs, newest first, as plain data (pseudonyms only)."""
    with sessions() as session:
        rows = session.scalars(select(HarvestedPair).order_by(HarvestedPair.id.desc())).all()
        kept = session.execute(
            select(func.count(), func.coalesce(func.sum(HarvestedPair.size), 0)).where(
                HarvestedPair.released_at.is_(None)
            )
        ).one()
        return {
            "kept": kept[0],
            "kept_bytes": int(kept[1]),
            "pairs": [
                {
                    "id": row.id,
                    "patient": row.patient,
                    "study_uid": row.study_uid,
                    "files": row.files,
                    "size": row.size,
                    "harvested_at": row.harvested_at.isoformat(timespec="seconds") + "Z",
                    "released_at": row.released_at.isoformat(timespec="seconds") + "Z"
                    if row.released_at
                    else None,
                }
                for row in rows
            ],
        }
