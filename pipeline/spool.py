"""The spool: where pixel data lives on disk, in one layout that only this module spells out.

Received instances lie under ``incoming/<study>/<series>/<instance>.dcm``, each as received
(a Part 10 file whose meta names the calling AE), each job's synthetic series under
``out/job-<id>/``, and harvested training pairs under ``harvest/pair-<id>/{t1,t2}/``.
The database keeps paths relative to the root, so the spool can move with
its database. Files get here through ``pipeline.files``: whole, or not at all.
"""

from __future__ import annotations

import struct
from pathlib import Path

from pipeline.files import make_folders, remove_partial_files

INCOMING = "incoming"
OUT = "out"
HARVEST = "harvest"
# The salt of harvested patients' pseudonyms: the node's own, made once (pipeline.harvest).
HARVEST_SALT = "harvest.salt"


class Spool:
    """The spool folder at ``root``: what lies where."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @staticmethod
    def instance_file(study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Where a received instance goes, relative to the root; the caller has checked the
        UIDs (``pipeline.dicom.values.check_uid``), which become path components."""
        return Path(INCOMING, study_uid, series_uid, sop_instance_uid + ".dcm")

    @staticmethod
    def job_folder(job_id: int) -> Path:
        """Where a job writes its synthetic series, relative to the root."""
        return Path(OUT, f"job-{job_id}")

    @staticmethod
    def harvest_folder(pair_id: int) -> Path:
        """Where a harvested pair's files are kept (hard links to the received files, so
        retention's deletions leave them), relative to the root."""
        return Path(HARVEST, f"pair-{pair_id}")

    def path(self, relative: str | Path) -> Path:
        """The file or folder at ``relative`` (as the database keeps it) under the root."""
        return self.root / relative

    def series_folder(self, study_uid: str, series_uid: str) -> Path:
        """The folder of a received series' instances."""
        return self.root / INCOMING / study_uid / series_uid

    def received_files(self) -> list[Path]:
        """Every received instance's file, in path order."""
        return sorted((self.root / INCOMING).rglob("*.dcm"))

    def series_files(self, folder: str | Path) -> list[Path]:
        """The instance files of the series in ``folder`` (relative), in name order."""
        return sorted(self.path(folder).glob("*.dcm"))

    def make(self) -> None:
        """Create the root, durably, if it is missing."""
        make_folders(self.root)

    def remove_partial_files(self) -> int:
        """Delete temporary files a crash left behind; return how many."""
        return remove_partial_files(self.root)


def stored_data_set(path: Path) -> bytes | None:
    """The data set of a Part 10 file the spool holds, as encoded (its file meta left out);
    None when there is no file at ``path``.

    Raises ValueError for a file that does not start as the node writes them: preamble,
    ``DICM``, then the file meta group led by its length (0002,0000).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if data[128:132] != b"DICM" or data[132:138] != b"\x02\x00\x00\x00UL":
        raise ValueError(f"{path.name} is not a Part 10 file with a meta group length")
    (meta_length,) = struct.unpack_from("<L", data, 140)
    return data[144 + meta_length :]
