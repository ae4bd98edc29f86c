"""Lesion masks made from FLAIR, for studies that have no expert's mask.

A glioma's tumour and oedema, and most white-matter lesions, are the brightest tissue of
a FLAIR image, where CSF is dark. So a study's FLAIR hyperintensity (brighter than the
brain's median by FLAIR_ROBUST_SDS robust standard deviations, opened, in components of at
least MIN_COMPONENT_MM3) is a rough lesion mask: it finds where a lesion is, not its
exact border. Only skull-stripped FLAIR is used: with the skull, the scalp's fat is as
bright. The masks are written in the format of ``train.lesions`` (on the grid of the
study's T1), so evaluation and training take them like an expert's::

    .venv/bin/python -m train.flairmasks ../shared/data/mr-brain ../shared/data/mr-brain-more \\
        --out var/flair-masks
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.dicom.contrast import Contrast, classify
from pipeline.dicom.registration import resample_onto
from pipeline.dicom.seriesfiles import SeriesFiles, scan_series
from pipeline.dicom.volume import SeriesError, Volume, load_series
from pipeline.model.preprocess import head_mask
from train.lesions import LESION_LEVEL
from train.pairs import StudyGroup, find_pairs, study_group

FLAIR_ROBUST_SDS = 3.0
MAD_TO_SD = 1.4826  # a normal distribution's standard deviation over its median deviation
MIN_COMPONENT_MM3 = 1000.0
BRAIN_EROSION = 3  # voxels: the brain's rim mixes tissue with the background


def flair_hyperintensity(flair: Volume) -> np.ndarray:
    """The bright lesions of a skull-stripped FLAIR volume, bool (S, H, W)."""
    pixels = np.asarray(flair.pixels)
    brain = ndimage.binary_erosion(head_mask(pixels), iterations=BRAIN_EROSION)
    median = float(np.median(pixels[brain]))
    spread = MAD_TO_SD * float(np.median(np.abs(pixels[brain] - median)))
    bright = ndimage.binary_opening(
        (pixels > median + FLAIR_ROBUST_SDS * spread) & brain, iterations=2
    )
    labels, count = ndimage.label(bright)
    sizes = ndimage.sum(bright, labels, range(1, count + 1)) * flair.voxel_mm3
    return np.isin(labels, 1 + np.flatnonzero(sizes >= MIN_COMPONENT_MM3))


def write_masks(data: list[Path], out: Path) -> list[str]:
    """A FLAIR-derived mask for every paired study with a skull-stripped FLAIR; one line
    per study saying what was written or why not."""
    search = find_pairs(data)
    flairs = _flair_series(data)
    lines = []
    out.mkdir(parents=True, exist_ok=True)
    for pair in search.pairs:
        flair = flairs.get((pair.patient_id, pair.study_uid))
        if flair is None:
            lines.append(f"{pair.label}: no FLAIR series")
            continue
        try:
            flair_volume = load_series(flair.files)
            t1 = load_series(pair.t1.files)
        except SeriesError as error:
            lines.append(f"{pair.label}: not read: {error}")
            continue
        if study_group(flair_volume.pixels, head_mask(flair_volume.pixels)) is not (
            StudyGroup.SKULL_STRIPPED
        ):
            lines.append(f"{pair.label}: FLAIR with the skull; no mask (the scalp is as bright)")
            continue
        lesion = flair_hyperintensity(flair_volume).astype(np.float32)
        on_t1, _ = resample_onto(replace(flair_volume, pixels=lesion), t1)
        mask = (on_t1 >= LESION_LEVEL).astype(np.uint8)
        if not mask.any():
            lines.append(f"{pair.label}: no FLAIR hyperintensity of {MIN_COMPONENT_MM3:g} mm3")
            continue
        np.savez_compressed(
            out / f"{pair.label.replace('/', '_')}-flair.npz",
            mask=mask,
            series_uid=pair.t1.series_uid,
            sop_uids=np.array([str(header.SOPInstanceUID) for header in t1.headers]),
        )
        lines.append(f"{pair.label}: {int(mask.sum())} voxels of FLAIR hyperintensity")
    return lines


def _flair_series(data: list[Path]) -> dict[tuple[str, str], SeriesFiles]:
    found = scan_series(data, ("PatientID",))
    return {
        (str(series.header.get("PatientID", "")), series.study_uid): series
        for series in found.series
        if classify(series.header).contrast is Contrast.FLAIR
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, nargs="+", help="folders of studies")
    parser.add_argument("--out", type=Path, default=Path("var/flair-masks"))
    args = parser.parse_args(argv)
    for line in write_masks(args.data, args.out):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
