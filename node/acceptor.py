"""The node's side of each connection: pynetdicom's acceptor, bounded in what a peer can
make it hold, and guarded against what a malformed PDU can break.

pynetdicom reads a PDU with a blocking read of whatever length its header announces: a
peer that sends a header announcing 4 GiB and then nothing holds that association's
thread for ever, and one that sends 256 MiB makes the node buffer all of it. Exceptions
raised while decoding malformed PDUs end its reactor threads. Here:

- a PDU must arrive in full within ``pdu_timeout`` of its first byte, and may not be
  longer than the node announced (P-DATA-TF) or than ``max_other_pdu_length`` (the rest);
  otherwise the connection is aborted (A-ABORT, then closed) with one log line;
- a new connection has ``request_timeout`` to send its A-ASSOCIATE-RQ; and until it has,
  it does not count against the node's association limit (node.scp enforces that limit
  on requests, not on sockets);
- an exception that escapes pynetdicom's reactor aborts its association with one line;
- several receiver processes (node.receivers) accept on one listening socket, and a new
  connection goes to the one that holds the fewest (`Loads`);
- on a TLS port the handshake runs in the connection's own thread within
  ``request_timeout`` (pynetdicom does it in the thread that accepts connections, so one
  silent peer would hold every other caller out), and a failed one is one log line.

pynetdicom gives no hook to choose the classes of an acceptor's association and upper
layer (it builds them in ``RequestHandler._create_association``); ours add behaviour
only, no state of their own, so the instances are re-classed before their threads start.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import MutableSequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dul import _PDU_TYPES, DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from pipeline.redact import redact

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
A_ASSOCIATE_RQ = 0x01
# A-ABORT reasons of a service provider (PS3.8 Table 9-26).
UNRECOGNIZED_PDU = 0x01
INVALID_PARAMETER_VALUE = 0x06
NOT_SPECIFIED = 0x00
# How long a receiver busier than another waits before it accepts a new connection itself,
# and how often it looks whether the other took it meanwhile.
DEFER_SECONDS = 0.2
DEFER_POLL_SECONDS = 0.002


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may make the node hold."""

    pdu_timeout: float  # seconds for a PDU to arrive in full once its first byte has
    request_timeout: float  # seconds from connecting to the A-ASSOCIATE-RQ
    acse_timeout: float  # the association's ACSE timeout once it has requested
    max_pdu_length: int  # the longest P-DATA-TF the node announced it receives
    # An A-ASSOCIATE-RQ proposing 128 contexts of 30 transfer syntaxes each is ~100 KB.
    max_other_pdu_length: int = 1 << 20


