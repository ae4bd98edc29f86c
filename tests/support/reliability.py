"""The harness that found issue 12's defects, kept to find the next ones.

Two parts, each against real processes:

- `malformed_inputs`: data sets broken every way a careless sender or an attacker breaks
  them, sent over real associations, and protocol abuse over raw sockets, against a
  running node; then what the node acknowledged is checked against its spool and
  database, its log is searched for the patient identifiers every input carries, and its
  memory, threads and descriptors are compared with what they were before.
- `kill_trials`: SIGKILL at random moments of receiving, synthesizing and delivering to
  Orthanc, a restart and a re-send each time; then nothing acknowledged may be missing,
  every series must be at the PACS once and whole, and no job or delivery stuck.

``bench/reliability`` runs both in full and prints the figures; tests/test_reliability.py
runs a short form and asserts the zeros that are due.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import os
import random
import socket
import struct
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import Verification
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from tests.support import rawdicom
from tests.support.dicomgen import mr_series
from tests.support.models import make_registry
from tests.support.nodeproc import NodeProcess, free_port, routes_toml, write_config
from tests.support.peers import Orthanc

# Every input carries these; none may reach the node's log.
PATIENT_NAME = "FUZZ^SECRET"
PATIENT_ID = "FUZZID-4711"
IDENTIFIERS = ("SECRET", PATIENT_ID)

# The node under fuzzing drops stalled connections fast, so a run does not wait on them.
FAST_CONNECTIONS = {"pdu_timeout_seconds": 1.0, "association_request_timeout_seconds": 1.0}
# Two receiving processes, so malformed inputs and kills reach a receiver beside `serve`.
RECEIVERS = 2
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless]
REQUIRED_UIDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID")


# What a process holds, from /proc.


@dataclass(frozen=True)
class ProcessStats:
    memory_mib: float
    threads: int
    sockets: int
    files: int  # open files but the database's
    database_files: int  # SQLAlchemy's pool keeps a connection per thread that needed one

    @classmethod
    def of(cls, pid: int) -> ProcessStats:
        """What ``pid`` and its children (the node's other receivers) hold together."""
        memory_kib = threads = 0
        targets = []
        for member in (pid, *_children(pid)):
            try:
                status = Path(f"/proc/{member}/status").read_text().splitlines()
                descriptors = os.listdir(f"/proc/{member}/fd")
            except FileNotFoundError:  # a child that ended meanwhile
                continue
            fields = dict(line.split(":", 1) for line in status)
            memory_kib += int(fields.get("VmRSS", "0 kB").split()[0])
            threads += int(fields["Threads"])
            for descriptor in descriptors:
                try:
                    targets.append(os.readlink(f"/proc/{member}/fd/{descriptor}"))
                except FileNotFoundError:  # closed meanwhile
                    continue
        database = [t for t in targets if ".sqlite" in t]
        sockets = [t for t in targets if t.startswith("socket:")]
        return cls(
            memory_mib=memory_kib / 1024,
            threads=threads,
            sockets=len(sockets),
            files=len(targets) - len(sockets) - len(database),
            database_files=len(database),
        )

    def counts(self) -> tuple[int, int, int]:
        """What must come back to where it was once the connections are gone."""
        return self.threads, self.sockets, self.files


def _children(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4: the parent's pid
            children.append(int(entry))
    return children


def settled_stats(
    pid: int, expected: ProcessStats | None = None, timeout: float = 30
) -> ProcessStats:
    """The node's stats once its threads, sockets and files are back to ``expected``
    (connections that never requested an association hold theirs a while), or, without
    one, once they held still for two seconds."""
    deadline = time.monotonic() + timeout
    stats, since = ProcessStats.of(pid), time.monotonic()
    while time.monotonic() < deadline:
        if expected and stats.counts() == expected.counts():
            break
        if not expected and time.monotonic() - since >= 2:
            break
        time.sleep(0.2)
        now = ProcessStats.of(pid)
        if now.counts() != stats.counts():
            since = time.monotonic()
        stats = now
    return stats


# Instances, as bytes: the harness breaks encodings pydicom would refuse to write.


@dataclass(frozen=True)
class Instance:
    """One C-STORE to send: the file meta names its context, the data set goes as is."""

    label: str  # the kind of input, for the report
    sop_instance_uid: str  # the request's Affected SOP Instance UID
    data_set: bytes
    sop_class_uid: str = MRImageStorage
    transfer_syntax: str = ExplicitVRLittleEndian
    must_refuse: bool = False  # storing it would be a defect

    def write(self, path: Path) -> Path:
        """A Part 10 file at ``path`` that pynetdicom sends as it is (chunked_sending)."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = self.sop_class_uid
        meta.MediaStorageSOPInstanceUID = self.sop_instance_uid
        meta.TransferSyntaxUID = self.transfer_syntax
        path.write_bytes(b"".join((bytes(128), b"DICM", encode_file_meta(meta), self.data_set)))
        return path

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data_set).hexdigest()


def base_dataset(rows: int = 32, columns: int = 32) -> Dataset:
    (ds,) = mr_series(1, rows=rows, columns=columns)
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds["PixelData"].VR = "OW"  # so it can be written without BitsAllocated
    return ds


def encoded(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = syntax == ImplicitVRLittleEndian
    buffer.is_little_endian = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the point is to write what pydicom warns about
        write_dataset(buffer, ds)
    return buffer.getvalue()


def instance(label: str, ds: Dataset, *, must_refuse: bool = False, **kwargs) -> Instance:
    uid = str(ds.get("SOPInstanceUID", "") or "")
    request_uid = uid if _is_uid(uid) else generate_uid()
    syntax = kwargs.get("transfer_syntax", ExplicitVRLittleEndian)
    return Instance(label, request_uid, encoded(ds, syntax), must_refuse=must_refuse, **kwargs)


def _is_uid(text: str) -> bool:
    return 0 < len(text) <= 64 and all(part.isdigit() for part in text.split("."))


# Explicit VRs whose length field has 4 bytes (PS3.5 7.1.2); the others have 2.
LONG_LENGTH_VRS = {
    vr.encode()
    for vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV")
}


@dataclass(frozen=True)
class Element:
    """Where a top-level element of an Explicit VR Little Endian data set lies."""

    tag: int
    start: int  # offset of its tag
    length_at: int
    length_size: int  # 2 or 4
    value_at: int
    length: int


def elements(data: bytes) -> list[Element]:
    """The top-level elements up to the first of undefined length (Explicit VR LE)."""
    found, offset = [], 0
    while offset + 8 <= len(data):
        group, number = struct.unpack_from("<HH", data, offset)
        vr = data[offset + 4 : offset + 6]
        if vr in LONG_LENGTH_VRS:
            length_at, size = offset + 8, 4
            (length,) = struct.unpack_from("<L", data, length_at)
        else:
            length_at, size = offset + 6, 2
            (length,) = struct.unpack_from("<H", data, length_at)
        value_at = length_at + size
        found.append(Element((group << 16) | number, offset, length_at, size, value_at, length))
        if length == 0xFFFFFFFF:
            break
        offset = value_at + length
    return found


def element(data: bytes, tag: int) -> Element:
    return next(e for e in elements(data) if e.tag == tag)


def replace_value(data: bytes, tag: int, value: bytes) -> bytes:
    """``data`` with the value of its element ``tag`` replaced (and its length fixed)."""
    e = element(data, tag)
    length = struct.pack("<H" if e.length_size == 2 else "<L", len(value))
    return data[: e.length_at] + length + value + data[e.value_at + e.length :]


# The inputs: each generator yields Instances of one kind, varied by the random source.

PIXEL_DATA = 0x7FE00010
PATIENT_NAME_TAG = 0x00100010


def missing_attributes(rng: random.Random) -> Iterator[Instance]:
    keywords = [*REQUIRED_UIDS, "PixelData", "Rows", "Columns", "BitsAllocated"]
    optional = [
        "FrameOfReferenceUID",
        "ImageOrientationPatient",
        "ImagePositionPatient",
        "PixelSpacing",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "Modality",
        "ImagesInAcquisition",
    ]
    for keyword in rng.sample(keywords + optional, k=len(keywords + optional)):
        ds = base_dataset()
        delattr(ds, keyword)
        yield instance(f"missing {keyword}", ds, must_refuse=keyword in keywords)


def raw(label: str, ds: Dataset, data: bytes) -> Instance:
    """``data``, broken from ``ds``'s encoding, sent under ``ds``'s SOP Instance UID."""
    return Instance(label, ds.SOPInstanceUID, data)


def garbage_values(rng: random.Random) -> Iterator[Instance]:
    """Random bytes in place of an element's value, its length kept."""
    ds = base_dataset()
    data = encoded(ds)
    candidates = [e for e in elements(data) if e.length and e.tag != PIXEL_DATA]
    e = rng.choice(candidates)
    garbage = bytes(rng.randrange(256) for _ in range(e.length))
    broken = data[: e.value_at] + garbage + data[e.value_at + e.length :]
    yield raw(f"garbage in ({e.tag >> 16:04X},{e.tag & 0xFFFF:04X})", ds, broken)


def pixel_lengths(rng: random.Random) -> Iterator[Instance]:
    ds = base_dataset()
    pixels = bytes(ds.PixelData)
    short = rng.randrange(0, len(pixels) - 1)
    ds.PixelData = pixels[:short]
    yield instance("pixel data shorter than its header says", ds, must_refuse=True)
    ds = base_dataset()
    ds.PixelData = pixels + bytes(rng.randrange(1, 5000) * 2)
    yield instance("pixel data longer than its header says", ds)


def absurd_sizes(rng: random.Random) -> Iterator[Instance]:
    for keyword, value, refuse in [
        ("Rows", 65535, True),
        ("Columns", 65535, True),
        ("Rows", 0, True),
        ("NumberOfFrames", rng.choice([1000000, 2**31 - 1]), True),
        ("BitsAllocated", rng.choice([1, 7, 13, 64]), False),
        ("SamplesPerPixel", rng.choice([0, 3, 255]), False),
        ("ImagesInAcquisition", rng.choice([-5, 0, 2**31 - 1]), False),
    ]:
        ds = base_dataset()
        setattr(ds, keyword, value)
        yield instance(f"absurd {keyword}", ds, must_refuse=refuse)


def broken_sequences(rng: random.Random) -> Iterator[Instance]:
    """A Referenced Image Sequence (0008,1140), broken, where it belongs: before the name."""
    item = b"\xfe\xff\x00\xe0"
    variants = {
        "sequence and item without delimiters": b"SQ\x00\x00\xff\xff\xff\xff"
        + item
        + b"\xff\xff\xff\xff",
        "sequence longer than the data set": b"SQ\x00\x00" + struct.pack("<L", 10**6) + item,
        "item of a wrong tag": b"SQ\x00\x00\x0c\x00\x00\x00\x08\x00\x50\x11\x04\x00\x00\x00",
        "item longer than its sequence": b"SQ\x00\x00\x08\x00\x00\x00" + item + b"\xf0\xff\xff\xff",
        "random bytes as a sequence": b"SQ\x00\x00"
        + struct.pack("<L", 64)
        + bytes(rng.randrange(256) for _ in range(64)),
    }
    for name, body in variants.items():
        ds = base_dataset()
        data = encoded(ds)
        at = element(data, PATIENT_NAME_TAG).start
        broken = data[:at] + b"\x08\x00\x40\x11" + body + data[at:]
        yield raw(f"broken sequence: {name}", ds, broken)


def nan_decimals(rng: random.Random) -> Iterator[Instance]:
    values = [b"NaN\\NaN ", b"inf\\-inf", b"nan ", b"1e999\\1 ", b"-0\\NaN "]
    for keyword, tag in [
        ("PixelSpacing", 0x00280030),
        ("SliceThickness", 0x00180050),
        ("ImagePositionPatient", 0x00200032),
        ("RepetitionTime", 0x00180080),
        ("EchoTime", 0x00180081),
    ]:
        ds = base_dataset()
        data = replace_value(encoded(ds), tag, rng.choice(values))
        yield raw(f"NaN or infinity in {keyword}", ds, data)


def hostile_uids(rng: random.Random) -> Iterator[Instance]:
    values = [
        "1.2.3/../../../../tmp/evil",
        "../../etc",
        "1.2.3\x00.4",
        "1.2.3\\4",
        "/etc/passwd",
        "1.2." + "9" * 80,
        "1.2.3.",
        "1.2.3.A",
    ]
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        ds = base_dataset()
        setattr(ds, keyword, rng.choice(values))
        yield instance(f"path characters or NUL in {keyword}", ds, must_refuse=True)


def wrong_sop_classes(rng: random.Random) -> Iterator[Instance]:
    for sop_class in (CTImageStorage, SecondaryCaptureImageStorage, EnhancedMRImageStorage):
        ds = base_dataset()
        ds.SOPClassUID = sop_class
        yield instance("SOP class other than its context's", ds, must_refuse=True)
    ds = base_dataset()
    yield instance(
        "MR data set on an Enhanced MR context",
        ds,
        must_refuse=True,
        sop_class_uid=EnhancedMRImageStorage,
    )


def corrupt_fragments(rng: random.Random) -> Iterator[Instance]:
    for syntax in (RLELossless, JPEG2000Lossless):
        ds = base_dataset(64, 64)
        ds.compress(syntax)
        pixels = bytes(ds.PixelData)
        variants = {
            "truncated": pixels[: rng.randrange(16, len(pixels) - 8)],
            "bytes flipped": _flip(rng, pixels, start=16, count=rng.randrange(1, 40)),
            "fragment length beyond the end": pixels[:12] + b"\xf0\xff\x0f\x00" + pixels[16:],
            "no sequence delimiter": pixels[:-8],
            "empty fragment": pixels[:8] + b"\xfe\xff\x00\xe0\x00\x00\x00\x00",
        }
        for name, value in variants.items():
            broken = copy.deepcopy(ds)
            broken.PixelData = value + (b"\x00" if len(value) % 2 else b"")
            yield instance(
                f"corrupt {syntax.name} fragments: {name}", broken, transfer_syntax=syntax
            )


def byte_mutations(rng: random.Random) -> Iterator[Instance]:
    ds = base_dataset()
    data = encoded(ds)
    yield raw("random bytes flipped", ds, _flip(rng, data, 0, rng.randrange(1, 20)))
    yield raw("data set cut short", ds, data[: rng.randrange(1, len(data))])
    # A length field that swallows the elements after it (PatientName and PatientID).
    e = rng.choice([x for x in elements(data) if x.length_size == 2 and x.tag < PATIENT_NAME_TAG])
    swallow = min(0xFFFF, rng.randrange(e.length + 8, e.length + 400))
    swallowed = data[: e.length_at] + struct.pack("<H", swallow) + data[e.value_at :]
    yield raw("length field swallowing the next elements", ds, swallowed)


def _flip(rng: random.Random, data: bytes, start: int, count: int) -> bytes:
    mutable = bytearray(data)
    for _ in range(count):
        mutable[rng.randrange(start, len(mutable))] = rng.randrange(256)
    return bytes(mutable)


GENERATORS: list[Callable[[random.Random], Iterator[Instance]]] = [
    missing_attributes,
    garbage_values,
    pixel_lengths,
    absurd_sizes,
    broken_sequences,
    nan_decimals,
    hostile_uids,
    wrong_sop_classes,
    corrupt_fragments,
    byte_mutations,
]


def data_set_inputs(rng: random.Random, count: int) -> list[Instance]:
    """``count`` broken instances, every kind in turn, then duplicates added by the run."""
    inputs: list[Instance] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the invalid values set here
        while len(inputs) < count:
            for generator in GENERATORS:
                inputs.extend(generator(rng))
    return inputs[:count]


# Protocol abuse: each case opens its own connection(s) and says how the node ended them.


@dataclass
class Abuse:
    label: str
    connect: Callable[[int], list[socket.socket]]  # opened and sent, nothing read yet


def _sent(port: int, data: bytes, associate: bool = False) -> list[socket.socket]:
    sock = rawdicom.open_association(port) if associate else rawdicom.connect(port)
    sock.sendall(data)
    return [sock]


def protocol_inputs(rng: random.Random, count: int) -> list[Abuse]:
    """``count`` abuses of the upper layer, each kind in turn."""
    rq = rawdicom.associate_rq()

    def truncated_request(port: int) -> list[socket.socket]:
        return _sent(port, rq[: rng.randrange(1, len(rq))])

    def huge_length(port: int) -> list[socket.socket]:
        pdu_type = rng.choice([1, 2, 3, 4, 5, 6, 7, rng.randrange(8, 256)])
        return _sent(port, struct.pack(">BBL", pdu_type, 0, rng.choice([2**32 - 1, 2**31, 2**24])))

    def oversized_p_data(port: int) -> list[socket.socket]:
        header = struct.pack(">BBL", 4, 0, rng.randrange(16383, 2**28))
        return _sent(port, header + bytes(rng.randrange(0, 20000)), associate=True)

    def random_bytes_after_association(port: int) -> list[socket.socket]:
        noise = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))
        return _sent(port, noise, associate=True)

    def unknown_pdu_type(port: int) -> list[socket.socket]:
        pdu_type = rng.choice([0, *range(8, 256)])
        return _sent(port, rawdicom.pdu(pdu_type, bytes(rng.randrange(0, 64))), rng.random() < 0.5)

    def malformed_message(port: int) -> list[socket.socket]:
        name = rng.choice(list(rawdicom.MALFORMED_MESSAGES))
        return _sent(port, rawdicom.MALFORMED_MESSAGES[name](), associate=True)

    def mutated_request(port: int) -> list[socket.socket]:
        return _sent(port, rq[:6] + _flip(rng, rq[6:], 68, rng.randrange(1, 12)))

    def stalled_mid_pdu(port: int) -> list[socket.socket]:
        message = rawdicom.p_data(1, 0x03, rawdicom.store_command(generate_uid()))
        return _sent(port, message[: rng.randrange(1, len(message) - 1)], associate=True)

    def first_pdu_out_of_place(port: int) -> list[socket.socket]:
        data = rng.choice(
            [rawdicom.release_rq(), rawdicom.abort_pdu(), rawdicom.pdu(2, rq[6:]), rq + rq]
        )
        return _sent(port, data)

    def even_context_id(port: int) -> list[socket.socket]:
        context = rawdicom.Context(id=rng.choice([0, 2, 128, 254]))
        return _sent(port, rawdicom.associate_rq(contexts=(context,)))

    def never_sends(port: int) -> list[socket.socket]:
        return [rawdicom.connect(port)]

    kinds = [
        truncated_request,
        huge_length,
        oversized_p_data,
        random_bytes_after_association,
        unknown_pdu_type,
        malformed_message,
        mutated_request,
        stalled_mid_pdu,
        first_pdu_out_of_place,
        even_context_id,
    ]
    abuses = [Abuse("connection that never sends", never_sends) for _ in range(50)]
    while len(abuses) < count:
        for kind in kinds:
            abuses.append(Abuse(kind.__name__.replace("_", " "), kind))
    return abuses[:count]


