"""The running node: the SCP, and the stages that move each series along.

Stages (each with its own lifecycle; all state in the database, pixels in the spool):
  receive   - node.scp stores instances and their series
  complete  - an APScheduler tick completes due series and routes them into jobs
  process   - the worker synthesizes queued jobs (in this process unless configured off)
  dispatch  - the dispatcher sends finished jobs to their destinations, with retries
  clean     - hourly, files of finished series past their retention are removed
  refresh   - optionally, a daily retraining from the hospital's paired studies
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker
from tzlocal import get_localzone

if TYPE_CHECKING:
    from pipeline.worker import Worker

from node.config import Config
from node.console import ConsoleServer, build_app
from node.dispatch import Dispatcher
from node.logs import LogFormat
from node.receivers import ReceiverPool, ensure_ports_free, receiver_count
from node.scp import StorageSCP
from node.version import software_version
from pipeline.completion import complete_due_series
from pipeline.harvest import harvest_due_pairs, harvest_root, node_salt
from pipeline.intake import recover_unrecorded
from pipeline.model.registry import ModelRegistry
from pipeline.monitor import score_due_pairs
from pipeline.retention import purge_finished
from pipeline.routing import header_keywords
from pipeline.spool import Spool
from pipeline.state.audit import record_activation
from pipeline.state.db import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Role,
    Series,
    SeriesState,
    open_database,
    utcnow,
)
from pipeline.state.deliveries import take_back_deliveries_of_gone_senders
from pipeline.state.heartbeats import Heart, Pulse
from pipeline.state.jobs import take_back_jobs_of_gone_workers

log = logging.getLogger(__name__)

BACKGROUND = "background"  # retention, harvest, quality monitor
REFRESH = "refresh"  # the daily retraining, hours long
COMPLETION_JOB = "completion"


def build_worker(config: Config, sessions: sessionmaker) -> Worker:
    """A synthesis worker on the node's database, spool and registry. Imports torch (2 s):
    only a node that runs a worker pays for it."""
    from pipeline.worker import Worker

    return Worker(
        sessions,
        config.node.storage,
        ModelRegistry(config.models.registry),
        config.worker,
        software_version(),
        config.output,
        config.monitor,
        config.uncertainty,
    )


def take_back_leases(config: Config, sessions: sessionmaker) -> None:
    """Jobs and deliveries held by a process of this host that is gone (killed, crashed)
    resume now instead of when its lease runs out (15 and 5 minutes by default)."""
    take_back_jobs_of_gone_workers(sessions, config.worker.max_attempts)
    take_back_deliveries_of_gone_senders(sessions, config.delivery)


def work_in_hand(sessions: sessionmaker) -> str:
    """What the stages have left to do, in words ("" when nothing), for the start's log."""
    with sessions() as session:
        receiving = session.scalar(
            select(func.count()).select_from(Series).where(Series.state == SeriesState.RECEIVING)
        )
        jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        deliveries = dict(
            session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
        )
    parts = [
        (receiving, "series receiving"),
        (jobs.get(JobState.QUEUED, 0), "job(s) queued"),
        (jobs.get(JobState.RUNNING, 0), "job(s) running, held by a live or remote worker"),
        (deliveries.get(DeliveryState.PENDING, 0), "delivery(ies) pending"),
        (
            deliveries.get(DeliveryState.SENDING, 0),
            "delivery(ies) sending, held by a live or remote sender",
        ),
    ]
    return ", ".join(f"{count} {what}" for count, what in parts if count)


