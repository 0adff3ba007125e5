"""Series completion: decide when a series has all its instances.

A radiograph (CR/DX) is complete as soon as it is stored. Other series (CT) are
complete when no instance has arrived for the modality's quiet period, or when
the hard upper wait since the first instance has passed. A series that receives
an instance after completion is completed again, and its jobs rerun.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from pacsnode import eventlog
from pacsnode.config import CompletionConfig
from pacsnode.tables import Series, Study

IMMEDIATE_MODALITIES = frozenset({"CR", "DX"})


def is_complete(series: Series, cfg: CompletionConfig, now: datetime) -> bool:
    if series.modality in IMMEDIATE_MODALITIES:
        return True
    quiet = timedelta(seconds=cfg.quiet_seconds(series.modality))
    if now - series.last_received_at >= quiet:
        return True
    return now - series.first_received_at >= timedelta(seconds=cfg.series_max_wait_seconds)


def complete_due_series(session: Session, cfg: CompletionConfig, now: datetime) -> list[Series]:
    """Mark every series that became complete by ``now``; returns them for routing."""
    open_series = session.scalars(
        select(Series)
        .where(or_(Series.completed_at.is_(None), Series.last_received_at > Series.completed_at))
        .order_by(Series.last_received_at)
    ).all()
    done = []
    for series in open_series:
        if not is_complete(series, cfg, now):
            continue
        again = series.completed_at is not None
        # an instance stored between taking ``now`` and this read is already counted: not
        # "late", so it must not complete the series a second time and rerun its jobs
        series.completed_at = max(now, series.last_received_at)
        study_uid = session.scalar(select(Study.study_uid).where(Study.id == series.study_id))
        eventlog.record(
            session,
            "series-complete",
            f"series {series.series_uid} ({series.modality}, {series.instance_count} instances) "
            + ("complete again after a late instance" if again else "complete"),
            now,
            study_uid=study_uid,
            series_uid=series.series_uid,
        )
        done.append(series)
    return done


def next_due(session: Session, cfg: CompletionConfig, now: datetime) -> float | None:
    """Seconds until the next open series may complete (for the loop's sleep), None if none open."""
    rows = session.execute(
        select(Series.modality, Series.first_received_at, Series.last_received_at).where(
            or_(Series.completed_at.is_(None), Series.last_received_at > Series.completed_at)
        )
    ).all()
    waits = []
    for modality, first, last in rows:
        if modality in IMMEDIATE_MODALITIES:
            return 0.0
        quiet_due = last + timedelta(seconds=cfg.quiet_seconds(modality))
        hard_due = first + timedelta(seconds=cfg.series_max_wait_seconds)
        waits.append((min(quiet_due, hard_due) - now).total_seconds())
    return max(0.0, min(waits)) if waits else None
