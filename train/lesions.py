"""Expert lesion masks, placed on the grid a pair's source is seen on.

A mask file is numpy's ``.npz`` with ``mask`` (uint8 slices x rows x columns, 1 = lesion)
on the grid of one series, ``series_uid`` (that series' SeriesInstanceUID) and ``sop_uids``
(the SOPInstanceUID of each of its slices, in the mask's order), as
``../shared/data/lesions`` holds them. A folder of such files is looked up by series UID,
so a mask follows its series whatever folder the study was exported to.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.dicom.volume import Volume

# A placed mask is linearly resampled, then cut here: a voxel counts as lesion when at least
# half of it is.
LESION_LEVEL = 0.5


class LesionMaskError(ValueError):
    """A mask file that cannot be used; the message names the file and why."""


@dataclass(frozen=True, eq=False)
class LesionMask:
    path: Path
    series_uid: str
    sop_uids: tuple[str, ...]
    mask: np.ndarray  # bool (slices, rows, columns) in sop_uids' order

    def on(self, volume: Volume) -> Volume:
        """The mask as a volume with ``volume``'s geometry (``volume`` is its series)."""
        index = {uid: position for position, uid in enumerate(self.sop_uids)}
        uids = [str(header.get("SOPInstanceUID", "")) for header in volume.headers]
        missing = [uid for uid in uids if uid not in index]
        if missing or len(uids) != self.mask.shape[0]:
            raise LesionMaskError(
                f"{self.path}: its {self.mask.shape[0]} slices are not the {len(uids)} "
                f"instances of series {self.series_uid} ({len(missing)} not in the mask)"
            )
        if self.mask.shape[1:] != volume.pixels.shape[1:]:
            raise LesionMaskError(
                f"{self.path}: mask slices are {self.mask.shape[1:]}, the series' are "
                f"{volume.pixels.shape[1:]}"
            )
        ordered = self.mask[[index[uid] for uid in uids]].astype(np.float32)
        return replace(volume, pixels=ordered)


class LesionMasks:
    """The masks of a folder, by the SeriesInstanceUID of the series each is drawn on."""

    def __init__(self, masks: list[LesionMask]) -> None:
        self._by_series = {mask.series_uid: mask for mask in masks}

    @classmethod
    def load(cls, *folders: Path) -> LesionMasks:
        """Every ``*.npz`` of ``folders`` (an earlier folder's mask of a series wins).
        Raises LesionMaskError for a missing folder or a file without the three arrays."""
        masks = []
        for folder in map(Path, reversed(folders)):
            if not folder.is_dir():
                raise LesionMaskError(f"lesion mask folder {folder} does not exist")
            masks += cls._read(folder)
        return cls(masks)

    @staticmethod
    def _read(folder: Path) -> list[LesionMask]:
        masks = []
        for path in sorted(folder.glob("*.npz")):
            try:
                with np.load(path) as content:
                    mask = np.asarray(content["mask"]) > 0
                    series_uid = str(content["series_uid"])
                    sop_uids = tuple(str(uid) for uid in content["sop_uids"])
            except (OSError, KeyError, ValueError) as error:
                raise LesionMaskError(
                    f"{path}: not a lesion mask (needs arrays mask, series_uid and sop_uids): "
                    f"{error}"
                ) from error
            if mask.ndim != 3 or mask.shape[0] != len(sop_uids):
                raise LesionMaskError(
                    f"{path}: mask of shape {mask.shape} for {len(sop_uids)} slices"
                )
            masks.append(LesionMask(path, series_uid, sop_uids, mask))
        return masks

    def __len__(self) -> int:
        return len(self._by_series)

    def for_series(self, series_uid: str) -> LesionMask | None:
        return self._by_series.get(series_uid)
