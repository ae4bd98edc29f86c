"""A certificate authority for tests, made with the openssl command line: a CA, and
certificates it signs for loopback (server and client use)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# Usable as a server's certificate on loopback and as a client's.
EXTENSIONS = """basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
"""


@dataclass(frozen=True)
class Issued:
    certificate: Path
    key: Path


class TestAuthority:
    """A CA in ``folder``: ``ca.crt`` and the certificates ``issue`` signs with it."""

    __test__ = False  # not a pytest class

    def __init__(self, folder: Path, name: str = "Test Hospital CA") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.certificate = folder / "ca.crt"
        self.key = folder / "ca.key"
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-keyout", self.key, "-out", self.certificate, "-subj", f"/CN={name}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip

    def issue(self, name: str, common_name: str) -> Issued:
        """A key and a certificate for ``common_name``, signed by this CA."""
        key, request = self.folder / f"{name}.key", self.folder / f"{name}.csr"
        certificate = self.folder / f"{name}.crt"
        extensions = self.folder / f"{name}.ext"
        extensions.write_text(EXTENSIONS)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", request,
                 "-subj", f"/CN={common_name}")  # fmt: skip
        _openssl("x509", "-req", "-in", request, "-CA", self.certificate, "-CAkey", self.key,
                 "-CAcreateserial", "-days", "2", "-out", certificate,
                 "-extfile", extensions)  # fmt: skip
        return Issued(certificate, key)


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
