"""Small readers of DICOM values, shared by everything that reads headers: each says once
what an absent, empty or malformed value counts as."""

from __future__ import annotations

import math
import re
from typing import Any

from pydicom import Dataset
from pydicom.multival import MultiValue

from pipeline.redact import fingerprint

# A DICOM UID is at most 64 characters of digits and dots (PS3.5 9.1). Anything else in a
# UID that becomes a path component could walk out of the spool ("../..") or collide.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class InvalidUID(ValueError):
    """A UID that is not a valid DICOM UID and therefore cannot name a file."""


def check_uid(uid: str, what: str) -> str:
    """Return ``uid`` if it is a valid DICOM UID, else raise InvalidUID naming ``what``
    and the value's length and hash (a malformed value can hold other elements' values)."""
    if not uid or len(uid) > 64 or not _UID.match(uid):
        raise InvalidUID(f"{what} is not a valid DICOM UID: {fingerprint(uid)}")
    return uid


def number_or_none(value: Any) -> float | None:
    """A header value as a finite number (the first of several), else None: absent,
    empty, text that is not a number, NaN."""
    if isinstance(value, list | tuple | MultiValue):
        value = value[0] if value else None
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def int_or_none(value: Any) -> int | None:
    """An IS or integer value as an int, else None: absent, empty or not an integer."""
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def first_item(ds: Dataset, keyword: str) -> Dataset | None:
    """The first item of a sequence, or None where it is absent, empty or unreadable."""
    try:
        sequence = ds.get(keyword)
    except Exception:  # pydicom raises many types for a corrupt sequence
        return None
    if not sequence or not isinstance(sequence[0], Dataset):
        return None
    return sequence[0]
