"""Prometheus metrics: counters the stages bump as things happen, gauges read at scrape time.

Each :class:`~pacsnode.service.Node` owns one :class:`Metrics` with its own
``CollectorRegistry`` (no module-level state) and hands it to its components. Components
built without one make a private, never-served instance, so library users and tests need
not care. The C-STORE path only increments in-memory counters; the stage latencies are
observed from the database timestamps when a stage happens (series completed, job
succeeded, delivery recorded); job and delivery counts by state are read from the
database by a collector when Prometheus scrapes, so they are right whichever process
changed them.

No label carries patient data: AE titles, modalities, model and destination names only.
Label values that come from the network (calling AE title, modality) are capped in
number, so a peer that invents AE titles cannot grow the scrape without bound.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from pacsnode.config import MetricsConfig
from pacsnode.tables import Delivery, DeliveryState, Job, JobState, Series
from pacsnode.upperlayer import AssociationObserver, AssociationRecord

log = logging.getLogger(__name__)

# seconds: a radiograph's stages take well under a second, a CT's completion waits its
# quiet period, a delivery to a PACS that was down may take hours of retries
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 14400)
OTHER = "other"
MAX_LABEL_VALUES = 64
_WAITING_JOBS = (JobState.QUEUED, JobState.FAILED)
_WAITING_DELIVERIES = (DeliveryState.PENDING, DeliveryState.FAILED)


class BoundedLabel:
    """Passes label values through until ``limit`` distinct ones were seen, then ``"other"``."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


