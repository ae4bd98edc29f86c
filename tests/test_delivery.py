"""Deliveries: the state machine on a real SQLite file, and sending to real peers."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage

from node.scu import echo, send_series
from pipeline.routing import Destination
from pipeline.state.db import Delivery, Job, JobState, Series, open_database, utcnow
from pipeline.state.deliveries import (
    SENT,
    DeliverySettings,
    InstanceResult,
    backoff_ceiling,
    claim_delivery,
    create_deliveries,
    record_attempt,
    retry_delivery,
)
from tests.support.dicomgen import mr_series, write
from tests.support.nodeproc import free_port
from tests.support.peers import Orthanc

SETTINGS = DeliverySettings(backoff_seconds=1, backoff_max_seconds=8, max_attempts=6)
FAST = DeliverySettings(timeout_seconds=1, lease_seconds=10)


@pytest.fixture
def db_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/node.sqlite"


@pytest.fixture
def sessions(db_url):
    return open_database(db_url)


def make_job(sessions, destinations: list[str], output_path: str = "out/1") -> int:
    now = utcnow()
    with sessions.begin() as session:
        series = Series(
            series_uid=f"1.2.3.{time.monotonic_ns()}",
            study_uid="1.2.3",
            sop_class_uid=MRImageStorage,
            calling_ae="MRI1",
            rows=32,
            columns=32,
            first_arrival=now,
            last_arrival=now,
            header={},
            contrast="T1",
            contrast_reason="test",
        )
        session.add(series)
        session.flush()
        job = Job(
            series_id=series.id,
            generation=1,
            route="t1",
            direction="t1-to-t2",
            model="t1-to-t2",
            destinations=destinations,
            state=JobState.DONE,
            output_series_uid="1.2.3.9",
            output_path=output_path,
            output_count=2,
            created_at=now,
            updated_at=now,
        )
        session.add(job)
        session.flush()
        create_deliveries(session, job)
        return job.id


def delivery(sessions, delivery_id: int) -> Delivery:
    with sessions() as session:
        return session.get(Delivery, delivery_id)


def fail_once(sessions, owner: str, now, error: str = "cannot connect to PACS: refused"):
    claimed = claim_delivery(sessions, owner, SETTINGS, now=now)
    state = record_attempt(
        sessions,
        claimed.id,
        owner,
        {"1.1": InstanceResult.not_sent("not sent")},
        error,
        SETTINGS,
        now=now,
    )
    return claimed, state


# The state machine.


def test_one_delivery_per_destination_and_claims_are_exclusive(sessions):
    job_id = make_job(sessions, ["pacs", "archive", "pacs"])
    now = utcnow()
    first = claim_delivery(sessions, "a", SETTINGS, now=now)
    second = claim_delivery(sessions, "b", SETTINGS, now=now)
    assert claim_delivery(sessions, "c", SETTINGS, now=now) is None
    assert {first.destination, second.destination} == {"pacs", "archive"}
    assert first.job_id == second.job_id == job_id
    assert first.output_path == "out/1" and first.already_sent == frozenset()
    assert delivery(sessions, first.id).lease_owner == "a"


def test_concurrent_senders_never_share_a_delivery(db_url):
    setup = open_database(db_url)
    for _ in range(10):
        make_job(setup, ["pacs", "archive"])
    claimed: dict[str, list[int]] = {}

    def sender(name: str) -> None:
        # Its own engine: a separate process would have its own connections too.
        own = open_database(db_url)
        mine = claimed.setdefault(name, [])
        while (got := claim_delivery(own, name, SETTINGS)) is not None:
            mine.append(got.id)

    threads = [threading.Thread(target=sender, args=(f"s{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    every = [i for ids in claimed.values() for i in ids]
    assert sorted(every) == list(range(1, 21))


def test_an_expired_lease_is_taken_over_and_the_dead_result_ignored(sessions):
    make_job(sessions, ["pacs"])
    t0 = utcnow()
    dead = claim_delivery(sessions, "dead", SETTINGS, now=t0)
    before_expiry = t0 + timedelta(seconds=SETTINGS.lease_seconds - 1)
    assert claim_delivery(sessions, "live", SETTINGS, now=before_expiry) is None
    after_expiry = t0 + timedelta(seconds=SETTINGS.lease_seconds + 1)
    live = claim_delivery(sessions, "live", SETTINGS, now=after_expiry)
    assert live.id == dead.id and live.attempt == 2  # the dead attempt counts
    assert "dead" in delivery(sessions, live.id).reason

    late = record_attempt(sessions, dead.id, "dead", {"1.1": SENT}, None, SETTINGS)
    assert late == "sending"
    row = delivery(sessions, live.id)
    assert row.lease_owner == "live" and row.instance_results is None
    state = record_attempt(sessions, live.id, "live", {"1.1": SENT, "1.2": SENT}, None, SETTINGS)
    assert state == "sent" and delivery(sessions, live.id).attempts == 2


def test_backoff_grows_with_full_jitter_is_capped_and_ends_in_failure(sessions):
    assert [backoff_ceiling(n, SETTINGS) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    make_job(sessions, ["pacs"])
    now = utcnow()
    for attempt in range(1, SETTINGS.max_attempts):
        claimed, state = fail_once(sessions, "a", now)
        assert claimed.attempt == attempt and state == "pending"
        row = delivery(sessions, claimed.id)
        delay = (row.next_attempt_at - now).total_seconds()
        assert 0 <= delay <= backoff_ceiling(attempt, SETTINGS)
        assert row.reason == "cannot connect to PACS: refused"
        # Not due before its time, due at it.
        if delay > 0.001:
            assert claim_delivery(sessions, "a", SETTINGS, now=now) is None
        now = row.next_attempt_at
    claimed, state = fail_once(
        sessions, "a", now, error="status 0xA700 (Refused: Out of Resources)"
    )
    assert state == "failed"
    row = delivery(sessions, claimed.id)
    assert row.reason == "gave up after 6 attempts: status 0xA700 (Refused: Out of Resources)"
    assert claim_delivery(sessions, "a", SETTINGS, now=now + timedelta(days=1)) is None


def test_sent_instances_are_not_sent_again(sessions):
    make_job(sessions, ["pacs"])
    now = utcnow()
    first = claim_delivery(sessions, "a", SETTINGS, now=now)
    results = {
        "1.1": SENT,
        "1.2": InstanceResult.sent(warning="0xB000 (Coercion of Data Elements)"),
        "1.3": InstanceResult.not_sent("status 0xA700 (Refused: Out of Resources): disk full"),
    }
    error = "1 of 3 instance(s) not stored"
    assert record_attempt(sessions, first.id, "a", results, error, SETTINGS, now=now) == "pending"
    row = delivery(sessions, first.id)
    assert (row.instances_sent, row.instances_total) == (2, 3)

    retry = claim_delivery(sessions, "a", SETTINGS, now=row.next_attempt_at)
    assert retry.already_sent == {"1.1", "1.2"}
    assert record_attempt(sessions, retry.id, "a", {"1.3": SENT}, None, SETTINGS) == "sent"
    row = delivery(sessions, first.id)
    assert (row.state, row.instances_sent, row.attempts, row.reason) == ("sent", 3, 2, None)


def test_results_recorded_as_text_by_an_earlier_version_still_count(sessions):
    # A node upgraded while deliveries were pending finds their results as the text they
    # were kept as before results had a type.
    make_job(sessions, ["pacs"])
    with sessions.begin() as session:
        row = session.get(Delivery, 1)
        row.instance_results = {
            "1.1": "sent",
            "1.2": "sent, warning 0xB000 (Coercion of Data Elements)",
            "1.3": "status 0xA700 (Refused: Out of Resources): disk full",
        }
    claimed = claim_delivery(sessions, "a", SETTINGS)
    assert claimed.already_sent == {"1.1", "1.2"}
    assert record_attempt(sessions, claimed.id, "a", {"1.3": SENT}, None, SETTINGS) == "sent"
    assert delivery(sessions, claimed.id).instances_sent == 3


def test_an_attempt_with_an_error_is_not_sent_even_if_no_instance_failed(sessions):
    make_job(sessions, ["pacs"])
    claimed = claim_delivery(sessions, "a", SETTINGS)
    error = "1 file(s) cannot be read (x.dcm: truncated)"
    assert record_attempt(sessions, claimed.id, "a", {"1.1": SENT}, error, SETTINGS) == "pending"


def test_retry_of_a_failed_delivery(sessions):
    make_job(sessions, ["pacs"])
    once = DeliverySettings(max_attempts=1)
    claimed = claim_delivery(sessions, "a", once)
    assert record_attempt(sessions, claimed.id, "a", {}, "refused", once) == "failed"

    message = retry_delivery(sessions, claimed.id, origin="test")
    assert message == f"delivery {claimed.id} to pacs queued again"
    row = delivery(sessions, claimed.id)
    assert (row.state, row.attempts) == ("pending", 0)
    again = claim_delivery(sessions, "b", once)
    assert again.id == claimed.id and again.attempt == 1

    with pytest.raises(ValueError, match="being sent now by b"):
        retry_delivery(sessions, claimed.id, origin="test")
    record_attempt(sessions, claimed.id, "b", {"1.1": SENT, "1.2": SENT}, None, once)
    with pytest.raises(ValueError, match="already sent"):
        retry_delivery(sessions, claimed.id, origin="test")
    with pytest.raises(ValueError, match="there is no delivery 99"):
        retry_delivery(sessions, 99, origin="test")


def test_settings_reject_inconsistent_values():
    with pytest.raises(ValueError, match="backoff_max_seconds"):
        DeliverySettings(backoff_seconds=60, backoff_max_seconds=10)
    with pytest.raises(ValueError, match="lease_seconds"):
        DeliverySettings(timeout_seconds=60, lease_seconds=100)


# Real peers over loopback.


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield pacs
    pacs.stop()


def pacs_of(orthanc: Orthanc, ae_title: str = Orthanc.AE_TITLE) -> Destination:
    return Destination(ae_title=ae_title, host="127.0.0.1", port=orthanc.dicom_port)


def stored_uids(orthanc: Orthanc, series_uid: str) -> set[str]:
    instances = orthanc.get("/instances?expand")
    return {
        i["MainDicomTags"]["SOPInstanceUID"]
        for i in instances
        if orthanc.get(f"/instances/{i['ID']}/simplified-tags")["SeriesInstanceUID"] == series_uid
    }


def test_send_series_to_orthanc_skips_what_was_sent(orthanc, tmp_path):
    datasets = mr_series(3)
    files = write(datasets, tmp_path / "out")
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    series_uid = str(datasets[0].SeriesInstanceUID)

    first = send_series(pacs_of(orthanc), files, {uids[0]}, FAST, "SYNTH")
    assert first == type(first)({uids[1]: SENT, uids[2]: SENT}, None)
    assert stored_uids(orthanc, series_uid) == {uids[1], uids[2]}

    rest = send_series(pacs_of(orthanc), files, {uids[1], uids[2]}, FAST, "SYNTH")
    assert rest.results == {uids[0]: SENT} and rest.error is None
    assert stored_uids(orthanc, series_uid) == set(uids)
    nothing = send_series(pacs_of(orthanc), files, set(uids), FAST, "SYNTH")
    assert nothing.results == {} and nothing.error is None


def test_claim_send_record_against_orthanc(orthanc, tmp_path, sessions):
    spool = tmp_path / "spool"
    datasets = mr_series(2)
    write(datasets, spool / "out" / "1")
    make_job(sessions, ["pacs"], output_path="out/1")
    claimed = claim_delivery(sessions, "node-1", FAST)
    files = sorted((spool / claimed.output_path).glob("*.dcm"))
    sent = send_series(pacs_of(orthanc), files, set(claimed.already_sent), FAST, "SYNTH")
    state = record_attempt(sessions, claimed.id, "node-1", sent.results, sent.error, FAST)
    assert state == "sent"
    assert delivery(sessions, claimed.id).instances_sent == 2


def test_nothing_listening_is_connection_refused(tmp_path):
    files = write(mr_series(2), tmp_path / "out")
    port = free_port()
    closed = Destination(ae_title="PACS", host="127.0.0.1", port=port)
    result = send_series(closed, files, set(), FAST, "SYNTH")
    assert result.error == f"cannot connect to PACS@127.0.0.1:{port}: connection refused"
    assert len(result.results) == 2
    assert all(r.detail.startswith("not sent: cannot connect") for r in result.results.values())
    assert echo(closed, FAST, "SYNTH") == result.error


def test_wrong_called_ae_is_rejected_readably(orthanc, tmp_path):
    files = write(mr_series(1), tmp_path / "out")
    result = send_series(pacs_of(orthanc, "NOTORTHANC"), files, set(), FAST, "SYNTH")
    assert result.error.startswith(
        f"association rejected by NOTORTHANC@127.0.0.1:{orthanc.dicom_port}"
    )
    assert "called AE title not recognised" in result.error
    assert "permanent" in result.error


def test_echo_orthanc(orthanc):
    assert echo(pacs_of(orthanc), FAST, "SYNTH") is None


@pytest.fixture
def moody_pacs():
    """A pynetdicom Storage SCP that answers by InstanceNumber: 1 refused, 2 a warning,
    3 no answer in time (like a lost response), others Success."""
    ae = AE(ae_title="MOODY")
    ae.add_supported_context(MRImageStorage)
    release = threading.Event()

    def on_store(event: evt.Event) -> Dataset | int:
        number = event.dataset.InstanceNumber
        if number == 1:
            status = Dataset()
            status.Status = 0xA700
            status.ErrorComment = "disk full"
            return status
        if number == 2:
            return 0xB000
        if number == 3:
            release.wait(5)
        return 0x0000

    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    yield Destination(ae_title="MOODY", host="127.0.0.1", port=port)
    release.set()
    server.shutdown()


def test_statuses_warnings_and_a_lost_response(moody_pacs, tmp_path):
    datasets = mr_series(4)
    files = write(datasets, tmp_path / "out")
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    result = send_series(moody_pacs, files, set(), FAST, "SYNTH")
    assert result.results[uids[0]] == InstanceResult.not_sent(
        "status 0xA700 (Refused: Out of Resources): disk full"
    )
    assert result.results[uids[1]] == InstanceResult.sent(
        warning="0xB000 (Coercion of Data Elements)"
    )
    assert result.results[uids[2]].detail.startswith("no response within 1 s")
    assert result.results[uids[3]].detail.startswith("not sent")  # the association was aborted
    assert result.error.startswith("3 of 4 instance(s) not stored by MOODY@127.0.0.1")
    assert uids[0] in result.error
