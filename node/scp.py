"""The Storage SCP: receives MR series over C-STORE and keeps them durably.

Durable before acknowledged: a C-STORE is answered Success only after the file is on
disk under its final name and its database row is committed. Every other answer is a
failure status with an ErrorComment that says why; the sender keeps the instance.
``StoreStatus`` lists the statuses this SCP returns and what each means.
"""

from __future__ import annotations

import enum
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID
from pynetdicom import AE, Association, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import EnhancedMRImageStorage, MRImageStorage, Verification
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from node.acceptor import ConnectionLimits, Loads, share_listening, start_server
from node.config import NodeSettings
from node.metrics import INSTANCES
from node.tls import certificate_name, server_context
from pipeline.files import DurableFolders, write_new
from pipeline.intake import InstanceRefused, RefusalKind, inspect_instance, record_instance
from pipeline.redact import redact
from pipeline.spool import Spool, stored_data_set
from pipeline.state import audit
from pipeline.state.db import Audit, AuditEvent, Series

log = logging.getLogger(__name__)

STORAGE_CLASSES = (MRImageStorage, EnhancedMRImageStorage)

# The compressed syntaxes MR scanners and PACS send (the pylibjpeg plugins decode each),
# then the uncompressed ones. pynetdicom accepts the first syntax of this list that the
# sender proposes: compressed first, so a sender that holds compressed files sends them as
# they are instead of converting (which DCMTK's storescu, for one, cannot do). Lossy
# syntaxes come after the uncompressed ones, so no sender compresses lossily for us.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
]


class StoreStatus(enum.IntEnum):
    """The C-STORE statuses this SCP returns (PS3.4 Annex B, PS3.7 Annex C)."""

    # Also for an identical re-send of an instance already stored: it is kept once.
    SUCCESS = 0x0000
    # An unexpected error; the log has the details.
    PROCESSING_FAILURE = 0x0110
    # An instance of this SOP Instance UID is stored with other content; the copy
    # acknowledged first is kept, the ErrorComment names the UID.
    DUPLICATE_SOP_INSTANCE = 0x0111
    # Refused: out of resources. The spool or the database cannot be written.
    OUT_OF_RESOURCES = 0xA700
    # Error: data set does not match SOP class. A UID or the pixel data is missing or
    # malformed, its SOP Class UID is not the presentation context's, or its SOP Instance
    # UID is not the one the C-STORE request names.
    DATA_SET_MISMATCH = 0xA900
    # Error: cannot understand. The pixel data cannot be decoded.
    UNDECODABLE = 0xC000
    # Error: cannot understand. The instance disagrees with its series (size,
    # orientation, spacing, frame of reference, SOP class or study).
    INCONSISTENT = 0xC001


@dataclass(frozen=True)
class StoreResult:
    """How a C-STORE is answered, and why (the log's words; ``comment`` is the shorter
    ErrorComment when the reason's first 64 characters would not say it)."""

    status: StoreStatus
    reason: str = ""
    duplicate: bool = False  # Success for an identical re-send: nothing was stored
    comment: str | None = None


_STATUS = {
    RefusalKind.INVALID: StoreStatus.DATA_SET_MISMATCH,
    RefusalKind.UNDECODABLE: StoreStatus.UNDECODABLE,
    RefusalKind.INCONSISTENT: StoreStatus.INCONSISTENT,
}
# Refused SOP classes named in an association's log line; the rest are logged at DEBUG.
REFUSED_CLASSES_NAMED = 3
# ErrorComment is a Long String (PS3.5): 64 characters at most.
ERROR_COMMENT_LENGTH = 64


def set_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: send each PDU at once instead of waiting on Nagle's algorithm."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class Listening:
    """`serve`'s listening sockets, which the other receivers accept on too."""

    plain: socket.socket | None = None
    tls: socket.socket | None = None  # the TLS port, where it is a port of its own


@dataclass
class _AssociationTally:
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    # Series UID -> (its audit row, instances stored on this association).
    receipts: dict[str, tuple[int, int]] = field(default_factory=dict)