class _Dropped(Exception):
    """The peer broke the framing of its PDUs; the connection is to be aborted."""

    def __init__(self, reason: str, diagnostic: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.diagnostic = diagnostic


class _Closed(Exception):
    """The peer closed the connection after ``received`` bytes of a PDU."""

    def __init__(self, received: int) -> None:
        super().__init__(received)
        self.received = received


class GuardedUpperLayer(DULServiceProvider):
    """pynetdicom's upper layer with PDU reads bounded in time and length, and a reactor
    whose exceptions abort the association instead of ending the thread."""

    limits: ConnectionLimits
    dropped: bool  # the node aborted this connection itself; what follows is its echo

    def _read_pdu_data(self) -> None:
        limits = self.limits
        sock = cast(AssociationSocket, self.socket)
        raw = cast(socket.socket, sock.socket)
        deadline = time.monotonic() + limits.pdu_timeout
        try:
            header = _receive(raw, 6, deadline)
            pdu_type, _, length = struct.unpack(">BBL", header)
            if bytes([pdu_type]) not in _PDU_TYPES:
                raise _Dropped(f"unknown PDU type 0x{pdu_type:02X}", UNRECOGNIZED_PDU)
            limit = limits.max_pdu_length if pdu_type == P_DATA_TF else limits.max_other_pdu_length
            if length > limit:
                raise _Dropped(
                    f"PDU of {length} bytes announced, more than the {limit} this node takes",
                    INVALID_PARAMETER_VALUE,
                )
            body = _receive(raw, length, deadline)
        except _Closed as closed:
            if closed.received:
                log.info("connection from %s closed in the middle of a PDU", self.peer)
            self.event_queue.put("Evt17")  # transport connection closed
            return
        except TimeoutError:
            self.drop(f"PDU not received in full within {limits.pdu_timeout:g} s", NOT_SPECIFIED)
            return
        except _Dropped as dropped:
            self.drop(dropped.reason, dropped.diagnostic)
            return
        try:
            pdu, event = self._decode_pdu(bytearray(header + body))
        except Exception as error:
            self.drop(f"malformed PDU of type 0x{pdu_type:02X} ({_describe(error)})", NOT_SPECIFIED)
            return
        if pdu_type == A_ASSOCIATE_RQ:
            # Requested: from now on the association's own ACSE timeout applies.
            self.assoc.acse_timeout = limits.acse_timeout
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def drop(self, reason: str, diagnostic: int) -> None:
        """Abort the connection at once (A-ABORT from the service provider, then close),
        with one log line naming the peer and ``reason``."""
        log.warning("connection from %s aborted: %s", self.peer, reason)
        self.dropped = True
        # The state machine hears Evt17 (connection closed) and ends the association.
        _abort_and_close(cast(AssociationSocket, self.socket), diagnostic)

    @property
    def peer(self) -> str:
        requestor = self.assoc.requestor
        calling = str(requestor.primitive.calling_ae_title).strip() if requestor.primitive else ""
        where = f"{requestor.address}:{requestor.port}"
        return f"{calling} ({where})" if calling else where

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:
            if not self.dropped:
                self.dropped = True
                log.warning(
                    "connection from %s aborted: pynetdicom failed on its input (%s)",
                    self.peer,
                    _describe(error),
                )
                _abandon(self.assoc)
        if self.assoc.requestor.primitive is None and self.artim_timer.expired and not self.dropped:
            log.info(
                "connection from %s closed: no A-ASSOCIATE-RQ within %g s",
                self.peer,
                self.limits.request_timeout,
            )


def _abandon(assoc: Association) -> None:
    """End an association whose upper layer died: A-ABORT to the peer, close, and let the
    association's own thread (and the node's handlers) see it aborted."""
    if assoc.dul.socket is not None:
        _abort_and_close(assoc.dul.socket, NOT_SPECIFIED)
    was_established = assoc.is_established
    assoc.is_aborted = True
    assoc.is_established = False
    if was_established:
        evt.trigger(assoc, evt.EVT_ABORTED, {})


def _abort_and_close(sock: AssociationSocket, diagnostic: int) -> None:
    """Send an A-ABORT (from the service provider, PS3.8 9.3.8) and close the connection."""
    if sock.socket is not None:
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = diagnostic
        with contextlib.suppress(OSError):  # gone already: closing is all that is left
            sock.socket.sendall(abort.encode())
    sock.close()


def _receive(sock: socket.socket, count: int, deadline: float) -> bytes:
    """``count`` bytes from ``sock`` by ``deadline`` (TimeoutError if not; _Closed if the
    peer closed first)."""
    data = bytearray()
    try:
        while len(data) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(min(count - len(data), 1 << 16))
            if not chunk:
                raise _Closed(len(data))
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        raise _Closed(len(data)) from None
    finally:
        # pynetdicom writes on the same socket and expects it blocking, as it was.
        sock.settimeout(None)
    return bytes(data)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {redact(str(error), limit=200)}"


def _describe_tls(error: object) -> str:
    """An SSL error in words: its reason (e.g. CERTIFICATE_VERIFY_FAILED, WRONG_VERSION_NUMBER
    for plain DICOM sent to the TLS port), not OpenSSL's file and line."""
    if isinstance(error, ssl.SSLError) and error.reason:
        return error.reason.lower().replace("_", " ")
    if isinstance(error, ssl.SSLError | OSError):
        return redact(str(error), limit=200)
    return str(error)


class GuardedRequestHandler(RequestHandler):
    """Builds each acceptor association on the guarded upper layer."""

    server: GuardedServer

    def handle(self) -> None:
        try:
            if isinstance(self.request, ssl.SSLSocket) and not self._handshake(self.request):
                return
            super().handle()
        finally:
            if self.server.loads is not None:
                self.server.loads.handled()

    def _handshake(self, sock: ssl.SSLSocket) -> bool:
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        try:
            sock.settimeout(self.server.limits.request_timeout)
            sock.do_handshake()
            sock.settimeout(None)
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            reason = "no handshake in time" if isinstance(error, TimeoutError) else error
            log.warning("TLS connection from %s refused: %s", peer, _describe_tls(reason))
            with contextlib.suppress(OSError):
                sock.close()
            return False
        return True

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        upper_layer = assoc.dul
        upper_layer.__class__ = GuardedUpperLayer
        upper_layer = cast(GuardedUpperLayer, upper_layer)
        upper_layer.limits = self.server.limits
        upper_layer.dropped = False
        # Until the A-ASSOCIATE-RQ arrives, the ACSE timeout is the short request timeout:
        # it is both how long the association's thread waits for the request and the
        # ARTIM timer that closes an idle connection.
        assoc.acse_timeout = self.server.limits.request_timeout
        if self.server.loads is not None:
            self.server.loads.hold(assoc)
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the guarded request handler and its limits."""

    def __init__(
        self,
        *args: Any,
        limits: ConnectionLimits,
        listening: socket.socket | None,
        loads: Loads | None,
        **kwargs: Any,
    ) -> None:
        self.limits = limits
        self.listening = listening
        self.loads = loads
        super().__init__(*args, request_handler=GuardedRequestHandler, **kwargs)

    def server_bind(self) -> None:
        if self.listening is None:
            super().server_bind()
            return
        # Another process's listening socket, shared (node.receivers): adopted, not bound.
        self.socket.close()
        self.socket = self.listening
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.listening is None:
            super().server_activate()

    def service_actions(self) -> None:
        # Between connections, at least every half second: the others see this one's load.
        if self.loads is not None:
            self.loads.publish()

    def _leave_to_a_less_busy_receiver(self, loads: Loads) -> None:
        # A busy receiver may take a while to wake: wait for it, for a bounded time (a
        # receiver that died holding a low count must not hold connections up for long).
        deadline = time.monotonic() + DEFER_SECONDS
        while loads.busier_than_another() and time.monotonic() < deadline:
            time.sleep(DEFER_POLL_SECONDS)
            readable, _, _ = select.select([self.socket], [], [], 0)
            if not readable:
                return  # taken meanwhile; accept() says so

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # On a shared socket every process is woken by a new connection and the first to
        # accept takes it; the others get BlockingIOError, which socketserver passes over.
        if self.loads is not None:
            self.loads.publish()
            self._leave_to_a_less_busy_receiver(self.loads)
        client, address = cast(socket.socket, self.socket).accept()
        if self.loads is not None:
            self.loads.accepted()
        if self.ssl_context:
            # The handshake waits for the connection's own thread (GuardedRequestHandler).
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address


def start_server(
    ae: AE,
    address: tuple[str, int],
    evt_handlers: list[Any],
    limits: ConnectionLimits,
    ssl_context: ssl.SSLContext | None = None,
    listening: socket.socket | None = None,
    loads: Loads | None = None,
) -> GuardedServer:
    """Listen on ``address`` in a thread of its own, as ``AE.start_server(block=False)``
    does, with connections bounded by ``limits`` (over TLS with ``ssl_context``). With
    ``listening`` (see `share_listening`), accept on that socket instead of binding one;
    with ``loads``, leave a new connection to a less busy process where there is one."""
    server = cast(
        GuardedServer,
        ae.make_server(
            address,
            ssl_context=ssl_context,
            evt_handlers=evt_handlers,
            server_class=GuardedServer,
            limits=limits,
            listening=listening,
            loads=loads,
        ),
    )
    timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(
        target=server.serve_forever, name=f"AcceptorServer@{timestamp}", daemon=True
    )
    thread.start()
    # AssociationServer.shutdown() removes the server from this list, as start_server adds it.
    ae._servers.append(server)
    return server


class Loads:
    """How many connections each receiver process holds, in memory they all share: a new
    connection goes to the least busy one rather than to whichever wakes first.

    One per process, shared by its servers (the plain and the TLS port): what it holds is
    the connections it accepted and has not handed to an association yet, and the
    associations of those it has, until their threads end."""

    def __init__(self, slots: MutableSequence[int], index: int) -> None:
        self._slots = slots  # one per receiver, e.g. a multiprocessing.Array("i", count)
        self._index = index
        self._unhandled = 0
        self._associations: set[Association] = set()
        self._lock = threading.Lock()

    def accepted(self) -> None:
        with self._lock:
            self._unhandled += 1
        self.publish()

    def hold(self, assoc: Association) -> None:
        """``assoc`` serves a connection accepted here (then `handled`)."""
        with self._lock:
            self._associations.add(assoc)

    def handled(self) -> None:
        """A connection accepted here has its association, or is gone."""
        with self._lock:
            self._unhandled -= 1
        self.publish()

    def publish(self) -> None:
        with self._lock:
            # Not started yet (ident None) counts as held; ended does not.
            self._associations = {a for a in self._associations if a.ident is None or a.is_alive()}
            self._slots[self._index] = self._unhandled + len(self._associations)

    def busier_than_another(self) -> bool:
        mine = self._slots[self._index]
        return any(held < mine for held in self._slots)


def share_listening(server: GuardedServer) -> socket.socket:
    """``server``'s listening socket, made ready to accept in several processes at once.

    Non-blocking, so a process that loses the race for a connection goes back to waiting
    instead of blocking in accept() (where it could not be stopped). Unlike SO_REUSEPORT,
    whose hash of the peer's address sent three of four senders to one process
    (bench/receive), the processes choose among themselves (`Loads`)."""
    listening = cast(socket.socket, server.socket)
    listening.setblocking(False)
    return listening