class Metrics:
    """The node's metrics; one instance per process, passed to every component."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.port: int | None = None
        self._server: WSGIServer | None = None
        self._aet = BoundedLabel()
        self._modality = BoundedLabel()
        reg = self.registry
        self.instances_received = Counter(
            "pacsnode_instances_received",
            "Instances stored (C-STORE answered success), by calling AE title and modality.",
            ["calling_aet", "modality"],
            registry=reg,
        )
        self.bytes_received = Counter(
            "pacsnode_received_bytes",
            "Dataset bytes of the instances stored, by calling AE title.",
            ["calling_aet"],
            registry=reg,
        )
        self.instances_refused = Counter(
            "pacsnode_instances_refused",
            "C-STOREs answered with a failure status (counted when the association ends).",
            registry=reg,
        )
        self.associations = Counter(
            "pacsnode_associations",
            "Connections ended, by their result: accepted, rejected (A-ASSOCIATE-RJ) or failed.",
            ["result"],
            registry=reg,
        )
        self.associations_open = Gauge(
            "pacsnode_associations_open", "Accepted associations still open.", registry=reg
        )
        self.completion_seconds = Histogram(
            "pacsnode_completion_seconds",
            "Series first instance received -> series complete.",
            ["modality"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.inference_seconds = Histogram(
            "pacsnode_inference_seconds",
            "Series complete -> job succeeded (queue wait and inference), by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.delivery_seconds = Histogram(
            "pacsnode_delivery_seconds",
            "Job succeeded -> result delivered, one per delivery, by destination.",
            ["destination"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.end_to_end_seconds = Histogram(
            "pacsnode_end_to_end_seconds",
            "Series last instance received -> result delivered, one per delivery, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.delivery_failures = Counter(
            "pacsnode_delivery_failures",
            "Delivery attempts that failed (to be retried, or dead), by destination.",
            ["destination"],
            registry=reg,
        )
        self.inputs_declined = Counter(
            "pacsnode_inputs_declined",
            "Inputs a gate kept from a model, by model and gate: body_part, description, view, "
            "age (header scope), content, region, contrast (pixels), ood (out of distribution).",
            ["model", "gate"],
            registry=reg,
        )
        self.inputs_flagged = Counter(
            "pacsnode_inputs_flagged",
            "Inputs that failed a gate but were read anyway (on_gate_failure = flag), by model "
            "and gate; their results are marked outside the validated input range.",
            ["model", "gate"],
            registry=reg,
        )
        self.model_load_seconds = Gauge(
            "pacsnode_model_load_seconds",
            "Time this process took to load the model at start.",
            ["model"],
            registry=reg,
        )

    # receiver: in-memory counters only, this runs on the association's thread
    def instance_stored(self, calling_aet: str, modality: str, size: int) -> None:
        aet = self._aet(calling_aet)
        self.instances_received.labels(aet, self._modality(modality)).inc()
        self.bytes_received.labels(aet).inc(size)

    def observe_associations(self, inner: AssociationObserver) -> AssociationObserver:
        """Wrap the audit's observer so association ends are counted too."""
        return _CountingObserver(inner, self)

    # the stages, observed from the timestamps the database now holds
    def series_completed(self, series: Series) -> None:
        seconds = _seconds(series.first_received_at, series.completed_at)
        if seconds is not None:
            self.completion_seconds.labels(self._modality(series.modality)).observe(seconds)

    def job_succeeded(self, job: Job) -> None:
        seconds = _seconds(job.series.completed_at, job.finished_at)
        if seconds is not None:
            self.inference_seconds.labels(job.model_name).observe(seconds)

    def delivery_recorded(self, delivery: Delivery, error: str | None) -> None:
        if error is not None:
            self.delivery_failures.labels(delivery.destination).inc()
            return
        job = delivery.output.job
        seconds = _seconds(job.finished_at, delivery.delivered_at)
        if seconds is not None:
            self.delivery_seconds.labels(delivery.destination).observe(seconds)
        seconds = _seconds(job.series.last_received_at, delivery.delivered_at)
        if seconds is not None:
            self.end_to_end_seconds.labels(job.model_name).observe(seconds)

    def input_declined(self, model: str, gate: str) -> None:
        self.inputs_declined.labels(model, gate).inc()

    def input_flagged(self, model: str, gate: str) -> None:
        self.inputs_flagged.labels(model, gate).inc()

    def model_loaded(self, model: str, seconds: float) -> None:
        self.model_load_seconds.labels(model).set(seconds)

    # serving
    def watch_database(
        self, engine: Engine, models: Sequence[str], destinations: Sequence[str]
    ) -> None:
        """Add the job and delivery gauges, read from ``engine`` at every scrape."""
        self.registry.register(DatabaseCollector(engine, models, destinations))

    def serve(self, cfg: MetricsConfig, offset: int = 0) -> int | None:
        """Listen on ``cfg.host``:``cfg.port + offset`` (port 0: any free one); the bound
        port, or None when it cannot bind: metrics are not worth refusing images over."""
        port = cfg.port + offset if cfg.port else 0
        try:
            self._server, _thread = start_http_server(port, cfg.host, self.registry)
        except OSError as exc:
            log.error(
                "metrics: cannot listen on %s:%d (%s); serving without metrics", cfg.host, port, exc
            )
            return None
        self.port = int(self._server.server_port)
        log.info("metrics on http://%s:%d/metrics", cfg.host, self.port)
        return self.port

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _CountingObserver:
    """An :class:`~pacsnode.upperlayer.AssociationObserver` that counts, then defers."""

    def __init__(self, inner: AssociationObserver, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    def opened(self, record: AssociationRecord) -> None:
        self.metrics.associations_open.inc()
        self.inner.opened(record)

    def closed(self, record: AssociationRecord) -> None:
        metrics = self.metrics
        metrics.associations.labels(record.result).inc()
        if record.result == "accepted":
            metrics.associations_open.dec()
        if record.refused:
            metrics.instances_refused.inc(record.refused)
        self.inner.closed(record)


class DatabaseCollector(Collector):
    """Jobs by model and state, deliveries by destination and state, and queue depth.

    Two grouped counts on indexed state columns per scrape; every configured model and
    destination is reported with all states, zeros included, so series never vanish.
    A database that does not answer gives ``pacsnode_database_up 0``, not a failed scrape.
    """

    def __init__(self, engine: Engine, models: Sequence[str], destinations: Sequence[str]) -> None:
        self.engine = engine
        self.models = tuple(models)
        self.destinations = tuple(destinations)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("pacsnode_database_up", "1 when the database answered this scrape.")
        try:
            with self.engine.connect() as connection:
                job_rows = connection.execute(
                    select(Job.model_name, Job.state, func.count()).group_by(
                        Job.model_name, Job.state
                    )
                ).all()
                delivery_rows = connection.execute(
                    select(Delivery.destination, Delivery.state, func.count()).group_by(
                        Delivery.destination, Delivery.state
                    )
                ).all()
        except SQLAlchemyError as exc:
            log.warning("metrics: database gauges unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = {(model, JobState(state).value): n for model, state, n in job_rows}
        deliveries = {(dest, DeliveryState(state).value): n for dest, state, n in delivery_rows}
        yield _by_state(
            "pacsnode_jobs", "Jobs by model and state.", "model", self.models, JobState, jobs
        )
        yield _by_state(
            "pacsnode_deliveries",
            "Deliveries by destination and state.",
            "destination",
            self.destinations,
            DeliveryState,
            deliveries,
        )
        depth = GaugeMetricFamily(
            "pacsnode_queue_depth",
            "Work waiting: jobs queued or failed awaiting retry; deliveries pending or failed.",
            labels=["queue"],
        )
        depth.add_metric(["jobs"], sum(n for (_, s), n in jobs.items() if s in _WAITING_JOBS))
        depth.add_metric(
            ["deliveries"], sum(n for (_, s), n in deliveries.items() if s in _WAITING_DELIVERIES)
        )
        yield depth


def _by_state(
    name: str,
    documentation: str,
    label: str,
    known: Sequence[str],
    states: type[JobState] | type[DeliveryState],
    counts: dict[tuple[str, str], int],
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label, "state"])
    keys = {key for key, _ in counts} | set(known)
    for key in sorted(keys):
        for state in states:
            family.add_metric([key, state.value], counts.get((key, state.value), 0))
    return family
