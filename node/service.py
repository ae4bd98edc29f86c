"""The running node: the SCP, and the scheduled stages that move series along.

Stages (each with its own lifecycle, all state in the database):
  receive  - node.scp stores instances and their series
  complete - an APScheduler tick completes due series and routes them into jobs
"""

from __future__ import annotations

import logging
import signal
import threading
from datetime import UTC, datetime

from apscheduler.schedulers.background import BackgroundScheduler

from node.config import Config
from node.scp import StorageSCP
from pipeline.completion import complete_due_series
from pipeline.db import open_database
from pipeline.routing import header_keywords
from pipeline.spool import remove_partial_files

log = logging.getLogger(__name__)

COMPLETION_JOB = "completion"


class NodeService:
    """Everything `dicomnode serve` runs, started and stopped together."""

    def __init__(self, config: Config) -> None:
        self.config = config
        storage = config.node.storage
        storage.mkdir(parents=True, exist_ok=True)
        self.sessions = open_database(config.node.database)
        self.scheduler = BackgroundScheduler(timezone=UTC)
        self.scp = StorageSCP(
            config.node,
            self.sessions,
            storage,
            header_keywords=header_keywords(config.routes),
            on_count_reached=self.wake_completion,
        )
        self._stopped = threading.Event()

    def start(self) -> None:
        removed = remove_partial_files(self.config.node.storage)
        if removed:
            log.info("removed %d partial file(s) left by an earlier crash", removed)
        self.scheduler.add_job(
            self._complete,
            "interval",
            seconds=self.config.completion.check_interval_seconds,
            id=COMPLETION_JOB,
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
        )
        self.scheduler.start()
        self.scp.start()

    def stop(self) -> None:
        self.scp.stop()
        self.scheduler.shutdown(wait=True)
        self._stopped.set()

    def run_until_signalled(self) -> None:
        """Start, then run until SIGTERM or SIGINT; stop cleanly."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self._stopped.set())
        self.start()
        self._stopped.wait()
        log.info("stopping")
        self.stop()

    def wake_completion(self) -> None:
        """Run the completion check now: a series just reached its announced count."""
        try:
            self.scheduler.modify_job(COMPLETION_JOB, next_run_time=datetime.now(UTC))
        except Exception:  # shutting down; the next start completes it
            log.debug("completion not woken", exc_info=True)

    def _complete(self) -> None:
        try:
            complete_due_series(self.sessions, self.config.routes, self.config.completion)
        except Exception:
            # A failing tick must not stop the schedule; it is retried next second.
            log.exception("completion check failed")
