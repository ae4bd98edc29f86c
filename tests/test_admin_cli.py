"""The admin's command line: its options anywhere, every mistake a line (never a traceback),
resend, reprocess and the audit trail, and a running node's heartbeat and health."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from sqlalchemy import update

from pipeline.model.registry import ModelRegistry
from pipeline.state.db import Delivery, DeliveryState, Series, open_database
from tests.support.dicomgen import mr_series
from tests.support.nodeproc import DICOMNODE, NodeProcess, free_port, run_dicomnode, write_config
from tests.support.paths import REPO
from tests.support.senders import send, storescu
from tests.test_cli import config
from tests.test_worker import receive, worker


def dicomnode(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DICOMNODE, *args], cwd=REPO, capture_output=True, text=True, env=env or os.environ
    )


def test_version_and_the_config_before_after_or_from_the_environment(tmp_path):
    version = dicomnode("--version")
    assert version.returncode == 0 and version.stdout.startswith("dicomnode ")
    path = str(config(tmp_path))
    open_database(f"sqlite:///{tmp_path / 'node.sqlite'}")  # as the node's first start does
    for args in (["--config", path, "status"], ["status", "--config", path]):
        result = dicomnode(*args)
        assert result.returncode == 0, result.stderr
        assert "SERIES (newest first)" in result.stdout
    env = {**os.environ, "DICOMNODE_CONFIG": path}
    assert "SERIES (newest first)" in dicomnode("status", env=env).stdout
    missing = dicomnode("status", env={**env, "DICOMNODE_CONFIG": str(tmp_path / "no.toml")})
    assert missing.returncode == 2 and "no.toml: 1 problem(s)" in missing.stderr


def test_mistaken_paths_and_names_are_one_line_each(tmp_path):
    path = str(config(tmp_path))
    route = dicomnode("route", str(tmp_path / "absent"), "--config", path)
    assert route.returncode == 1 and "route: no such file or folder:" in route.stderr
    (tmp_path / "out.dcm").write_text("")
    translate = dicomnode("translate", str(tmp_path), str(tmp_path / "out.dcm"), "--config", path)
    assert translate.returncode == 1
    assert f"translate: OUTPUT {tmp_path}/out.dcm is a file" in translate.stderr
    activate = dicomnode("models", "activate", "t1-to-t3", "v1", "--config", path)
    assert activate.returncode == 1 and "no model named 't1-to-t3'" in activate.stderr
    (tmp_path / "node.sqlite").write_text("not a database")
    status = dicomnode("status", "--config", path)
    assert status.returncode == 1
    assert (
        status.stderr == "dicomnode: the database failed: DatabaseError: file is not a database\n"
    )
    for result in (route, translate, activate):
        assert "Traceback" not in result.stderr


def test_resend_reprocess_and_the_audit_trail(tmp_path):
    path = str(config(tmp_path))
    sessions = open_database(f"sqlite:///{tmp_path}/node.sqlite")
    node = (sessions, tmp_path / "var" / "spool", ModelRegistry(tmp_path / "models"))
    datasets = mr_series(4)
    for ds in datasets:
        ds.AccessionNumber = "ACC42"
    receive(node, datasets)
    assert worker(node).run_due_jobs() == 1
    with sessions.begin() as session:
        session.execute(update(Delivery).values(state=DeliveryState.SENT))
        series_uid = session.query(Series.series_uid).scalar()

    retry = run_dicomnode("retry", "1", "--config", path)
    assert retry.returncode == 1 and "dicomnode resend 1" in retry.stderr
    resend = run_dicomnode("resend", "1", "--config", path)
    assert resend.returncode == 0, resend.stderr
    assert "queued to be sent again to pacs, archive" in resend.stdout
    with sessions() as session:
        assert session.get(Delivery, 1).state == DeliveryState.PENDING
    unknown = run_dicomnode("resend", "1", "--destination", "lab", "--config", path)
    assert unknown.returncode == 1 and "no destination named 'lab'" in unknown.stderr

    reprocess = run_dicomnode("reprocess", series_uid, "--config", path)
    assert reprocess.returncode == 0 and "job 2 queued" in reprocess.stdout
    again = run_dicomnode("reprocess", series_uid, "--config", path)
    assert again.returncode == 1 and "job 2 is queued already" in again.stderr

    rows = json.loads(
        run_dicomnode("audit", "--accession", "ACC42", "--json", "--config", path).stdout
    )
    events = [(row["event"], row["detail"].split(":")[0]) for row in rows]
    output = rows[0]["detail"].split(":")[0]
    assert events == [
        ("synthesized", output),
        ("admin action", "resend"),
        ("admin action", "reprocess"),
    ]
    assert rows[0]["series_uid"] == series_uid and rows[0]["accession_number"] == "ACC42"
    assert all(row["origin"].startswith("cli ") for row in rows[1:])
    assert rows[0]["model"] == "t1-to-t2" and rows[0]["model_version"] == "v1"
    assert (
        run_dicomnode("audit", "--accession", "OTHER", "--json", "--config", path).stdout == "[]\n"
    )
    table = run_dicomnode("audit", "--study", rows[0]["study_uid"], "--config", path).stdout
    assert "AUDIT TRAIL" in table and "reprocess: series" in table


def test_a_running_node_beats_logs_json_and_audits_what_it_receives(tmp_path, mr_brain):
    """serve without a worker: it beats, its health flags the job no worker takes, its log
    is JSON a line, refused SOP classes are one line, and each receipt is audited."""
    port = free_port()
    path = write_config(tmp_path, port)
    node = NodeProcess(path, port, "--log-format", "json").start()
    try:
        results = send(mr_series(3), port, calling_ae="MRI7")
        assert [status for status, _ in results] == [0, 0, 0]
        # storescu proposes every storage class it knows: the refused ones make one line.
        sent = storescu([mr_brain / "brats-gli-00001" / "03_t1"], port, calling_ae="MRI8")
        assert sent.returncode == 0, sent.stderr
        status = node.wait_for(lambda s: s["jobs"] and s["health"]["reasons"], timeout=60)
        assert any("queued and no live worker" in r for r in status["health"]["reasons"])
        (serve,) = status["workers"]
        assert (serve["role"], serve["pid"], serve["liveness"]) == (
            "serve",
            node.process.pid,
            "alive",
        )
        assert serve["device"] is None  # no worker in this process
        text = dicomnode("status", "--config", str(path)).stdout
        assert text.startswith("UNHEALTHY: jobs: ") and "PROCESSES" in text
    finally:
        node.stop()
    lines = node.log().splitlines()
    records = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    refused = [r["message"] for r in records if "SOP class(es) refused" in r["message"]]
    assert len(refused) == 1 and "more (at DEBUG)" in refused[0]
    rows = json.loads(run_dicomnode("audit", "--json", "--config", str(path)).stdout)
    received = [row for row in rows if row["event"] == "received"]
    assert [row["origin"] for row in received] == ["MRI7@127.0.0.1", "MRI8@127.0.0.1"]
    assert received[0]["detail"] == "3 instance(s) stored on one association (released)"
    after = json.loads(run_dicomnode("status", "--json", "--config", str(path)).stdout)
    assert after["workers"][0]["liveness"] == "stopped"
    assert after["health"]["running"] is False


HOLD_A_JOB = """
import sys, time
from pipeline.state.db import open_database
from pipeline.state.jobs import claim_job
assert claim_job(open_database(sys.argv[1]), "holder", 900) is not None
print("claimed", flush=True)
time.sleep(600)
"""


def test_a_lease_held_by_a_killed_process_is_shown_with_its_end(tmp_path):
    path = str(config(tmp_path))
    url = f"sqlite:///{tmp_path}/node.sqlite"
    sessions = open_database(url)
    receive((sessions, tmp_path / "var" / "spool", None), mr_series(4))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_JOB, url], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "claimed"
        (job,) = json.loads(run_dicomnode("status", "--json", "--config", path).stdout)["jobs"]
        assert (job["state"], job["holder"]) == ("running", "alive")
    finally:
        holder.kill()
        holder.wait(10)
    (job,) = json.loads(run_dicomnode("status", "--json", "--config", path).stdout)["jobs"]
    assert (job["state"], job["holder"]) == ("running", "gone")
    text = run_dicomnode("status", "--config", path).stdout
    assert "that process is gone" in text and f"its lease ends at {job['held_until']}" in text


def test_a_worker_process_beats_with_its_device(tmp_path):
    path = config(tmp_path)
    path.write_text(path.read_text() + '\n[models]\nregistry = "models"\n')
    worker_process = subprocess.Popen(
        [*DICOMNODE, "worker", "--config", str(path)], cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        workers = []
        while time.monotonic() < deadline:
            status = run_dicomnode("status", "--json", "--config", str(path))
            # Until the worker has made the database, status says there is none.
            workers = json.loads(status.stdout)["workers"] if status.returncode == 0 else []
            if workers:
                break
            time.sleep(0.5)
        (beat,) = workers
        assert (beat["role"], beat["pid"], beat["device"]) == ("worker", worker_process.pid, "cpu")
        assert beat["liveness"] == "alive"
    finally:
        worker_process.terminate()
        worker_process.wait(30)
    (beat,) = json.loads(run_dicomnode("status", "--json", "--config", str(path)).stdout)["workers"]
    assert beat["liveness"] == "stopped"
