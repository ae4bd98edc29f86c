"""Completion and re-opening, on a real SQLite file, with the clock passed in."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from pipeline.completion import CompletionSettings, complete_due_series
from pipeline.intake import InstanceRefused, inspect_instance, record_instance
from pipeline.routing import Route
from pipeline.state.db import Job, JobState, Series, open_database, utcnow
from tests.support.dicomgen import mr_series

ROUTES = [
    Route(name="t1", direction="t1-to-t2", destinations=["pacs"]),
    Route(name="t2", direction="t2-to-t1", destinations=["pacs"]),
]
SETTINGS = CompletionSettings(quiet_seconds=10)


@pytest.fixture
def sessions(tmp_path):
    return open_database(f"sqlite:///{tmp_path}/node.sqlite")


def receive(sessions, datasets, at):
    outcomes = []
    for ds in datasets:
        facts = inspect_instance(ds, "1.2.840.10008.1.2.1")
        with sessions.begin() as session:
            outcomes.append(record_instance(session, facts, 1000, "MRI1", now=at))
    return outcomes


def series_row(sessions) -> Series:
    with sessions() as session:
        return session.scalars(select(Series)).one()


def jobs(sessions) -> list[Job]:
    with sessions() as session:
        return session.scalars(select(Job).order_by(Job.id)).all()


def test_announced_count_completes_at_once(sessions):
    t0 = utcnow()
    outcomes = receive(sessions, mr_series(3), t0)
    assert [o.count_reached for o in outcomes] == [False, False, True]
    (done,) = complete_due_series(sessions, ROUTES, SETTINGS, now=t0)
    assert done.state == "routed" and done.job_id == jobs(sessions)[0].id


def test_without_a_count_the_quiet_time_decides(sessions):
    t0 = utcnow()
    receive(sessions, mr_series(3, announce=False), t0)
    assert complete_due_series(sessions, ROUTES, SETTINGS, now=t0 + timedelta(seconds=9)) == []
    (done,) = complete_due_series(sessions, ROUTES, SETTINGS, now=t0 + timedelta(seconds=10))
    assert done.state == "routed"


def test_a_route_can_override_the_quiet_time(sessions):
    t0 = utcnow()
    receive(sessions, mr_series(3, announce=False), t0)
    quick = [Route(name="q", direction="t1-to-t2", destinations=["p"], quiet_seconds=2)]
    (done,) = complete_due_series(sessions, quick, SETTINGS, now=t0 + timedelta(seconds=2))
    assert done.state == "routed"


def test_inconsistent_counts_fall_back_to_the_quiet_time(sessions):
    t0 = utcnow()
    series = mr_series(3)
    series[1].ImagesInAcquisition = 2  # scanners disagreeing with themselves
    receive(sessions, series[:2], t0)
    assert series_row(sessions).expected_count is None
    receive(sessions, series[2:], t0)
    assert complete_due_series(sessions, ROUTES, SETTINGS, now=t0) == []
    assert complete_due_series(sessions, ROUTES, SETTINGS, now=t0 + timedelta(seconds=10))


def test_unrouted_series_is_ignored_with_the_reason(sessions):
    t0 = utcnow()
    flair = mr_series(2, tr=9000, te=120, description="AX T2 FLAIR")
    for ds in flair:
        ds.ScanningSequence = ["SE", "IR"]
        ds.InversionTime = 2500
    receive(sessions, flair, t0)
    (done,) = complete_due_series(sessions, ROUTES, SETTINGS, now=t0)
    assert done.state == "ignored"
    assert done.reason == (
        "no route matched (route 't1': contrast FLAIR is not T1; "
        "route 't2': contrast FLAIR is not T2)"
    )
    assert jobs(sessions) == []


def test_late_instance_reopens_and_supersedes_the_queued_job(sessions):
    t0 = utcnow()
    series = mr_series(4)
    receive(sessions, series[:3], t0)  # announced 4
    receive(sessions, series[3:], t0)
    complete_due_series(sessions, ROUTES, SETTINGS, now=t0)
    (late,) = mr_series(
        1, study_uid=series[0].StudyInstanceUID, series_uid=series[0].SeriesInstanceUID
    )
    late.FrameOfReferenceUID = series[0].FrameOfReferenceUID
    (outcome,) = receive(sessions, [late], t0 + timedelta(seconds=30))
    assert outcome.reopened
    row = series_row(sessions)
    assert (row.state, row.generation, row.instance_count) == ("receiving", 2, 5)
    assert row.expected_count is None  # 5 > 4 announced: the count is no longer trusted
    complete_due_series(sessions, ROUTES, SETTINGS, now=t0 + timedelta(seconds=40))
    first, second = jobs(sessions)
    assert first.state == JobState.SUPERSEDED and "re-opened" in first.reason
    assert (second.state, second.generation) == (JobState.QUEUED, 2)


def test_duplicate_changes_nothing(sessions):
    t0 = utcnow()
    series = mr_series(2)
    receive(sessions, series, t0)
    (again,) = receive(sessions, series[:1], t0)
    assert again.duplicate and series_row(sessions).instance_count == 2


def test_inconsistent_instance_is_refused_and_not_recorded(sessions):
    t0 = utcnow()
    series = mr_series(2)
    series[1].Rows = 64
    series[1].PixelData = series[1].PixelData * 2
    receive(sessions, series[:1], t0)
    with pytest.raises(InstanceRefused, match="size 32x64 differs"):
        receive(sessions, series[1:], t0)
    assert series_row(sessions).instance_count == 1


def test_the_quiet_time_counts_only_while_the_node_listens(sessions):
    t0 = utcnow()
    receive(sessions, mr_series(3, announce=False), t0)
    restarted = t0 + timedelta(seconds=60)  # the node was down for a minute
    later = restarted + timedelta(seconds=9)
    assert (
        complete_due_series(sessions, ROUTES, SETTINGS, now=later, listening_since=restarted) == []
    )
    done = complete_due_series(
        sessions, ROUTES, SETTINGS, now=later + timedelta(seconds=1), listening_since=restarted
    )
    assert [d.state for d in done] == ["routed"]


def test_a_series_short_of_its_announced_count_waits_then_fails_as_incomplete(sessions):
    settings = CompletionSettings(quiet_seconds=10, incomplete_wait_seconds=60)
    t0 = utcnow()
    receive(sessions, mr_series(5)[:3], t0)  # announced 5, sent 3
    assert complete_due_series(sessions, ROUTES, settings, now=t0 + timedelta(seconds=69)) == []
    assert series_row(sessions).state == "receiving"
    (done,) = complete_due_series(sessions, ROUTES, settings, now=t0 + timedelta(seconds=70))
    assert done.state == "incomplete"
    assert (
        done.reason
        == "incomplete: 3 of 5 announced instances (route 't1' does not allow_incomplete)"
    )
    (job,) = jobs(sessions)
    assert (job.state, job.reason) == (JobState.FAILED, done.reason)
    assert series_row(sessions).state == "incomplete"


def test_a_route_may_allow_an_incomplete_series(sessions):
    settings = CompletionSettings(quiet_seconds=10, incomplete_wait_seconds=60)
    lenient = [Route(name="t1", direction="t1-to-t2", destinations=["p"], allow_incomplete=True)]
    t0 = utcnow()
    receive(sessions, mr_series(5)[:3], t0)
    (done,) = complete_due_series(sessions, lenient, settings, now=t0 + timedelta(seconds=10))
    assert done.state == "routed" and jobs(sessions)[0].state == JobState.QUEUED


def test_the_rest_arriving_during_the_wait_completes_the_series(sessions):
    settings = CompletionSettings(quiet_seconds=10, incomplete_wait_seconds=60)
    t0 = utcnow()
    series = mr_series(5)
    receive(sessions, series[:3], t0)
    assert complete_due_series(sessions, ROUTES, settings, now=t0 + timedelta(seconds=30)) == []
    receive(sessions, series[3:], t0 + timedelta(seconds=40))
    (done,) = complete_due_series(sessions, ROUTES, settings, now=t0 + timedelta(seconds=40))
    assert done.state == "routed"