# The run against one node.


@dataclass
class MalformedReport:
    inputs: int = 0
    data_sets: int = 0
    protocol: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    crashes: int = 0
    hangs: int = 0
    stored_but_refusable: list[str] = field(default_factory=list)
    lost_or_changed: list[str] = field(default_factory=list)
    rows_without_files: int = 0
    files_without_rows: int = 0
    identifiers_in_log: int = 0
    longest_log_line: int = 0
    before: ProcessStats | None = None
    after: ProcessStats | None = None

    def zeros_due(self) -> dict[str, int]:
        assert self.before and self.after
        return {
            "crashes": self.crashes,
            "hangs": self.hangs,
            "stored though it must be refused": len(self.stored_but_refusable),
            "acknowledged then lost or changed": len(self.lost_or_changed),
            "rows without files": self.rows_without_files,
            "files without rows": self.files_without_rows,
            "patient identifiers in the log": self.identifiers_in_log,
            "threads left over": self.after.threads - self.before.threads,
            "sockets left over": self.after.sockets - self.before.sockets,
            "files left open": self.after.files - self.before.files,
        }

    def lines(self) -> list[str]:
        assert self.before and self.after
        codes = ", ".join(f"{code} {n}" for code, n in sorted(self.statuses.items()))
        lines = [
            f"inputs tried: {self.inputs} ({self.data_sets} data sets over associations, "
            f"{self.protocol} protocol abuses over raw sockets)",
            f"answers by code: {codes}",
            *(f"{name}: {value}" for name, value in self.zeros_due().items()),
            f"longest log line: {self.longest_log_line} characters",
            f"before -> after: memory {self.before.memory_mib:.0f} -> "
            f"{self.after.memory_mib:.0f} MiB; threads {self.before.threads} -> "
            f"{self.after.threads}; descriptors: sockets {self.before.sockets} -> "
            f"{self.after.sockets}, files {self.before.files} -> {self.after.files}, database "
            f"{self.before.database_files} -> {self.after.database_files}",
        ]
        lines += [f"  stored though it must be refused: {x}" for x in self.stored_but_refusable]
        lines += [f"  lost or changed: {x}" for x in self.lost_or_changed]
        return lines


