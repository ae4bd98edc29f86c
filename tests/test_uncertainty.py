"""Uncertainty over real associations: a series the model is unsure of is held with the
reason, an admin releases it, and the route's uncertainty map goes out as its own series,
marked synthetic and described as the uncertainty."""

from __future__ import annotations

import json

import numpy as np
import pydicom

from tests.support.models import make_registry
from tests.support.nodeproc import NodeProcess, free_port, run_dicomnode, write_config
from tests.support.peers import StoreSCP
from tests.support.senders import storescu
from tests.support.validators import assert_dciodvfy_finds_no_error
from tests.test_console import get
from tests.test_label import find_label
from train.uncertainty import auroc

T1 = "tcga-fg-6692-native/03_t1"


def config_text(receiver: StoreSCP) -> str:
    return f"""
[uncertainty]
passes = 2

[destinations.pacs]
ae_title = "{receiver.ae_title}"
host = "127.0.0.1"
port = {receiver.port}

[[routes]]
name = "careful"
direction = "t1-to-t2"
destinations = ["pacs"]
hold_uncertainty_above = 0.001
send_uncertainty = true
"""


def test_an_uncertain_series_is_held_then_released_with_its_uncertainty_map(tmp_path, mr_brain):
    receiver = StoreSCP(tmp_path / "pacs").start()
    port = free_port()
    registry = make_registry(tmp_path / "models", dropout=0.2)
    config = write_config(
        tmp_path / "node", port, extra=config_text(receiver), models=registry.root
    )
    node = NodeProcess(config, port).start()
    try:
        source = sorted((mr_brain / T1).glob("*.dcm"))
        assert storescu([mr_brain / T1], port).returncode == 0
        status = node.wait_for(lambda s: s["jobs"] and s["jobs"][0]["state"] == "held", 180)
        (job,) = status["jobs"]
        assert job["uncertainty"] > 0.001 and 0 <= job["confidence"] <= 1
        assert job["reason"].startswith(f"held: uncertainty {job['uncertainty']:.4f} is above")
        assert "hold_uncertainty_above 0.001" in job["reason"]
        assert status["deliveries"] == []
        table = run_dicomnode("status", "--config", str(config)).stdout
        assert "held" in table and f"{job['uncertainty']:.4f}" in table
        spread = config.parent / "spool" / "out" / f"job-{job['id']}" / "uncertainty.npy"
        assert spread.is_file()
        check_console(node.http_url, job)

        released = run_dicomnode("retry", str(job["id"]), "--config", str(config))
        assert released.returncode == 0 and "released" in released.stdout
        node.wait_for(lambda s: [d["state"] for d in s["deliveries"]] == ["sent"], 120)
        trail = json.loads(run_dicomnode("audit", "--json", "--config", str(config)).stdout)
        (release,) = [row for row in trail if row["event"] == "admin action"]
        assert release["detail"].startswith(f"retry: job {job['id']} released")
        assert release["origin"].startswith("cli ") and release["job_id"] == job["id"]
        (made,) = [row for row in trail if row["event"] == "synthesized"]
        assert "; not sent, held: uncertainty" in made["detail"]
    finally:
        node.stop()
        receiver.stop()

    received = [pydicom.dcmread(p) for p in sorted((tmp_path / "pacs").iterdir())]
    by_series: dict[str, list] = {}
    for ds in received:
        by_series.setdefault(ds.SeriesDescription, []).append(ds)
    assert sorted(by_series) == [
        "SYNTHETIC T2 UNCERTAINTY from AX T1 SE",
        "SYNTHETIC T2 from AX T1 SE",
    ]
    maps = by_series["SYNTHETIC T2 UNCERTAINTY from AX T1 SE"]
    synthetic = by_series["SYNTHETIC T2 from AX T1 SE"]
    assert len(maps) == len(synthetic) == len(source)
    first = maps[0]
    assert first.SyntheticData == "YES" and "SYNTHETIC" in first.ImageType
    assert first.SeriesInstanceUID != synthetic[0].SeriesInstanceUID
    assert first.SeriesNumber == synthetic[0].SeriesNumber + 1000
    assert "uncertainty" in first.DerivationDescription.lower()
    # The reader of the synthetic image is told what it may not show; the test model's card
    # has no held-out lesion measurement, and the map is not an image of lesions.
    caution = "was not measured; a synthetic image does not rule out a lesion."
    assert synthetic[0].ImageComments.endswith(caution)
    assert "Lesions" not in first.ImageComments
    top = int(float(first.WindowCenter) + float(first.WindowWidth) / 2)
    assert len(find_label(first.pixel_array, "UNCERTAINTY", top)) == 1
    assert_dciodvfy_finds_no_error(sorted((tmp_path / "pacs").iterdir())[:2])


def check_console(url: str, job: dict) -> None:
    """The held job on the console: counted, listed with its uncertainty and thumbnails."""
    metrics = get(f"{url}/metrics")[1].decode()
    assert 'dicomnode_jobs{state="held"} 1.0' in metrics
    status, html = get(f"{url}/jobs?state=held")
    assert status == 200 and f"{job['uncertainty']:.4f}".encode() in html
    status, png = get(f"{url}/jobs/{job['id']}/synthetic.png")
    assert status == 200 and png.startswith(b"\x89PNG")


def test_auroc_by_ranks():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    assert auroc(scores, np.array([False, False, True, True])) == 0.75
    assert auroc(scores, scores > 0.3) == 1.0 and auroc(-scores, scores > 0.3) == 0.0
    assert auroc(np.ones(4), np.array([True, False, True, False])) == 0.5  # ties count half
    assert auroc(scores, np.zeros(4, bool)) is None