class StorageSCP:
    """The node's listening side: C-ECHO and C-STORE of MR images."""

    def __init__(
        self,
        settings: NodeSettings,
        sessions: sessionmaker,
        storage: Path,
        header_keywords: Iterable[str] = (),
        on_count_reached: Callable[[], None] = lambda: None,
        listening: Listening | None = None,
        loads: Loads | None = None,
    ) -> None:
        self._settings = settings
        # One of several receivers (node.receivers): accept on `serve`'s sockets (unless
        # this is `serve`), leaving new connections to the least busy receiver.
        self._listening = listening
        self._loads = loads
        self._sessions = sessions
        self._spool = Spool(storage)
        self._folders = DurableFolders(storage)
        self._header_keywords = tuple(header_keywords)
        self._on_count_reached = on_count_reached
        self._tallies: dict[int, _AssociationTally] = {}
        self._lock = threading.Lock()
        self._server = None  # plain DICOM; the TLS server where there is no plain port
        self._tls_server = None

        ae = AE(ae_title=settings.ae_title)
        # pynetdicom counts every acceptor thread against its limit, connections that never
        # sent an A-ASSOCIATE-RQ included, so twenty stalled sockets locked every scanner
        # out. The node's limit counts associations that were requested (_on_requested);
        # a connection without a request is bounded in time by node.acceptor instead.
        ae.maximum_associations = sys.maxsize
        # Reject associations addressed to another AE title ("called AE not recognized").
        ae.require_called_aet = True
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        self._ae = ae

    @property
    def port(self) -> int:
        """The port actually listened on (useful when config asked for port 0)."""
        return self._server.server_address[1] if self._server else self._settings.port

    def start(self) -> None:
        # With several receivers the counter lives in a file per process, opened at its
        # first value: open it now, so a receiver's open files do not grow while it serves.
        INSTANCES.labels("success")
        handlers = [
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        limits = ConnectionLimits(
            pdu_timeout=self._settings.pdu_timeout_seconds,
            request_timeout=self._settings.association_request_timeout_seconds,
            acse_timeout=self._ae.acse_timeout,
            max_pdu_length=self._ae.maximum_pdu_size,
        )
        host, tls = self._settings.host, self._settings.tls
        shared = self._listening or Listening()
        if tls is None or tls.port is not None:
            address = (host, self._settings.port)
            self._server = start_server(
                self._ae, address, handlers, limits, listening=shared.plain, loads=self._loads
            )
            log.info("listening as %s on %s:%d", self._settings.ae_title, host, self.port)
        if tls is not None:
            address = (host, tls.port or self._settings.port)
            server = start_server(
                self._ae,
                address,
                handlers,
                limits,
                server_context(tls),
                listening=shared.tls,
                loads=self._loads,
            )
            self._tls_server = server
            self._server = self._server or server
            log.info(
                "listening as %s on %s:%d over TLS (client certificate %s)",
                self._settings.ae_title,
                host,
                server.server_address[1],
                "required" if tls.require_client_certificate else "optional",
            )

    def share(self) -> Listening:
        """The listening sockets, for other receiver processes to accept on (after start)."""
        plain = self._server if self._server is not self._tls_server else None
        return Listening(
            plain=share_listening(plain) if plain is not None else None,
            tls=share_listening(self._tls_server) if self._tls_server is not None else None,
        )

    def stop(self) -> None:
        for server in {self._server, self._tls_server} - {None}:
            server.shutdown()
        self._server = self._tls_server = None

    # Handlers run in each association's own thread.

    def _on_requested(self, event: evt.Event) -> None:
        # The requestor's AE title is filled in only during negotiation, after this event.
        calling = str(event.assoc.requestor.primitive.calling_ae_title).strip()
        host = str(event.assoc.requestor.address)
        sock = event.assoc.dul.socket
        subject = certificate_name(sock.socket if sock else None)
        if not self._settings.caller_allowed(calling, host, subject):
            log.warning(
                "association from %s (%s%s) rejected: calling AE title not recognized",
                calling,
                host,
                f", certificate {subject!r}" if subject else "",
            )
            # Rejected permanent, by the service user, "calling AE title not recognized".
            _reject(event.assoc, 0x01, 0x01, 0x03)
            return
        requested = sum(
            1
            for assoc in self._ae.active_associations
            if assoc.is_acceptor and assoc.requestor.primitive is not None
        )
        if requested > self._settings.max_associations:
            log.warning(
                "association from %s (%s) rejected: %d associations open, max_associations is %d",
                calling,
                host,
                requested - 1,
                self._settings.max_associations,
            )
            # Rejected transient, by the service provider, "local limit exceeded".
            _reject(event.assoc, 0x02, 0x03, 0x02)

    def _on_established(self, event: evt.Event) -> None:
        calling, host = _peer(event)
        with self._lock:
            self._tallies[id(event.assoc)] = _AssociationTally()
        log.info("association from %s (%s) accepted", calling, host)
        refused = sorted({str(c.abstract_syntax) for c in event.assoc.rejected_contexts})
        if refused:
            # Generic senders propose every storage class they know (storescu: ~120), so
            # one line per association, not one per class.
            named = [f"{UID(uid).name} ({uid})" for uid in refused]
            shown = REFUSED_CLASSES_NAMED
            more = f" and {len(refused) - shown} more (at DEBUG)" if len(refused) > shown else ""
            log.warning(
                "association from %s (%s): %d SOP class(es) refused, not accepted by this "
                "node: %s%s",
                calling,
                host,
                len(refused),
                "; ".join(named[:shown]),
                more,
            )
            if more:
                log.debug("association from %s (%s): refused %s", calling, host, "; ".join(named))

    def _on_ended(self, event: evt.Event) -> None:
        calling, host = _peer(event)
        with self._lock:
            tally = self._tallies.pop(id(event.assoc), None)
        if tally is None:
            return  # rejected before it was established; already logged
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        self._close_receipts(tally, how)
        log.info(
            "association from %s (%s) %s: %d stored, %d duplicate, %d refused",
            calling,
            host,
            how,
            tally.stored,
            tally.duplicates,
            tally.refused,
        )

    def _close_receipts(self, tally: _AssociationTally, how: str) -> None:
        """The audit trail's receipts of this association get their counts."""
        if not tally.receipts:
            return
        try:
            with self._sessions.begin() as session:
                for row_id, stored in tally.receipts.values():
                    row = session.get(Audit, row_id)
                    row.detail = f"{stored} instance(s) stored on one association ({how})"
        except SQLAlchemyError as error:
            log.warning("audit trail not completed: %s", type(error).__name__)

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> Dataset | int:
        calling, host = _peer(event)
        tally = self._tallies.get(id(event.assoc)) or _AssociationTally()
        answer = self._store(event, calling, host, tally)
        if answer.status is StoreStatus.SUCCESS:
            if answer.duplicate:
                tally.duplicates += 1
            else:
                tally.stored += 1
            INSTANCES.labels("duplicate" if answer.duplicate else "success").inc()
            return int(StoreStatus.SUCCESS)
        tally.refused += 1
        INSTANCES.labels(answer.status.name.lower()).inc()
        log.warning(
            "C-STORE from %s (%s) refused with 0x%04X: %s",
            calling,
            host,
            answer.status,
            answer.reason,
        )
        response = Dataset()
        response.Status = int(answer.status)
        response.ErrorComment = answer.comment or answer.reason[:ERROR_COMMENT_LENGTH]
        return response

    def _store(
        self, event: evt.Event, calling: str, host: str, tally: _AssociationTally
    ) -> StoreResult:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            context = event.context
            facts = inspect_instance(
                ds,
                str(context.transfer_syntax),
                self._header_keywords,
                context_sop_class=str(context.abstract_syntax),
                request_sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
            )
        except InstanceRefused as refusal:
            return StoreResult(_STATUS[refusal.kind], refusal.reason)
        except Exception as error:
            return StoreResult(
                StoreStatus.DATA_SET_MISMATCH,
                f"the data set cannot be parsed: {redact(str(error))}",
            )

        received = event.encoded_dataset(include_meta=False)
        data = encode_received(ds.file_meta, calling, received)
        path = self._spool.path(facts.relative_path())
        try:
            self._folders.make(path.parent)
            created = write_new(path, data)
            # Another copy lies there already: the first acknowledged one stays as it is.
            if not created and not _same_data_set(path, received):
                return _conflict(facts.sop_instance_uid)
        except OSError as error:
            return StoreResult(
                StoreStatus.OUT_OF_RESOURCES, f"spool cannot be written: {error.strerror}"
            )
        try:
            with self._sessions.begin() as session:
                outcome = record_instance(session, facts, len(data), calling)
                receipt = tally.receipts.get(facts.series_uid)
                if receipt is None and not outcome.duplicate:
                    # In the instance's own transaction: a receipt is never lost to a crash.
                    row = audit.record(
                        session,
                        AuditEvent.RECEIVED,
                        f"{calling}@{host}",
                        "receiving",
                        series=session.get(Series, outcome.series_id),
                    )
                    session.flush()
                    receipt = (row.id, 0)
        except InstanceRefused as refusal:
            # Refused: a file this call made goes; one that was there already is not ours.
            if created:
                path.unlink(missing_ok=True)
            return StoreResult(_STATUS[refusal.kind], refusal.reason)
        except (SQLAlchemyError, OSError) as error:
            # Refused, so the file must not be recorded at the next start either.
            if created:
                path.unlink(missing_ok=True)
            log.exception("database write failed for instance %s", facts.sop_instance_uid)
            return StoreResult(
                StoreStatus.OUT_OF_RESOURCES,
                f"database cannot be written: {type(error).__name__}",
            )
        except Exception:
            if created:
                path.unlink(missing_ok=True)
            log.exception("unexpected error recording instance %s", facts.sop_instance_uid)
            return StoreResult(
                StoreStatus.PROCESSING_FAILURE, "unexpected error; see the node's log"
            )
        if outcome.duplicate:
            if created and outcome.orphaned_file:
                path.unlink(missing_ok=True)  # the stored copy, under its first UIDs, stays
            if outcome.stored_path and not _same_data_set(
                self._spool.path(outcome.stored_path), received
            ):
                return _conflict(facts.sop_instance_uid)
            return StoreResult(StoreStatus.SUCCESS, duplicate=True)
        tally.receipts[facts.series_uid] = (receipt[0], receipt[1] + 1)
        if outcome.count_reached:
            self._on_count_reached()
        return StoreResult(StoreStatus.SUCCESS)


def _conflict(sop_instance_uid: str) -> StoreResult:
    comment = f"stored with other content: {sop_instance_uid}"
    return StoreResult(
        StoreStatus.DUPLICATE_SOP_INSTANCE,
        f"SOP Instance UID {sop_instance_uid} is stored with other content; the copy "
        "acknowledged first is kept",
        # The UID whole, with as many of the words as fit.
        comment=comment if len(comment) <= ERROR_COMMENT_LENGTH else sop_instance_uid,
    )


def _same_data_set(path: Path, received: bytes) -> bool:
    """Whether the spool file at ``path`` holds ``received`` byte for byte (its file meta
    aside, which names the sender). A missing file (its series purged) proves nothing
    either way, so it counts as the same."""
    try:
        stored = stored_data_set(path)
    except (OSError, ValueError):
        return False
    return stored is None or stored == received


def encode_received(meta: FileMetaDataset, calling_ae: str, data_set: bytes) -> bytes:
    """The instance as received (``data_set``, not decoded and re-encoded), as a Part 10
    file whose ``meta`` (changed here) names the calling AE, so recovery after a crash knows
    who sent it."""
    meta.SourceApplicationEntityTitle = calling_ae
    return b"".join((b"\x00" * 128, b"DICM", encode_file_meta(meta), data_set))


def _reject(assoc: Association, result: int, source: int, diagnostic: int) -> None:
    assoc.acse.send_reject(result, source, diagnostic)
    # As pynetdicom does for its own rejections: let the DUL send the A-ASSOCIATE-RJ
    # before the server closes the socket (else the peer sees only an abort).
    assoc.kill()


def _peer(event: evt.Event) -> tuple[str, str]:
    requestor = event.assoc.requestor
    return str(requestor.ae_title).strip(), str(requestor.address)