class Sender:
    """C-STOREs files over one association at a time, reopening after an abort."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._assoc = None
        self._ae = AE(ae_title="FUZZER")
        self._ae.dimse_timeout = 30
        for sop_class in (MRImageStorage, EnhancedMRImageStorage):
            for syntax in SYNTAXES:  # one context each: the node picks one syntax a context
                self._ae.add_requested_context(sop_class, syntax)

    def store(self, path: Path) -> str:
        """The answer's status as 0xNNNN, or what happened instead."""
        if self._assoc is None or not self._assoc.is_established:
            self._assoc = self._ae.associate("127.0.0.1", self._port, ae_title="SYNTH")
            if not self._assoc.is_established:
                return "association refused"
        try:
            status = self._assoc.send_c_store(path)
        except (ValueError, AttributeError, RuntimeError) as error:
            return f"not sent ({type(error).__name__})"
        if "Status" not in status:
            return "no answer (association aborted)" if self._assoc.is_aborted else "no answer"
        return f"0x{int(status.Status):04X}"

    def close(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()


@contextmanager
def chunked_sending() -> Iterator[None]:
    """pynetdicom sends a file's bytes as they are (broken ones too) only in this mode."""
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def echo_answers(port: int, timeout: float = 10) -> bool:
    ae = AE(ae_title="FUZZPROBE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SYNTH")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return "Status" in status and status.Status == 0


def malformed_inputs(
    workdir: Path, count: int, seed: int = 0, progress: Callable[[str], None] = lambda _: None
) -> MalformedReport:
    """Send about ``count`` malformed inputs (two in three data sets, the rest protocol
    abuse) to a fresh node, and check what it kept, logged and holds afterwards."""
    rng = random.Random(seed)
    report = MalformedReport()
    port = free_port()
    config = write_config(workdir / "node", port, receivers=RECEIVERS, **FAST_CONNECTIONS)
    node = NodeProcess(config, port).start()
    inputs_folder = workdir / "inputs"
    inputs_folder.mkdir(parents=True)
    acknowledged: dict[str, Acknowledged] = {}  # by SOP Instance UID: the first Success
    try:
        with chunked_sending():
            # Decoders and caches load on first use: "before" is after one of each syntax.
            warm_up = Sender(port)
            for index, syntax in enumerate(SYNTAXES):
                ds = base_dataset(64, 64)
                if syntax in (RLELossless, JPEG2000Lossless):
                    ds.compress(syntax)
                warm = instance("warm-up", ds, transfer_syntax=syntax)
                path = warm.write(inputs_folder / f"warm-up-{index}.dcm")
                assert warm_up.store(path) == "0x0000", syntax
            warm_up.close()
            report.before = settled_stats(node.process.pid)
            sender = Sender(port)

            protocol_count = max(count // 3, 60)
            data_sets = data_set_inputs(rng, count - protocol_count)
            for index, item in enumerate(data_sets, start=1):
                path = item.write(inputs_folder / f"{index:05d}.dcm")
                _send_one(sender, path, item, report, acknowledged)
                # Re-sends of what was stored: identical (a quiet duplicate) or other content.
                if item.label.startswith("pixel data longer") and acknowledged:
                    first = acknowledged[rng.choice(sorted(acknowledged))]
                    _send_duplicates(sender, first, inputs_folder, index, report, acknowledged)
                if index % 25 == 0:
                    node = _check_alive(node, report)
                    progress(f"{report.inputs} inputs")
            sender.close()

            abuses = protocol_inputs(rng, protocol_count)
            for start in range(0, len(abuses), 60):
                _abuse(abuses[start : start + 60], port, report)
                node = _check_alive(node, report)
                progress(f"{report.inputs} inputs")

        report.after = settled_stats(node.process.pid, report.before)
        _check_spool(node, acknowledged, report)
        _check_log(node, report)
    finally:
        node.stop()
    return report


@dataclass(frozen=True)
class Acknowledged:
    """The first Success for a SOP Instance UID: what the spool must keep."""

    digest: str
    label: str
    path: Path  # the file it was sent from


def _send_one(
    sender: Sender,
    path: Path,
    item: Instance,
    report: MalformedReport,
    acknowledged: dict[str, Acknowledged],
) -> None:
    answer = sender.store(path)
    report.inputs += 1
    report.data_sets += 1
    report.statuses[answer] += 1
    if answer == "0x0000":
        if item.must_refuse:
            report.stored_but_refusable.append(item.label)
        acknowledged.setdefault(item.sop_instance_uid, Acknowledged(item.digest, item.label, path))


def _send_duplicates(
    sender: Sender,
    first: Acknowledged,
    folder: Path,
    index: int,
    report: MalformedReport,
    acknowledged: dict[str, Acknowledged],
) -> None:
    """The acknowledged instance again, as it was, then other content under its UIDs."""
    again = folder / f"{index:05d}-identical.dcm"
    again.write_bytes(first.path.read_bytes())
    report.inputs += 1
    report.data_sets += 1
    report.statuses[sender.store(again)] += 1
    other = base_dataset(16, 16)
    other.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    original = dcmread(first.path, force=True)
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if keyword in original and _is_uid(str(original[keyword].value)):
            setattr(other, keyword, original[keyword].value)
    conflicting = instance("conflicting duplicate", other, must_refuse=True)
    path = conflicting.write(folder / f"{index:05d}-other.dcm")
    _send_one(sender, path, conflicting, report, acknowledged)


def _abuse(batch: list[Abuse], port: int, report: MalformedReport) -> None:
    opened: list[tuple[str, socket.socket]] = []
    for abuse in batch:
        try:
            opened += [(abuse.label, sock) for sock in abuse.connect(port)]
        except (OSError, ConnectionError):
            report.statuses["association refused"] += 1
        report.inputs += 1
        report.protocol += 1
    # While they are all open, a real sender must still get through.
    if not echo_answers(port):
        report.hangs += 1
    # The node's timeouts in the run are 1 s: whatever it still holds after 3 s, it waits
    # on legitimately (an incomplete message on an idle association, say).
    deadline = time.monotonic() + 3
    for _, sock in opened:
        report.statuses[_ending(sock, deadline)] += 1
        sock.close()


def _ending(sock: socket.socket, deadline: float) -> str:
    """How the node ended a connection by ``deadline``: "aborted", "rejected", "closed",
    or "left open" when it still waits for more (the harness closes it then)."""
    while True:
        try:
            answer = rawdicom.read_pdu(sock, max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            return "left open"
        except OSError:
            return "closed"
        if answer is None:
            return "closed"
        if answer[0] == rawdicom.PduType.ABORT:
            return "aborted"
        if answer[0] == rawdicom.PduType.ASSOCIATE_RJ:
            return "rejected"


def _check_alive(node: NodeProcess, report: MalformedReport) -> NodeProcess:
    if node.process.poll() is not None:
        report.crashes += 1
        return node.start()
    if not echo_answers(node.port):
        report.hangs += 1
    return node


def _check_spool(
    node: NodeProcess, acknowledged: dict[str, Acknowledged], report: MalformedReport
) -> None:
    from pipeline.spool import stored_data_set

    spool = node.config.parent / "spool"
    rows = dict(_rows(node, "select sop_instance_uid, path from instance"))
    files = {str(p.relative_to(spool)) for p in spool.rglob("*.dcm")}
    report.rows_without_files += len(set(rows.values()) - files)
    report.files_without_rows += len(files - set(rows.values()))
    for uid, first in acknowledged.items():
        if uid not in rows:
            report.lost_or_changed.append(f"{first.label}: {uid} has no row")
            continue
        stored = stored_data_set(spool / rows[uid])
        if stored is None or hashlib.sha256(stored).hexdigest() != first.digest:
            report.lost_or_changed.append(f"{first.label}: {uid} is not what was acknowledged")


def _check_log(node: NodeProcess, report: MalformedReport) -> None:
    lines = node.log().splitlines()
    report.identifiers_in_log += sum(any(x in line for x in IDENTIFIERS) for line in lines)
    report.longest_log_line = max(map(len, lines), default=0)


# SIGKILL at random moments.


class Phase(enum.StrEnum):
    """Where a series was when its node was killed."""

    RECEIVING = "receiving"
    SYNTHESIZING = "synthesizing"
    DELIVERING = "delivering"


@dataclass
class KillReport:
    trials: int = 0
    kills_by_phase: Counter[str] = field(default_factory=Counter)
    acknowledged: int = 0
    lost_or_changed: list[str] = field(default_factory=list)
    rows_without_files: int = 0
    files_without_rows: int = 0
    synthetic_expected: int = 0
    synthetic_series_found: int = 0
    duplicate_synthetic_series: int = 0
    missing_synthetic_instances: int = 0
    extra_synthetic_instances: int = 0
    stuck_jobs: int = 0
    stuck_deliveries: int = 0
    failed: list[str] = field(default_factory=list)
    identifiers_in_log: int = 0
    resends_not_acknowledged: int = 0  # after a restart, by a node that is up
    seconds: float = 0.0

    def zeros_due(self) -> dict[str, int]:
        return {
            "re-sends after a restart not acknowledged": self.resends_not_acknowledged,
            "acknowledged then lost or changed": len(self.lost_or_changed),
            "rows without files": self.rows_without_files,
            "files without rows": self.files_without_rows,
            "series missing at the PACS": self.synthetic_expected - self.synthetic_series_found,
            "duplicate synthetic series at the PACS": self.duplicate_synthetic_series,
            "missing synthetic instances": self.missing_synthetic_instances,
            "duplicate synthetic instances": self.extra_synthetic_instances,
            "stuck jobs": self.stuck_jobs,
            "stuck deliveries": self.stuck_deliveries,
            "failed jobs or deliveries": len(self.failed),
            "patient identifiers in the log": self.identifiers_in_log,
        }

    def lines(self) -> list[str]:
        phases = ", ".join(f"{p} {self.kills_by_phase[p]}" for p in Phase)
        lines = [
            f"SIGKILL trials: {self.trials} ({phases}), restart and re-send after each, "
            f"{self.seconds:.0f} s",
            f"instances acknowledged: {self.acknowledged}; synthetic series expected at the "
            f"PACS: {self.synthetic_expected}, found: {self.synthetic_series_found}",
            *(f"{name}: {value}" for name, value in self.zeros_due().items()),
        ]
        return lines + [f"  failed: {x}" for x in self.failed]


SLICES, MATRIX = 24, 96


def kill_trials(
    workdir: Path,
    count: int,
    seed: int = 0,
    progress: Callable[[str], None] = lambda _: None,
    database: str = "sqlite:///node.sqlite",
) -> KillReport:
    """``count`` trials: a T1 series sent to a node delivering to Orthanc, the node killed in
    one of the three phases (in turn) at a random moment, restarted, the series sent again.
    ``database``: the node's, SQLite beside its config or a PostgreSQL URL."""
    rng = random.Random(seed)
    report = KillReport()
    started = time.monotonic()
    orthanc = Orthanc(workdir / "orthanc").start()
    registry = make_registry(workdir / "models")
    port = free_port()
    extra = (
        "\n[delivery]\nbackoff_seconds = 0.2\nbackoff_max_seconds = 1\ntimeout_seconds = 10\n"
        "lease_seconds = 600\n"
    ) + routes_toml(Orthanc.AE_TITLE, orthanc.dicom_port)
    config = write_config(
        workdir / "node",
        port,
        extra=extra,
        models=registry.root,
        database=database,
        receivers=RECEIVERS,
    )
    node = NodeProcess(config, port).start()
    sent: dict[str, list[Dataset]] = {}  # study UID -> its series
    acknowledged: dict[str, str] = {}  # SOP Instance UID -> digest of what was acknowledged
    try:
        for trial in range(count):
            phase = list(Phase)[trial % 3]
            series = mr_series(SLICES, rows=MATRIX, columns=MATRIX)
            for ds in series:
                ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
            sent[series[0].StudyInstanceUID] = series
            report.kills_by_phase[_kill_in(node, phase, series, acknowledged, rng)] += 1
            report.trials += 1
            node = NodeProcess(config, port).start()
            # The sender tries again, all of it: every instance acknowledged this time.
            report.resends_not_acknowledged += not _send_series(port, series, acknowledged)
            progress(f"trial {trial + 1}: killed while {phase}")
        _wait_until_settled(node, timeout=120 + 10 * count)
        _check_kill_outcome(node, orthanc, sent, acknowledged, report)
    finally:
        node.stop()
        orthanc.stop()
    report.seconds = time.monotonic() - started
    return report


# Standard SQL, each join with its condition: PostgreSQL refuses what SQLite lets pass.
_OF_SERIES = "job join series on job.series_id = series.id where series.series_uid = :uid"
_DELIVERIES_OF_SERIES = (
    "delivery join job on delivery.job_id = job.id join series on job.series_id = series.id "
    "where series.series_uid = :uid"
)
_IN_PHASE = {
    Phase.SYNTHESIZING: f"select 1 from {_OF_SERIES} and job.state = 'running'",
    Phase.DELIVERING: f"select 1 from {_DELIVERIES_OF_SERIES} and delivery.state = 'sending'",
}


def _kill_in(
    node: NodeProcess,
    phase: Phase,
    series: list[Dataset],
    acknowledged: dict[str, str],
    rng: random.Random,
) -> Phase:
    """Kill ``node`` at a random moment of ``phase`` for ``series``; the phase it was in."""
    series_uid = series[0].SeriesInstanceUID
    sender = threading.Thread(target=_send_series, args=(node.port, series, acknowledged))
    sender.start()
    if phase == Phase.RECEIVING:
        target = rng.randrange(1, SLICES)
        _poll(lambda: sum(ds.SOPInstanceUID in acknowledged for ds in series) >= target, 60)
    else:
        _poll(lambda: _row(node, _IN_PHASE[phase], uid=series_uid), 60, interval=0.005)
        time.sleep(rng.uniform(0, 0.05))
    observed = _phase_now(node, series_uid)
    node.kill()
    sender.join(60)
    return observed


def _phase_now(node: NodeProcess, series_uid: str) -> Phase:
    if _row(node, f"select 1 from {_DELIVERIES_OF_SERIES}", uid=series_uid):
        return Phase.DELIVERING
    if _row(node, f"select 1 from {_OF_SERIES}", uid=series_uid):
        return Phase.SYNTHESIZING
    return Phase.RECEIVING


def _send_series(port: int, series: list[Dataset], acknowledged: dict[str, str]) -> bool:
    """Send ``series`` until done or the node goes; note what it acknowledged. Whether
    every instance was acknowledged."""
    ae = AE(ae_title="MRI1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="SYNTH")
    if not assoc.is_established:
        return False
    every = True
    for ds in series:
        status = assoc.send_c_store(ds)
        if not assoc.is_established or "Status" not in status:
            return False
        if status.Status == 0:
            acknowledged.setdefault(ds.SOPInstanceUID, hashlib.sha256(encoded(ds)).hexdigest())
        every &= status.Status == 0
    assoc.release()
    return every


def _row(node: NodeProcess, query: str, **params: object) -> tuple | None:
    """The first row of ``query``, None if none or if the database cannot say yet."""
    try:
        rows = _rows(node, query, **params)
    except OperationalError:  # SQLite busy
        return None
    return rows[0] if rows else None


def _rows(node: NodeProcess, query: str, **params: object) -> list[tuple]:
    """``query`` on the node's database, whichever its config names (SQLite, PostgreSQL)."""
    with _reader(node.config).connect() as connection:
        return [tuple(row) for row in connection.execute(text(query), params)]


@cache
def _reader(config: Path) -> Engine:
    from node.config import load_config
    from pipeline.state.db import database_url

    url = database_url(load_config(config).node.database)
    # Plain reads: never the node's own engine, whose SQLite transactions begin IMMEDIATE
    # (a write lock). PostgreSQL keeps its connection: a new one per poll is too slow to
    # catch a delivery in the act.
    if url.get_backend_name() == "sqlite":
        return create_engine(url, poolclass=NullPool, connect_args={"timeout": 5})
    return create_engine(url, pool_size=1)


def _poll(predicate: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def _wait_until_settled(node: NodeProcess, timeout: float) -> None:
    unfinished = (
        "select (select count(*) from series where state = 'receiving') + "
        "(select count(*) from job where state in ('queued', 'running')) + "
        "(select count(*) from delivery where state in ('pending', 'sending'))"
    )
    _poll(lambda: _row(node, unfinished) == (0,), timeout, interval=0.5)


def _check_kill_outcome(
    node: NodeProcess,
    orthanc: Orthanc,
    sent: dict[str, list[Dataset]],
    acknowledged: dict[str, str],
    report: KillReport,
) -> None:
    from pipeline.spool import stored_data_set

    spool = node.config.parent / "spool"
    rows = dict(_rows(node, "select sop_instance_uid, path from instance"))
    ((report.stuck_jobs,),) = _rows(
        node, "select count(*) from job where state in ('queued', 'running')"
    )
    ((report.stuck_deliveries,),) = _rows(
        node, "select count(*) from delivery where state in ('pending', 'sending')"
    )
    report.failed = [
        f"job {i}: {reason}"
        for i, reason in _rows(node, "select id, reason from job where state = 'failed'")
    ] + [
        f"delivery {i}: {reason}"
        for i, reason in _rows(node, "select id, reason from delivery where state = 'failed'")
    ]
    files = {str(p.relative_to(spool)) for p in (spool / "incoming").rglob("*.dcm")}
    report.rows_without_files = len(set(rows.values()) - files)
    report.files_without_rows = len(files - set(rows.values()))
    report.acknowledged = len(acknowledged)
    for uid, digest in acknowledged.items():
        stored = stored_data_set(spool / rows[uid]) if uid in rows else None
        if stored is None or hashlib.sha256(stored).hexdigest() != digest:
            report.lost_or_changed.append(uid)

    report.synthetic_expected = len(sent)
    by_study: dict[str, list[dict]] = {}
    for series in orthanc.get("/series?expand"):
        if series["MainDicomTags"].get("SeriesDescription", "").startswith("SYNTHETIC"):
            study = orthanc.get(f"/studies/{series['ParentStudy']}")
            by_study.setdefault(study["MainDicomTags"]["StudyInstanceUID"], []).append(series)
    for study_uid, source in sent.items():
        found = by_study.get(study_uid, [])
        report.synthetic_series_found += bool(found)
        report.duplicate_synthetic_series += max(len(found) - 1, 0)
        instances = sum(len(s["Instances"]) for s in found[:1])
        if found:
            report.missing_synthetic_instances += max(len(source) - instances, 0)
            report.extra_synthetic_instances += max(instances - len(source), 0)
    log = node.log()
    report.identifiers_in_log = sum(log.count(x) for x in IDENTIFIERS)
