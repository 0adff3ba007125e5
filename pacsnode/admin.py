"""Administration: the repairs behind `pacsnode requeue`, `cancel`, `replay` and `destinations test`.

Plain functions on a session (the CLI commits), so tests call them directly; each
change goes through :func:`pacsnode.queue.transition` or :func:`pacsnode.queue.enqueue`
and so leaves its event in the audit trail. What cannot be done is an
:class:`~pacsnode.errors.AdminError` whose message says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pynetdicom import AE
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from pacsnode import eventlog, queue, routing
from pacsnode.config import DestinationConfig
from pacsnode.errors import AdminError
from pacsnode.manifest import Manifest
from pacsnode.tables import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    RoutingDecision,
    Series,
    Study,
)

VERIFICATION = "1.2.840.10008.1.1"


@dataclass(frozen=True)
class JobFilter:
    """Which jobs an admin command means; the given criteria all apply (AND)."""

    job_id: int | None = None
    study_uid: str | None = None
    accession: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    model: str | None = None
    failed: bool = False

    def is_empty(self) -> bool:
        return not any(
            (
                self.job_id is not None,
                self.study_uid,
                self.accession,
                self.since,
                self.until,
                self.model,
                self.failed,
            )
        )


def _job_query(criteria: JobFilter) -> Select[Job]:
    query = (
        select(Job)
        .join(Series, Job.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .order_by(Job.id)
    )
    if criteria.job_id is not None:
        query = query.where(Job.id == criteria.job_id)
    if criteria.study_uid:
        query = query.where(Study.study_uid == criteria.study_uid)
    if criteria.accession:
        query = query.where(Study.accession_number == criteria.accession)
    if criteria.since is not None:
        query = query.where(Job.created_at >= criteria.since)
    if criteria.until is not None:
        query = query.where(Job.created_at < criteria.until)
    if criteria.model:
        query = query.where(Job.model_name == criteria.model)
    if criteria.failed:
        query = query.where(Job.state.in_([JobState.FAILED, JobState.DEAD]))
    return query


def select_jobs(session: Session, criteria: JobFilter) -> list[Job]:
    """The jobs ``criteria`` name; refuses an empty filter (that would be every job)."""
    if criteria.is_empty():
        raise AdminError(
            "name the jobs: a job id, --study, --accession, --since, --model or --failed"
        )
    if criteria.since and criteria.until and criteria.until <= criteria.since:
        raise AdminError(f"--until {criteria.until} is not after --since {criteria.since}")
    return list(session.scalars(_job_query(criteria)))


@dataclass(frozen=True)
class Requeued:
    jobs: list[int]
    skipped: dict[int, str]
    deliveries: int


def requeue(
    session: Session,
    jobs: Sequence[Job],
    now: datetime,
    *,
    deliveries: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Requeued:
    """Queue ``jobs`` again (not those queued or running, nor a series whose instances are gone),
    and with ``deliveries`` every failed or dead delivery too; ``progress(done, total)`` is
    called after each job (the CLI's progress bar)."""
    done, skipped = [], {}
    for count, job in enumerate(jobs, 1):
        if progress is not None:
            progress(count, len(jobs))
        if job.state in (JobState.QUEUED, JobState.RUNNING):
            skipped[job.id] = f"already {job.state.value}"
        elif not _has_instances(session, job.series_id):
            skipped[job.id] = "its series has no instances left (purged or re-sent elsewhere)"
        else:
            queue.transition(session, job, JobState.QUEUED, now)
            done.append(job.id)
    revived = 0
    if deliveries:
        for delivery in session.scalars(
            select(Delivery).where(Delivery.state.in_([DeliveryState.FAILED, DeliveryState.DEAD]))
        ):
            delivery.state = DeliveryState.PENDING
            delivery.attempts = 0
            delivery.not_before = now
            delivery.updated_at = now
            delivery.worker_id = None
            delivery.lease_until = None  # last_error stays: the event log keeps the history
            eventlog.record(
                session,
                "delivery-requeued",
                f"delivery {delivery.id} to {delivery.destination} requeued by an administrator",
                now,
                job_id=delivery.output.job_id,
            )
            revived += 1
    return Requeued(done, skipped, revived)


def cancel(session: Session, job_id: int, now: datetime) -> Job:
    """Stop a queued, failed or running job; a running one's result is discarded by the worker's
    ownership check when it finishes. `pacsnode requeue JOB_ID` brings it back."""
    job = session.get(Job, job_id)
    if job is None:
        raise AdminError(f"no job {job_id}")
    if job.state in (JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED):
        raise AdminError(f"job {job_id} is {job.state.value}: nothing to cancel")
    queue.transition(session, job, JobState.CANCELLED, now, error="cancelled by an administrator")
    return job


def replay(
    session: Session, series_uid: str, manifest: Manifest, now: datetime, *, force: bool = False
) -> Job:
    """Run ``manifest``'s model on a stored series again (e.g. after a model update).

    The job of (series, model, version) is requeued, or created for a new version; its
    deterministic output UIDs make the new results replace the old ones of that version.
    A series the model does not accept is refused with routing's reason unless ``force``.
    """
    series = session.scalar(select(Series).where(Series.series_uid == series_uid))
    if series is None:
        raise AdminError(f"no series {series_uid}")
    if series.completed_at is None:
        raise AdminError(f"series {series_uid} is still arriving; it is routed once complete")
    rows = session.execute(
        select(Instance.sop_class_uid, Instance.view_position).where(
            Instance.series_id == series.id
        )
    ).all()
    if not rows:
        raise AdminError(f"series {series_uid} has no instances left (purged or re-sent elsewhere)")
    views = {(r[1] or "").strip() for r in rows}
    reason = routing.decide(manifest, series.modality, {r[0] for r in rows}, views)
    if reason is None and manifest.accepts.ct is None:
        first = session.scalar(
            select(func.min(Instance.path)).where(Instance.series_id == series.id)
        )
        facts = routing.read_facts(Path(first)) if first else None
        refusal = routing.header_scope(manifest, facts, views)
        reason = refusal.reason if refusal is not None else None
    if reason is not None and not force:
        raise AdminError(f"{reason}; --force runs it anyway")
    decision = session.scalar(
        select(RoutingDecision).where(
            RoutingDecision.series_id == series.id, RoutingDecision.model_name == manifest.name
        )
    )
    if force and decision is not None and not decision.accepted:
        # the worker writes a notice for a declined series; forced, it runs the model
        # (its pixel gates still apply, as the site's on_gate_failure says)
        decision.accepted = True
        decision.reason = f"replayed with --force by an administrator ({decision.reason})"
        decision.decided_at = now
    running = session.scalar(
        select(Job).where(
            Job.series_id == series.id,
            Job.model_name == manifest.name,
            Job.model_version == manifest.version,
            Job.state.in_([JobState.QUEUED, JobState.RUNNING]),
        )
    )
    if running is not None:
        raise AdminError(f"job {running.id} for this series is already {running.state.value}")
    job = queue.enqueue(session, series.id, manifest.name, manifest.version, now)
    study_uid = session.scalar(select(Study.study_uid).where(Study.id == series.study_id))
    eventlog.record(
        session,
        "job-replayed",
        f"series {series_uid} replayed with {manifest.name} {manifest.version} as job {job.id}"
        + (f" (forced: {reason})" if reason else ""),
        now,
        study_uid=study_uid,
        series_uid=series_uid,
        job_id=job.id,
    )
    return job


def _has_instances(session: Session, series_id: int) -> bool:
    return (
        session.scalar(select(Instance.id).where(Instance.series_id == series_id).limit(1))
        is not None
    )


@dataclass(frozen=True)
class EchoResult:
    destination: str
    ok: bool
    milliseconds: float
    detail: str


def echo(dest: DestinationConfig, calling_aet: str, timeout: float) -> EchoResult:
    """C-ECHO one destination: does it accept our association and answer Verification?"""
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    start = time.perf_counter()
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "unreachable or aborted"
        return EchoResult(dest.name, False, _ms(start), why)
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    code = int(getattr(status, "Status", -1)) if status else -1
    if code == 0:
        return EchoResult(dest.name, True, _ms(start), "C-ECHO success")
    detail = "no C-ECHO response" if code == -1 else f"C-ECHO status 0x{code:04X}"
    return EchoResult(dest.name, False, _ms(start), detail)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 1)
