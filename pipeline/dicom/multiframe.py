"""Enhanced MR (multi-frame) instances as one classic header per frame.

An Enhanced MR instance holds many slices as frames, and keeps what a classic MR Image holds
in each file (where the slice lies, its pixel spacing, its rescale) in functional groups,
shared by all frames or given per frame. Siemens XA and Philips scanners send whole series
this way. Each frame becomes a header with those attributes where a classic image has them,
so that ordering, the geometry checks, synthesis and the derived series treat both kinds the
same; the frame's number stays with it, because the synthetic image must reference it.

Headers only: ``pipeline.dicom.volume`` decodes the pixels, and turns the ValueErrors raised here
into its SeriesError, naming the file.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from pipeline.dicom.values import first_item

# Functional-group macro -> the attributes lifted from its item to the frame's header.
_LIFTED = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
}
_NOT_PER_FRAME = (
    "PixelData",
    "NumberOfFrames",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
)
# The Code Sequence Macro: all the classic Contrast/Bolus module's agent sequence may hold.
_CODE = ("CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning")


def is_multi_frame(dataset: Dataset) -> bool:
    """Whether ``dataset`` holds its slices as frames (Enhanced MR and its relatives)."""
    return "PerFrameFunctionalGroupsSequence" in dataset or frame_count(dataset) > 1


def frame_count(dataset: Dataset) -> int:
    try:
        # pydicom parses the IS value on access and raises on text that is not a number.
        value = dataset.get("NumberOfFrames")
        return 1 if value in (None, "") else int(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"an unreadable NumberOfFrames ({error})") from error


def split_frames(dataset: Dataset) -> list[tuple[int, Dataset]]:
    """(frame number from 1, the frame's header) for every frame of ``dataset``.

    The header has the instance's own attributes, then each lifted attribute from the
    frame's functional groups, else from the shared ones. Raises ValueError when the
    functional groups do not describe every frame.
    """
    frames = frame_count(dataset)
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        raise ValueError(
            f"{frames} frames but no per-frame functional groups; its frames cannot be "
            "placed in space"
        )
    if len(per_frame) != frames:
        raise ValueError(f"{frames} frames but {len(per_frame)} per-frame functional group items")
    shared_items = dataset.get("SharedFunctionalGroupsSequence")
    shared = shared_items[0] if shared_items else Dataset()
    common = _instance_attributes(dataset)
    headers = []
    for number, groups in enumerate(per_frame, start=1):
        header = Dataset()  # Dataset(common) would share common's elements dict
        header.update(common)
        # Kept from the file as read, so that its transfer syntax (lossy or not) stays known.
        header.file_meta = dataset.file_meta
        for macro, keywords in _LIFTED.items():
            item = first_item(groups, macro) or first_item(shared, macro)
            if item is None:
                continue
            for keyword in keywords:
                if keyword in item:
                    header[keyword] = item[keyword]
        headers.append((number, header))
    return headers


def _instance_attributes(dataset: Dataset) -> Dataset:
    """What every frame shares: the instance's attributes, in a classic image's terms."""
    common = Dataset()
    for element in dataset:
        if element.keyword not in _NOT_PER_FRAME:
            common.add(element)
    agents = dataset.get("ContrastBolusAgentSequence")
    if agents:
        # The Enhanced Contrast/Bolus module's items carry more than a code; a classic image
        # names the agent by its code alone, and in text.
        codes = DicomSequence()
        for agent in agents:
            code = Dataset()
            for keyword in _CODE:
                if keyword in agent:
                    code[keyword] = agent[keyword]
            codes.append(code)
        common.ContrastBolusAgentSequence = codes
        if not common.get("ContrastBolusAgent"):
            common.ContrastBolusAgent = str(codes[0].get("CodeMeaning", ""))[:64]
    return common
