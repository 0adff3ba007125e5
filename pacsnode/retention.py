"""Retention: delete received instances from the spool once the node is done with them.

The unit is a series, because jobs are. A series is *done* when it is complete, none of
its jobs is queued, running or waiting for a retry (``failed``), and none of its results
is waiting to be delivered (``pending``, ``sending`` or ``failed``). A done series is
purged

* ``delivered_days`` after the last thing that happened to it (its last instance, the end
  of its last job, its last delivery) when all its work succeeded, or when no model took it;
* ``failed_days`` after that when a job or a delivery of it is dead, so there is time to
  look into it and ``pacsnode requeue`` it.

What a purge does, for each series, in one transaction that re-checks the rule first: the
spooled files are unlinked, the series' ``instances`` rows are deleted and a
``retention-purged`` event names the series. The ``series``, ``jobs``, ``outputs``,
``deliveries`` and ``findings`` rows stay, so the audit, ``pacsnode jobs`` and the event log
keep the history; the series keeps its ``instance_count``. Our own results under
``output_dir`` are not touched. A series whose instances are sent again after a purge is
received as new instances of the same series.

A crash between unlinking and commit leaves rows whose files are gone; the next purge
deletes them (unlinking a missing file is not an error). Empty series and study folders
are removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from pacsnode import eventlog
from pacsnode.config import RetentionConfig
from pacsnode.tables import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Output,
    Series,
    Study,
)

log = logging.getLogger(__name__)

ACTIVE_JOBS = (JobState.QUEUED, JobState.RUNNING, JobState.FAILED)
UNDELIVERED = (DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.FAILED)


@dataclass(frozen=True)
class Purged:
    """One series that went (or, in a dry run, would go)."""

    study_uid: str
    series_uid: str
    modality: str
    outcome: str  # "delivered", "failed" (a dead job or delivery) or "not routed"
    done_at: datetime
    instances: int
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["done_at"] = self.done_at.isoformat(timespec="seconds")
        return row


@dataclass(frozen=True)
class PurgeResult:
    dry_run: bool
    series: list[Purged]

    @property
    def instances(self) -> int:
        return sum(p.instances for p in self.series)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.series)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "series_count": len(self.series),
            "instances": self.instances,
            "bytes": self.bytes,
            "series": [p.as_dict() for p in self.series],
        }


def _verdict(
    session: Session, series: Series, now: datetime, policy: RetentionConfig
) -> tuple[str, datetime] | None:
    """``(outcome, done_at)`` when ``series`` may be purged at ``now``, else None."""
    if series.completed_at is None:
        return None
    jobs = session.execute(
        select(Job.state, Job.updated_at).where(Job.series_id == series.id)
    ).all()
    deliveries = session.execute(
        select(Delivery.state, Delivery.updated_at)
        .join(Output, Delivery.output_id == Output.id)
        .join(Job, Output.job_id == Job.id)
        .where(Job.series_id == series.id)
    ).all()
    if any(state in ACTIVE_JOBS for state, _ in jobs):
        return None
    if any(state in UNDELIVERED for state, _ in deliveries):
        return None
    times = [series.completed_at, series.last_received_at]
    times += [at for _, at in jobs] + [at for _, at in deliveries]
    done_at = max(times)
    dead = any(s in (JobState.DEAD, JobState.CANCELLED) for s, _ in jobs) or any(
        s is DeliveryState.DEAD for s, _ in deliveries
    )
    outcome = "failed" if dead else ("delivered" if jobs else "not routed")
    days = policy.failed_days if dead else policy.delivered_days
    if now < done_at + timedelta(days=days):
        return None
    return outcome, done_at


def _candidates(session: Session) -> list[Series]:
    """Complete series that still have instances in the spool, oldest first."""
    has_instances = select(Instance.id).where(Instance.series_id == Series.id).exists()
    return list(
        session.scalars(
            select(Series)
            .where(Series.completed_at.is_not(None), has_instances)
            .order_by(Series.last_received_at, Series.id)
        )
    )


def _remove_empty(folder: Path, stop: Path) -> None:
    """Remove ``folder`` and its parents up to (not including) ``stop`` while empty."""
    with contextlib.suppress(OSError):
        while folder != stop and stop in folder.parents:
            folder.rmdir()
            folder = folder.parent


def purge(
    session: Session,
    now: datetime,
    policy: RetentionConfig,
    spool_dir: Path,
    *,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> PurgeResult:
    """Delete (or with ``dry_run`` only list) the spooled instances the policy lets go.

    ``session`` must not be inside a transaction: each series is purged in its own, so a
    large purge never holds the database's write lock for long. ``policy.enabled`` is the
    scheduler's business; calling this purges regardless. ``progress(done, total)`` is called
    after each candidate series (the CLI's progress bar).
    """
    with session.begin():
        ids = [s.id for s in _candidates(session)]
    purged: list[Purged] = []
    for done, series_id in enumerate(ids, 1):
        if progress is not None:
            progress(done, len(ids))
        folders: set[Path] = set()
        with session.begin():
            series = session.get(Series, series_id)
            if series is None:
                continue
            verdict = _verdict(session, series, now, policy)
            if verdict is None:
                continue
            outcome, done_at = verdict
            rows = session.execute(
                select(Instance.path, Instance.size_bytes).where(Instance.series_id == series_id)
            ).all()
            study_uid = session.scalar(select(Study.study_uid).where(Study.id == series.study_id))
            item = Purged(
                study_uid=study_uid or "",
                series_uid=series.series_uid,
                modality=series.modality,
                outcome=outcome,
                done_at=done_at,
                instances=len(rows),
                bytes=sum(size for _, size in rows),
            )
            purged.append(item)
            if dry_run:
                continue
            for path, _ in rows:
                file = Path(path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(file)
                folders.add(file.parent)
            session.execute(delete(Instance).where(Instance.series_id == series_id))
            eventlog.record(
                session,
                "retention-purged",
                f"series {series.series_uid} ({series.modality}, {outcome} {done_at:%Y-%m-%d}): "
                f"{item.instances} instances, {item.bytes} bytes deleted from the spool",
                now,
                study_uid=item.study_uid,
                series_uid=series.series_uid,
            )
        for folder in folders:
            _remove_empty(folder.resolve(), spool_dir.resolve())
    if purged and not dry_run:
        log.info("retention purged %d series, %d bytes", len(purged), sum(p.bytes for p in purged))
    return PurgeResult(dry_run=dry_run, series=purged)


def spool_usage(session: Session) -> dict[str, int]:
    """Instances and bytes the database says are in the spool."""
    count, size = session.execute(
        select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))
    ).one()
    return {"instances": int(count), "bytes": int(size)}
