"""Real DICOM senders for tests and benches: DCMTK's storescu and pynetdicom."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset, dcmread
from pynetdicom import AE, _config
from pynetdicom.sop_class import MRImageStorage

# Debian's DCMTK waits on Nagle's algorithm (about 40 ms per C-STORE) unless told not to.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
# pip's pynetdicom installs console scripts with the same names: call DCMTK by full path.
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"


def storescu(
    paths: Sequence[Path],
    port: int,
    *options: str,
    calling_ae: str = "STORESCU",
    called_ae: str = "SYNTH",
) -> subprocess.CompletedProcess:
    """Send files or folders (recursively) with DCMTK's storescu."""
    return subprocess.run(
        [
            STORESCU,
            "-aet",
            calling_ae,
            "-aec",
            called_ae,
            "+sd",
            "+r",
            "-nh",
            *options,
            "127.0.0.1",
            str(port),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=600,
    )


def send(
    datasets: Sequence[Dataset | Path],
    port: int,
    calling_ae: str = "PYNETDICOM",
    called_ae: str = "SYNTH",
    transfer_syntax: str | None = None,
) -> list[tuple[int, str]]:
    """Send over one pynetdicom association; return (status, error comment) per instance."""
    metas = [
        dcmread(d, stop_before_pixels=True).file_meta if isinstance(d, Path) else d.file_meta
        for d in datasets
    ]
    ae = AE(ae_title=calling_ae)
    syntaxes = {transfer_syntax or str(meta.TransferSyntaxUID) for meta in metas}
    classes = {str(m.get("MediaStorageSOPClassUID", MRImageStorage)) for m in metas}
    # One context per transfer syntax: the acceptor picks one syntax per context.
    for sop_class in classes | {MRImageStorage}:
        for syntax in sorted(syntaxes):
            ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError("association not established")
    results = []
    # Send files as their bytes, unparsed, so a broken dataset reaches the node as it is. The
    # setting is process-wide: restored below so other senders in the process are unaffected.
    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if "Status" not in status:
                results.append((-1, "no response"))
            else:
                results.append((int(status.Status), str(status.get("ErrorComment", ""))))
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    return results
