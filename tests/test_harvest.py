"""Pairs to learn from, over real associations: three studies that bring a T1 and a T2 are
harvested (kept beyond retention, patients by salted pseudonym), a small model is trained on
them, and the activation rule decides on a held-out harvested patient."""

from __future__ import annotations

import json
import time

import pydicom

from pipeline.retention import RetentionSettings, purge_finished
from pipeline.state.db import open_database
from tests.support.models import make_registry
from tests.support.nodeproc import NodeProcess, free_port, run_dicomnode, write_config
from tests.support.senders import storescu
from train.pairs import patient_label

STUDIES = ("brats-met-00110", "tcga-fg-6692-native", "brats-gli-00001")

# Nothing is synthesized (no route takes a series from this AE): the series only complete.
CONFIG = """
[harvest]
enabled = true
check_interval_seconds = 0.5

[monitor]
enabled = false

[destinations.pacs]
ae_title = "PACS"
host = "127.0.0.1"
port = 9

[[routes]]
name = "elsewhere"
direction = "t1-to-t2"
calling_ae = ["NOBODY"]
destinations = ["pacs"]
"""


def harvested(config) -> dict:
    result = run_dicomnode("harvest", "list", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_three_paired_studies_are_harvested_trained_on_and_judged(tmp_path, mr_brain):
    registry = make_registry(tmp_path / "models")
    port = free_port()
    config = write_config(tmp_path / "node", port, extra=CONFIG, models=registry.root)
    node = NodeProcess(config, port).start()
    try:
        for study in STUDIES:
            folders = [mr_brain / study / "03_t1", mr_brain / study / "04_t2"]
            assert storescu(folders, port).returncode == 0
        deadline = time.monotonic() + 120
        while len(harvested(config)["pairs"]) < 3:
            assert time.monotonic() < deadline, node.log()
            time.sleep(0.5)
    finally:
        node.stop()

    listing = harvested(config)
    patient_ids = {
        str(pydicom.dcmread(next((mr_brain / s / "03_t1").glob("*.dcm"))).PatientID)
        for s in STUDIES
    }
    pseudonyms = {pair["patient"] for pair in listing["pairs"]}
    assert listing["kept"] == 3 and len(pseudonyms) == 3
    assert pseudonyms.isdisjoint({patient_label(p) for p in patient_ids})  # salted
    assert all(p not in json.dumps(listing) for p in patient_ids)
    table = run_dicomnode("harvest", "list", "--config", str(config)).stdout
    assert "3 pair(s) kept" in table

    # Beyond retention: the received files go, the harvested ones stay.
    sessions = open_database(f"sqlite:///{config.parent / 'node.sqlite'}")
    storage = config.parent / "spool"
    assert purge_finished(sessions, storage, RetentionSettings(keep_days=1e-9)) == 6
    assert not list((storage / "incoming").rglob("*.dcm"))
    assert len(list((storage / "harvest").rglob("*.dcm"))) == sum(
        p["files"] for p in listing["pairs"]
    )

    trained = run_dicomnode(
        "train", "--harvested", "--direction", "t1-to-t2", "--config", str(config),
        "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--crop", "32",
        "--base-width", "2", "--depth", "1", "--threads", "1", "--no-register",
        "--validation-fraction", "0.34", "--checkpoint", str(tmp_path / "ckpt"),
    )  # fmt: skip
    output = trained.stdout + trained.stderr
    assert "activated" in output, output  # by the rule: "activated: ..." or "not activated: ..."
    card = json.loads((registry.root / "t1-to-t2" / "v2.json").read_text())
    named = {study["patient"] for study in json.loads(json.dumps(card["training"]["data"]))}
    assert named <= pseudonyms and named
    assert all(p not in json.dumps(card) for p in patient_ids)
