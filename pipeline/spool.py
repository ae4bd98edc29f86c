"""The spool: where pixel data lives on disk, and how files get there durably.

Every file is written to a temporary name in its final folder, flushed to disk, then
renamed, and the folder itself is flushed, so a crash leaves either the whole file under
its final name or nothing under it. Received instances live under
``incoming/<study>/<series>/<instance>.dcm``, synthetic ones under ``out/<job>/``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# A DICOM UID is at most 64 characters of digits and dots (PS3.5 9.1). Anything else in a
# UID that becomes a path component could walk out of the spool ("../..") or collide.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

TEMP_SUFFIX = ".partial"


class InvalidUID(ValueError):
    """A UID that is not a valid DICOM UID and therefore cannot name a file."""


def check_uid(uid: str, what: str) -> str:
    """Return ``uid`` if it is a valid DICOM UID, else raise InvalidUID naming ``what``."""
    if not uid or len(uid) > 64 or not _UID.match(uid):
        raise InvalidUID(f"{what} is not a valid DICOM UID: {uid!r}")
    return uid


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either all of it or its old content.

    Raises OSError (ENOSPC, EACCES, EROFS...) with nothing left under ``path``'s new name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + TEMP_SUFFIX)
    try:
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    # The rename is only durable once the directory entry itself is on disk.
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_partial_files(root: Path) -> int:
    """Delete temporary files a crash left behind under ``root``; return how many."""
    removed = 0
    if root.exists():
        for leftover in root.rglob("*" + TEMP_SUFFIX):
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed
