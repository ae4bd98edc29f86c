"""What fuzzing found (issue 12): each defect reproduced through a real association or socket."""

from __future__ import annotations

import os
import sqlite3
import struct

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage

from node.config import NodeSettings
from node.scp import StorageSCP
from pipeline.db import open_database
from tests.dicomgen import mr_series, write
from tests.nodeproc import NodeProcess, free_port, write_config
from tests.senders import send


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory):
    """One node (intake only) for the tests that leave it as they found it."""
    port = free_port()
    folder = tmp_path_factory.mktemp("integrity")
    process = NodeProcess(write_config(folder / "node", port), port).start()
    yield process
    process.stop()


def spool_files(node: NodeProcess) -> list:
    return sorted((node.config.parent / "spool").rglob("*.dcm"))


def instance_rows(node: NodeProcess, sop_instance_uid: str) -> list[tuple]:
    with sqlite3.connect(node.config.parent / "node.sqlite") as db:
        return db.execute(
            "select path, size from instance where sop_instance_uid = ?", (sop_instance_uid,)
        ).fetchall()


# 1. A re-send under the same SOP Instance UID with other content must not replace the file.


def test_a_conflicting_resend_leaves_the_acknowledged_file_as_it_was(shared_node):
    (axial,) = mr_series(1, rows=240, columns=240)
    assert send([axial], shared_node.port) == [(0, "")]
    ((path, size),) = instance_rows(shared_node, axial.SOPInstanceUID)
    stored = shared_node.config.parent / "spool" / path
    acknowledged = stored.read_bytes()

    (sagittal,) = mr_series(1, rows=16, columns=16)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(sagittal, keyword, getattr(axial, keyword))
    sagittal.file_meta.MediaStorageSOPInstanceUID = axial.SOPInstanceUID
    sagittal.FrameOfReferenceUID = axial.FrameOfReferenceUID
    sagittal.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ((status, comment),) = send([sagittal], shared_node.port)
    assert status == 0x0111  # Duplicate SOP Instance
    assert axial.SOPInstanceUID in comment
    assert stored.read_bytes() == acknowledged
    assert dcmread(stored).pixel_array.shape == (240, 240)
    assert f"{axial.SOPInstanceUID} is stored with other content" in shared_node.log()

    # The same instance again is a quiet duplicate; one row, one file, unchanged.
    assert send([axial], shared_node.port) == [(0, "")]
    assert instance_rows(shared_node, axial.SOPInstanceUID) == [(path, size)]
    assert stored.read_bytes() == acknowledged
    assert [f for f in spool_files(shared_node) if axial.SOPInstanceUID in f.name] == [stored]


# 5. A data set of another SOP class than its presentation context is refused.


@pytest.mark.parametrize("sop_class", [CTImageStorage, SecondaryCaptureImageStorage, "1.2.3.4"])
def test_a_data_set_of_another_sop_class_than_its_context_is_refused(
    shared_node, tmp_path, sop_class
):
    (ds,) = mr_series(1)
    ds.SOPClassUID = sop_class  # the file meta, and so the context, stays MR Image Storage
    path = tmp_path / "other-class.dcm"
    ds.preamble = bytes(128)  # written as it is, file meta included, not made to agree
    ds.save_as(path, enforce_file_format=False)
    assert dcmread(path).file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    ((status, comment),) = send([path], shared_node.port)
    assert status == 0xA900
    assert comment.startswith("SOPClassUID differs from its context's MR Image Storage")
    assert instance_rows(shared_node, ds.SOPInstanceUID) == []


# 4. A malformed element's value never reaches the log, nor do pydicom's warnings about it.


def swallowing_uid_file(folder) -> tuple:
    """A Part 10 file whose SOP Instance UID's length field swallows the elements after it,
    PatientName and PatientID among them, as the fuzzer sent it; (path, dataset)."""
    (ds,) = mr_series(1)
    ds.PatientName = "SECRET^NAME"
    ds.PatientID = "PID-4711"
    (path,) = write([ds], folder)
    data = bytearray(path.read_bytes())
    uid = data.index(b"\x08\x00\x18\x00UI")  # (0008,0018) UI, then a 2-byte length
    patient_id = data.index(b"\x10\x00\x20\x00LO")
    end = patient_id + 8 + struct.unpack_from("<H", data, patient_id + 6)[0]
    struct.pack_into("<H", data, uid + 6, end - (uid + 8))
    path.write_bytes(bytes(data))
    return path, ds


def test_a_malformed_uid_does_not_carry_patient_identifiers_into_the_log(shared_node, tmp_path):
    path, ds = swallowing_uid_file(tmp_path)
    ((status, comment),) = send([path], shared_node.port)
    assert status == 0xA900
    assert comment.startswith("SOPInstanceUID (0008,0018) is not a valid DICOM UID: <126 char")
    log = shared_node.log()
    assert "SECRET" not in log and "PID-4711" not in log
    assert max(len(line) for line in log.splitlines()) < 1000


# 8. Every folder made on the way to a received file is durable before its Success.


def test_every_folder_made_for_a_received_file_is_fsynced_before_success(tmp_path, monkeypatch):
    synced: list[int] = []  # inodes whose descriptor was fsynced, in order
    fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        fsync(descriptor)
        synced.append(os.fstat(descriptor).st_ino)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    storage = tmp_path / "spool"
    settings = NodeSettings(host="127.0.0.1", port=free_port())
    scp = StorageSCP(settings, open_database(f"sqlite:///{tmp_path}/node.sqlite"), storage)
    scp.start()
    try:
        (ds,) = mr_series(1)
        assert send([ds], scp.port) == [(0, "")]
    finally:
        scp.stop()
    series = storage / "incoming" / ds.StudyInstanceUID / ds.SeriesInstanceUID
    (received,) = series.iterdir()
    # A folder's entry lives in its parent: each new folder's parent is flushed, and the
    # file's own folder once the file is in it.
    for folder in (storage, storage / "incoming", series.parent, series):
        assert folder.parent.stat().st_ino in synced, folder
    assert synced.index(series.stat().st_ino) > synced.index(received.stat().st_ino)
