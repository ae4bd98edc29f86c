"""Rolling quality and pauses, on a real SQLite file with recorded scores."""

from __future__ import annotations

from datetime import timedelta

import pytest

from node.config import load_config
from node.console import ConsoleServer, build_app
from pipeline.completion import CompletionSettings, complete_due_series
from pipeline.intake import inspect_instance, record_instance
from pipeline.routing import Route
from pipeline.state.audit import AuditFilter, read_audit
from pipeline.state.db import Job, QualityScore, QualityState, open_database, utcnow
from pipeline.state.quality import (
    MonitorPause,
    MonitorSettings,
    NoScores,
    QualityKey,
    check_not_paused,
    resume,
    rolling,
)
from tests.support.dicomgen import mr_series
from tests.support.nodeproc import free_port, write_config
from tests.support.paths import REPO
from tests.test_console import TOKEN, get

KEY = QualityKey("SIEMENS Avanto", "AX T1 SE", "t1-to-t2", "v1")
SETTINGS = MonitorSettings(floor=0.7, window=3, min_scores=2)


@pytest.fixture
def sessions(tmp_path):
    sessions = open_database(f"sqlite:///{tmp_path}/node.sqlite")
    route = [Route(name="t1", direction="t1-to-t2", destinations=["p"])]
    for _ in range(6):  # a job per score
        now = utcnow()
        for ds in mr_series(2):
            with sessions.begin() as session:
                record_instance(session, inspect_instance(ds, "1.2.840.10008.1.2.1"), 1, "A")
        complete_due_series(sessions, route, CompletionSettings(), now=now)
    return sessions


def score(sessions, correlation: float, version: str = "v1", minutes: int = 0) -> None:
    with sessions.begin() as session:
        used = {row.job_id for row in session.query(QualityScore)}
        job = next(j for j in session.query(Job).order_by(Job.id) if j.id not in used)
        at = utcnow() - timedelta(minutes=10 - minutes)  # in the past, in order
        session.add(
            QualityScore(
                job_id=job.id,
                real_series_uid="1.2.3",
                study_uid="1.2",
                scanner=KEY.scanner,
                protocol=KEY.protocol,
                model=KEY.model,
                model_version=version,
                state=QualityState.SCORED,
                correlation=correlation,
                ssim=0.5,
                psnr=15.0,
                created_at=at,
                scored_at=at,
            )
        )


def test_the_window_the_minimum_the_resume_and_a_new_version(sessions):
    score(sessions, 0.5, minutes=1)
    check_not_paused(sessions, KEY, SETTINGS)  # one score is no verdict (min_scores 2)
    score(sessions, 0.6, minutes=2)
    with pytest.raises(MonitorPause, match=r"rolling correlation 0.550 over its last 2"):
        check_not_paused(sessions, KEY, SETTINGS)
    for minute, good in enumerate((0.9, 0.9, 0.9), start=3):
        score(sessions, good, minutes=minute)
    with sessions() as session:
        current = rolling(session, KEY, SETTINGS)
    assert current.count == 3 and current.total == 5 and current.correlation == pytest.approx(0.9)
    assert current.paused is None  # only the last 3 count

    assert resume(sessions, KEY.scanner, KEY.protocol, KEY.model, origin="cli test") == 5
    trail = read_audit(sessions, AuditFilter())
    assert [row["origin"] for row in trail] == ["cli test"]
    assert "quality resume: protocol" in trail[0]["detail"] and trail[0]["model"] == KEY.model
    with sessions() as session:
        assert rolling(session, KEY, SETTINGS) is None  # every score predates the resume
    with pytest.raises(NoScores, match=r"no scores for protocol .* on other"):
        resume(sessions, "other", KEY.protocol, KEY.model, origin="cli test")
    assert len(read_audit(sessions, AuditFilter())) == 1  # nothing resumed, nothing recorded
    # A new version is a new key: the old one's scores do not pause it.
    check_not_paused(sessions, QualityKey(*[*vars(KEY).values()][:3], "v2"), SETTINGS)
    check_not_paused(sessions, KEY, MonitorSettings(enabled=False, floor=1.0, min_scores=1))


def test_a_paused_protocol_is_shown_and_resumed_from_the_console(tmp_path, sessions):
    """The admin sees the pause and its reason on the models page and resumes it there,
    audited as from the console; without the token the button is not offered."""
    monitor = "\n[monitor]\nfloor = 0.7\nwindow = 3\nmin_scores = 2\n"
    http = f'\n[http]\nport = {free_port()}\nadmin_token = "{TOKEN}"\n'
    config = load_config(
        write_config(
            tmp_path,
            free_port(),
            extra=monitor + http,
            database=f"sqlite:///{tmp_path}/node.sqlite",
            models=REPO / "models",
        )
    )
    score(sessions, 0.5, minutes=1)
    score(sessions, 0.6, minutes=2)
    server = ConsoleServer(config, build_app(config, sessions))
    server.start()
    try:
        status, html = get(f"{server.url}/models", token=TOKEN)
        assert status == 200 and b"rolling correlation 0.550 over its last 2" in html
        # Each shipped version with what it keeps of a lesion on patients it never saw.
        assert html.count(b"of their real contrast on patients it never saw") == 4
        assert b'value="quality-resume"' in html and b'value="AX T1 SE"' in html
        assert b'value="quality-resume"' not in get(f"{server.url}/models")[1]  # read-only
        form = {"action": "quality-resume", "target": KEY.model}
        form |= {"scanner": KEY.scanner, "protocol": KEY.protocol}
        assert get(f"{server.url}/actions", data=form)[0] == 403
        unknown = form | {"protocol": "AX T2 TSE"}
        status, body = get(f"{server.url}/actions", token=TOKEN, data=unknown)
        assert status == 400 and b"no scores for protocol 'AX T2 TSE'" in body  # the CLI's words
        status, body = get(f"{server.url}/actions", token=TOKEN, data=form)
        assert status == 200 and b"resumed" in body
        check_not_paused(sessions, KEY, SETTINGS)
        assert b"over its last 2" not in get(f"{server.url}/models", token=TOKEN)[1]
        (row,) = read_audit(sessions, AuditFilter())
        assert row["origin"] == "http 127.0.0.1" and "quality resume" in row["detail"]
    finally:
        server.stop()
