"""The job queue: one function changes a job's state; claims are atomic; leases expire.

States: queued → running → succeeded | failed → (retry after backoff) → … → dead
after ``max_attempts`` or at once on a permanent input error; running → declined when a
gate keeps the input from the model (the reason is ``last_error``; a notice may be sent). A job whose worker
died keeps ``running`` only until its lease lapses (or at once, when the worker's
process is known dead on this host), then it is claimable again.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacsnode import db, eventlog
from pacsnode.config import QueueConfig
from pacsnode.tables import Delivery, DeliveryState, Job, JobState

_ALLOWED: dict[JobState, set[JobState]] = {
    JobState.QUEUED: {JobState.RUNNING, JobState.DEAD, JobState.CANCELLED},
    JobState.RUNNING: {
        JobState.SUCCEEDED,
        JobState.DECLINED,
        JobState.FAILED,
        JobState.DEAD,
        JobState.QUEUED,
        JobState.CANCELLED,
    },
    JobState.FAILED: {JobState.RUNNING, JobState.DEAD, JobState.QUEUED, JobState.CANCELLED},
    JobState.SUCCEEDED: {JobState.QUEUED},
    JobState.DEAD: {JobState.QUEUED},
    JobState.CANCELLED: {JobState.QUEUED},
    JobState.DECLINED: {JobState.QUEUED},
}


class IllegalTransitionError(RuntimeError):
    """A programming error: a state change the state machine does not allow."""


def worker_identity() -> str:
    """``host:pid:token`` — lets a restarted node release its dead predecessor's leases."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def backoff(attempts: int, base: float, cap: float) -> timedelta:
    """Exponential backoff: base, 2·base, 4·base … capped."""
    return timedelta(seconds=min(cap, base * 2 ** max(0, attempts - 1)))


def transition(
    session: Session,
    job: Job,
    new: JobState,
    now: datetime,
    *,
    error: str | None = None,
    not_before: datetime | None = None,
) -> None:
    """The one place a job changes state; records an event for every change."""
    if new not in _ALLOWED[job.state]:
        raise IllegalTransitionError(f"job {job.id}: {job.state} → {new} is not allowed")
    old = job.state
    job.state = new
    job.updated_at = now
    if new in (JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED, JobState.DECLINED):
        job.finished_at = now
        job.lease_until = None
    if new is JobState.QUEUED:
        job.attempts = 0
        job.finished_at = None
        job.lease_until = None
        job.worker_id = None
        job.last_error = None
        job.not_before = now
    if error is not None:
        job.last_error = error
    if not_before is not None:
        job.not_before = not_before
    level = {
        JobState.DEAD: "error",
        JobState.FAILED: "warning",
        JobState.CANCELLED: "warning",
    }.get(new, "info")
    detail = f": {error}" if error else ""
    eventlog.record(
        session,
        f"job-{new.value}",
        f"job {job.id} ({job.model_name} {job.model_version}) {old.value} → {new.value}{detail}",
        now,
        level=level,
        job_id=job.id,
    )


def enqueue(session: Session, series_id: int, name: str, version: str, now: datetime) -> Job:
    """Create the job for (series, model, version), or requeue it when it already ran.

    A series that changed after its job finished (a late instance) is rerun; its
    deterministic output UIDs make the new result replace the old one.
    """
    job = session.scalar(
        select(Job).where(
            Job.series_id == series_id, Job.model_name == name, Job.model_version == version
        )
    )
    if job is None:
        job = Job(
            series_id=series_id,
            model_name=name,
            model_version=version,
            state=JobState.QUEUED,
            attempts=0,
            not_before=now,
            created_at=now,
            updated_at=now,
        )
        session.add(job)
        session.flush()
        eventlog.record(
            session, "job-queued", f"job {job.id} queued for {name} {version}", now, job_id=job.id
        )
    elif job.state is not JobState.QUEUED:
        transition(session, job, JobState.QUEUED, now)
    return job


def claim(
    session: Session,
    model_names: Sequence[str],
    worker_id: str,
    now: datetime,
    cfg: QueueConfig,
    limit: int = 1,
    first_attempts_only: bool = False,
) -> list[Job]:
    """Take up to ``limit`` runnable jobs; jobs out of attempts are declared dead first."""
    exhausted = session.scalars(
        select(Job).where(
            Job.state == JobState.RUNNING,
            Job.lease_until < now,
            Job.attempts >= cfg.max_attempts,
        )
    ).all()
    for job in exhausted:
        transition(
            session,
            job,
            JobState.DEAD,
            now,
            error=f"worker lost the job {job.attempts} times (crash or kill while running)",
        )
    ids = db.claim_jobs(
        session, model_names, worker_id, now, cfg.lease_seconds, limit, first_attempts_only
    )
    if not ids:
        return []
    fresh = select(Job).where(Job.id.in_(ids)).order_by(Job.id)
    claimed = list(session.scalars(fresh.execution_options(populate_existing=True)))
    for job in claimed:  # the claim is one UPDATE, not transition(): the audit still sees it
        eventlog.record(
            session,
            "job-running",
            f"job {job.id} ({job.model_name} {job.model_version}) → running, "
            f"attempt {job.attempts} by {worker_id}",
            now,
            job_id=job.id,
        )
    return claimed


def still_owned(session: Session, job_id: int, worker_id: str, attempts: int) -> Job | None:
    """The job if this worker still holds this attempt (the fencing check before committing results)."""
    return session.scalar(
        select(Job).where(
            Job.id == job_id,
            Job.state == JobState.RUNNING,
            Job.worker_id == worker_id,
            Job.attempts == attempts,
        )
    )


def fail(
    session: Session, job: Job, error: str, now: datetime, cfg: QueueConfig, *, permanent: bool
) -> None:
    """Record a failure: retry later with backoff, or dead when permanent or out of attempts."""
    if permanent or job.attempts >= cfg.max_attempts:
        reason = error if permanent else f"{error} (gave up after {job.attempts} attempts)"
        transition(session, job, JobState.DEAD, now, error=reason)
        return
    delay = backoff(job.attempts, cfg.backoff_base_seconds, cfg.backoff_max_seconds)
    transition(session, job, JobState.FAILED, now, error=error, not_before=now + delay)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_orphans(session: Session, table: type[Job] | type[Delivery], now: datetime) -> int:
    """Expire the leases that dead processes on this host hold on ``table`` (jobs or deliveries).

    Leases alone bring work back eventually (and are all that works across
    hosts); this makes a restart after ``kill -9`` pick the work up at once.
    Each component releases its own kind of work when it starts.
    """
    host = socket.gethostname()
    busy = JobState.RUNNING if table is Job else DeliveryState.SENDING
    rows = session.execute(
        select(table.id, table.worker_id).where(table.state == busy, table.lease_until >= now)
    ).all()
    dead = []
    for row_id, owner in rows:
        parts = (owner or "").split(":")
        local = len(parts) == 3 and parts[0] == host and parts[1].isdigit()
        if local and int(parts[1]) != os.getpid() and not _pid_alive(int(parts[1])):
            dead.append(row_id)
    if dead:
        session.execute(
            update(table)
            .where(table.id.in_(dead))
            .values(lease_until=now - timedelta(seconds=1))
            .execution_options(synchronize_session=False)
        )
        eventlog.record(
            session,
            "orphans-released",
            f"released {len(dead)} {table.__tablename__} held by dead processes on {host}",
            now,
            level="warning",
        )
    return len(dead)
