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

Before a model reads anything, its gates run (:mod:`pacsnode.gates`): the header scope of
each image (routing judged the series already), the content gate on the pixels, and after
the forward pass the out-of-distribution score of the model's own features. An input that
fails is declined (no finding; a "not analysed" notice, :mod:`pacsnode.writers.notice`)
or, with ``on_gate_failure = "flag"``, read and marked. A job all of whose inputs are
declined ends ``declined`` with the reason, never ``dead``.

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

from pacsnode import eventlog, findings, queue, scope
from pacsnode.config import Config
from pacsnode.db import utcnow
from pacsnode.errors import InputError, InvalidDatasetError
from pacsnode.gates import GateVerdict, ood
from pacsnode.gates.ct import CtGate, contrast_verdict, region_verdict
from pacsnode.gates.radiograph import RadiographGate
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
from pacsnode.selection import NOT_ELIGIBLE, NOT_SELECTED
from pacsnode.spool import write_durably
from pacsnode.tables import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    Output,
    RoutingDecision,
    Series,
    Study,
)
from pacsnode.volumes import Volume, load_volume, plan_volume, read_slice_refs
from pacsnode.writers.heatmap import build_heatmap_images, heatmap_uids
from pacsnode.writers.kos import build_key_images
from pacsnode.writers.notice import build_notice_image, build_notice_report
from pacsnode.writers.seg import build_segmentation
from pacsnode.writers.sr import (
    InputCheck,
    build_measurement_report,
    build_segmentation_report,
    build_series_report,
    result_uids,
)

log = logging.getLogger(__name__)

HEATMAP_THREADS = 2
GATES_DIR = "gates"  # content gates live in models/gates/<name>/
CONTRAST_SEEN = 0.5  # the content gate's "enhanced" probability that counts as contrast


@dataclass(frozen=True)
class Ticket:
    """What a worker needs to run one claimed job outside the claiming transaction."""

    job_id: int
    attempts: int
    study_uid: str
    series_uid: str
    paths: tuple[Path, ...]
    declined: str | None = None  # routing's scope refusal: write the notice, run no model


