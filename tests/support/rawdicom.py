"""DICOM upper-layer PDUs written byte by byte over a plain socket, for tests and benches
that abuse the protocol the way a broken or hostile peer would (PS3.8 section 9.3).

pynetdicom's own requestor refuses to send most of what these helpers write (even
presentation context IDs, truncated PDUs, lying length fields), which is the point.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom.dsutils import encode

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.9.3811.0"


class PduType:
    """The PDU types of PS3.8 Table 9-11."""

    ASSOCIATE_RQ = 0x01
    ASSOCIATE_AC = 0x02
    ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    RELEASE_RQ = 0x05
    RELEASE_RP = 0x06
    ABORT = 0x07


def pdu(pdu_type: int, body: bytes, announced: int | None = None) -> bytes:
    """A PDU: type, reserved byte, a 4-byte length (``announced``, or the body's), body."""
    length = len(body) if announced is None else announced
    return struct.pack(">BBL", pdu_type, 0, length) + body


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


@dataclass(frozen=True)
class Context:
    """A proposed presentation context."""

    id: int = 1
    abstract_syntax: str = MRImageStorage
    transfer_syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian,)


def associate_rq(
    called: str = "SYNTH",
    calling: str = "RAWPEER",
    contexts: tuple[Context, ...] = (Context(),),
    max_pdu: int = 16382,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing ``contexts``."""
    items = _item(0x10, APPLICATION_CONTEXT.encode())
    for context in contexts:
        sub = _item(0x30, context.abstract_syntax.encode())
        sub += b"".join(_item(0x40, ts.encode()) for ts in context.transfer_syntaxes)
        items += _item(0x20, struct.pack(">BBBB", context.id, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">L", max_pdu))
    user += _item(0x52, IMPLEMENTATION_CLASS_UID.encode())
    items += _item(0x50, user)
    header = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32)
    return pdu(PduType.ASSOCIATE_RQ, header + items)


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU holding one PDV (control: bit 0 command, bit 1 last fragment)."""
    pdv = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return pdu(PduType.P_DATA_TF, pdv)


def abort_pdu() -> bytes:
    return pdu(PduType.ABORT, bytes(4))


def release_rq() -> bytes:
    return pdu(PduType.RELEASE_RQ, bytes(4))


def store_command(
    sop_instance_uid: str,
    sop_class_uid: str = MRImageStorage,
    *,
    drop: tuple[str, ...] = (),
    with_data_set: bool = True,
    command_field: int = 0x0001,
) -> bytes:
    """A C-STORE-RQ command set (Implicit VR Little Endian), without the keywords in
    ``drop``; ``with_data_set`` False makes it a whole message (no data set follows)."""
    command = Dataset()
    command.AffectedSOPClassUID = sop_class_uid
    command.CommandField = command_field
    command.MessageID = 1
    command.Priority = 0
    command.CommandDataSetType = 0x0000 if with_data_set else 0x0101
    command.AffectedSOPInstanceUID = sop_instance_uid
    for keyword in drop:
        delattr(command, keyword)
    body = encode(command, True, True)
    assert body is not None
    group_length = struct.pack("<HHLL", 0, 0, 4, len(body))
    return group_length + body


# What a peer may send once its association is accepted, each malformed its own way.
MALFORMED_MESSAGES: dict[str, Callable[[], bytes]] = {
    "command set without CommandField": lambda: p_data(
        1, 0x03, store_command("1.2.3.4", drop=("CommandField",))
    ),
    "command set that is not a data set": lambda: p_data(1, 0x03, b"\xff" * 40),
    "unknown command field": lambda: p_data(
        1, 0x03, store_command("1.2.3.4", command_field=0x7777)
    ),
    "P-DATA on a context never proposed": lambda: p_data(
        9, 0x03, store_command("1.2.3.4", with_data_set=False)
    ),
    "PDV longer than its PDU": lambda: pdu(
        PduType.P_DATA_TF, struct.pack(">LBB", 5000, 1, 0x03) + store_command("1.2.3.4")
    ),
    "empty PDV": lambda: pdu(PduType.P_DATA_TF, struct.pack(">L", 0)),
    "unknown PDU type": lambda: pdu(0x55, b"\x00" * 10),
}


def read_pdu(sock: socket.socket, timeout: float) -> tuple[int, bytes] | None:
    """The next whole PDU as (type, body), or None when the peer closed the connection.

    Raises TimeoutError when nothing complete arrives within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    header = _read_exactly(sock, 6, deadline)
    if header is None:
        return None
    pdu_type, _, length = struct.unpack(">BBL", header)
    body = _read_exactly(sock, length, deadline)
    return None if body is None else (pdu_type, body)


def _read_exactly(sock: socket.socket, count: int, deadline: float) -> bytes | None:
    data = bytearray()
    while len(data) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{len(data)} of {count} bytes within the time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(count - len(data), 65536))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def connect(port: int, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def open_association(
    port: int, contexts: tuple[Context, ...] = (Context(),), timeout: float = 10
) -> socket.socket:
    """A socket on which the node accepted an association; ConnectionError if it did not."""
    sock = connect(port, timeout)
    sock.sendall(associate_rq(contexts=contexts))
    answer = read_pdu(sock, timeout)
    if answer is None or answer[0] != PduType.ASSOCIATE_AC:
        sock.close()
        raise ConnectionError(f"association not accepted: {answer!r:.80}")
    return sock


def ends_with_abort_or_close(sock: socket.socket, timeout: float) -> bool:
    """True when the peer sends an A-ABORT or closes the connection within ``timeout``
    (PDUs it sends before, such as a C-STORE response, are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = read_pdu(sock, max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            return False
        except OSError:  # reset or broken: closed all the same
            return True
        if answer is None or answer[0] == PduType.ABORT:
            return True
