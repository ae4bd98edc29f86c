"""Compressed transfer syntaxes scanners send are accepted, stored as sent, and decode."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless

from tests.support.nodeproc import NodeProcess, free_port, write_config
from tests.support.senders import send

# DCMTK's encoders, each producing one of the syntaxes; JPEG 2000 comes from pydicom.
DCMTK_ENCODERS = {
    "1.2.840.10008.1.2.4.70": ["dcmcjpeg", "+e1"],  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57": ["dcmcjpeg", "+el"],  # JPEG Lossless
    "1.2.840.10008.1.2.4.80": ["dcmcjpls", "+el"],  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": ["dcmcjpls", "+en"],  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.5": ["dcmcrle"],  # RLE Lossless
    "1.2.840.10008.1.2": ["dcmconv", "+ti"],  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2": ["dcmconv", "+tb"],  # Explicit VR Big Endian
}


@pytest.fixture(scope="module")
def source(mr_brain):
    return sorted((mr_brain / "tcga-fg-6692-native" / "04_t2").glob("*.dcm"))[12]


def test_each_transfer_syntax_is_stored_and_decodes(tmp_path, source):
    original = dcmread(source).pixel_array
    files = []
    for index, (syntax, command) in enumerate(DCMTK_ENCODERS.items()):
        out = tmp_path / "send" / f"{index}.dcm"
        out.parent.mkdir(exist_ok=True)
        subprocess.run([f"/usr/bin/{command[0]}", *command[1:], str(source), str(out)], check=True)
        ds = dcmread(out)
        assert ds.file_meta.TransferSyntaxUID == syntax
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID[:50]}.{index + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out)
        files.append(out)
    j2k = dcmread(source)
    j2k.compress(JPEG2000Lossless)
    j2k.SOPInstanceUID = f"{j2k.SOPInstanceUID[:50]}.99"
    j2k.file_meta.MediaStorageSOPInstanceUID = j2k.SOPInstanceUID
    j2k.save_as(tmp_path / "send" / "j2k.dcm")
    files.append(tmp_path / "send" / "j2k.dcm")

    port = free_port()
    node = NodeProcess(write_config(tmp_path / "node", port), port).start()
    try:
        # pynetdicom proposes each file's own transfer syntax and sends the file's bytes.
        assert send(files, port) == [(0, "")] * len(files)
        stored = {
            str(dcmread(p).file_meta.TransferSyntaxUID): dcmread(p)
            for p in (tmp_path / "node" / "spool").rglob("*.dcm")
        }
    finally:
        node.stop()
    assert set(stored) == set(DCMTK_ENCODERS) | {JPEG2000Lossless}
    for syntax, ds in stored.items():
        difference = np.abs(ds.pixel_array.astype(int) - original.astype(int)).max()
        # Near-lossless JPEG-LS may differ by its NEAR value (2 with dcmcjpls +en).
        assert difference <= (2 if syntax.endswith(".81") else 0), syntax
