"""The inference worker: claim jobs, run the warm model in batches, write results, queue deliveries.

Image models (chest X-ray) take a batch of jobs in one forward pass and write one SR per
series; with ``[outputs] heatmaps = ["sc"]`` the same pass gives a Grad-CAM map of every
finding reported Present, written first as a Secondary Capture per finding
(:mod:`pacsnode.writers.heatmap`) that the SR then points to. Volume models take one job
at a time and assemble the series into a volume (:mod:`pacsnode.volumes`): a classifier
(CT PE) writes an SR plus, for a positive exam, a Key Object Selection of the most
suspicious slices; a segmenter (CT kidney) writes a DICOM SEG on the source slices and an
SR with the measured volumes that references it. A series that cannot become a volume
(gap, mixed orientation, localizer only...) fails permanently with the reason recorded.

Lifecycle: ``initialize()`` loads every enabled model once (they stay warm),
``loop(now)`` does one round of work and returns how many jobs it finished,
``shutdown()`` releases the models. Results are committed only if this worker
still holds the job's attempt (fencing), so a job taken over after a lapsed
lease never records two outcomes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path

import torch
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacsnode import eventlog, findings, queue
from pacsnode.config import Config
from pacsnode.db import utcnow
from pacsnode.errors import InputError, InvalidDatasetError
from pacsnode.manifest import Manifest
from pacsnode.measurements import measure
from pacsnode.metrics import Metrics
from pacsnode.models import Model, load_model
from pacsnode.models.base import (
    ImageClassifier,
    ImageResult,
    VolumeClassifier,
    VolumeSegmenter,
    default_device,
)
from pacsnode.spool import write_durably
from pacsnode.tables import Delivery, DeliveryState, Instance, Job, Output, Series, Study
from pacsnode.volumes import Volume, load_volume, plan_volume, read_slice_refs
from pacsnode.writers.heatmap import build_heatmap_images, heatmap_uids
from pacsnode.writers.kos import build_key_images
from pacsnode.writers.seg import build_segmentation
from pacsnode.writers.sr import (
    build_measurement_report,
    build_segmentation_report,
    build_series_report,
    result_uids,
)

log = logging.getLogger(__name__)

HEATMAP_THREADS = 2


@dataclass(frozen=True)
class Ticket:
    """What a worker needs to run one claimed job outside the claiming transaction."""

    job_id: int
    attempts: int
    study_uid: str
    series_uid: str
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class ResultFile:
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    kind: str
    path: Path


def resolve_device(name: str) -> torch.device:
    return default_device() if name == "auto" else torch.device(name)


class Worker:
    def __init__(
        self,
        config: Config,
        sessions: sessionmaker[Session],
        worker_id: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.worker_id = worker_id or queue.worker_identity()
        self.metrics = metrics or Metrics()
        self.models: dict[str, Model] = {}
        # a radiograph's heatmap images are built side by side (measured: see README, Speed)
        self.pool = ThreadPoolExecutor(HEATMAP_THREADS, thread_name_prefix="pacsnode-heatmap")

    def initialize(self) -> None:
        device = resolve_device(self.config.models.device)
        for name in self.config.models.enabled:
            started = time.monotonic()
            self.models[name] = load_model(self.config.models.dir / name, device)
            self.metrics.model_loaded(name, time.monotonic() - started)
            m = self.models[name].manifest
            log.info("model %s %s loaded on %s", m.name, m.version, device)
        with self.sessions.begin() as session:
            queue.release_orphans(session, Job, utcnow())

    def shutdown(self) -> None:
        self.models.clear()
        self.pool.shutdown()

    def loop(self, now: datetime | None = None) -> int:
        """Run at most one batch per model; returns the number of jobs finished."""
        finished = 0
        for name, model in self.models.items():
            if isinstance(model, VolumeClassifier | VolumeSegmenter):
                for ticket in self._claim(name, 1, now or utcnow()):
                    self._run_volume(model, ticket)
                    finished += 1
                continue
            tickets = self._claim(name, 1, now or utcnow())
            if tickets and tickets[0].attempts == 1 and model.manifest.batch_size > 1:
                # a job tried before runs alone: if it kills the worker, only it is charged
                more = model.manifest.batch_size - 1
                tickets += self._claim(name, more, now or utcnow(), first_attempts_only=True)
            if tickets:
                self._run_batch(model, tickets)
                finished += len(tickets)
        return finished

    def _claim(
        self, model_name: str, limit: int, now: datetime, first_attempts_only: bool = False
    ) -> list[Ticket]:
        with self.sessions.begin() as session:
            jobs = queue.claim(
                session,
                [model_name],
                self.worker_id,
                now,
                self.config.queue,
                limit=limit,
                first_attempts_only=first_attempts_only,
            )
            tickets = []
            for job in jobs:
                series_uid, study_uid = session.execute(
                    select(Series.series_uid, Study.study_uid)
                    .join(Study, Series.study_id == Study.id)
                    .where(Series.id == job.series_id)
                ).one()
                paths = session.scalars(
                    select(Instance.path)
                    .where(Instance.series_id == job.series_id)
                    .order_by(Instance.sop_instance_uid)
                ).all()
                tickets.append(
                    Ticket(job.id, job.attempts, study_uid, series_uid, tuple(map(Path, paths)))
                )
            return tickets

    def _run_batch(self, model: ImageClassifier, tickets: Sequence[Ticket]) -> None:
        """Infer all tickets in one pass; isolate a bad input to its own job."""
        inputs: dict[Ticket, list[Dataset]] = {}
        for ticket in tickets:
            try:
                if not ticket.paths:  # moved away between routing and claim
                    raise InputError(f"series {ticket.series_uid}: no instances left")
                inputs[ticket] = [_read_instance(p) for p in ticket.paths]
            except InputError as exc:
                self._fail(ticket, str(exc), permanent=True)
        if not inputs:
            return
        heatmaps = "sc" in self.config.outputs.heatmaps
        try:
            try:
                flat = [ds for datasets in inputs.values() for ds in datasets]
                results = model.predict(flat, heatmaps=heatmaps)
                by_ticket = _split(results, inputs)
            except InputError:
                by_ticket = {}
                for ticket, datasets in inputs.items():
                    try:
                        by_ticket[ticket] = model.predict(datasets, heatmaps=heatmaps)
                    except InputError as exc:
                        self._fail(ticket, str(exc), permanent=True)
            for ticket, ticket_results in by_ticket.items():
                try:
                    outputs = self._write_sr(model, inputs[ticket], ticket_results, ticket)
                except (InputError, InvalidDatasetError) as exc:  # this job's sources
                    self._fail(ticket, str(exc), permanent=True)
                    continue
                except Exception as exc:  # a job's boundary: its writer must not fail the batch
                    log.exception("job %d: writing its results failed", ticket.job_id)
                    self._fail(ticket, f"{type(exc).__name__}: {exc}", permanent=False)
                    continue
                self._succeed(ticket, outputs)
        except Exception as exc:  # the worker's main loop: one bad batch must not stop the node
            log.exception("batch of %d jobs failed", len(tickets))
            for ticket in tickets:
                self._fail(ticket, f"{type(exc).__name__}: {exc}", permanent=False)

    def _run_volume(self, model: VolumeClassifier | VolumeSegmenter, ticket: Ticket) -> None:
        """One CT series: assemble the volume, run the model, write its DICOM outputs."""
        try:
            try:
                headers = [_read_header(p) for p in ticket.paths]
                volume = _volume(ticket)
                if isinstance(model, VolumeSegmenter):
                    outputs = self._segment(model, headers, volume, ticket)
                else:
                    outputs = self._classify(model, headers, volume, ticket)
            except InputError as exc:
                self._fail(ticket, str(exc), permanent=True)
                return
            self._succeed(ticket, outputs)
        except Exception as exc:  # the worker's main loop: one bad series must not stop the node
            log.exception("job %d failed", ticket.job_id)
            self._fail(ticket, f"{type(exc).__name__}: {exc}", permanent=False)

    def _classify(
        self, model: VolumeClassifier, headers: list[Dataset], volume: Volume, ticket: Ticket
    ) -> list[ResultFile]:
        """SR of the exam labels, plus key images when slices are positive."""
        result = model.classify(volume)
        manifest = model.manifest
        outputs = [
            self._write(ticket, build_series_report(headers, result, manifest), "sr", manifest)
        ]
        key_images = build_key_images(headers, result, manifest)
        if key_images is not None:
            outputs.append(self._write(ticket, key_images, "ko", manifest))
        return outputs

    def _segment(
        self, model: VolumeSegmenter, headers: list[Dataset], volume: Volume, ticket: Ticket
    ) -> list[ResultFile]:
        """SEG first (the SR references its segments), then the SR with the volumes."""
        result = model.segment(volume)
        manifest = model.manifest
        seg = build_segmentation(headers, result, manifest)
        outputs = []
        if seg is not None:
            outputs.append(self._write(ticket, seg, "seg", manifest))
        report = build_segmentation_report(headers, result, seg, measure(result), manifest)
        outputs.append(self._write(ticket, report, "sr", manifest))
        return outputs

    def _write(
        self,
        ticket: Ticket,
        ds: Dataset,
        kind: str,
        manifest: Manifest,
        uids: tuple[str, str] | None = None,
    ) -> ResultFile:
        """Store ``ds`` durably under the outputs; ``uids``: the (series, instance) UIDs it
        must have, by default ``result_uids()`` of ``kind`` (one document per series)."""
        series_uid, sop_uid = uids or result_uids(ticket.series_uid, manifest, kind)
        if (str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)) != (series_uid, sop_uid):
            raise RuntimeError(f"{kind} writer produced UIDs other than the derived ones")
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        path = self.config.storage.output_dir / ticket.study_uid / series_uid / f"{sop_uid}.dcm"
        write_durably(path, buffer.getbuffer())
        return ResultFile(sop_uid, str(ds.SOPClassUID), series_uid, kind, path)

    def _write_sr(
        self,
        model: ImageClassifier,
        sources: Sequence[Dataset],
        results: Sequence[ImageResult],
        ticket: Ticket,
    ) -> list[ResultFile]:
        """The heatmap SCs of the positive findings (if any), then the SR that points to them."""
        manifest = model.manifest
        outputs = []
        heatmaps: dict[tuple[str, str], Dataset] = {}
        for index, (source, result) in enumerate(zip(sources, results, strict=True)):
            images = build_heatmap_images(
                source,
                result,
                manifest,
                image_index=index,
                encoding=self.config.outputs.heatmap_encoding,
                pool=self.pool,
            )
            for label, sc in images.items():
                uids = heatmap_uids(ticket.series_uid, result.sop_instance_uid, manifest, label)
                # outputs.kind holds 16 characters: the label is in the UID, not the kind
                outputs.append(self._write(ticket, sc, "heatmap", manifest, uids))
                heatmaps[(result.sop_instance_uid, label)] = sc
        sr = build_measurement_report(sources, results, manifest, heatmaps=heatmaps)
        outputs.append(self._write(ticket, sr, "sr", manifest))
        return outputs

    def _succeed(self, ticket: Ticket, outputs: Sequence[ResultFile]) -> None:
        manifests = [model.manifest for model in self.models.values()]
        verdicts = findings.from_outputs(ticket.series_uid, outputs, manifests)
        now = utcnow()
        with self.sessions.begin() as session:
            job = queue.still_owned(session, ticket.job_id, self.worker_id, ticket.attempts)
            if job is None:
                log.warning("job %d was taken over; discarding this result", ticket.job_id)
                return
            for result in outputs:
                output = _upsert_output(session, job, result, now)
                for dest in self.config.destinations:
                    _schedule_delivery(session, output, dest.name, now)
            findings.record(session, job.id, verdicts, now)
            queue.transition(session, job, queue.JobState.SUCCEEDED, now)
            self.metrics.job_succeeded(job)

    def _fail(self, ticket: Ticket, error: str, *, permanent: bool) -> None:
        now = utcnow()
        with self.sessions.begin() as session:
            job = queue.still_owned(session, ticket.job_id, self.worker_id, ticket.attempts)
            if job is not None:
                queue.fail(session, job, error, now, self.config.queue, permanent=permanent)


def _volume(ticket: Ticket) -> Volume:
    return load_volume(plan_volume(read_slice_refs(ticket.paths), ticket.series_uid))


def _read_header(path: Path) -> Dataset:
    try:
        return dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read spooled instance {path.name}: {exc}") from exc


def _read_instance(path: Path) -> Dataset:
    try:
        return dcmread(path)
    except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read spooled instance {path.name}: {exc}") from exc


def _split(
    results: Sequence[ImageResult], inputs: dict[Ticket, list[Dataset]]
) -> dict[Ticket, list[ImageResult]]:
    out: dict[Ticket, list[ImageResult]] = {}
    start = 0
    for ticket, datasets in inputs.items():
        out[ticket] = list(results[start : start + len(datasets)])
        start += len(datasets)
    return out


def _upsert_output(session: Session, job: Job, result: ResultFile, now: datetime) -> Output:
    output = session.scalar(
        select(Output).where(Output.sop_instance_uid == result.sop_instance_uid)
    )
    if output is None:
        output = Output(sop_instance_uid=result.sop_instance_uid, created_at=now)
        session.add(output)
    output.job_id = job.id
    output.sop_class_uid = result.sop_class_uid
    output.series_uid = result.series_uid
    output.kind = result.kind
    output.path = str(result.path)
    session.flush()
    return output


def _schedule_delivery(session: Session, output: Output, destination: str, now: datetime) -> None:
    """(Re)queue delivery of ``output``; a rerun's new content must reach the PACS again."""
    delivery = session.scalar(
        select(Delivery).where(Delivery.output_id == output.id, Delivery.destination == destination)
    )
    if delivery is None:
        delivery = Delivery(output_id=output.id, destination=destination, created_at=now)
        session.add(delivery)
    delivery.state = DeliveryState.PENDING
    delivery.attempts = 0
    delivery.not_before = now
    delivery.lease_until = None
    delivery.worker_id = None
    delivery.last_error = None
    delivery.updated_at = now
    eventlog.record(
        session,
        "delivery-pending",
        f"output {output.sop_instance_uid} queued for {destination}",
        now,
        job_id=output.job_id,
    )
