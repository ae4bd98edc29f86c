"""Several receiving processes on one port, each with its own interpreter lock.

pynetdicom does its PDU and DIMSE work in Python: in one process, one lock serializes all
associations, so four senders were barely faster than one. `serve` itself receives, and
starts ``receivers - 1`` more processes that accept on its listening sockets: each
connection goes to the process that accepts it first, the least busy one. Each writes
the same spool and database the same way (durable before acknowledged); only `serve`
completes, synthesizes and delivers.

A receiver that dies is started again. One whose `serve` dies is killed by the kernel
(PR_SET_PDEATHSIG), as a crash of the node would: nothing it acknowledged is lost, and the
next `serve` cleans up what it left half-written.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, MutableSequence
from multiprocessing.synchronize import Event as ProcessEvent
from typing import TYPE_CHECKING

from node.acceptor import Loads
from node.config import Config, NodeSettings
from node.logs import LogFormat, setup_logging

if TYPE_CHECKING:
    from node.scp import Listening

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
# How long a start waits for the port to be free: the receivers of a node killed just
# before are being killed by the kernel.
PORT_WAIT_SECONDS = 5
# prometheus_client's multiprocess mode: each process keeps its counters in files there.
COUNTERS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def receiver_count(settings: NodeSettings) -> int:
    """How many processes receive: ``[node] receivers``, else one per CPU core."""
    return settings.receivers or len(os.sched_getaffinity(0)) or 1


def share_counters() -> tempfile.TemporaryDirectory:
    """A folder where every receiver keeps its C-STORE counters, which `serve`'s /metrics
    sums (node.metrics), so a scrape counts all receivers and not only `serve`'s share.
    prometheus_client reads the variable when it is imported: call this before that; the
    receivers inherit it. New at each start, so the counters start at zero with `serve`."""
    folder = tempfile.TemporaryDirectory(prefix="dicomnode-counters-")
    os.environ[COUNTERS_VARIABLE] = folder.name
    return folder


def ensure_ports_free(settings: NodeSettings) -> None:
    """Wait until the node's ports are free, and raise OSError naming the port if another
    process still listens on one: the receivers of a node killed just before hold its
    sockets until the kernel has killed them too."""
    ports = [settings.port] + ([settings.tls.port] if settings.tls and settings.tls.port else [])
    for port in ports:
        deadline = time.monotonic() + PORT_WAIT_SECONDS
        while True:
            with socket.socket() as probe:
                # As the servers bind: connections of an earlier node in TIME_WAIT do not
                # hold the port, a listening socket does.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((settings.host, port))
                    break
                except OSError as error:
                    if time.monotonic() > deadline:
                        raise OSError(
                            error.errno, f"port {port} is in use by another process"
                        ) from None
            time.sleep(0.2)


class ReceiverPool:
    """The receivers beside `serve`'s own: started, watched, restarted and stopped."""

    def __init__(
        self,
        config: Config,
        count: int,
        on_count_reached: Callable[[], None],
        log_format: LogFormat = LogFormat.TEXT,
    ) -> None:
        self._config = config
        self._log_format = log_format
        self._count = count
        self._on_count_reached = on_count_reached
        self._context = multiprocessing.get_context("spawn")  # never fork a threaded process
        # Set by a receiver when a series reaches its announced count: `serve` completes it.
        self._count_reached = self._context.Event()
        self._processes: dict[int, multiprocessing.process.BaseProcess] = {}
        self._listening: Listening | None = None
        # Connections held by each receiver, `serve`'s first (node.acceptor.Loads).
        self._loads = self._context.Array("i", count, lock=False)
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def loads(self, number: int) -> Loads:
        """Receiver ``number``'s view of every receiver's load (`serve` is number 1)."""
        return Loads(self._loads, number - 1)

    def start(self, listening: Listening) -> None:
        """Start the receivers, accepting on `serve`'s ``listening`` sockets."""
        self._listening = listening
        for number in range(2, self._count + 1):  # `serve` is receiver 1
            self._start(number)
        self._watcher = threading.Thread(target=self._watch, name="receivers", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stopping.set()
        self._count_reached.set()  # ends the watcher's wait
        for process in self._processes.values():
            process.terminate()
        for process in self._processes.values():
            process.join(20)
            if process.is_alive():
                process.kill()
                process.join(5)
        if self._watcher is not None:
            self._watcher.join(5)

    def _start(self, number: int) -> None:
        process = self._context.Process(
            target=run_receiver,
            args=(
                self._config,
                number,
                self._listening,
                self._loads,
                self._log_format,
                self._count_reached,
                os.getpid(),
            ),
            name=f"receiver-{number}",
            daemon=False,
        )
        process.start()
        self._processes[number] = process
        log.info("receiver %d started (pid %d)", number, process.pid)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            if self._count_reached.wait(1):
                self._count_reached.clear()
                if not self._stopping.is_set():
                    self._on_count_reached()
            for number, process in list(self._processes.items()):
                if not process.is_alive() and not self._stopping.is_set():
                    log.error(
                        "receiver %d (pid %s) exited with code %s; starting it again",
                        number,
                        process.pid,
                        process.exitcode,
                    )
                    self._start(number)


def run_receiver(
    config: Config,
    number: int,
    listening: Listening,
    loads: MutableSequence[int],
    log_format: LogFormat,
    count_reached: ProcessEvent,
    parent: int,
) -> None:
    """A receiver process: the SCP on `serve`'s sockets until SIGTERM or `serve` dies."""
    # Die with `serve`, even when it is killed; and if it died while this one started, now.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return
    from node.scp import StorageSCP
    from pipeline.routing import header_keywords
    from pipeline.state.db import open_database

    setup_logging(config.node.log_level, log_format, label=f"receiver-{number}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # `serve` stops the receivers itself
    scp = StorageSCP(
        config.node,
        open_database(config.node.database),
        config.node.storage,
        header_keywords=header_keywords(config.routes),
        on_count_reached=count_reached.set,
        listening=listening,
        loads=Loads(loads, number - 1),
    )
    scp.start()
    stop.wait()
    scp.stop()
