"""The worker on a real SQLite file and spool: jobs run, fail with reasons, retry, hand over."""

from __future__ import annotations

import shutil
from datetime import timedelta

import pytest
from pydicom import dcmread
from sqlalchemy import select

from pipeline.completion import CompletionSettings, complete_due_series
from pipeline.dicom.derived import encode
from pipeline.files import write_atomically
from pipeline.intake import inspect_instance, record_instance
from pipeline.model.registry import ModelRegistry
from pipeline.retention import RetentionSettings, purge_finished
from pipeline.routing import Route
from pipeline.settings import WorkerSettings
from pipeline.state.db import Delivery, Job, open_database, utcnow
from pipeline.state.jobs import JobOutput, claim_job, finish_job
from pipeline.worker import Worker
from tests.support.dicomgen import enhanced_mr, mr_series
from tests.support.models import add_model, make_registry

ROUTES = [Route(name="t1", direction="t1-to-t2", destinations=["pacs", "archive"])]
SETTINGS = WorkerSettings(max_attempts=2, retry_delay_seconds=0)


@pytest.fixture
def node(tmp_path):
    """(sessions, spool, registry) of a node with tiny models."""
    return (
        open_database(f"sqlite:///{tmp_path}/node.sqlite"),
        tmp_path / "spool",
        make_registry(tmp_path / "models"),
    )


def receive(node, datasets) -> None:
    """Store and record instances as the SCP does, then complete the series."""
    sessions, spool, _ = node
    for ds in datasets:
        facts = inspect_instance(ds, "1.2.840.10008.1.2.1")
        write_atomically(spool / facts.relative_path(), encode(ds))
        with sessions.begin() as session:
            record_instance(session, facts, 1, "MRI1")
    complete_due_series(
        sessions, ROUTES, CompletionSettings(), now=utcnow() + timedelta(seconds=60)
    )


def worker(node, settings: WorkerSettings = SETTINGS) -> Worker:
    sessions, spool, registry = node
    return Worker(sessions, spool, registry, settings, "test")


def jobs(node) -> list[Job]:
    with node[0]() as session:
        return session.scalars(select(Job).order_by(Job.id)).all()


def deliveries(node) -> list[Delivery]:
    with node[0]() as session:
        return session.scalars(select(Delivery).order_by(Delivery.id)).all()


def test_a_job_writes_one_marked_instance_per_slice_and_queues_deliveries(node):
    receive(node, mr_series(5))
    assert worker(node).run_due_jobs() == 1
    (job,) = jobs(node)
    assert (job.state, job.model_version, job.device, job.output_count) == ("done", "v1", "cpu", 5)
    assert len(list((node[1] / job.output_path).glob("*.dcm"))) == 5
    assert {"load_s", "inference_s", "write_s"} <= set(job.timings)
    assert [(d.destination, d.state) for d in deliveries(node)] == [
        ("pacs", "pending"),
        ("archive", "pending"),
    ]


def test_an_enhanced_mr_series_gives_one_synthetic_image_per_frame(node):
    # Siemens XA and Philips send a whole series as one multi-frame instance.
    receive(node, [enhanced_mr(mr_series(5), frame_order=[4, 2, 0, 1, 3])])
    assert worker(node).run_due_jobs() == 1
    (job,) = jobs(node)
    assert (job.state, job.output_count) == ("done", 5), job.reason
    outputs = [dcmread(path) for path in (node[1] / job.output_path).glob("*.dcm")]
    frames = sorted(ds.SourceImageSequence[0].ReferencedFrameNumber for ds in outputs)
    assert frames == [1, 2, 3, 4, 5]


def test_a_series_that_cannot_be_synthesized_fails_once_with_its_reason(node):
    receive(node, mr_series(1))
    worker(node).run_due_jobs()
    (job,) = jobs(node)
    assert job.state == "failed" and job.attempts == 1
    assert "single slice" in job.reason
    assert deliveries(node) == []


def test_a_transient_error_is_retried_then_fails_with_the_count(node):
    receive(node, mr_series(3))
    node[1].joinpath("out").write_text("a file where the output folder should be")
    worker(node).run_due_jobs()
    (job,) = jobs(node)
    assert job.state == "failed" and job.attempts == 2
    assert job.reason.startswith("failed 2 time(s):")


