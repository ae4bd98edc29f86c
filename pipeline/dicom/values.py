"""Small readers of DICOM values, shared by everything that reads headers: each says once
what an absent, empty or malformed value counts as."""

from __future__ import annotations

import re

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
