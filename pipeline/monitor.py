"""The live quality monitor: each synthetic series scored against the real one.

Most brain protocols acquire both T1 and T2, so the node receives real pairs every day. When
a study holds both the source of a finished synthesis and a complete real series of its
target contrast (same study and frame of reference; either may arrive first), the real one
is placed on the source's grid (header geometry refined by the rigid registration that
training uses, ``pipeline.model.scores.place_real``) and the synthetic series is scored
against it with the scores of the model cards: correlation and SSIM inside the head, and
the paper's PSNR (per-slice min-max, whole slice), per slice and per series. The burnt-in
label lies outside the head and is left out of the scores.

Runs in `serve`'s scheduler (torch-free); a score row is claimed by inserting it (one per
job), so several nodes on one database never score a job twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import and_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

from pipeline.dicom.contrast import Direction
from pipeline.dicom.volume import SeriesError, load_series
from pipeline.model.scores import mean_metrics, minmax_slices, place_real, slice_metrics
from pipeline.spool import Spool
from pipeline.state.db import (
    Instance,
    Job,
    JobState,
    QualityScore,
    QualityState,
    Series,
    SeriesState,
    utcnow,
)
from pipeline.state.quality import MonitorSettings, protocol_of, scanner_of

log = logging.getLogger(__name__)

# Per series: the monitor's three figures, from the per-slice scores of pipeline.model.scores.
SERIES_FIGURES = {"correlation": "corr_head", "ssim": "ssim_head", "psnr": "psnr_slice"}
SCORED_JOBS = (JobState.DONE, JobState.HELD)
COMPLETE = (SeriesState.ROUTED, SeriesState.IGNORED)


@dataclass(frozen=True)
class Pair:
    job_id: int
    real_series_id: int


def find_due_pairs(session: Session) -> list[Pair]:
    """Finished syntheses not scored yet whose study holds a complete real series of their
    target contrast on the same frame of reference, with the files of all three kept."""
    source, real = aliased(Series), aliased(Series)
    rows = session.execute(
        select(Job.id, Job.direction, real.id, real.contrast, real.frame_of_reference_uid)
        .add_columns(source.frame_of_reference_uid)
        .join(source, Job.series_id == source.id)
        .join(real, and_(real.study_uid == source.study_uid, real.id != source.id))
        .where(
            Job.state.in_(SCORED_JOBS),
            Job.output_path.is_not(None),
            Job.id.not_in(select(QualityScore.job_id)),
            source.purged_at.is_(None),
            real.state.in_(COMPLETE),
            real.purged_at.is_(None),
        )
        .order_by(Job.id, real.id.desc())  # the latest real series of a contrast first
    ).all()
    pairs: dict[int, Pair] = {}
    for job_id, direction, real_id, contrast, real_frame, source_frame in rows:
        wanted = contrast == Direction(direction).target and real_frame == source_frame
        if wanted and job_id not in pairs:
            pairs[job_id] = Pair(job_id, real_id)
    return list(pairs.values())


def score_due_pairs(
    sessions: sessionmaker, storage: Path, settings: MonitorSettings, register: bool = True
) -> list[int]:
    """Score every due pair; return the ids of the jobs scored (or found unscorable)."""
    if not settings.enabled:
        return []
    with sessions() as session:
        pairs = find_due_pairs(session)
    done = []
    for pair in pairs:
        if _claim(sessions, pair):
            _score(sessions, Spool(storage), pair, register)
            done.append(pair.job_id)
    return done


def _claim(sessions: sessionmaker, pair: Pair) -> bool:
    try:
        with sessions.begin() as session:
            job = session.get(Job, pair.job_id)
            real = session.get(Series, pair.real_series_id)
            header = job.series.header
            now = utcnow()
            session.add(
                QualityScore(
                    job_id=job.id,
                    real_series_uid=real.series_uid,
                    study_uid=real.study_uid,
                    scanner=scanner_of(header),
                    protocol=protocol_of(header),
                    model=job.model,
                    model_version=job.model_version or "?",
                    state=QualityState.SCORING,
                    created_at=now,
                )
            )
        return True
    except IntegrityError:  # another node claimed it first
        return False


def _files(session: Session, series_id: int, spool: Spool) -> list[Path]:
    paths = session.scalars(select(Instance.path).where(Instance.series_id == series_id))
    return [spool.path(p) for p in paths]


def _score(sessions: sessionmaker, spool: Spool, pair: Pair, register: bool) -> None:
    with sessions() as session:
        job = session.get(Job, pair.job_id)
        source_files = _files(session, job.series_id, spool)
        real_files = _files(session, pair.real_series_id, spool)
        synthetic_files = spool.series_files(job.output_path)
    try:
        scores = score_synthesis(source_files, synthetic_files, real_files, register)
    except (SeriesError, ValueError, OSError, RuntimeError) as error:
        _record(sessions, pair.job_id, state=QualityState.FAILED, reason=str(error))
        log.warning("job %d: not scored against its real counterpart: %s", pair.job_id, error)
        return
    _record(sessions, pair.job_id, state=QualityState.SCORED, **scores)
    log.info(
        "job %d: scored against its real counterpart: correlation %.3f, SSIM %.3f, PSNR "
        "%.2f dB inside the head over %d slice(s) (%s)",
        pair.job_id,
        scores["correlation"],
        scores["ssim"],
        scores["psnr"],
        len(scores["per_slice"]["slices"]),
        scores["placed_by"],
    )


def _record(sessions: sessionmaker, job_id: int, **values) -> None:
    with sessions.begin() as session:
        row = session.scalars(select(QualityScore).where(QualityScore.job_id == job_id)).one()
        for name, value in values.items():
            setattr(row, name, value)
        row.scored_at = utcnow()


def score_synthesis(
    source_files: list[Path], synthetic_files: list[Path], real_files: list[Path], register: bool
) -> dict:
    """The scores of a synthetic series against the real one, on its source's grid: per
    series (``SERIES_FIGURES``), per slice, the accession and how the real was placed."""
    if not synthetic_files:
        raise ValueError("the synthetic series' files are gone")
    source = load_series(source_files)
    synthetic = load_series(synthetic_files)
    if synthetic.pixels.shape != source.pixels.shape:
        raise ValueError(
            f"synthetic series {synthetic.pixels.shape} and its source {source.pixels.shape} differ"
        )
    placed = place_real(source, load_series(real_files), register)
    keep = placed.slices
    if keep.size == 0:
        dropped = ", ".join(f"{n} {why}" for why, n in placed.dropped.items())
        raise ValueError(f"no slice of the source pairs with the real series ({dropped})")
    # Outside the head the synthetic series is black but for its label: not anatomy.
    synthetic_pixels = np.where(placed.head, synthetic.pixels, 0.0)[keep]
    placement = placed.placement
    per_slice = slice_metrics(
        minmax_slices(synthetic_pixels),
        minmax_slices(placement.resampled[keep]),
        placement.covered[keep],
        placed.head[keep],
    )
    means = mean_metrics(per_slice)
    rigid = placement.registration
    if rigid is None:
        placed_by = "same grid" if register else "header geometry"
    elif rigid.applied:
        placed_by = f"rigid registration ({rigid.angle_degrees:.1f} degrees)"
    else:
        placed_by = f"header geometry ({rigid.kept_header})"
    accession = pydicom.dcmread(
        source_files[0], stop_before_pixels=True, specific_tags=["AccessionNumber"]
    ).get("AccessionNumber")
    return {
        **{name: means[metric] for name, metric in SERIES_FIGURES.items()},
        "per_slice": {
            "slices": keep.tolist(),
            **{
                metric: [round(v, 4) for v in per_slice[metric]]
                for metric in SERIES_FIGURES.values()
            },
        },
        "placed_by": placed_by,
        "accession": str(accession) if accession else None,
    }
