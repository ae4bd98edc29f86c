"""Output beyond the range a model learnt: measured on constructed volumes, said by
`translate`, and a node holds such a series (real association, real data) until an admin
releases it."""

from __future__ import annotations

import numpy as np
import pytest

from node.config import ConfigError, load_config
from pipeline.model.overshoot import OVERSHOOT_FACTOR, measure_overshoot
from pipeline.model.preprocess import Normalization
from pipeline.model.registry import ModelRegistry
from tests.support.models import add_model
from tests.support.nodeproc import (
    NodeProcess,
    free_port,
    routes_toml,
    run_dicomnode,
    write_config,
)
from tests.support.peers import StoreSCP
from tests.support.senders import storescu

T1 = "tcga-fg-6692-native/03_t1"


def test_only_output_beyond_the_learnt_range_counts():
    output = np.random.default_rng(0).uniform(0.0, 1.0, size=(6, 32, 32)).astype(np.float32)
    within = measure_overshoot(output, Normalization.PERCENTILE_VOLUME, voxel_mm3=2.0)
    assert within.volume_ml == 0 and within.peak <= 1.0

    output[4, 10, 5:15] = 1.8  # a line of ten bright voxels along one slice
    line = measure_overshoot(output, Normalization.PERCENTILE_VOLUME, voxel_mm3=2.0)
    assert line.volume_ml == pytest.approx(10 * 2.0 / 1000)
    assert line.peak == pytest.approx(1.8) and line.peak_slice == 4
    # A model whose target space reaches 2.0 learnt to draw 1.8.
    wide = measure_overshoot(output, Normalization.MEDIAN_VOLUME, voxel_mm3=2.0)
    assert wide.volume_ml == 0 and wide.peak == pytest.approx(0.9)
    assert OVERSHOOT_FACTOR * 1.0 < 1.8 < OVERSHOOT_FACTOR * 2.0


def overshooting_registry(root) -> ModelRegistry:
    """t1-to-t2 draws 3 times its learnt range everywhere; t2-to-t1 is a plain tiny model."""
    registry = ModelRegistry(root)
    add_model(registry, "t1-to-t2", "v1", constant=3.0)
    add_model(registry, "t2-to-t1", "v1")
    for direction in ("t1-to-t2", "t2-to-t1"):
        registry.activate(direction, "v1")
    return registry


def test_translate_says_where_to_look(tmp_path, mr_brain):
    registry = overshooting_registry(tmp_path / "models")
    result = run_dicomnode(
        "translate",
        str(mr_brain / T1),
        str(tmp_path / "out"),
        "--model",
        str(registry.active_path("t1-to-t2")),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (note,) = [line for line in result.stdout.splitlines() if "check it before use" in line]
    assert "brighter than anything its model learnt to draw (up to 3.0 times" in note
    assert "in image 1)" in note


def test_an_overshooting_series_is_held_then_released(tmp_path, mr_brain):
    receiver = StoreSCP(tmp_path / "pacs").start()
    port = free_port()
    registry = overshooting_registry(tmp_path / "models")
    config = write_config(
        tmp_path / "node",
        port,
        extra=routes_toml(receiver.ae_title, receiver.port),
        models=registry.root,
    )
    node = NodeProcess(config, port).start()
    try:
        assert storescu([mr_brain / T1], port).returncode == 0
        status = node.wait_for(lambda s: s["jobs"] and s["jobs"][0]["state"] == "held", 180)
        (job,) = status["jobs"]
        assert job["reason"].startswith("held: ") and "mL of the synthetic series" in job["reason"]
        assert "above [output] hold_overshoot_above_ml 0.1" in job["reason"]
        assert job["reason"].endswith(f"dicomnode retry {job['id']} sends it anyway")
        assert status["deliveries"] == []

        released = run_dicomnode("retry", str(job["id"]), "--config", str(config))
        assert released.returncode == 0 and "released" in released.stdout
        node.wait_for(lambda s: [d["state"] for d in s["deliveries"]] == ["sent"], 120)
    finally:
        node.stop()
        receiver.stop()
    assert len(list((tmp_path / "pacs").iterdir())) == len(list((mr_brain / T1).glob("*.dcm")))


def test_the_hold_threshold_is_checked_by_name(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[output]\nhold_overshoot_above_ml = -1\n")
    with pytest.raises(ConfigError, match=r"output\.hold_overshoot_above_ml = -1"):
        load_config(path)
    path.write_text("[output]\nhold_overshoot_above_ml = inf\n")
    assert load_config(path).output.hold_overshoot_above_ml == float("inf")
