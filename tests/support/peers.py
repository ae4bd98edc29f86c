"""Real DICOM peers on loopback: Orthanc as the PACS, DCMTK's storescp as a receiver."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.nodeproc import free_port, stop_process
from tests.support.senders import DCMTK_ENV


def wait_listening(port: int, process: subprocess.Popen, what: str, timeout: float = 30) -> None:
    """Wait until ``process`` accepts connections on ``port``; fail if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port}")


class Orthanc:
    """Debian's Orthanc with its own configuration: no plugins, own storage, free ports."""

    AE_TITLE = "ORTHANC"

    def __init__(
        self, folder: Path, dicom_port: int | None = None, settings: dict[str, Any] | None = None
    ) -> None:
        self.folder = folder
        # More of Orthanc's configuration (DICOM TLS: DicomTlsEnabled, DicomTlsCertificate...).
        self.settings = settings or {}
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        if shutil.which("Orthanc") is None:
            raise RuntimeError("Orthanc is not installed (Debian package 'orthanc')")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "dicomnode-test-pacs",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "Plugins": [],
            "DicomAet": self.AE_TITLE,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "StorageCompression": False,
            # A re-run of a job re-sends the same UIDs: the PACS must take the new copy.
            "OverwriteInstances": True,
            "SaveJobs": False,
            **self.settings,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        with open(self.folder / "orthanc.log", "ab") as log:  # the child keeps its own
            self.process = subprocess.Popen(
                ["Orthanc", str(path)], stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV
            )
        wait_listening(self.dicom_port, self.process, "Orthanc")
        wait_listening(self.http_port, self.process, "Orthanc (HTTP)")
        return self

    def stop(self) -> None:
        stop_process(self.process)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body


class StoreSCP:
    """DCMTK's storescp writing every received instance to ``folder``."""

    def __init__(
        self, folder: Path, ae_title: str = "STORESCP", *, unique_filenames: bool = False
    ) -> None:
        self.folder = folder
        self.ae_title = ae_title
        # One file per received instance, so an instance received twice shows as two files.
        self.options = ["+uf"] if unique_filenames else []
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "/usr/bin/storescp",
                "-aet",
                self.ae_title,
                "--output-directory",
                str(self.folder),
                *self.options,
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=DCMTK_ENV,
        )
        wait_listening(self.port, self.process, "storescp")
        return self

    def stop(self) -> None:
        stop_process(self.process)
