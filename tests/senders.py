"""Real DICOM senders for tests and benches: DCMTK's storescu and pynetdicom."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset, dcmread
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

# Debian's DCMTK waits on Nagle's algorithm (about 40 ms per C-STORE) unless told not to.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
# pip's pynetdicom installs console scripts with the same names: call DCMTK by full path.
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"


def storescu(
    paths: Sequence[Path], port: int, calling_ae: str = "STORESCU", called_ae: str = "SYNTH"
) -> subprocess.CompletedProcess:
    """Send files or folders (recursively) with DCMTK's storescu."""
    return subprocess.run(
        [STORESCU, "-aet", calling_ae, "-aec", called_ae, "+sd", "+r", "-nh",
         "127.0.0.1", str(port), *map(str, paths)],
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
    items = [dcmread(d) if isinstance(d, Path) else d for d in datasets]
    ae = AE(ae_title=calling_ae)
    syntaxes = {transfer_syntax or str(ds.file_meta.TransferSyntaxUID) for ds in items}
    for sop_class in {str(ds.SOPClassUID) for ds in items} | {MRImageStorage}:
        ae.add_requested_context(sop_class, sorted(syntaxes))
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError("association not established")
    results = []
    try:
        for ds in items:
            status = assoc.send_c_store(ds)
            if "Status" not in status:
                results.append((-1, "no response"))
            else:
                results.append((int(status.Status), str(status.get("ErrorComment", ""))))
    finally:
        assoc.release()
    return results
