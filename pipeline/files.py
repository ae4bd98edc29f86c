"""Durable files: written so that a crash leaves the whole file or nothing.

Every file is written to a temporary name in its final folder, flushed to disk, then
renamed (or linked), and the folder itself is flushed, so a crash leaves either the whole
file under its final name or nothing under it. A folder made on the way is flushed into
its parent before the file counts as stored. Knows nothing of what the files hold: the
spool (``pipeline.spool``), model files and the registry all write through here.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

TEMP_SUFFIX = ".partial"


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either all of it or its old content.

    Raises OSError (ENOSPC, EACCES, EROFS...) with nothing left under ``path``'s new name.
    """
    make_folders(path.parent)
    temp = path.with_name(path.name + TEMP_SUFFIX)
    try:
        _write_flushed(temp, data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def write_new(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` durably unless a file is already there.

    True when written; False when ``path`` already held a file, which is left untouched:
    a file the node acknowledged is never replaced. The caller makes the folder (see
    `DurableFolders`). Raises OSError with nothing left under ``path``.
    """
    # A temporary name of its own per thread: two senders of one instance write at once.
    temp = path.with_name(f"{path.name}.{threading.get_ident()}{TEMP_SUFFIX}")
    try:
        _write_flushed(temp, data)
        # Unlike a rename, a link fails instead of replacing what is already there.
        os.link(temp, path)
    except FileExistsError:
        return False
    finally:
        temp.unlink(missing_ok=True)
    _fsync_directory(path.parent)
    return True


def _write_flushed(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def make_folders(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each flushed into its parent folder: a
    new folder's entry lives there, and without the flush a power loss may take the new
    folder away with every file written into it."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another thread made it meanwhile
            new.mkdir()
        _fsync_directory(new.parent)


class DurableFolders:
    """Makes the folders of received files under ``root`` durable before a file in them is
    acknowledged.

    Each folder from ``root`` down is created if missing and flushed into its parent once
    per process. A folder found made by someone else is flushed here all the same: its
    maker may not have flushed it yet, and this thread may acknowledge first.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._durable: set[Path] = set()

    def make(self, folder: Path) -> None:
        """Create ``folder`` (under the root) and its parents as needed, all durable."""
        if folder in self._durable and folder.is_dir():
            return
        if self._root not in self._durable or not self._root.is_dir():
            make_folders(self._root)
            self._durable.add(self._root)
        for relative in _prefixes(folder, self._root):
            each = self._root / relative
            if each in self._durable and each.is_dir():
                continue
            with contextlib.suppress(FileExistsError):
                each.mkdir()
            _fsync_directory(each.parent)
            self._durable.add(each)


def _prefixes(folder: Path, root: Path) -> list[Path]:
    """``a``, ``a/b``, ``a/b/c`` for ``root/a/b/c``; ValueError if it is not under root."""
    parts = folder.relative_to(root).parts
    return [Path(*parts[: index + 1]) for index in range(len(parts))]


def _fsync_directory(folder: Path) -> None:
    # A new entry (a renamed or linked file, a new folder) is durable only once the
    # folder holding it is flushed.
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
