"""The dispatch stage: sends each finished job's synthetic series to its destinations.

Deliveries are claimed under a lease (several dispatchers can share a database), sent with
node.scu, and their outcome recorded: sent, retried later with backoff, or failed.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from sqlalchemy.orm import sessionmaker

from node.scu import send_series
from pipeline.routing import Destination
from pipeline.spool import Spool
from pipeline.state.deliveries import (
    DeliverySettings,
    InstanceResult,
    claim_delivery,
    record_attempt,
)
from pipeline.state.leases import worker_identity

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self,
        sessions: sessionmaker,
        storage: Path,
        destinations: dict[str, Destination],
        settings: DeliverySettings,
        calling_ae: str,
    ) -> None:
        self._sessions = sessions
        self._spool = Spool(storage)
        self._destinations = destinations
        self._settings = settings
        self._calling_ae = calling_ae
        self.owner = worker_identity()
        # Set when a job finishes, so its deliveries start at once.
        self.wake = threading.Event()

    def run_due(self) -> int:
        """Attempt every due delivery once; return how many were attempted."""
        count = 0
        while (claimed := claim_delivery(self._sessions, self.owner, self._settings)) is not None:
            count += 1
            destination = self._destinations.get(claimed.destination)
            if destination is None:
                error = (
                    f"destination {claimed.destination!r} is no longer in config.toml "
                    "(add it back, then `dicomnode retry`)"
                )
                results: dict[str, InstanceResult] = {}
            elif not claimed.output_path:
                error, results = "the job has no output to send", {}
            else:
                files = self._spool.series_files(claimed.output_path)
                outcome = send_series(
                    destination, files, set(claimed.already_sent), self._settings, self._calling_ae
                )
                error, results = outcome.error, outcome.results
            record_attempt(self._sessions, claimed.id, self.owner, results, error, self._settings)
        return count

    def run_forever(self, stop: threading.Event, poll_seconds: float = 1.0) -> None:
        while not stop.is_set():
            try:
                attempted = self.run_due()
            except Exception:
                log.exception("dispatch loop error; retrying")
                attempted = 0
            if not attempted:
                self.wake.wait(poll_seconds)
                self.wake.clear()