@dataclass(frozen=True)
class Screened:
    """What the gates made of one input: its refusal (None: passed) and the numbers."""

    gate: str | None = None  # body_part, content, region, contrast, ood...
    reason: str | None = None
    scores: dict[str, float] | None = None


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
        self.content_gates: dict[str, RadiographGate | CtGate] = {}
        self.ood: dict[str, ood.OodStats] = {}
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
            self._load_gates(self.models[name], device)
        with self.sessions.begin() as session:
            queue.release_orphans(session, Job, utcnow())

    def _load_gates(self, model: Model, device: torch.device) -> None:
        """The model's content gate (shared between models that name the same one) and its
        out-of-distribution statistics."""
        manifest = model.manifest
        model_dir = self.config.models.dir / manifest.name
        stats = ood.load(model_dir, manifest)
        if stats is not None:
            self.ood[manifest.name] = stats
        gate_name = manifest.accepts.scope.content_gate
        if gate_name is None:
            return
        kind = CtGate if isinstance(model, VolumeClassifier | VolumeSegmenter) else RadiographGate
        gate = next(  # models naming the same gate share one loaded copy
            (g for g in self.content_gates.values() if isinstance(g, kind) and g.name == gate_name),
            None,
        ) or kind.load(self.config.models.dir / GATES_DIR / gate_name, device)
        self.content_gates[manifest.name] = gate
        log.info("model %s: content gate %s %s", manifest.name, gate.name, gate.version)

    def shutdown(self) -> None:
        self.models.clear()
        self.content_gates.clear()
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
                decision = session.scalar(
                    select(RoutingDecision).where(
                        RoutingDecision.series_id == job.series_id,
                        RoutingDecision.model_name == model_name,
                    )
                )
                declined = None
                if decision is not None and not decision.accepted:  # routing's scope refusal
                    declined = decision.reason.removeprefix(NOT_ELIGIBLE)
                tickets.append(
                    Ticket(
                        job.id,
                        job.attempts,
                        study_uid,
                        series_uid,
                        tuple(map(Path, paths)),
                        declined,
                    )
                )
            return tickets

    def _run_batch(self, model: ImageClassifier, tickets: Sequence[Ticket]) -> None:
        """Gate every image, infer the admitted ones of all tickets in one pass, write each
        job's results; isolate a bad input to its own job."""
        inputs: dict[Ticket, list[Dataset]] = {}
        for ticket in tickets:
            try:
                if not ticket.paths:  # moved away between routing and claim
                    raise InputError(f"series {ticket.series_uid}: no instances left")
                if ticket.declined is not None:
                    headers = [_read_header(p) for p in ticket.paths]
                    self._decline(ticket, model.manifest, headers, ticket.declined)
                    continue
                inputs[ticket] = [_read_instance(p) for p in ticket.paths]
            except InputError as exc:
                self._fail(ticket, str(exc), permanent=True)
        if not inputs:
            return
        heatmaps = "sc" in self.config.outputs.heatmaps
        try:
            screened: dict[Ticket, dict[str, Screened]] = {}
            for ticket in list(inputs):
                try:
                    screened[ticket] = self._screen_images(model, inputs[ticket])
                except InputError as exc:
                    self._fail(ticket, str(exc), permanent=True)
                    del inputs[ticket]
            policy = self._policy(model.manifest)
            admitted = {
                ticket: [
                    ds
                    for ds in datasets
                    if not _kept_out(screened[ticket].get(str(ds.SOPInstanceUID)), policy)
                ]
                for ticket, datasets in inputs.items()
            }
            try:
                flat = [ds for datasets in admitted.values() for ds in datasets]
                results = model.predict(flat, heatmaps=heatmaps)
                by_ticket = _split(results, admitted)
            except InputError:
                by_ticket = {}
                for ticket, datasets in admitted.items():
                    try:
                        by_ticket[ticket] = model.predict(datasets, heatmaps=heatmaps)
                    except InputError as exc:
                        self._fail(ticket, str(exc), permanent=True)
            for ticket, ticket_results in by_ticket.items():
                checks = screened[ticket]
                kept = self._screen_features(model.manifest, ticket_results, checks)
                sources = [ds for ds in admitted[ticket] if str(ds.SOPInstanceUID) in kept]
                results_kept = [r for r in ticket_results if r.sop_instance_uid in kept]
                refused = _refusals(inputs[ticket], checks, policy)
                try:
                    outputs = []
                    if results_kept:
                        outputs = self._write_sr(model, sources, results_kept, ticket, checks)
                    if refused:
                        outputs += self._notice(ticket, model.manifest, inputs[ticket], refused)
                except (InputError, InvalidDatasetError) as exc:  # this job's sources
                    self._fail(ticket, str(exc), permanent=True)
                    continue
                except Exception:  # a job's boundary: its writer must not fail the batch
                    log.exception("job %d: writing its results failed", ticket.job_id)
                    self._fail(ticket, _internal("writing its results", ticket), permanent=False)
                    continue
                if results_kept:
                    self._succeed(ticket, outputs)
                else:
                    self._finish_declined(ticket, model.manifest, outputs, refused)
        except Exception:  # the worker's main loop: one bad batch must not stop the node
            log.exception("batch of %d jobs failed", len(tickets))
            for ticket in tickets:
                self._fail(ticket, _internal("running the batch", ticket), permanent=False)

    def _policy(self, manifest: Manifest) -> str:
        return self.config.models.gate_policy(manifest.name)

    def _screen_images(
        self, model: ImageClassifier, datasets: Sequence[Dataset]
    ) -> dict[str, Screened]:
        """Header scope of each image, then the content gate on those the header admits."""
        manifest = model.manifest
        out: dict[str, Screened] = {}
        for ds in datasets:
            refusal = scope.check(scope.facts(ds), manifest.accepts, manifest.name)
            if refusal is not None:
                self.metrics.input_declined(manifest.name, refusal.kind)
                out[str(ds.SOPInstanceUID)] = Screened(refusal.kind, refusal.reason)
        gate = self.content_gates.get(manifest.name)
        rest = [ds for ds in datasets if str(ds.SOPInstanceUID) not in out]
        if gate is None or not rest or not isinstance(gate, RadiographGate):
            return out
        for ds, verdict in zip(rest, gate.check(rest), strict=True):
            out[str(ds.SOPInstanceUID)] = self._judged(manifest, "content", verdict)
        return out

    def _judged(self, manifest: Manifest, gate: str, verdict: GateVerdict) -> Screened:
        """A pixel gate's verdict as the worker keeps it, counted in the metrics."""
        if verdict.passed:
            return Screened(scores=dict(verdict.scores))
        if self._policy(manifest) == "flag":
            self.metrics.input_flagged(manifest.name, gate)
        else:
            self.metrics.input_declined(manifest.name, gate)
        return Screened(gate, verdict.reason, dict(verdict.scores))

    def _screen_features(
        self, manifest: Manifest, results: Sequence[ImageResult], checks: dict[str, Screened]
    ) -> set[str]:
        """Out-of-distribution score of each result's features (into ``checks``; an earlier
        refusal keeps speaking); returns the SOP Instance UIDs whose results are sent."""
        stats = self.ood.get(manifest.name)
        policy = self._policy(manifest)
        for result in results:
            uid = result.sop_instance_uid
            if stats is None or result.features is None:
                continue
            prior = checks.get(uid, Screened())
            verdict = stats.verdict(float(stats.distances(result.features)[0]), "image")
            judged = self._judged(manifest, "ood", verdict)
            first = prior if prior.reason else judged
            checks[uid] = Screened(
                first.gate, first.reason, {**(prior.scores or {}), **verdict.scores}
            )
        return {
            r.sop_instance_uid
            for r in results
            if not _kept_out(checks.get(r.sop_instance_uid), policy)
        }

    def _run_volume(self, model: VolumeClassifier | VolumeSegmenter, ticket: Ticket) -> None:
        """One CT series: assemble the volume, gate it, run the model, write its outputs."""
        manifest = model.manifest
        try:
            try:
                headers = [_read_header(p) for p in ticket.paths]
                if ticket.declined is not None:
                    self._decline(ticket, manifest, headers, ticket.declined)
                    return
                volume = _volume(ticket)
                check = self._screen_volume(model, volume)
                if check.reason is not None and self._policy(manifest) != "flag":
                    self._decline(ticket, manifest, headers, check.reason)
                    return
                if self._switched_to_contrast(model, ticket, check):
                    return
                if isinstance(model, VolumeSegmenter):
                    outputs = self._segment(model, headers, volume, ticket, check)
                else:
                    outputs = self._classify(model, headers, volume, ticket, check)
            except InputError as exc:
                self._fail(ticket, str(exc), permanent=True)
                return
            self._succeed(ticket, outputs)
        except Exception:  # the worker's main loop: one bad series must not stop the node
            log.exception("job %d failed", ticket.job_id)
            self._fail(ticket, _internal("running the model", ticket), permanent=False)

    def _switched_to_contrast(
        self, model: VolumeClassifier | VolumeSegmenter, ticket: Ticket, check: Screened
    ) -> bool:
        """``prefer_contrast``: when routing chose this series for a contrast agent its header
        names but the pixels show none, read an eligible sibling that does show contrast.

        The sibling's job is queued and its routing decision says why; this job ends
        declined with the reason, and no notice, since the study is read. False when no
        switch was made (the series shows contrast, or no sibling does).
        """
        manifest = model.manifest
        criteria = manifest.accepts.ct
        gate = self.content_gates.get(manifest.name)
        enhanced = (check.scores or {}).get("enhanced")
        if criteria is None or not criteria.prefer_contrast or not isinstance(gate, CtGate):
            return False
        if enhanced is None or enhanced >= CONTRAST_SEEN:
            return False
        for series_id, series_uid, paths in self._eligible_siblings(ticket, manifest):
            try:
                sibling = gate.inspect(load_volume(plan_volume(read_slice_refs(paths), series_uid)))
            except InputError:
                continue
            if sibling.enhanced < CONTRAST_SEEN:
                continue
            reason = (
                f"no intravenous contrast seen in this series (enhanced {enhanced:.2f}) although "
                f"its header suggested it; series {series_uid}, which shows contrast "
                f"({sibling.enhanced:.2f}), is read instead"
            )
            now = utcnow()
            with self.sessions.begin() as session:
                job = queue.still_owned(session, ticket.job_id, self.worker_id, ticket.attempts)
                if job is None:
                    return True
                decision = session.scalar(
                    select(RoutingDecision).where(
                        RoutingDecision.series_id == series_id,
                        RoutingDecision.model_name == manifest.name,
                    )
                )
                if decision is not None:
                    decision.accepted = True
                    decision.reason = (
                        f"selected by the content gate: contrast seen ({sibling.enhanced:.2f}) "
                        f"while series {ticket.series_uid}, chosen by its header, shows none"
                    )
                    decision.decided_at = now
                queue.enqueue(session, series_id, manifest.name, manifest.version, now)
            self._finish_declined(ticket, manifest, [], reason)
            return True
        return False

    def _eligible_siblings(
        self, ticket: Ticket, manifest: Manifest
    ) -> list[tuple[int, str, tuple[Path, ...]]]:
        """Series of the ticket's study that routing found eligible but did not choose."""
        with self.sessions() as session:
            rows = session.execute(
                select(Series.id, Series.series_uid)
                .join(Study, Series.study_id == Study.id)
                .join(RoutingDecision, RoutingDecision.series_id == Series.id)
                .where(
                    Study.study_uid == ticket.study_uid,
                    Series.series_uid != ticket.series_uid,
                    RoutingDecision.model_name == manifest.name,
                    RoutingDecision.reason.startswith(NOT_SELECTED),
                )
                .order_by(Series.id)
            ).all()
            return [
                (
                    series_id,
                    series_uid,
                    tuple(
                        Path(p)
                        for p in session.scalars(
                            select(Instance.path).where(Instance.series_id == series_id)
                        )
                    ),
                )
                for series_id, series_uid in rows
            ]

    def _screen_volume(self, model: VolumeClassifier | VolumeSegmenter, volume: Volume) -> Screened:
        """Region and contrast from the content gate, then out of distribution (its
        embedding against the model's training data); the first failure speaks."""
        manifest = model.manifest
        gate = self.content_gates.get(manifest.name)
        if not isinstance(gate, CtGate):
            return Screened()
        content = gate.inspect(volume)
        criteria = manifest.accepts.ct
        regions = manifest.accepts.scope.regions
        verdicts = [("region", region_verdict(content, regions))] if regions else []
        if criteria is not None and criteria.require_contrast:
            verdicts.append(("contrast", contrast_verdict(content, require=True)))
        stats = self.ood.get(manifest.name)
        if stats is not None:
            distance = float(stats.distances(content.features)[0])
            verdicts.append(("ood", stats.verdict(distance, "series")))
        scores: dict[str, float] = {"enhanced": content.enhanced, **content.region_scores}
        for _, verdict in verdicts:
            scores.update(verdict.scores)
        for gate_kind, verdict in verdicts:
            if not verdict.passed:
                judged = self._judged(manifest, gate_kind, verdict)
                return Screened(judged.gate, judged.reason, scores)
        return Screened(scores=scores)

    def _classify(
        self,
        model: VolumeClassifier,
        headers: list[Dataset],
        volume: Volume,
        ticket: Ticket,
        check: Screened,
    ) -> list[ResultFile]:
        """SR of the exam labels, plus key images when slices are positive."""
        result = model.classify(volume)
        manifest = model.manifest
        report = build_series_report(headers, result, manifest, input_check=_input_check(check))
        outputs = [self._write(ticket, report, "sr", manifest)]
        key_images = build_key_images(headers, result, manifest)
        if key_images is not None:
            outputs.append(self._write(ticket, key_images, "ko", manifest))
        return outputs

    def _segment(
        self,
        model: VolumeSegmenter,
        headers: list[Dataset],
        volume: Volume,
        ticket: Ticket,
        check: Screened,
    ) -> list[ResultFile]:
        """SEG first (the SR references its segments), then the SR with the volumes."""
        result = model.segment(volume)
        manifest = model.manifest
        seg = build_segmentation(headers, result, manifest)
        outputs = []
        if seg is not None:
            outputs.append(self._write(ticket, seg, "seg", manifest))
        report = build_segmentation_report(
            headers, result, seg, measure(result), manifest, input_check=_input_check(check)
        )
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
        checks: dict[str, Screened] | None = None,
    ) -> list[ResultFile]:
        """The heatmap SCs of the positive findings (if any), then the SR that points to them;
        ``checks``: what the gates made of each image, reported in the SR."""
        manifest = model.manifest
        checks = checks or {}
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
                outside=checks.get(result.sop_instance_uid, Screened()).reason,
            )
            for label, sc in images.items():
                uids = heatmap_uids(ticket.series_uid, result.sop_instance_uid, manifest, label)
                # outputs.kind holds 16 characters: the label is in the UID, not the kind
                outputs.append(self._write(ticket, sc, "heatmap", manifest, uids))
                heatmaps[(result.sop_instance_uid, label)] = sc
        input_checks = {
            r.sop_instance_uid: check
            for r in results
            if (check := _input_check(checks.get(r.sop_instance_uid))) is not None
        }
        sr = build_measurement_report(
            sources, results, manifest, heatmaps=heatmaps, input_checks=input_checks
        )
        outputs.append(self._write(ticket, sr, "sr", manifest))
        return outputs

    def _notice(
        self, ticket: Ticket, manifest: Manifest, sources: Sequence[Dataset], reason: str
    ) -> list[ResultFile]:
        """The "not analysed" SR and Secondary Capture, when ``[outputs] not_analysed``."""
        if not self.config.outputs.not_analysed:
            return []
        report = build_notice_report(sources, manifest, reason)
        image = build_notice_image(sources[0], manifest, reason)
        return [
            self._write(ticket, report, "notice", manifest),
            self._write(ticket, image, "notice-sc", manifest),
        ]

    def _decline(
        self, ticket: Ticket, manifest: Manifest, sources: Sequence[Dataset], reason: str
    ) -> None:
        """Keep the whole series from the model: notice (if on), then the job ``declined``."""
        try:
            outputs = self._notice(ticket, manifest, sources, reason)
        except (InputError, InvalidDatasetError) as exc:
            raise InputError(f"{reason}; and the notice cannot be written: {exc}") from exc
        self._finish_declined(ticket, manifest, outputs, reason)

    def _finish_declined(
        self, ticket: Ticket, manifest: Manifest, outputs: Sequence[ResultFile], reason: str
    ) -> None:
        now = utcnow()
        with self.sessions.begin() as session:
            job = queue.still_owned(session, ticket.job_id, self.worker_id, ticket.attempts)
            if job is None:
                log.warning("job %d was taken over; discarding its notice", ticket.job_id)
                return
            self._record_outputs(session, job, outputs, now)
            decision = session.scalar(
                select(RoutingDecision).where(
                    RoutingDecision.series_id == job.series_id,
                    RoutingDecision.model_name == manifest.name,
                )
            )
            if decision is not None and decision.accepted:
                decision.accepted = False
                decision.reason = f"declined when read: {reason}"
                decision.decided_at = now
            findings.record(session, job.id, {}, now)
            queue.transition(session, job, queue.JobState.DECLINED, now, error=reason)

    def _record_outputs(
        self, session: Session, job: Job, outputs: Sequence[ResultFile], now: datetime
    ) -> None:
        """The job's written files as outputs, each queued for every destination."""
        for result in outputs:
            output = _upsert_output(session, job, result, now)
            for dest in self.config.destinations:
                _schedule_delivery(session, output, dest.name, now)

    def _succeed(self, ticket: Ticket, outputs: Sequence[ResultFile]) -> None:
        manifests = [model.manifest for model in self.models.values()]
        verdicts = findings.from_outputs(ticket.series_uid, outputs, manifests)
        now = utcnow()
        with self.sessions.begin() as session:
            job = queue.still_owned(session, ticket.job_id, self.worker_id, ticket.attempts)
            if job is None:
                log.warning("job %d was taken over; discarding this result", ticket.job_id)
                return
            self._record_outputs(session, job, outputs, now)
            findings.record(session, job.id, verdicts, now)
            queue.transition(session, job, queue.JobState.SUCCEEDED, now)
            self.metrics.job_succeeded(job)

    def _fail(self, ticket: Ticket, error: str, *, permanent: bool) -> None:
        now = utcnow()
        with self.sessions.begin() as session:
            job = queue.still_owned(session, ticket.job_id, self.worker_id, ticket.attempts)
            if job is not None:
                queue.fail(session, job, error, now, self.config.queue, permanent=permanent)


