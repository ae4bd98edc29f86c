"""/metrics in Prometheus' format: what the receivers count as they answer (C-STORE results,
summed over `serve` and its other receiver processes), and what the database holds, read
at each scrape, so that every process of the node (serve, workers on other machines) is
counted once, where the state is."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from node.receivers import COUNTERS_VARIABLE
from pipeline.model.registry import ModelRegistry, RegistryError
from pipeline.routing import Route
from pipeline.state.db import Delivery, Instance, Job, JobState, Series, utcnow
from pipeline.state.jobs import read_queue

INSTANCES = Counter(
    "dicomnode_instances",
    "C-STORE requests the node's receivers answered, by status (success, duplicate or a refusal)",
    ["status"],
)
# Synthesis of one series takes seconds on a GPU and a minute or more on a CPU.
SYNTHESIS_BUCKETS = (1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
SYNTHESIS_STAGES = ("load_s", "inference_s", "write_s")


class StateCollector(Collector):
    """Series, jobs, deliveries, queue, spool and models, as the database says now."""

    def __init__(self, sessions: sessionmaker, registry: ModelRegistry, routes: Sequence[Route]):
        self._sessions = sessions
        self._registry = registry
        self._models = sorted({route.model_name for route in routes})

    def collect(self) -> Iterator[Metric]:
        with self._sessions() as session:
            series = session.execute(select(Series.state, func.count()).group_by(Series.state))
            jobs = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
            deliveries = session.execute(
                select(Delivery.destination, Delivery.state, func.count()).group_by(
                    Delivery.destination, Delivery.state
                )
            ).all()
            queue = read_queue(session)
            spool = session.scalar(
                select(func.coalesce(func.sum(Instance.size), 0))
                .join(Series)
                .where(Series.purged_at.is_(None))
            )
            timings = session.scalars(
                select(Job.timings).where(Job.state == JobState.DONE, Job.timings.is_not(None))
            ).all()
            yield _by("dicomnode_series", "Series by state (routed: completed)", ["state"], series)
            yield _by("dicomnode_jobs", "Jobs by state", ["state"], jobs)
            yield _by(
                "dicomnode_deliveries",
                "Deliveries by destination and result",
                ["destination", "state"],
                deliveries,
            )
        yield GaugeMetricFamily(
            "dicomnode_queue_depth", "Jobs waiting for a worker", value=queue.depth
        )
        yield GaugeMetricFamily(
            "dicomnode_oldest_queued_job_seconds",
            "Age of the oldest queued job (0: none queued)",
            value=(utcnow() - queue.oldest).total_seconds() if queue.oldest else 0,
        )
        yield GaugeMetricFamily(
            "dicomnode_spool_bytes", "Bytes of received instances kept in the spool", value=spool
        )
        yield _histogram(timings)
        yield self._model_versions()

    def _model_versions(self) -> Metric:
        family = GaugeMetricFamily(
            "dicomnode_model_active",
            "The active version of each model a route names",
            labels=["model", "version"],
        )
        for name in self._models:
            try:
                family.add_metric([name, self._registry.active_version(name)], 1)
            except RegistryError:
                family.add_metric([name, "none"], 0)
        return family


def _by(name: str, documentation: str, labels: list[str], rows) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for *values, count in rows:
        family.add_metric([str(value) for value in values], count)
    return family


def _histogram(timings: list[dict]) -> Metric:
    seconds = [sum(t.get(stage, 0.0) for stage in SYNTHESIS_STAGES) for t in timings]
    buckets = [(str(le), sum(s <= le for s in seconds)) for le in SYNTHESIS_BUCKETS]
    buckets.append(("+Inf", len(seconds)))
    return HistogramMetricFamily(
        "dicomnode_synthesis_seconds",
        "Seconds a done job took to load, synthesize and write its series",
        buckets=buckets,
        sum_value=sum(seconds),
    )


def metrics_registry(
    sessions: sessionmaker, registry: ModelRegistry, routes: Sequence[Route]
) -> CollectorRegistry:
    """The receivers' counters and the database's state, for one /metrics."""
    combined = CollectorRegistry(auto_describe=False)
    if COUNTERS_VARIABLE in os.environ:
        # `serve` (node.receivers.share_counters): every receiver process's counters, summed.
        MultiProcessCollector(combined)
    else:  # an app built in a process of its own (tests): its counters
        from prometheus_client import REGISTRY

        combined.register(_Forward(REGISTRY))
    combined.register(StateCollector(sessions, registry, routes))
    return combined


class _Forward(Collector):
    """The process-wide registry's metrics (INSTANCES, the process' own) inside another."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        yield from self._source.collect()
