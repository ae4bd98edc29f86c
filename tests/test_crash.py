"""A SIGKILL in the middle of a series loses nothing that was acknowledged."""

from __future__ import annotations

import sqlite3
import threading
import time

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from tests.support.nodeproc import NodeProcess, free_port, write_config
from tests.support.senders import storescu


def test_kill_mid_series_then_resume(tmp_path, mr_brain):
    port = free_port()
    config = write_config(tmp_path, port)
    node = NodeProcess(config, port).start()
    database = tmp_path / "node.sqlite"

    # A complete T2 series first: its job must survive the crash.
    assert storescu([mr_brain / "brats-met-00110" / "04_t2"], port).returncode == 0
    node.wait_for(lambda s: len(s["jobs"]) == 1)

    t1 = [dcmread(p) for p in sorted((mr_brain / "brats-met-00110" / "03_t1").glob("*.dcm"))]
    acknowledged: list[str] = []

    def sender() -> None:
        ae = AE(ae_title="MRI1")
        ae.add_requested_context(MRImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="SYNTH")
        for ds in t1:
            status = assoc.send_c_store(ds)
            if not assoc.is_established or "Status" not in status or status.Status != 0:
                return
            acknowledged.append(ds.SOPInstanceUID)
        assoc.release()

    thread = threading.Thread(target=sender)
    thread.start()
    while len(acknowledged) < 60:
        time.sleep(0.01)
    node.kill()
    thread.join(30)
    assert 60 <= len(acknowledged) < len(t1), "the kill came too late to test anything"

    with sqlite3.connect(database) as db:
        stored = {uid for (uid,) in db.execute("select sop_instance_uid from instance")}
    assert set(acknowledged) <= stored  # durable before acknowledged

    node = NodeProcess(config, port).start()
    try:
        rest = [ds for ds in t1 if ds.SOPInstanceUID not in set(acknowledged)]
        ae = AE(ae_title="MRI1")
        ae.add_requested_context(MRImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="SYNTH")
        assert all(assoc.send_c_store(ds).Status == 0 for ds in rest)
        assoc.release()

        status = node.wait_for(lambda s: len(s["jobs"]) == 2)
        time.sleep(1)  # a second completion of the same series would show by now
        status = node.status()
        t1_series = [s for s in status["series"] if s["contrast"] == "T1"]
        assert len(t1_series) == 1 and t1_series[0]["instances"] == 155
        assert t1_series[0]["generation"] == 1 and t1_series[0]["state"] == "routed"
        assert sorted(j["direction"] for j in status["jobs"]) == ["t1-to-t2", "t2-to-t1"]
        assert all(j["state"] == "queued" for j in status["jobs"])
        spool = tmp_path / "spool"
        assert len(list(spool.rglob("*.dcm"))) == 310
        assert not list(spool.rglob("*.partial"))
    finally:
        node.stop()


def test_rows_lost_with_the_power_are_rebuilt_from_the_spool(tmp_path, mr_brain):
    """The database may lose its last commits in a power failure (synchronous=NORMAL);
    every acknowledged file is fsynced, so the node records it again at start."""
    port = free_port()
    config = write_config(tmp_path, port)
    node = NodeProcess(config, port).start()
    assert storescu([mr_brain / "tcga-fg-6692-native" / "03_t1"], port).returncode == 0
    node.wait_for(lambda s: len(s["jobs"]) == 1)
    node.kill()
    for leftover in tmp_path.glob("node.sqlite*"):  # worst case: every row is gone
        leftover.unlink()

    node = NodeProcess(config, port).start()
    try:
        status = node.wait_for(lambda s: len(s["jobs"]) == 1)
        (series,) = status["series"]
        assert series["instances"] == 26 and series["contrast"] == "T1"
        assert series["calling_ae"] == "STORESCU"  # kept in the file's meta information
        assert "recovered 26 received instance(s)" in node.log()
    finally:
        node.stop()
