"""The admin's commands: route (dry run), translate (offline), check, retry, status."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from node.cli import _parser, main
from pipeline.state.db import Job, JobState, open_database
from tests.support.dicomgen import mr_series
from tests.support.models import make_registry
from tests.support.nodeproc import free_port, routes_toml, run_dicomnode
from tests.support.peers import Orthanc
from tests.test_worker import receive


def config(tmp_path, ae="PACS", port=None):
    path = tmp_path / "config.toml"
    path.write_text(
        '[node]\ndatabase = "sqlite:///node.sqlite"\n' + routes_toml(ae, port or free_port())
    )
    make_registry(tmp_path / "models")
    return path


def test_route_dry_run_explains_every_series(tmp_path, mr_brain):
    result = run_dicomnode(
        "route", str(mr_brain / "brats-gli-00001"), "--config", str(config(tmp_path))
    )
    assert result.returncode == 0, result.stderr
    blocks = {b.split("  (")[0].rsplit("/", 1)[-1]: b for b in result.stdout.split("\n/")}
    assert "route:       t1-to-t2 -> t1-to-t2" in blocks["03_t1"]
    assert "destination: pacs (PACS@127.0.0.1:" in blocks["03_t1"]
    assert "route:       t2-to-t1 -> t2-to-t1" in blocks["04_t2"]
    assert "contrast:    FLAIR" in blocks["05_flair"] and "ignored:" in blocks["05_flair"]
    assert "contrast:    T1C" in blocks["07_t1c"] and "contrast T1C is not T1" in blocks["07_t1c"]


def test_translate_writes_a_marked_series_and_explains_skips(tmp_path, mr_brain):
    out = tmp_path / "out"
    result = run_dicomnode(
        "translate",
        str(mr_brain / "tcga-fg-6692-native"),
        str(out),
        "--config",
        str(config(tmp_path)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("wrote ") == 2  # the T1 and the T2 series
    assert "skipped" in result.stdout and "FLAIR" in result.stdout
    written = sorted(out.rglob("*.dcm"))
    assert len(written) == 52
    descriptions = {pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription for p in written}
    assert descriptions == {"SYNTHETIC T2 from AX T1 SE", "SYNTHETIC T1 from AX T2 TSE"}


def test_check_echoes_each_destination(tmp_path):
    closed = run_dicomnode("check", "--config", str(config(tmp_path)))
    assert closed.returncode == 1 and "FAILED: cannot connect" in closed.stdout
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        path = config(tmp_path, ae=Orthanc.AE_TITLE, port=orthanc.dicom_port)
        result = run_dicomnode("check", "--config", str(path))
        assert result.returncode == 0 and " OK" in result.stdout
    finally:
        orthanc.stop()


def test_retry_requeues_a_failed_job_and_refuses_the_rest(tmp_path):
    path = config(tmp_path)
    sessions = open_database(f"sqlite:///{tmp_path}/node.sqlite")
    receive((sessions, tmp_path / "spool", None), mr_series(2))
    with sessions.begin() as session:
        job = session.get(Job, 1)
        job.state, job.reason, job.attempts = JobState.FAILED, "single slice", 3
    result = run_dicomnode("retry", "1", "--config", str(path))
    assert result.returncode == 0 and "job 1 queued again" in result.stdout
    with sessions() as session:
        assert (session.get(Job, 1).state, session.get(Job, 1).attempts) == ("queued", 0)
    again = run_dicomnode("retry", "1", "--config", str(path))
    assert again.returncode == 1 and "job 1 is queued" in again.stderr
    missing = run_dicomnode("retry", "99", "--config", str(path))
    assert missing.returncode == 1 and "there is no job 99" in missing.stderr

    status = run_dicomnode("status", "--config", str(path))
    assert "JOBS (newest first)" in status.stdout and "replayed by an admin" in status.stdout
    data = json.loads(run_dicomnode("status", "--json", "--config", str(path)).stdout)
    assert set(data) == {"health", "workers", "series", "jobs", "deliveries", "quality"}
    assert data["jobs"][0]["state"] == "queued" and data["quality"]["rolling"] == []


# Every command an admin runs, with its required arguments.
ADMIN_COMMANDS = [
    ["serve"],
    ["status"],
    ["route", "PATH"],
    ["quality"],
    ["quality", "resume", "--scanner", "S", "--protocol", "P", "--model", "M"],
    ["harvest"],
    ["harvest", "list"],
    ["worker"],
    ["check"],
    ["retry", "1"],
    ["resend", "1"],
    ["reprocess", "1.2.3"],
    ["audit"],
    ["translate", "IN", "OUT"],
    ["config", "check"],
    ["db", "version"],
    ["db", "upgrade"],
]


@pytest.mark.parametrize("argv", ADMIN_COMMANDS, ids=" ".join)
def test_config_before_or_after_the_command_reaches_it_and_none_leaves_the_variable(argv):
    # The systemd units name the file by $DICOMNODE_CONFIG: a command that fell back to a
    # default of its own would read ./config.toml instead.
    parser = _parser(training=False)
    for given in (["--config", "a.toml", *argv], [*argv, "--config", "a.toml"]):
        args = parser.parse_args(given)
        assert args.config == Path("a.toml") and callable(args.run)
    assert parser.parse_args(argv).config is None  # main() then reads $DICOMNODE_CONFIG


def test_harvest_json_before_or_after_list():
    parser = _parser(training=False)
    assert parser.parse_args(["harvest", "--json", "list"]).json is True
    assert parser.parse_args(["harvest", "list", "--json"]).json is True
    assert parser.parse_args(["harvest", "list"]).json is False


def test_bad_places_and_parts_are_named_not_traced(tmp_path, capsys, mr_brain):
    path = config(tmp_path)
    (tmp_path / "afile").write_text("")

    # OUTPUT that cannot be made: refused before any synthesis.
    argv = ["translate", str(mr_brain / "tcga-fg-6692-native"), str(tmp_path / "afile" / "o")]
    assert main([*argv, "--config", str(path)]) == 1
    assert "OUTPUT = " in capsys.readouterr().err

    # A destination's CA file that is not there: a config error naming the key.
    ca = path.read_text().replace("port = ", 'tls = { ca = "missing-ca.pem" }\nport = ', 1)
    path.write_text(ca)
    assert main(["check", "--config", str(path)]) == 2
    assert "destinations.pacs.tls" in capsys.readouterr().err

    # An admin's command on a database the node never made: said so, and none is made.
    assert main(["status", "--config", str(path)]) == 2
    assert "node.sqlite': no such database" in capsys.readouterr().err
    assert not (tmp_path / "node.sqlite").exists()

    # A worker whose spool cannot be made: refused before it claims a job.
    original = path.read_text()
    path.write_text(original.replace("[node]\n", '[node]\nstorage = "afile/spool"\n'))
    assert main(["worker", "--config", str(path)]) == 2
    assert "node.storage = " in capsys.readouterr().err
    path.write_text(original)

    # A database whose driver is not installed: a config error, for every database command.
    path.write_text(
        '[node]\ndatabase = "mysql://node@127.0.0.1/dicomnode"\n' + routes_toml("PACS", 9)
    )
    for command in (["status"], ["db", "version"], ["retry", "1"], ["harvest", "list"]):
        assert main([*command, "--config", str(path)]) == 2, command
        assert "node.database = " in capsys.readouterr().err

    # A file that is not DICOM: route says why it skipped it.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not DICOM")
    assert main(["route", str(tmp_path / "notes"), "--config", str(path)]) == 1
    assert "skipped " in capsys.readouterr().out
