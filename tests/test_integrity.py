"""What fuzzing found (issue 12): each defect reproduced through a real association or socket."""

from __future__ import annotations

import os
import socket
import sqlite3
import struct
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, RLELossless, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, Association
from pynetdicom.sop_class import Verification

from node.config import NodeSettings
from node.scp import StorageSCP
from pipeline.state.db import open_database
from tests.support import rawdicom
from tests.support.dicomgen import mr_series, write
from tests.support.models import make_registry
from tests.support.nodeproc import (
    NodeProcess,
    dicomnode_status,
    free_port,
    routes_toml,
    run_dicomnode,
    write_config,
)
from tests.support.peers import Orthanc
from tests.support.reliability import settled_stats
from tests.support.senders import send, storescu


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory):
    """One node (intake only) for the tests that leave it as they found it."""
    port = free_port()
    folder = tmp_path_factory.mktemp("integrity")
    # A connection that never requests an association holds its thread this long.
    config = write_config(folder / "node", port, association_request_timeout_seconds=2)
    process = NodeProcess(config, port).start()
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


# 3. A P-DATA PDU longer than the maximum the node announced is refused, not buffered.


def test_a_pdu_longer_than_the_announced_maximum_is_aborted_at_its_header(shared_node):
    with rawdicom.open_association(shared_node.port) as sock:
        # 256 MiB announced; a few KiB sent. The node must not wait for (or keep) the rest.
        sock.sendall(struct.pack(">BBL", rawdicom.PduType.P_DATA_TF, 0, 256 << 20))
        sock.sendall(bytes(4096))
        assert rawdicom.ends_with_abort_or_close(sock, timeout=5)
    assert "PDU of 268435456 bytes announced" in shared_node.log()
    assert send(mr_series(1), shared_node.port) == [(0, "")]  # and the node carries on


# 4. A malformed element's value never reaches the log, nor do pydicom's warnings about it.


def swallowing_uid_file(folder: Path) -> Path:
    """A Part 10 file whose SOP Instance UID's length field swallows the elements after it,
    PatientName and PatientID among them, as the fuzzer sent it."""
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
    return path


def test_a_malformed_uid_does_not_carry_patient_identifiers_into_the_log(shared_node, tmp_path):
    path = swallowing_uid_file(tmp_path)
    ((status, comment),) = send([path], shared_node.port)
    assert status == 0xA900
    assert comment.startswith("SOPInstanceUID (0008,0018) is not a valid DICOM UID: <126 char")
    log = shared_node.log()
    assert "SECRET" not in log and "PID-4711" not in log
    assert max(len(line) for line in log.splitlines()) < 1000


# 6. Malformed PDUs end their association, not a thread of the node, and leak nothing.


@pytest.mark.parametrize("name", rawdicom.MALFORMED_MESSAGES)
def test_a_malformed_pdu_after_association_aborts_it_cleanly(shared_node, name):
    before = settled_stats(shared_node.process.pid)
    with rawdicom.open_association(shared_node.port) as sock:
        sock.sendall(rawdicom.MALFORMED_MESSAGES[name]())
        assert rawdicom.ends_with_abort_or_close(sock, timeout=10), name
    assert settled_stats(shared_node.process.pid, before).counts() == before.counts()
    log = shared_node.log()
    assert "Traceback" not in log and "Exception in thread" not in log
    assert send(mr_series(1), shared_node.port) == [(0, "")]


def test_malformed_association_requests_end_cleanly(shared_node):
    before = settled_stats(shared_node.process.pid)
    even_context = rawdicom.associate_rq(contexts=(rawdicom.Context(id=2),))
    # A request followed at once by garbage: the peer's PDU arrives while the node answers.
    request_then_garbage = rawdicom.associate_rq() + rawdicom.pdu(0x55, b"\x00" * 4)
    truncated = rawdicom.associate_rq()[:40]
    for data in (even_context, request_then_garbage, truncated, b"\x01\x00\x00\x00\x00\x02ab"):
        with rawdicom.connect(shared_node.port) as sock:
            sock.sendall(data)
            if data is truncated:
                sock.shutdown(socket.SHUT_WR)
            assert rawdicom.ends_with_abort_or_close(sock, timeout=10)
    assert settled_stats(shared_node.process.pid, before).counts() == before.counts()
    log = shared_node.log()
    assert "Traceback" not in log and "Exception in thread" not in log


# 2. Stalled and half-open sockets neither hold their thread nor starve real senders.


def verification(port: int) -> Association:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="SYNTH")