class NodeService:
    """Everything `dicomnode serve` runs, started and stopped together."""

    def __init__(self, config: Config, log_format: LogFormat = LogFormat.TEXT) -> None:
        self.config = config
        storage = config.node.storage
        self.spool = Spool(storage)
        self.spool.make()
        self.sessions = open_database(config.node.database)
        # One thread per kind of work, each started once: completion never waits behind a
        # monitor's registration or a retraining, and the node's thread count stays put
        # (bench/reliability counts threads left over).
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={
                "default": ThreadPoolExecutor(1),
                BACKGROUND: ThreadPoolExecutor(1),
                REFRESH: ThreadPoolExecutor(1),
            },
        )
        receivers = receiver_count(config.node)
        # The other receiving processes: this one is the first.
        self.receivers = (
            ReceiverPool(config, receivers, self.wake_completion, log_format)
            if receivers > 1
            else None
        )
        self.scp = StorageSCP(
            config.node,
            self.sessions,
            storage,
            header_keywords=header_keywords(config.routes),
            on_count_reached=self.wake_completion,
            loads=self.receivers.loads(1) if self.receivers is not None else None,
        )
        self.worker = build_worker(config, self.sessions) if config.worker.in_process else None
        self.dispatcher = Dispatcher(
            self.sessions, storage, config.destinations, config.delivery, config.node.ae_title
        )
        if self.worker is not None:
            self.worker.on_job_done = self._job_done
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listening_since = utcnow()
        # The last completion tick that ran through: /health says when the scheduler stalls.
        self.ticked_at: datetime | None = None
        self.heart: Heart | None = None
        self.console = (
            ConsoleServer(config, build_app(config, self.sessions, self._heart_id))
            if config.http.enabled
            else None
        )

    def _job_done(self) -> None:
        self.dispatcher.wake.set()
        if self.heart is not None:
            self.heart.wake.set()  # the console should not show the finished job for a beat

    def _heart_id(self) -> int | None:
        return self.heart.id if self.heart is not None else None

    def pulse(self) -> Pulse:
        job = self.worker.current_job if self.worker is not None else None
        return Pulse(current_job_id=job, ticked_at=self.ticked_at)

    def _every(
        self,
        task: Callable[[], object],
        name: str,
        seconds: float,
        executor: str = BACKGROUND,
        start_now: bool = False,
    ) -> None:
        """Run ``task`` every ``seconds``, never two at once, a missed run made up once."""
        # APScheduler pauses a job given next_run_time=None: leave it out to wait a period.
        first = {"next_run_time": datetime.now(UTC)} if start_now else {}
        self.scheduler.add_job(
            task,
            "interval",
            seconds=seconds,
            id=name,
            max_instances=1,
            coalesce=True,
            executor=executor,
            **first,
        )

    def start(self) -> None:
        if self.receivers is not None:  # shared ports: a plain bind tells if one is taken
            ensure_ports_free(self.config.node)
        if self.console is not None:  # first: a port taken stops the start before any work
            self.console.start()
        removed = self.spool.remove_partial_files()
        if removed:
            log.info("removed %d partial file(s) left by an earlier crash", removed)
        recover_unrecorded(
            self.sessions, self.config.node.storage, header_keywords(self.config.routes)
        )
        take_back_leases(self.config, self.sessions)
        resuming = work_in_hand(self.sessions)
        if resuming:
            log.info("resuming: %s", resuming)
        self._every(
            self._complete,
            COMPLETION_JOB,
            self.config.completion.check_interval_seconds,
            executor="default",
            start_now=True,
        )
        self._every(self._clean, "clean", 3600, start_now=True)
        if self.config.harvest.enabled:
            self._every(self._harvest, "harvest", self.config.harvest.check_interval_seconds)
        if self.config.monitor.enabled:
            self._every(self._monitor, "monitor", self.config.monitor.check_interval_seconds)
        if self.config.refresh.enabled:
            refresh = self.config.refresh
            self.scheduler.add_job(
                self._refresh,
                CronTrigger(hour=refresh.hour, minute=refresh.minute, timezone=get_localzone()),
                id="refresh",
                max_instances=1,
                coalesce=True,
                executor=REFRESH,
            )
            log.info("model refresh scheduled daily at %s (local time)", refresh.time)
        self.scheduler.start()
        loops = [("dispatch", self.dispatcher.run_forever)]
        if self.worker is not None:
            loops.append(("worker", self.worker.run_forever))
        for name, loop in loops:
            thread = threading.Thread(target=loop, args=(self._stop,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._listening_since = utcnow()
        self.heart = Heart(
            self.sessions,
            Role.SERVE,
            software_version(),
            self.worker.device if self.worker is not None else None,
            pulse=self.pulse,
            console_url=self.console.url if self.console is not None else None,
        )
        self.heart.start()
        self.scp.start()
        if self.receivers is not None:
            self.receivers.start(self.scp.share())
            log.info("receiving in %d processes", receiver_count(self.config.node))

    def stop(self) -> None:
        self.scp.stop()
        if self.console is not None:
            self.console.stop()
        if self.receivers is not None:
            self.receivers.stop()
        self.scheduler.shutdown(wait=True)
        self._stop.set()
        self.dispatcher.wake.set()
        if self.worker is not None:
            self.worker.wake.set()
        for thread in self._threads:
            thread.join(timeout=60)
        if self.heart is not None:
            self.heart.stop()

    def run_until_signalled(self) -> None:
        """Start, then run until SIGTERM or SIGINT; stop cleanly."""
        stopped = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stopped.set())
        self.start()
        stopped.wait()
        log.info("stopping")
        self.stop()

    def wake_completion(self) -> None:
        """Run the completion check now: a series just reached its announced count."""
        try:
            self.scheduler.modify_job(COMPLETION_JOB, next_run_time=datetime.now(UTC))
        except Exception:  # shutting down; the next start completes it
            log.debug("completion not woken", exc_info=True)

    def _clean(self) -> None:
        try:
            purge_finished(self.sessions, self.config.node.storage, self.config.retention)
        except Exception:
            log.exception("clean stage failed; files are kept and it runs again in an hour")

    def _harvest(self) -> None:
        try:
            harvest_due_pairs(self.sessions, self.config.node.storage, self.config.harvest)
        except Exception:
            log.exception("harvest failed; it tries again at its next tick")

    def _monitor(self) -> None:
        try:
            score_due_pairs(self.sessions, self.config.node.storage, self.config.monitor)
        except Exception:
            log.exception("quality monitor failed; it tries again at its next tick")

    def _refresh(self) -> None:
        from train.refresh import refresh_models  # torch and the training stack: only now

        registry = ModelRegistry(self.config.models.registry)
        before = registry.active_versions()
        try:
            storage = self.config.node.storage
            harvested = [harvest_root(storage)] if self.config.refresh.harvested else []
            salt = node_salt(storage) if harvested else ""
            for line in refresh_models(self.config.refresh, registry, harvested, salt):
                log.info("model refresh: %s", line)
        except Exception:
            log.exception("model refresh failed; the active models are unchanged")
        for name, version in registry.active_versions().items():
            if before.get(name) != version:
                record_activation(self.sessions, name, version, "daily refresh")

    def _complete(self) -> None:
        try:
            done = complete_due_series(
                self.sessions,
                self.config.routes,
                self.config.completion,
                listening_since=self._listening_since,
            )
            if self.worker is not None and any(c.job_id for c in done):
                self.worker.wake.set()
            first = self.ticked_at is None
            self.ticked_at = utcnow()
            if first and self.heart is not None:
                self.heart.wake.set()  # /health should not wait a beat to see the first tick
        except Exception:
            # A failing tick must not stop the schedule; it is retried next second.
            log.exception("completion check failed")
