"""The synthesis worker: turns each queued job into a synthetic series in the spool.

Several workers (threads, processes or machines sharing the database and the spool) may
run at once: a job is held under a lease, and a dead worker's lease runs out so another
takes the job again. The active model is looked up before every job, so a newly activated
model is used from the next job on, while a job in flight finishes with the one it has.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from sqlalchemy.orm import sessionmaker

from pipeline.dicom.derived import write_series
from pipeline.dicom.volume import SeriesError
from pipeline.model.card import ModelFileError, describe
from pipeline.model.inference import Synthesizer, Synthesizers, pick_device
from pipeline.model.registry import ModelRegistry, RegistryError
from pipeline.model.uncertainty import SPREAD_FILE, confidence, save_spread
from pipeline.settings import (
    DEFAULT_OUTPUT,
    DEFAULT_UNCERTAINTY,
    OutputSettings,
    UncertaintySettings,
    WorkerSettings,
)
from pipeline.spool import Spool
from pipeline.state.jobs import ClaimedJob, JobOutput, claim_job, fail_job, finish_job
from pipeline.state.leases import worker_identity
from pipeline.state.quality import (
    DEFAULT_MONITOR,
    MonitorPause,
    MonitorSettings,
    QualityKey,
    check_not_paused,
)
from pipeline.synthesis import SynthesisResult, synthesize_series

log = logging.getLogger(__name__)


class Worker:
    """Claims jobs and runs them until none is due."""

    def __init__(
        self,
        sessions: sessionmaker,
        storage: Path,
        registry: ModelRegistry,
        settings: WorkerSettings,
        software_version: str,
        output_settings: OutputSettings = DEFAULT_OUTPUT,
        monitor_settings: MonitorSettings = DEFAULT_MONITOR,
        uncertainty_settings: UncertaintySettings = DEFAULT_UNCERTAINTY,
    ) -> None:
        self._sessions = sessions
        self._uncertainty_settings = uncertainty_settings
        self._monitor_settings = monitor_settings
        self._output_settings = output_settings
        self._spool = Spool(storage)
        self._registry = registry
        self._settings = settings
        self._software_version = software_version
        device = pick_device() if settings.device == "auto" else torch.device(settings.device)
        self._synthesizers = Synthesizers(device)
        self.device = str(device)
        self.owner = worker_identity()
        # The job in hand, for the heartbeat (pipeline.state.heartbeats).
        self.current_job: int | None = None
        # Set when a job is queued, so the loop starts it at once instead of at its next poll.
        self.wake = threading.Event()
        # Called after each finished job (the node wakes its dispatcher with it).
        self.on_job_done: Callable[[], None] = lambda: None

    def run_due_jobs(self) -> int:
        """Run jobs until none is due; return how many were run."""
        count = 0
        while (
            job := claim_job(self._sessions, self.owner, self._settings.lease_seconds)
        ) is not None:
            self.current_job = job.id
            try:
                self._run(job)
            finally:
                self.current_job = None
            count += 1
        return count

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                ran = self.run_due_jobs()
            except Exception:
                log.exception("worker loop error; retrying")
                ran = 0
            if not ran:
                self.wake.wait(self._settings.poll_seconds)
                self.wake.clear()

    def _run(self, job: ClaimedJob) -> None:
        try:
            output = self._synthesize(job)
        except (SeriesError, ModelFileError, RegistryError, MonitorPause) as error:
            # The same input or model would fail again: no point in retrying by itself.
            self._fail(job, str(error), retryable=False)
        except Exception as error:
            log.exception("job %d: unexpected error", job.id)
            self._fail(job, f"{type(error).__name__}: {error}", retryable=True)
        else:
            if finish_job(self._sessions, job.id, self.owner, output):
                self.on_job_done()

    def _fail(self, job: ClaimedJob, reason: str, *, retryable: bool) -> None:
        fail_job(
            self._sessions,
            job.id,
            self.owner,
            reason,
            retryable=retryable,
            max_attempts=self._settings.max_attempts,
            retry_delay_seconds=self._settings.retry_delay_seconds,
        )

    def _synthesize(self, job: ClaimedJob) -> JobOutput:
        if not job.instance_paths:
            raise SeriesError("the series has no stored instances")
        synthesizer = self.synthesizer(job.model)
        # The active version's rolling score on this scanner and protocol, checked now:
        # an activation or a resume takes effect from the next job on.
        key = QualityKey(job.scanner, job.protocol, job.model, synthesizer.card.version)
        check_not_paused(self._sessions, key, self._monitor_settings)
        result = synthesize_series(
            [self._spool.path(p) for p in job.instance_paths],
            synthesizer,
            job.direction,
            self._software_version,
            self._output_settings,
            uncertainty_passes=self._uncertainty_settings.passes_to_run,
            uncertainty_series=job.send_uncertainty,
        )
        output_folder = Spool.job_folder(job.id)
        started = time.perf_counter()
        folder = self._spool.path(output_folder)
        # Every file in the folder is sent: the map only where the route asks for it.
        write_series(result.datasets + result.uncertainty_datasets, folder)
        if result.spread is not None:
            save_spread(folder / SPREAD_FILE, result.spread)
        timings = result.timings | {
            "write_s": round(time.perf_counter() - started, 3),
            "slices": len(result.datasets),
        }
        held = self._why_held(job, result)
        card = synthesizer.card
        log.info(
            "job %d: %d %s slice(s) synthesized with %s on %s (load %.2fs, inference %.2fs, "
            "write %.2fs)",
            job.id,
            len(result.datasets),
            result.source_plane,
            describe(card),
            synthesizer.device,
            timings["load_s"],
            timings["inference_s"],
            timings["write_s"],
        )
        return JobOutput(
            model_version=card.version,
            model_checksum=card.checksum,
            device=str(synthesizer.device),
            timings=timings,
            series_uid=result.series_uid,
            path=str(output_folder),
            count=len(result.datasets) + len(result.uncertainty_datasets),
            uncertainty=result.uncertainty,
            confidence=None if result.uncertainty is None else confidence(result.uncertainty),
            held=held,
        )

    def _why_held(self, job: ClaimedJob, result: SynthesisResult) -> str | None:
        """Why the synthesis must wait for an admin instead of being sent; None: it need not."""
        reasons = []
        beyond = result.overshoot_note()
        if beyond is not None:
            limit_ml = self._output_settings.hold_overshoot_above_ml
            if result.overshoot.volume_ml > limit_ml:
                reasons.append(f"{beyond}, above [output] hold_overshoot_above_ml {limit_ml:g}")
            else:
                log.warning("job %d: %s; sent, under hold_overshoot_above_ml", job.id, beyond)
        limit = job.hold_uncertainty_above
        if limit is not None and result.uncertainty is not None and result.uncertainty > limit:
            reasons.append(
                f"uncertainty {result.uncertainty:.4f} is above the route's "
                f"hold_uncertainty_above {limit:g}"
            )
        if not reasons:
            return None
        return f"held: {'; '.join(reasons)}; dicomnode retry {job.id} sends it anyway"

    def synthesizer(self, model_name: str) -> Synthesizer:
        """The active version of ``model_name``, loaded once and reused while it stays active."""
        return self._synthesizers.get(self._registry.active_path(model_name))