def test_an_expired_lease_is_taken_over_and_the_late_result_discarded(node):
    receive(node, mr_series(3))
    sessions = node[0]
    first = claim_job(sessions, "dead-worker", lease_seconds=60)
    assert claim_job(sessions, "other", lease_seconds=60) is None  # held
    later = utcnow() + timedelta(seconds=61)
    second = claim_job(sessions, "other", lease_seconds=60, now=later)
    assert second.id == first.id and second.attempt == 2
    late = JobOutput("v1", "0" * 64, "cpu", {}, "1.2.3", "out/job-1", 0)
    assert finish_job(sessions, first.id, "dead-worker", late) is False


def test_a_newly_activated_model_is_used_from_the_next_job(node):
    receive(node, mr_series(3))
    runner = worker(node)
    runner.run_due_jobs()
    registry: ModelRegistry = node[2]
    add_model(registry, "t1-to-t2", "v2", seed=1)
    registry.activate("t1-to-t2", "v2")
    receive(node, mr_series(3))
    runner.run_due_jobs()
    assert [j.model_version for j in jobs(node)] == ["v1", "v2"]
    assert jobs(node)[0].model_checksum != jobs(node)[1].model_checksum


def test_a_reopened_series_does_not_send_its_older_output(node):
    series = mr_series(4, announce=False)
    receive(node, series[:3])  # no count announced: completed by the quiet time
    runner = worker(node)
    runner.run_due_jobs()
    (late,) = mr_series(
        1,
        study_uid=series[0].StudyInstanceUID,
        series_uid=series[0].SeriesInstanceUID,
        announce=False,
    )
    late.FrameOfReferenceUID = series[0].FrameOfReferenceUID
    late.ImagePositionPatient = series[3].ImagePositionPatient
    receive(node, [late])
    runner.run_due_jobs()
    first, second = jobs(node)
    assert second.generation == 2 and second.output_count == 4
    assert second.output_series_uid == first.output_series_uid  # replaces, not duplicates
    states = {(d.job_id, d.destination): d.state for d in deliveries(node)}
    assert states[(first.id, "pacs")] == "superseded"
    assert states[(second.id, "pacs")] == "pending"


def test_a_sagittal_series_fails_with_the_reason(node):
    series = mr_series(4)
    for index, ds in enumerate(series):
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
        ds.ImagePositionPatient = [float(index * 5), 0, 0]
    receive(node, series)
    worker(node).run_due_jobs()
    (job,) = jobs(node)
    assert job.state == "failed" and job.attempts == 1
    assert job.reason.startswith("the slices are sagittal (90 degrees from axial)")


def test_the_clean_stage_removes_only_finished_series_after_the_retention(node):
    sessions, spool, _ = node
    receive(node, mr_series(3))  # will be delivered
    receive(node, mr_series(3))  # its delivery stays pending
    worker(node).run_due_jobs()
    done, pending = jobs(node)
    with sessions.begin() as session:
        for delivery in session.scalars(select(Delivery).where(Delivery.job_id == done.id)):
            delivery.state = "sent"
    keep = RetentionSettings(keep_days=30)
    assert purge_finished(sessions, spool, keep) == 0  # too recent
    later = utcnow() + timedelta(days=31)
    assert purge_finished(sessions, spool, keep, now=later) == 1
    assert not (spool / done.output_path).exists()
    assert (spool / pending.output_path).exists()
    with sessions() as session:
        pending_uid = session.get(Job, pending.id).series.series_uid
    incoming = [p.parent.name for p in (spool / "incoming").rglob("*.dcm")]
    assert set(incoming) == {pending_uid}
    assert purge_finished(sessions, spool, RetentionSettings(keep_days=0), now=later) == 0


def test_a_file_the_clean_stage_cannot_remove_keeps_its_series_unpurged(node):
    sessions, spool, _ = node
    receive(node, mr_series(3))
    worker(node).run_due_jobs()
    (done,) = jobs(node)
    with sessions.begin() as session:
        for delivery in session.scalars(select(Delivery)):
            delivery.state = "sent"
        blocked = spool / session.get(Job, done.id).series.instances[0].path
    # A folder where the file was: its deletion fails, as a file on a read-only or broken
    # file system would (root deletes anything else).
    blocked.unlink()
    blocked.mkdir()
    (blocked / "inside").write_text("x")
    keep, later = RetentionSettings(keep_days=30), utcnow() + timedelta(days=31)
    assert purge_finished(sessions, spool, keep, now=later) == 0
    with sessions() as session:
        assert session.get(Job, done.id).series.purged_at is None
    shutil.rmtree(blocked)
    assert purge_finished(sessions, spool, keep, now=later) == 1
    with sessions() as session:
        assert session.get(Job, done.id).series.purged_at is not None
    assert not list((spool / "incoming").rglob("*.dcm"))
    assert not (spool / done.output_path).exists()
