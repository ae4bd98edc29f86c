"""Receiving: real associations into a real node, checked through status and the database."""

from __future__ import annotations

import sqlite3
import subprocess
import threading

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from tests.support.dicomgen import mr_series
from tests.support.nodeproc import NodeProcess, free_port, write_config
from tests.support.senders import DCMTK_ENV, ECHOSCU, send, storescu


def rows(node: NodeProcess, query: str) -> list[tuple]:
    with sqlite3.connect(node.config.parent / "node.sqlite") as db:
        return db.execute(query).fetchall()


def by_description(status: dict) -> dict[str, dict]:
    return {s["description"]: s for s in status["series"]}


def test_real_studies_via_storescu_are_stored_classified_and_routed(node, mr_brain):
    study = mr_brain / "brats-gli-00001"
    result = storescu([study], node.port)
    assert result.returncode == 0, result.stderr

    status = node.wait_for(
        lambda s: all(x["state"] != "receiving" for x in s["series"]) and len(s["series"]) == 4
    )
    series = by_description(status)
    assert {k: v["instances"] for k, v in series.items()} == {
        "AX T1 SE": 155,
        "AX T2 TSE": 155,
        "AX T2 FLAIR": 155,
        "AX T1 SE +C": 155,
    }
    assert series["AX T1 SE"]["contrast"] == "T1" and series["AX T1 SE"]["state"] == "routed"
    assert series["AX T2 TSE"]["contrast"] == "T2" and series["AX T2 TSE"]["state"] == "routed"
    assert series["AX T2 FLAIR"]["contrast"] == "FLAIR"
    assert series["AX T2 FLAIR"]["state"] == "ignored"
    assert "contrast FLAIR is not T1" in series["AX T2 FLAIR"]["reason"]
    assert series["AX T1 SE +C"]["contrast"] == "T1C"
    assert series["AX T1 SE +C"]["state"] == "ignored"

    jobs = {j["series_uid"]: j for j in status["jobs"]}
    assert len(jobs) == 2
    assert jobs[series["AX T1 SE"]["series_uid"]]["direction"] == "t1-to-t2"
    assert jobs[series["AX T2 TSE"]["series_uid"]]["direction"] == "t2-to-t1"
    assert all(j["state"] == "queued" and j["destinations"] == ["pacs"] for j in jobs.values())

    # Every instance is a row and a complete file, byte for byte what the scanner sent.
    stored = rows(node, "select sop_instance_uid, path from instance")
    assert len(stored) == 620
    sent = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in study.rglob("*.dcm")}
    spool = node.config.parent / "spool"
    for uid, relative in stored[::50]:
        assert dcmread(spool / relative).PixelData == dcmread(sent[uid]).PixelData
    # The count announced by ImagesInAcquisition completed them, without the quiet time.
    assert "announced count reached" in node.log()
    assert "SECRET" not in node.log() and "BRATS-GLI" not in node.log()


def test_four_concurrent_associations_lose_nothing(node, mr_brain):
    files = sorted((mr_brain / "brats-met-00110").rglob("*.dcm"))
    shares = [files[i::4] for i in range(4)]
    results: list[list] = [[] for _ in shares]
    errors: list[BaseException] = []

    def sender(index: int) -> None:
        try:
            results[index] = send(shares[index], node.port, calling_ae=f"MOD{index}")
        except BaseException as error:  # reported below: a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert [len(r) for r in results] == [len(s) for s in shares]
    assert all(status == 0 for r in results for status, _ in r)
    status = node.wait_for(lambda s: len(s["jobs"]) == 2)
    assert sorted(s["instances"] for s in status["series"]) == [155, 155]
    assert rows(node, "select count(*) from instance") == [(310,)]


def test_echo_and_duplicate(node, tmp_path):
    echo = subprocess.run(
        [ECHOSCU, "-aec", "SYNTH", "127.0.0.1", str(node.port)], env=DCMTK_ENV, capture_output=True
    )
    assert echo.returncode == 0
    series = mr_series(3)
    assert send(series, node.port) == [(0, "")] * 3
    assert send(series[:1], node.port) == [(0, "")]  # a duplicate: Success, stored once
    assert rows(node, "select count(*) from instance") == [(3,)]


def test_a_resend_under_other_series_uids_is_refused_and_leaves_no_second_file(node):
    (original,) = mr_series(1)
    assert send([original], node.port) == [(0, "")]
    moved = mr_series(1)[0]
    moved.SOPInstanceUID = original.SOPInstanceUID  # re-sent with other study/series UIDs
    moved.file_meta.MediaStorageSOPInstanceUID = original.SOPInstanceUID
    ((status, comment),) = send([moved], node.port)
    assert status == 0x0111 and original.SOPInstanceUID in comment  # Duplicate SOP Instance
    spool = node.config.parent / "spool"
    (stored,) = list(spool.rglob("*.dcm"))
    assert original.SeriesInstanceUID in str(stored)
    assert rows(node, "select count(*) from instance") == [(1,)]


def test_unknown_calling_ae_and_wrong_called_ae_are_rejected(tmp_path):
    port = free_port()
    config = write_config(tmp_path, port, allowed_callers=["MRI1", "PACS@127.0.0.1", "CT@10.9.9.9"])
    node = NodeProcess(config, port).start()
    try:
        for calling, expected in [
            ("MRI1", True),
            ("PACS", True),
            ("CT", False),
            ("INTRUDER", False),
        ]:
            ae = AE(ae_title=calling)
            ae.add_requested_context(MRImageStorage)
            assoc = ae.associate("127.0.0.1", port, ae_title="SYNTH")
            assert assoc.is_established == expected, calling
            if assoc.is_established:
                assoc.release()
            else:
                rejection = assoc.acceptor.primitive
                assert (rejection.result, rejection.diagnostic) == (0x01, 0x03)
        ae = AE(ae_title="MRI1")
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="OTHER")
        assert assoc.is_rejected and assoc.acceptor.primitive.diagnostic == 0x07
        log = node.log()
        assert (
            "association from INTRUDER (127.0.0.1) rejected: calling AE title not recognized" in log
        )
    finally:
        node.stop()


def test_unsupported_sop_class_is_refused_and_logged(node):
    ae = AE(ae_title="CTSCAN")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SYNTH")
    assert assoc.is_established
    accepted = {c.abstract_syntax for c in assoc.accepted_contexts}
    assoc.release()
    assert accepted == {MRImageStorage}
    node.wait_for(lambda s: "CT Image Storage" in node.log(), timeout=5)
    assert (
        "association from CTSCAN (127.0.0.1): 1 SOP class(es) refused, not accepted by this "
        "node: CT Image Storage (1.2.840.10008.5.1.4.1.1.2)"
    ) in node.log()
