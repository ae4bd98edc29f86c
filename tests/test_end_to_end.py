"""End to end: storescu -> dicomnode -> synthesis -> Orthanc, checked on the PACS side."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pydicom import dcmread

from pipeline.dicom.volume import load_series
from tests.support.dicomgen import as_sagittal_files, enhanced_mr
from tests.support.models import make_registry
from tests.support.nodeproc import NodeProcess, free_port, routes_toml, write_config
from tests.support.peers import Orthanc
from tests.support.senders import storescu
from tests.support.validators import assert_dciodvfy_finds_no_error
from tests.test_label import find_label

NATIVE_T1 = "tcga-fg-6692-native/03_t1"  # 26 oblique slices, with the skull


def pacs_config(orthanc_port: int) -> str:
    return (
        "\n[delivery]\nbackoff_seconds = 0.5\nbackoff_max_seconds = 1\n"
        "timeout_seconds = 10\nlease_seconds = 40\nmax_attempts = 100\n"
    ) + routes_toml(Orthanc.AE_TITLE, orthanc_port)


@pytest.fixture
def registry(tmp_path):
    return make_registry(tmp_path / "models")


@contextmanager
def node_beside_pacs(tmp_path, registry) -> Iterator[tuple[NodeProcess, Orthanc, int]]:
    """(node, Orthanc, node's port): a node on the registry's models delivering to Orthanc."""
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        port = free_port()
        config = write_config(
            tmp_path / "node", port, extra=pacs_config(orthanc.dicom_port), models=registry.root
        )
        node = NodeProcess(config, port).start()
        try:
            yield node, orthanc, port
        finally:
            node.stop()
    finally:
        orthanc.stop()


def synthetic_series(orthanc: Orthanc) -> list[dict]:
    return [
        s
        for s in orthanc.get("/series?expand")
        if s["MainDicomTags"].get("SeriesDescription", "").startswith("SYNTHETIC")
    ]


def test_t1_series_comes_back_as_marked_synthetic_t2(tmp_path, mr_brain, registry):
    with node_beside_pacs(tmp_path, registry) as (node, orthanc, port):
        source = sorted((mr_brain / NATIVE_T1).glob("*.dcm"))
        assert storescu([mr_brain / NATIVE_T1], port).returncode == 0
        status = node.wait_for(
            lambda s: s["deliveries"] and s["deliveries"][0]["state"] == "sent", timeout=120
        )
        (job,) = status["jobs"]
        assert job["state"] == "done" and job["model_version"] == "v1"
        assert job["device"] == "cpu" and set(job["timings"]) >= {"load_s", "inference_s"}
        assert status["deliveries"][0]["instances_sent"] == len(source)

        (series,) = synthetic_series(orthanc)
        first = dcmread(source[0], stop_before_pixels=True)
        study = orthanc.get(f"/studies/{series['ParentStudy']}")
        assert study["MainDicomTags"]["StudyInstanceUID"] == first.StudyInstanceUID
        assert series["MainDicomTags"]["SeriesDescription"] == "SYNTHETIC T2 from AX T1 SE"
        assert series["MainDicomTags"]["SeriesInstanceUID"] == job["output_series_uid"]
        assert len(series["Instances"]) == len(source)

        instance = series["Instances"][0]
        tags = orthanc.get(f"/instances/{instance}/simplified-tags")
        assert tags["ImageType"].startswith("DERIVED\\SECONDARY")
        assert tags["PatientID"] == first.PatientID
        assert "SYNTHETIC" in tags.get("DerivationDescription", "").upper()
        assert tags["FrameOfReferenceUID"] == first.FrameOfReferenceUID
        downloaded = tmp_path / "from-pacs.dcm"
        downloaded.write_bytes(orthanc.get(f"/instances/{instance}/file"))
        assert_dciodvfy_finds_no_error([downloaded])
        ds = dcmread(downloaded)
        assert (ds.SyntheticData, ds.BurnedInAnnotation) == ("YES", "YES")
        top_of_window = int(float(ds.WindowCenter) + float(ds.WindowWidth) / 2)
        assert len(find_label(ds.pixel_array, "SYNTHETIC", top_of_window)) == 1
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in {
            dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in source
        }
        checksum = registry_checksum(registry)
        assert any(checksum[:16] in str(v) for v in ds.SoftwareVersions)


def registry_checksum(registry) -> str:
    from pipeline.model.card import load_model

    return load_model(registry.active_path("t1-to-t2")).card.checksum


def test_delivery_retries_until_the_pacs_is_up(tmp_path, mr_brain, registry):
    orthanc_port = free_port()  # nothing listens there yet
    port = free_port()
    config = write_config(
        tmp_path / "node", port, extra=pacs_config(orthanc_port), models=registry.root
    )
    node = NodeProcess(config, port).start()
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=orthanc_port)
    try:
        assert storescu([mr_brain / NATIVE_T1], port).returncode == 0
        # Between two failed attempts the delivery waits as pending; a backoff drawn near zero
        # can show the next attempt already sending, so wait for a pending moment.
        status = node.wait_for(
            lambda s: (
                s["deliveries"]
                and s["deliveries"][0]["attempts"] >= 2
                and s["deliveries"][0]["state"] == "pending"
            ),
            timeout=120,
        )
        assert "connection refused" in status["deliveries"][0]["reason"]
        orthanc.start()
        node.wait_for(lambda s: s["deliveries"][0]["state"] == "sent", timeout=60)
        (series,) = synthetic_series(orthanc)
        assert len(series["Instances"]) == 26
    finally:
        node.stop()
        orthanc.stop()


def test_enhanced_mr_and_sagittal_3d_series_come_back_on_their_own_grids(
    tmp_path, mr_brain, registry
):
    # What newer scanners send: the native T1 as one Enhanced MR instance, and a 3D T1 as
    # sagittal slices (healthy-t1-only, stored again sagittally).
    sent = tmp_path / "sent"
    sent.mkdir()
    native = [dcmread(path) for path in sorted((mr_brain / NATIVE_T1).glob("*.dcm"))]
    enhanced = enhanced_mr(native)
    enhanced.save_as(sent / "enhanced.dcm", enforce_file_format=True)
    axial_3d = load_series(sorted((mr_brain / "healthy-t1-only" / "03_t1").glob("*.dcm")))
    sagittal = as_sagittal_files(axial_3d, sent / "sagittal")
    with node_beside_pacs(tmp_path, registry) as (node, orthanc, port):
        assert storescu([sent], port).returncode == 0
        status = node.wait_for(
            lambda s: (
                len(s["deliveries"]) == 2 and all(d["state"] == "sent" for d in s["deliveries"])
            ),
            timeout=180,
        )
        assert [job["state"] for job in status["jobs"]] == ["done", "done"]
        received = {len(s["Instances"]) for s in synthetic_series(orthanc)}
        assert received == {len(native), len(sagittal)}
        for series in synthetic_series(orthanc):
            instance = series["Instances"][0]
            downloaded = tmp_path / f"{instance}.dcm"
            downloaded.write_bytes(orthanc.get(f"/instances/{instance}/file"))
            assert_dciodvfy_finds_no_error([downloaded])
            ds = dcmread(downloaded)
            (source,) = ds.SourceImageSequence
            if len(series["Instances"]) == len(native):
                assert source.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
                assert 1 <= source.ReferencedFrameNumber <= len(native)
            else:
                assert list(ds.ImageOrientationPatient) == [0, 1, 0, 0, 0, -1]  # sagittal
