"""DICOM over TLS: DCMTK's storescu/echoscu +tls as the scanner, Orthanc with DICOM TLS as
the PACS, certificates from a CA the test makes with openssl."""

from __future__ import annotations

import re
import subprocess
import threading
from pathlib import Path

import pytest

from tests.support.dicomgen import mr_series, write
from tests.support.models import make_registry
from tests.support.nodeproc import NodeProcess, free_port, run_dicomnode, write_config
from tests.support.peers import Orthanc
from tests.support.pki import TestAuthority
from tests.support.senders import DCMTK_ENV, ECHOSCU, STORESCU

SCANNER_NAME = "mri1.hospital.test"


def dcmtk(
    program: str, port: int, *options: object, calling_ae: str, files: list[Path] = ()
) -> subprocess.CompletedProcess:
    """Run a DCMTK client against the node on loopback ``port``."""
    return subprocess.run(
        [program, "-aet", calling_ae, "-aec", "SYNTH", *map(str, options), "127.0.0.1",
         str(port), *map(str, files)],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=120,
    )  # fmt: skip


def tls_options(ca: TestAuthority, certificate=None) -> list[object]:
    """storescu/echoscu options: TLS with ``certificate`` (anonymous without), trusting ``ca``."""
    own = ["+tls", certificate.key, certificate.certificate] if certificate else ["+tla"]
    return [*own, "+cf", ca.certificate]


def test_a_study_is_received_and_delivered_over_tls_and_strangers_are_refused(tmp_path: Path):
    ca = TestAuthority(tmp_path / "pki")
    node_certificate = ca.issue("node", "synth.hospital.test")
    scanner = ca.issue("scanner", SCANNER_NAME)
    stranger = TestAuthority(tmp_path / "other-pki", "Someone Else's CA").issue("x", SCANNER_NAME)

    orthanc = Orthanc(
        tmp_path / "orthanc",
        settings={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(ca.issue("orthanc", "pacs.hospital.test").certificate),
            "DicomTlsPrivateKey": str(ca.folder / "orthanc.key"),
            "DicomTlsTrustedCertificates": str(ca.certificate),
            "DicomTlsRemoteCertificateRequired": True,
        },
    ).start()
    port, tls_port = free_port(), free_port()
    extra = f"""
[node.tls]
certificate = "{node_certificate.certificate}"
key = "{node_certificate.key}"
ca = "{ca.certificate}"
port = {tls_port}

[delivery]
backoff_seconds = 0.5
timeout_seconds = 10
lease_seconds = 40

[destinations.pacs]
ae_title = "{Orthanc.AE_TITLE}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
tls = {{ ca = "{ca.certificate}", certificate = "{node_certificate.certificate}", \
key = "{node_certificate.key}" }}

[[routes]]
name = "t1-to-t2"
direction = "t1-to-t2"
destinations = ["pacs"]
"""
    registry = make_registry(tmp_path / "models")
    config = write_config(
        tmp_path / "node",
        port,
        extra=extra,
        models=registry.root,
        allowed_callers=[f"MRI1#{SCANNER_NAME}", "ECHO"],
        receivers=2,  # the second accepts on serve's TLS socket too
    )
    node = NodeProcess(config, port).start()
    try:
        node.wait_until_receiving(2)
        assert run_dicomnode("check", "--config", str(config)).returncode == 0  # C-ECHO over TLS

        # Two associations at once: the second receiver takes at least one.
        files = write(mr_series(5), tmp_path / "study")
        sent: list[subprocess.CompletedProcess] = []

        def send(part: list[Path]) -> None:
            options = tls_options(ca, scanner)
            sent.append(dcmtk(STORESCU, tls_port, *options, calling_ae="MRI1", files=part))

        senders = [threading.Thread(target=send, args=(p,)) for p in (files[:3], files[3:])]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(120)
        assert [s.returncode for s in sent] == [0, 0], [s.stderr for s in sent]
        takers = re.findall(r"(receiver-2 )?node.scp: association from MRI1 \S+ accepted$",
                            node.log(), re.MULTILINE)  # fmt: skip
        assert len(takers) == 2 and "receiver-2 " in takers
        status = node.wait_for(
            lambda s: s["deliveries"] and s["deliveries"][0]["state"] == "sent", timeout=120
        )
        assert status["deliveries"][0]["instances_sent"] == 5
        synthetic = [
            s
            for s in orthanc.get("/series?expand")
            if s["MainDicomTags"].get("SeriesDescription", "").startswith("SYNTHETIC")
        ]
        assert len(synthetic) == 1 and len(synthetic[0]["Instances"]) == 5

        # A certificate another CA signed, none at all, and plain DICOM: refused at the TLS port.
        for options in (tls_options(ca, stranger), tls_options(ca), []):
            refused = dcmtk(ECHOSCU, tls_port, *options, calling_ae="MRI1")
            assert refused.returncode != 0, options
        log = node.log()
        for reason in (
            "certificate verify failed",
            "peer did not return a certificate",
            "wrong version number",  # plain DICOM's A-ASSOCIATE-RQ is no TLS record
        ):
            assert f"refused: {reason}" in log
        assert "Traceback" not in log

        # MRI1 is bound to its certificate: from a plain connection it is not MRI1.
        assert dcmtk(ECHOSCU, port, calling_ae="MRI1").returncode != 0
        assert "association from MRI1 (127.0.0.1) rejected: calling AE title not recognized" in (
            node.log()
        )
        # Nor does a valid certificate make another AE title allowed.
        other = dcmtk(ECHOSCU, tls_port, *tls_options(ca, scanner), calling_ae="MRI2")
        assert other.returncode != 0
        assert f"MRI2 (127.0.0.1, certificate {SCANNER_NAME!r}) rejected" in node.log()
        # The plain port stays open to the callers allowed without a certificate.
        assert dcmtk(ECHOSCU, port, calling_ae="ECHO").returncode == 0
    finally:
        node.stop()
        orthanc.stop()


@pytest.mark.parametrize(
    ("tls", "problem"),
    [
        (
            'certificate = "missing.crt"\nkey = "missing.key"\nca = "missing.crt"',
            "node.tls: No such file",
        ),
        ('certificate = "a.crt"\nkey = "a.key"', "require_client_certificate = true needs ca"),
    ],
)
def test_tls_files_are_checked_at_start(tmp_path, tls, problem):
    config = write_config(tmp_path, free_port(), extra=f"\n[node.tls]\n{tls}\n")
    result = run_dicomnode("serve", "--config", str(config))
    assert result.returncode == 2
    assert problem in result.stderr and "Traceback" not in result.stderr
