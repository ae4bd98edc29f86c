"""Paired T1/T2 studies for training and evaluation, found by header and aligned by geometry.

A pair is a T1 and a T2 series of the same patient, study and frame of reference, each
classified from its header physics by ``pipeline.dicom.contrast.classify`` (FLAIR and
post-contrast T1 never enter a pair). The target series is resampled onto the source
series' grid through both series' DICOM geometry, refined by a rigid registration where the
two were acquired on different grids (``pipeline.dicom.registration``), so series with their own
slab and obliquity (the native study) pair voxel for voxel with what the network sees at
inference, which is the source series on its own grid.

Patients are named in logs, reports and model cards by a pseudonym (``patient_label``): a
PatientID identifies a person and must not leave the hospital in a model card.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.dicom.contrast import Contrast, Direction, classify
from pipeline.dicom.reformat import at_pixel_size, axial_volume
from pipeline.dicom.registration import Rigid, resample_onto
from pipeline.dicom.seriesfiles import SeriesFiles, scan_series
from pipeline.dicom.volume import SeriesError, Volume, load_series
from pipeline.harvest import salted_pseudonym
from pipeline.model.scores import place_real
from train.lesions import LESION_LEVEL, LesionMasks

PAIR_KEYWORDS = ("PatientID", "FrameOfReferenceUID")

# Voxels this far (pixels) from the head are background; skull-stripping leaves them all at
# one value, a scanner's own images have noise there (or zero-filling of part of it).
BACKGROUND_MARGIN = 3
STRIPPED_BACKGROUND_FRACTION = 0.999


class StudyGroup(StrEnum):
    """What a study looks like, for reporting scores by kind of input."""

    SKULL_STRIPPED = "skull-stripped"  # research releases: brain only, resampled to an atlas
    AS_ACQUIRED = "as acquired"  # what a scanner sends: skull, scanner grid, often slabs


@dataclass(frozen=True)
class StudyPair:
    """A T1 and a T2 series that belong together (same patient, study, frame of reference)."""

    label: str  # where the study was found, for people: its folder relative to the data root
    patient_id: str
    study_uid: str
    t1: SeriesFiles
    t2: SeriesFiles
    salt: str = ""  # the node's harvest salt, for pairs it harvested

    @property
    def patient(self) -> str:
        return patient_label(self.patient_id, self.salt)

    def source_and_target(self, direction: Direction) -> tuple[SeriesFiles, SeriesFiles]:
        first_is_t1 = Direction.parse(direction, "direction").source is Contrast.T1
        return (self.t1, self.t2) if first_is_t1 else (self.t2, self.t1)


@dataclass
class PairSearch:
    pairs: list[StudyPair]
    notes: list[str]  # why a study or series did not become a pair, one line each
    unpaired: list[tuple[Contrast, SeriesFiles]]  # T1 and T2 series with no partner


@dataclass(frozen=True, eq=False)
class PairedVolume:
    """A source series with its target resampled onto its grid, and which slices pair up."""

    pair: StudyPair
    direction: Direction
    source: Volume
    target: np.ndarray  # float32 (S, H, W): target intensities on the source grid
    covered: np.ndarray  # bool (S, H, W): source pixels that lie inside the target's volume
    head: np.ndarray  # bool (S, H, W): the head (or brain) in the source, holes filled
    slices: np.ndarray  # indices of the slices that make usable pairs, ascending
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> number of slices
    # None: same grid, aligned voxel for voxel by header (or registration not asked for).
    # Otherwise what the registration proposed, and whether it was applied or why not.
    registration: Rigid | None = None
    group: StudyGroup = StudyGroup.AS_ACQUIRED
    lesions: np.ndarray | None = None  # bool (S, H, W): an expert's lesion mask, if one exists

    def summary(self) -> str:
        total = self.source.pixels.shape[0]
        why = ", ".join(f"{count} {reason}" for reason, count in self.dropped.items())
        return (
            f"{self.pair.label} ({self.pair.patient}): {len(self.slices)} of {total} slice "
            f"pairs"
            + (f"; dropped {why}" if why else "")
            + (f"; {self.registration.describe()}" if self.registration else "")
        )


def patient_label(patient_id: str, salt: str = "") -> str:
    """A stable pseudonym for a PatientID, for logs, reports and model cards; with the
    node's ``salt``, the harvest's (``pipeline.harvest.salted_pseudonym``)."""
    if salt:
        return salted_pseudonym(patient_id, salt)
    return "patient-" + hashlib.sha256(patient_id.encode()).hexdigest()[:8]


def find_pairs(roots: Sequence[Path], salt: str = "") -> PairSearch:
    """Every T1/T2 pair under ``roots``, by header classification, never by file names.

    Series are grouped by (PatientID, StudyInstanceUID, FrameOfReferenceUID). A group with
    several T1 or T2 series pairs the one with the most slices of each and notes the rest.
    """
    roots = [Path(root) for root in roots]
    found = scan_series(roots, PAIR_KEYWORDS)
    notes = [f"skipped {path}: {reason}" for path, reason in found.unreadable]
    groups: dict[tuple[str, str, str], dict[Contrast, list[SeriesFiles]]] = {}
    for series in found.series:
        contrast = classify(series.header).contrast
        if contrast not in (Contrast.T1, Contrast.T2):
            continue
        patient = str(series.header.get("PatientID", ""))
        frame = str(series.header.get("FrameOfReferenceUID", ""))
        where = _label(series.folder, roots)
        if not patient or not frame:
            notes.append(f"{where}: {contrast} series without PatientID or FrameOfReferenceUID")
            continue
        key = (patient, series.study_uid, frame)
        groups.setdefault(key, {}).setdefault(contrast, []).append(series)

    pairs, unpaired = [], []
    for (patient, study, _), by_contrast in groups.items():
        t1s, t2s = by_contrast.get(Contrast.T1, []), by_contrast.get(Contrast.T2, [])
        if not t1s or not t2s:
            lonely = (t1s or t2s)[0]
            missing = "T2" if t1s else "T1"
            unpaired += [(Contrast.T1 if t1s else Contrast.T2, s) for s in t1s or t2s]
            notes.append(
                f"{_label(lonely.folder.parent, roots)}: no {missing} series in the same study "
                "and frame of reference; not paired"
            )
            continue
        t1 = max(t1s, key=lambda s: len(s.files))
        t2 = max(t2s, key=lambda s: len(s.files))
        for extra in [s for s in t1s + t2s if s is not t1 and s is not t2]:
            notes.append(f"{_label(extra.folder, roots)}: another series of the pair's contrast")
        label = _label(_common_folder(t1.folder, t2.folder), roots)
        pairs.append(StudyPair(label, patient, study, t1, t2, salt))
    pairs.sort(key=lambda p: p.label)
    return PairSearch(pairs, notes, unpaired)


def load_pair(
    pair: StudyPair,
    direction: Direction,
    register: bool = True,
    pixel_spacing_mm: float | None = None,
    lesions: LesionMasks | None = None,
) -> PairedVolume:
    """Read both series and resample the target onto the source's grid.

    The source is taken as the models see it: in its axial view, and with
    ``pixel_spacing_mm`` resampled in-plane to that pixel size where its own is far from it
    (``pipeline.dicom.reformat``; None: as it is, which evaluation wants, as the node resamples).

    The target is placed by ``pipeline.model.scores.place_real``: by its DICOM
    geometry, refined (with ``register``) by a rigid registration where the two series lie
    on different grids, voxel for voxel where they share one. Raises SeriesError when a
    series cannot be read, when the source has no axial view (a 2D sagittal or coronal
    series), or when the target's slices are unevenly spaced (its affine would misplace
    them).

    With ``lesions``, a mask drawn on either series is placed on the source's grid too.
    Raises LesionMaskError for a mask that does not fit its series.
    """
    source_files, target_files = pair.source_and_target(direction)
    as_read = load_series(source_files.files)
    # The slices the models learn from are the axial ones they will be shown (a 3D
    # sagittal T1 goes in as its axial view); the target is resampled onto those.
    source = axial_volume(as_read)
    if pixel_spacing_mm is not None:
        source = at_pixel_size(source, pixel_spacing_mm)
    target = load_series(target_files.files)
    if not target.uniform_spacing:
        raise SeriesError(f"{pair.label}: target series has unevenly spaced slices")
    real = place_real(source, target, register)
    placed = real.placement
    return PairedVolume(
        pair,
        direction,
        source,
        placed.resampled,
        placed.covered,
        real.head,
        real.slices,
        real.dropped,
        placed.registration,
        study_group(source.pixels, real.head),
        _lesions_on(source, [(source_files, as_read), (target_files, placed.volume)], lesions),
    )


def study_group(pixels: np.ndarray, head: np.ndarray) -> StudyGroup:
    """Skull-stripped when the background around the head is one value throughout."""
    background = pixels[~ndimage.binary_dilation(head, iterations=BACKGROUND_MARGIN)]
    if not background.size:
        return StudyGroup.AS_ACQUIRED
    _, counts = np.unique(background, return_counts=True)
    stripped = counts.max() >= STRIPPED_BACKGROUND_FRACTION * background.size
    return StudyGroup.SKULL_STRIPPED if stripped else StudyGroup.AS_ACQUIRED


def _lesions_on(
    grid: Volume, placed: list[tuple[SeriesFiles, Volume]], lesions: LesionMasks | None
) -> np.ndarray | None:
    """A mask drawn on one of the pair's series, moved to ``grid`` through that series'
    geometry as placed (registered, for the target)."""
    if lesions is None:
        return None
    for series, volume in placed:
        mask = lesions.for_series(series.series_uid)
        if mask is not None:
            resampled, covered = resample_onto(mask.on(volume), grid)
            return (resampled >= LESION_LEVEL) & covered
    return None


def _common_folder(first: Path, second: Path) -> Path:
    parts = []
    for a, b in zip(first.parts, second.parts, strict=False):
        if a != b:
            break
        parts.append(a)
    return Path(*parts)


def _label(folder: Path, roots: Sequence[Path]) -> str:
    for root in roots:
        base = root if root.is_dir() else root.parent
        try:
            relative = folder.relative_to(base)
        except ValueError:
            continue
        return str(relative) if relative.parts else base.name
    return str(folder)


def split_by_patient(
    pairs: list[StudyPair], holdout: Sequence[str], validation_fraction: float, seed: int
) -> tuple[list[StudyPair], list[StudyPair]]:
    """(training pairs, held-out pairs), split by patient, never by slice or study.

    ``holdout`` names patients by PatientID or by pseudonym; without it a seeded random
    ``validation_fraction`` of the patients (rounded, at least one when the fraction is
    positive and two or more patients exist) is held out. Raises ValueError for a held-out
    patient that has no pair.
    """
    patients = sorted({pair.patient_id for pair in pairs})
    pseudonyms = {pair.patient_id: pair.patient for pair in pairs}
    if holdout:
        chosen = set()
        for wanted in holdout:
            matches = [p for p in patients if wanted in (p, pseudonyms[p])]
            if not matches:
                raise ValueError(f"--holdout {wanted}: no paired study of that patient")
            chosen.update(matches)
    elif validation_fraction > 0 and len(patients) >= 2:
        count = min(len(patients) - 1, max(1, round(validation_fraction * len(patients))))
        order = np.random.default_rng(seed).permutation(len(patients))
        chosen = {patients[i] for i in order[:count]}
    else:
        chosen = set()
    return (
        [pair for pair in pairs if pair.patient_id not in chosen],
        [pair for pair in pairs if pair.patient_id in chosen],
    )