def test_stalled_sockets_do_not_lock_senders_out_and_are_dropped(tmp_path):
    port = free_port()
    config = write_config(
        tmp_path / "node",
        port,
        max_associations=4,
        receivers=1,  # the limit counts per receiver process
        pdu_timeout_seconds=1.5,
        association_request_timeout_seconds=1.5,
    )
    node = NodeProcess(config, port).start()
    stalled: list[socket.socket] = []
    try:
        for index in range(42):
            sock = rawdicom.connect(port)
            if index % 3 == 0:  # a PDU header announcing 4 GiB, then nothing
                sock.sendall(bytes.fromhex("0100FFFFFFFF"))
            elif index % 3 == 1:  # the start of an A-ASSOCIATE-RQ, then nothing
                sock.sendall(rawdicom.associate_rq()[:20])
            stalled.append(sock)  # else: nothing at all
        # Forty-two sockets hold no association: senders still get in, up to the limit.
        held = [verification(port) for _ in range(4)]
        assert all(assoc.is_established for assoc in held)
        fifth = verification(port)
        assert fifth.is_rejected
        rejection = fifth.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
        for assoc in held:
            assoc.release()
        assert send(mr_series(2), port) == [(0, "")] * 2
        # Each stalled socket is dropped once its time is up, not held for ever.
        assert all(rawdicom.ends_with_abort_or_close(sock, timeout=10) for sock in stalled)
        log = node.log()
        assert "PDU of 4294967295 bytes announced, more than the 1048576" in log
        assert "PDU not received in full within 1.5 s" in log
        assert "no A-ASSOCIATE-RQ within 1.5 s" in log
    finally:
        for sock in stalled:
            sock.close()
        node.stop()


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


# 7. A node restarted after a crash takes back at once what its dead predecessor held.


def first_row(node: NodeProcess, query: str) -> tuple | None:
    with sqlite3.connect(node.config.parent / "node.sqlite") as db:
        return db.execute(query).fetchone()


def poll(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def test_a_restart_takes_back_at_once_what_its_killed_predecessor_held(tmp_path, mr_brain):
    # A PACS that takes the connection and never answers: a delivery to it stays "sending".
    silent_pacs = socket.create_server(("127.0.0.1", 0), backlog=8)
    pacs_port = silent_pacs.getsockname()[1]
    registry = make_registry(tmp_path / "models")
    port = free_port()
    config = write_config(
        tmp_path / "node",
        port,
        extra=routes_toml(Orthanc.AE_TITLE, pacs_port),
        models=registry.root,
    )
    node = NodeProcess(config, port).start()
    orthanc = None
    try:
        assert storescu([mr_brain / "tcga-fg-6692-native" / "03_t1"], port).returncode == 0
        poll(lambda: first_row(node, "select id from job where state = 'running'"), 60, "a job")
        node.kill()  # in the middle of synthesis: the job's lease runs 15 minutes

        (job,) = dicomnode_status(config)["jobs"]
        assert job["state"] == "running" and job["holder"] == "gone"
        assert job["held_by"].startswith(f"{socket.gethostname()}:{node.process.pid}:")
        shown = run_dicomnode("status", "--config", str(config)).stdout
        assert f"held by {job['held_by']} until {job['held_until']}" in shown
        assert "that process is gone" in shown

        node = NodeProcess(config, port).start()
        poll(lambda: first_row(node, "select id from delivery where state = 'sending'"), 60, "send")
        log = node.log()
        assert f"job {job['id']}: taken back, its worker {job['held_by']} stopped while" in log
        assert "resuming: " in log
        node.kill()  # while the delivery waits on the silent PACS: its lease runs 5 minutes

        silent_pacs.close()
        orthanc = Orthanc(tmp_path / "orthanc", dicom_port=pacs_port).start()
        node = NodeProcess(config, port).start()
        status = node.wait_for(lambda s: s["deliveries"][0]["state"] == "sent", timeout=60)
        delivery = status["deliveries"][0]
        assert delivery["attempts"] == 2  # the dead attempt counts, as an expired lease's
        assert "did not finish (that process is gone)" in node.log()
    finally:
        node.stop()
        silent_pacs.close()
        if orthanc is not None:
            orthanc.stop()


# 9. Found by the harness (bench/reliability) once the above were fixed.


def test_rle_data_that_makes_the_rust_decoder_panic_is_refused_as_undecodable(shared_node):
    (ds,) = mr_series(1, rows=64, columns=64)
    # Each segment: 33 runs of 128 repeated bytes, one run more than a 64x64 plane holds.
    segment = b"\x81\x00" * 33
    header = struct.pack("<16L", 2, 64, 64 + len(segment), *[0] * 13)
    ds.PixelData = encapsulate([header + segment + segment])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    ((status, comment),) = send([ds], shared_node.port, transfer_syntax=RLELossless)
    assert status == 0xC000 and comment.startswith("pixel data cannot be decoded")


def test_a_data_set_of_another_instance_than_its_request_names_is_refused(shared_node, tmp_path):
    (ds,) = mr_series(1)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # the request's UID
    ds.preamble = bytes(128)
    path = tmp_path / "other-instance.dcm"
    ds.save_as(path, enforce_file_format=False)
    ((status, comment),) = send([path], shared_node.port)
    assert status == 0xA900
    assert comment.startswith("SOPInstanceUID differs from the request's Affected SOP")
    assert instance_rows(shared_node, ds.SOPInstanceUID) == []
