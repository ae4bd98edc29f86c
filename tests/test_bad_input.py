"""Every bad instance gets a failure status that says why, and the node carries on."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from tests.support.dicomgen import mr_series, write
from tests.support.nodeproc import NodeProcess, free_port, write_config
from tests.support.senders import send


def stored_count(node: NodeProcess) -> int:
    return sum(1 for _ in (node.config.parent / "spool").rglob("*.dcm"))


def test_missing_uid_and_missing_pixels(node, tmp_path):
    no_series, no_pixels = mr_series(2)
    del no_series.SeriesInstanceUID
    del no_pixels.PixelData
    assert send([no_series], node.port) == [(0xA900, "SeriesInstanceUID is missing")]
    assert send([no_pixels], node.port) == [(0xA900, "the instance has no pixel data")]

    # A file whose dataset lacks SOPInstanceUID (the C-STORE request still names one).
    (path,) = write(mr_series(1), tmp_path / "no-sop")
    ds = dcmread(path)
    del ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=False)
    assert send([path], node.port) == [(0xA900, "SOPInstanceUID is missing")]
    assert stored_count(node) == 0


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom warns; we refuse
def test_crafted_uid_cannot_escape_the_spool(node, tmp_path):
    (ds,) = mr_series(1)
    ds.SeriesInstanceUID = "1.2.3/../../../../evil"
    ((status, comment),) = send([ds], node.port)
    assert status == 0xA900 and "not a valid DICOM UID" in comment
    assert not list(tmp_path.rglob("*evil*"))


def test_undecodable_pixel_data(node):
    (ds,) = mr_series(1)
    ds.PixelData = encapsulate([b"\xff\xd8 this is not a JPEG-LS stream"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ((status, comment),) = send([ds], node.port, transfer_syntax=JPEGLSLossless)
    assert status == 0xC000 and comment.startswith("pixel data cannot be decoded")
    assert stored_count(node) == 0


def test_truncated_uncompressed_pixel_data(node):
    (ds,) = mr_series(1, rows=32, columns=32)
    ds.PixelData = ds.PixelData[:1000]
    ((status, comment),) = send([ds], node.port)
    assert (status, comment) == (
        0xC000,
        "pixel data cannot be decoded: 1000 bytes, 2048 expected for its",
    )


def test_instance_that_disagrees_with_its_series(node):
    series = mr_series(3, rows=32, columns=32)
    (odd,) = mr_series(
        1,
        rows=64,
        columns=48,
        study_uid=series[0].StudyInstanceUID,
        series_uid=series[0].SeriesInstanceUID,
    )
    odd.FrameOfReferenceUID = series[0].FrameOfReferenceUID
    tilted = mr_series(
        1, study_uid=series[0].StudyInstanceUID, series_uid=series[0].SeriesInstanceUID
    )[0]
    tilted.FrameOfReferenceUID = series[0].FrameOfReferenceUID
    tilted.ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.43589]
    results = send([series[0], odd, tilted, series[1]], node.port)
    assert results[0] == (0, "") and results[3] == (0, "")
    assert results[1][0] == 0xC001 and "size 48x64 differs from the series' 32x32" in node.log()
    assert results[2][0] == 0xC001 and "ImageOrientationPatient differs" in node.log()
    assert stored_count(node) == 2


def test_node_carries_on_after_bad_input(node):
    (bad,) = mr_series(1)
    del bad.PixelData
    good = mr_series(2)
    assert [s for s, _ in send([bad, *good], node.port)] == [0xA900, 0, 0]
    assert stored_count(node) == 2


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A real 200 KiB file system for the spool (tmpfs; needs root, as in CI)."""
    spool = tmp_path / "node" / "spool"
    spool.mkdir(parents=True)
    try:
        _mount("-t", "tmpfs", "-o", "size=200k", "tmpfs", str(spool))
    except (subprocess.CalledProcessError, FileNotFoundError, PermissionError) as error:
        pytest.skip(f"cannot mount a small file system here: {error}")
    yield spool
    subprocess.run(["umount", "-l", str(spool)], capture_output=True)


def test_full_disk_answers_out_of_resources_and_leaves_nothing_half_written(small_disk):
    port = free_port()
    node = NodeProcess(write_config(small_disk.parent, port), port).start()
    try:
        series = mr_series(20, rows=64, columns=64)  # 8 KiB of pixels each
        for ds in series:
            ds.PixelData = np.full((64, 64), 7, np.uint16).tobytes() * 4
            ds.Rows = ds.Columns = 128
        results = send(series, node.port)
        statuses = [status for status, _ in results]
        assert 0 in statuses and 0xA700 in statuses
        assert statuses == sorted(statuses, key=lambda s: s != 0)  # successes, then refusals
        assert "spool cannot be written: No space left on device" in results[-1][1]
        # Exactly the acknowledged instances are on disk, each complete; no partial file.
        files = list(small_disk.rglob("*"))
        assert not [f for f in files if f.name.endswith(".partial")]
        stored = [f for f in files if f.suffix == ".dcm"]
        assert len(stored) == statuses.count(0)
        for path in stored:
            assert dcmread(path).pixel_array.shape == (128, 128)

        # Read-only: the same answer.
        _mount("-o", "remount,ro", str(small_disk))
        ((status, comment),) = send(mr_series(1), node.port)
        assert status == 0xA700 and "Read-only file system" in comment
        assert node.process.poll() is None
    finally:
        node.stop()
