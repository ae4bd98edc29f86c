"""The Storage SCU: sends a synthetic series to a destination, and checks one with C-ECHO.

One association per attempt; every outcome becomes text an admin can act on. How a
destination's C-STORE answer counts (PS3.4 Annex B.2.3, PS3.7 Annex C):
  0x0000        Success: sent
  0xB000        Warning, coercion of data elements: sent, the warning is kept
  0xB006        Warning, elements discarded: sent, the warning is kept
  0xB007        Warning, data set does not match SOP class: sent, the warning is kept
  0xA7xx        Refused, out of resources: not sent, retried
  0xA9xx        Error, data set does not match SOP class: not sent
  0xCxxx        Error, cannot understand: not sent
  0x01xx/0x02xx General failures (0x0122 SOP class not supported, ...): not sent
  no answer     The response was lost or late (pynetdicom can lose one, its issue #875)
                or the association ended: not sent, so the next attempt sends it again.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association, evt
from pynetdicom.sop_class import Verification
from pynetdicom.status import (
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from node.scp import set_tcp_nodelay
from node.tls import client_context
from pipeline.routing import Destination
from pipeline.state.deliveries import DeliverySettings, InstanceResult

log = logging.getLogger(__name__)

# The node writes Explicit VR Little Endian; Implicit is the one every peer must accept.
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@dataclass(frozen=True)
class SendResult:
    """One attempt's outcome: what the destination did with each SOP Instance UID sent;
    ``error`` says why the attempt failed, None when every instance was stored."""

    results: dict[str, InstanceResult]
    error: str | None


def send_series(
    destination: Destination,
    files: Sequence[Path],
    skip: set[str],
    settings: DeliverySettings,
    calling_ae: str,
) -> SendResult:
    """C-STORE ``files`` to ``destination`` over one association, except the SOP Instance
    UIDs in ``skip`` (acknowledged by an earlier attempt)."""
    to_send: list[tuple[Path, str, str]] = []  # path, SOP Class UID, SOP Instance UID
    unreadable: list[str] = []
    for path in files:
        try:
            meta = read_file_meta_info(path)
            instance, sop_class = meta.MediaStorageSOPInstanceUID, meta.MediaStorageSOPClassUID
        except (OSError, InvalidDicomError, AttributeError) as error:
            unreadable.append(f"{path.name}: {error}")
            continue
        if instance not in skip:
            to_send.append((path, str(sop_class), str(instance)))
    problems = []
    if unreadable:
        problems.append(f"{len(unreadable)} file(s) cannot be read ({unreadable[0]})")
    if not to_send:
        return SendResult({}, "; ".join(problems) or None)

    label = _label(destination)
    ae = _application_entity(calling_ae, settings)
    for sop_class in sorted({sop_class for _, sop_class, _ in to_send}):
        ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
    assoc, failure = _associate(ae, destination, settings)
    if assoc is None:
        log.warning("sending %d instance(s) to %s failed: %s", len(to_send), label, failure)
        not_sent = InstanceResult.not_sent(f"not sent: {failure}")
        return SendResult({uid: not_sent for _, _, uid in to_send}, failure)

    results: dict[str, InstanceResult] = {}
    try:
        for path, _, uid in to_send:
            if not assoc.is_established:
                results[uid] = InstanceResult.not_sent(
                    "not sent: the association ended before its turn"
                )
                continue
            results[uid] = _store(assoc, path, settings)
    finally:
        if assoc.is_established:
            assoc.release()

    failed = [(uid, result) for uid, result in results.items() if not result.stored]
    warned = [uid for uid, result in results.items() if result.stored and result.detail]
    if failed:
        uid, result = failed[0]
        problems.insert(
            0,
            f"{len(failed)} of {len(to_send)} instance(s) not stored by {label} ({uid}: {result})",
        )
    log.info(
        "sent %d of %d instance(s) to %s (%d with a warning, %d skipped as sent before)",
        len(results) - len(failed),
        len(to_send),
        label,
        len(warned),
        len(files) - len(to_send) - len(unreadable),
    )
    return SendResult(results, "; ".join(problems) or None)


def echo(destination: Destination, settings: DeliverySettings, calling_ae: str) -> str | None:
    """None when ``destination`` answers a C-ECHO with Success, else why it does not."""
    ae = _application_entity(calling_ae, settings)
    ae.add_requested_context(Verification)
    assoc, failure = _associate(ae, destination, settings)
    if assoc is None:
        return failure
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        return f"no C-ECHO response from {_label(destination)} (lost, late or aborted)"
    if status.Status != 0x0000:
        return f"{_label(destination)} answered C-ECHO with status {_describe(status)}"
    return None


def _label(destination: Destination) -> str:
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def _application_entity(calling_ae: str, settings: DeliverySettings) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = settings.timeout_seconds
    ae.acse_timeout = settings.timeout_seconds
    ae.dimse_timeout = settings.timeout_seconds
    ae.network_timeout = settings.timeout_seconds
    return ae


def _note_open(event: evt.Event, opened: threading.Event) -> None:
    opened.set()


def _associate(
    ae: AE, destination: Destination, settings: DeliverySettings
) -> tuple[Association, None] | tuple[None, str]:
    """An established association, or None and why there is none."""
    label = _label(destination)
    opened = threading.Event()
    handlers = [(evt.EVT_CONN_OPEN, set_tcp_nodelay), (evt.EVT_CONN_OPEN, _note_open, [opened])]
    started = time.monotonic()
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            evt_handlers=handlers,
            tls_args=(client_context(destination.tls), destination.host)
            if destination.tls
            else None,
        )
    except socket.gaierror as error:
        return None, f"cannot connect to {label}: cannot resolve host: {error.strerror}"
    if assoc.is_established:
        return assoc, None
    elapsed = time.monotonic() - started
    timeout = settings.timeout_seconds
    response = assoc.acceptor.primitive
    if assoc.is_rejected and response is not None:
        reason = response.reason_str
        return None, (
            f"association rejected by {label}: {reason[:1].lower()}{reason[1:]} "
            f"({response.result_str.lower()}, by the {response.source_str.lower()})"
        )
    if not opened.is_set():
        return None, f"cannot connect to {label}: {_connect_failure(destination, timeout, elapsed)}"
    if response is not None and response.result == 0x00:
        offered = ", ".join(
            sorted({cx.abstract_syntax.name for cx in assoc.requestor.requested_contexts})
        )
        return None, (
            f"{label} accepted the association but none of its presentation contexts "
            f"({offered} in Explicit or Implicit VR Little Endian)"
        )
    if elapsed >= timeout:
        return None, f"no answer from {label} to the association request within {timeout:g} s"
    return None, f"{label} aborted the association request or closed the connection"


def _connect_failure(destination: Destination, timeout: float, elapsed: float) -> str:
    if elapsed >= timeout:
        return f"connection timed out after {timeout:g} s"
    # pynetdicom logs why the connection failed but does not keep it: ask the system again.
    try:
        with socket.create_connection((destination.host, destination.port), timeout=timeout) as raw:
            if destination.tls:  # the handshake is what fails, most likely: say why
                context = client_context(destination.tls)
                with context.wrap_socket(raw, server_hostname=destination.host):
                    pass
            return "connection failed, though the port accepts connections now"
    except ssl.SSLError as error:
        return f"TLS handshake failed: {(error.reason or str(error)).lower().replace('_', ' ')}"
    except TimeoutError:
        return f"connection timed out after {timeout:g} s"
    except OSError as error:
        return (error.strerror or str(error)).lower()


def _store(assoc: Association, path: Path, settings: DeliverySettings) -> InstanceResult:
    started = time.monotonic()
    try:
        status = assoc.send_c_store(path)
    except (OSError, InvalidDicomError, AttributeError, ValueError, RuntimeError) as error:
        # Unreadable file, no accepted context for its SOP class, association just ended.
        return InstanceResult.not_sent(f"not sent: {error}")
    if "Status" not in status:
        if time.monotonic() - started >= settings.timeout_seconds:
            return InstanceResult.not_sent(
                f"no response within {settings.timeout_seconds:g} s "
                "(lost or late; the association was aborted)"
            )
        return InstanceResult.not_sent(
            "no response: the association was aborted or the connection closed"
        )
    category = code_to_category(status.Status)
    if category == STATUS_SUCCESS:
        return InstanceResult.sent()
    if category == STATUS_WARNING:
        return InstanceResult.sent(warning=_describe(status))
    return InstanceResult.not_sent(f"status {_describe(status)}")


def _describe(status: Dataset) -> str:
    """'0xA700 (Refused: Out of Resources): <ErrorComment>'."""
    code = int(status.Status)
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1] or "success"
    comment = str(status.get("ErrorComment", "")).strip()
    return f"0x{code:04X} ({meaning})" + (f": {comment}" if comment else "")