def _internal(stage: str, ticket: Ticket) -> str:
    """The recorded reason of an error that is ours, not the input's: the traceback is in
    the log; the job is retried (a fixed node then succeeds)."""
    return (
        f"pacsnode failed while {stage} (an internal error, logged in full with job "
        f"{ticket.job_id}); it will be retried"
    )


def _input_check(check: Screened | None) -> InputCheck | None:
    """The SR's view of a gate outcome: distance, limit, and the reason when the input was
    let through although a pixel gate failed (``on_gate_failure = "flag"``); None when no
    pixel gate looked at it."""
    if check is None or (not check.scores and check.reason is None):
        return None
    scores = check.scores or {}
    return InputCheck(scores.get("ood_distance"), scores.get("ood_threshold"), check.reason)


def _kept_out(check: Screened | None, policy: str) -> bool:
    """Whether a gate keeps the input from the model: it failed one, and either the gate
    read the header (always final) or ``policy`` is "decline"."""
    if check is None or check.reason is None:
        return False
    return not (policy == "flag" and check.gate in PIXEL_GATES)


def _refusals(datasets: Sequence[Dataset], checks: dict[str, Screened], policy: str) -> str:
    """One sentence for the images kept from the model ("" when none was), for the notice."""
    refused = [
        (ds, check)
        for ds in datasets
        if _kept_out(check := checks.get(str(ds.SOPInstanceUID)), policy) and check is not None
    ]
    if not refused:
        return ""
    if len(datasets) == 1:
        return str(refused[0][1].reason)
    parts = [
        f"image {ds.get('InstanceNumber', '?')} ({ds.SOPInstanceUID}): {check.reason}"
        for ds, check in refused
    ]
    return f"{len(refused)} of {len(datasets)} images not analysed: " + "; ".join(parts)


PIXEL_GATES = frozenset({"content", "region", "contrast", "ood"})
"""Gates that look at the pixels; ``on_gate_failure = "flag"`` lets their inputs through."""


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
