"""The live quality monitor over real associations: a study that brings both a T1 and a T2
gets each synthetic series scored against the real one; a protocol under the floor pauses,
and an admin resumes it."""

from __future__ import annotations

import json
import sqlite3

import pydicom
import pytest

from tests.support.models import make_registry
from tests.support.nodeproc import NodeProcess, free_port, routes_toml, run_dicomnode, write_config
from tests.support.peers import StoreSCP
from tests.support.senders import storescu

NATIVE = "tcga-fg-6692-native"  # T1 and T2 of one study, on different grids
REGISTERED = "tcga-fg-6692"  # the same scanner and protocols, another study

# The tiny random test models score far under any real floor: every key pauses after one.
MONITOR = "\n[monitor]\nfloor = 0.99\nwindow = 2\nmin_scores = 1\ncheck_interval_seconds = 0.5\n"


@pytest.fixture
def node(tmp_path):
    receiver = StoreSCP(tmp_path / "pacs").start()
    port = free_port()
    extra = MONITOR + routes_toml(receiver.ae_title, receiver.port)
    config = write_config(
        tmp_path / "node", port, extra=extra, models=make_registry(tmp_path / "models").root
    )
    process = NodeProcess(config, port).start()
    yield process, port
    process.stop()
    receiver.stop()


def quality(node: NodeProcess, *args: str) -> str:
    result = run_dicomnode("quality", *args, "--config", str(node.config))
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_paired_study_is_scored_a_protocol_under_the_floor_pauses_and_resumes(node, mr_brain):
    process, port = node
    t1 = mr_brain / NATIVE / "03_t1"
    first = pydicom.dcmread(next(t1.glob("*.dcm")), stop_before_pixels=True)
    # The T2 first, then the T1: either order pairs them.
    assert storescu([mr_brain / NATIVE / "04_t2"], port).returncode == 0
    process.wait_for(lambda s: [j["state"] for j in s["jobs"]] == ["done"], timeout=120)
    assert storescu([t1], port).returncode == 0
    status = process.wait_for(
        lambda s: len(s["quality"]["rolling"]) == 2 and len(s["quality"]["worst_recent"]) == 2,
        timeout=240,
    )

    report = json.loads(quality(process, "--json"))
    assert report["not_scored"] == []
    by_model = {r["model"]: r for r in report["rolling"]}
    t1_key = by_model["t1-to-t2"]
    assert (t1_key["scanner"], t1_key["protocol"], t1_key["model_version"]) == (
        "SIEMENS Avanto",
        "AX T1 SE",
        "v1",
    )
    assert by_model["t2-to-t1"]["protocol"] == "AX T2 TSE"
    assert t1_key["scores"] == 1 and -1 <= t1_key["correlation"] < 0.99
    assert t1_key["paused"].startswith("quality monitor paused protocol 'AX T1 SE' on SIEMENS")
    assert "floor 0.990" in t1_key["paused"]
    worst = {s["model_version"]: s for s in report["worst_recent"]}["t1-to-t2 v1"]
    t1_job = next(j for j in status["jobs"] if j["direction"] == "t1-to-t2")
    assert worst["source_series_uid"] == first.SeriesInstanceUID
    assert worst["synthetic_series_uid"] == t1_job["output_series_uid"]
    assert worst["accession"] == first.AccessionNumber
    assert worst["placed_by"].startswith(("rigid registration", "header geometry"))
    # The database keeps the per-slice scores with the job.
    with sqlite3.connect(process.config.parent / "node.sqlite") as db:
        (per_slice,) = db.execute(
            "SELECT per_slice FROM quality_score WHERE job_id = ?", (t1_job["id"],)
        ).fetchone()
    per_slice = json.loads(per_slice)
    assert 10 <= len(per_slice["slices"]) <= 26
    assert len(per_slice["corr_head"]) == len(per_slice["psnr_slice"]) == len(per_slice["slices"])
    table = quality(process)
    assert "PAUSED" in table and first.AccessionNumber in table
    assert str(first.PatientName) not in table + json.dumps(report) + process.log()

    # A later series of the paused protocol (another study, same scanner) is not synthesized.
    assert storescu([mr_brain / REGISTERED / "03_t1"], port).returncode == 0
    status = process.wait_for(
        lambda s: len(s["jobs"]) == 3 and s["jobs"][0]["state"] == "failed", timeout=120
    )
    paused_job = status["jobs"][0]
    assert paused_job["reason"].startswith("quality monitor paused protocol 'AX T1 SE'")
    assert "rolling correlation" in paused_job["reason"] and "floor 0.990" in paused_job["reason"]

    result = run_dicomnode(
        "quality", "resume", "--scanner", "SIEMENS Avanto", "--protocol", "AX T1 SE",
        "--model", "t1-to-t2", "--config", str(process.config),
    )  # fmt: skip
    assert result.returncode == 0 and "resumed protocol 'AX T1 SE'" in result.stdout
    resumed = {r["model"]: r for r in json.loads(quality(process, "--json"))["rolling"]}
    assert resumed["t1-to-t2"]["paused"] is None and resumed["t2-to-t1"]["paused"]
    assert (
        run_dicomnode("retry", str(paused_job["id"]), "--config", str(process.config)).returncode
        == 0
    )
    process.wait_for(
        lambda s: next(j for j in s["jobs"] if j["id"] == paused_job["id"])["state"] == "done",
        timeout=180,
    )
