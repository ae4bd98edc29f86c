"""DICOM over TLS (PS3.15 Annex B): the TLS contexts of the node's listening port and of
its destinations, and the name a caller's certificate gives. TLS 1.2 or newer only; the
ciphers are OpenSSL's defaults for that minimum."""

from __future__ import annotations

import ssl

from node.config import Config, NodeTLS
from pipeline.routing import DestinationTLS

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def server_context(settings: NodeTLS) -> ssl.SSLContext:
    """The context of the node's TLS port: its certificate, and the CA that signs callers'."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.load_cert_chain(settings.certificate, settings.key)
    if settings.ca is not None:
        context.load_verify_locations(cafile=settings.ca)
        # Optional: a caller without a certificate is let in (its AE title must then be
        # allowed without a certificate name); one with a certificate not signed is refused.
        context.verify_mode = (
            ssl.CERT_REQUIRED if settings.require_client_certificate else ssl.CERT_OPTIONAL
        )
    return context


def client_context(settings: DestinationTLS) -> ssl.SSLContext:
    """The context for sending to a destination: its certificate must be signed by ``ca``
    and name the host the node connects to."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MINIMUM_VERSION
    context.load_verify_locations(cafile=settings.ca)
    if settings.certificate is not None and settings.key is not None:
        context.load_cert_chain(settings.certificate, settings.key)
    return context


def certificate_name(sock: object) -> str | None:
    """The common name of the certificate the peer of ``sock`` presented (verified by the
    handshake), or None: no TLS, or no certificate."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    certificate = sock.getpeercert()
    for relative_name in (certificate or {}).get("subject", ()):
        for key, value in relative_name:
            if key == "commonName":
                return value
    return None


def check_tls(config: Config) -> list[str]:
    """Problems with the certificates and keys the config names: each context is built
    once at start, so a missing or mismatched file stops `serve` instead of every call."""
    problems = []
    if config.node.tls is not None:
        try:
            server_context(config.node.tls)
        except (OSError, ssl.SSLError) as error:
            problems.append(f"node.tls: {_describe(error)}")
    for name, destination in config.destinations.items():
        if destination.tls is None:
            continue
        try:
            client_context(destination.tls)
        except (OSError, ssl.SSLError) as error:
            problems.append(f"destinations.{name}.tls: {_describe(error)}")
    return problems


def _describe(error: OSError) -> str:
    if isinstance(error, ssl.SSLError):
        # e.g. "[X509: KEY_VALUES_MISMATCH] key values mismatch": the key is not the certificate's.
        return f"certificate or key not usable ({error.reason or error})"
    where = f" ({error.filename})" if error.filename else ""
    return f"{error.strerror or error}{where}"
