"""Routing: send each complete series to every enabled model whose manifest accepts it.

Image models (chest X-ray) take every series they accept. Volume models (CT PE) take
one series per study, chosen by :mod:`pacsnode.selection` once no other series of the
study is still arriving. Every decision, yes or no, is recorded with its reason, so
`pacsnode jobs --study` can answer "why did this study get no result?".
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacsnode import eventlog, queue, selection
from pacsnode.manifest import CtCriteria, Manifest
from pacsnode.tables import Instance, Job, RoutingDecision, Series, Study


def decide(manifest: Manifest, modality: str, sop_classes: set[str], views: set[str]) -> str | None:
    """None when ``manifest`` accepts the series, else the reason it does not."""
    accepts = manifest.accepts
    if modality not in accepts.modalities:
        return f"modality {modality} not accepted by {manifest.name}"
    if accepts.sop_classes:
        foreign = sorted(sop_classes - set(accepts.sop_classes))
        if foreign:
            return f"SOP class {', '.join(foreign)} not accepted by {manifest.name}"
    if accepts.view_positions:
        unknown = sorted(views - set(accepts.view_positions))
        if unknown:
            shown = ", ".join(v or "(none)" for v in unknown)
            return f"view position {shown} not accepted by {manifest.name}"
    return None


def route_series(
    session: Session, series: Series, manifests: Sequence[Manifest], now: datetime
) -> list[Job]:
    """Create one job per accepting model; record the reason for each model that declined."""
    rows = session.execute(
        select(Instance.sop_class_uid, Instance.view_position).where(
            Instance.series_id == series.id
        )
    ).all()
    sop_classes = {r[0] for r in rows}
    views = {(r[1] or "").strip() for r in rows}
    study_uid = session.scalar(select(Study.study_uid).where(Study.id == series.study_id))
    jobs = []
    for manifest in manifests:
        reason = decide(manifest, series.modality, sop_classes, views)
        if not rows:  # each instance was re-sent in another series (routed on its own)
            reason = f"series {series.series_uid} has no instances left; nothing to route"
        if reason is None and manifest.accepts.ct is not None:
            jobs.extend(_select_in_study(session, series, manifest, manifest.accepts.ct, now))
            continue
        _record(session, series.id, manifest, reason, now)
        if reason is None:
            jobs.append(queue.enqueue(session, series.id, manifest.name, manifest.version, now))
        else:
            eventlog.record(
                session,
                "routing-declined",
                reason,
                now,
                study_uid=study_uid,
                series_uid=series.series_uid,
            )
    return jobs


def _record(
    session: Session, series_id: int, manifest: Manifest, reason: str | None, now: datetime
) -> None:
    decision = session.scalar(
        select(RoutingDecision).where(
            RoutingDecision.series_id == series_id,
            RoutingDecision.model_name == manifest.name,
        )
    )
    if decision is None:
        decision = RoutingDecision(series_id=series_id, model_name=manifest.name)
        session.add(decision)
    decision.accepted = reason is None
    decision.reason = reason or f"accepted by {manifest.name} {manifest.version}"
    decision.decided_at = now


def _select_in_study(
    session: Session, series: Series, manifest: Manifest, criteria: CtCriteria, now: datetime
) -> list[Job]:
    """Choose one series of the study for a volume model, once the study has settled.

    While another series of an accepted modality is still arriving the choice waits
    (recorded as such); the last series to complete makes it. A series completing later
    re-runs the choice: if it wins, it gets a job too (the earlier result stays); the
    chosen series is re-queued only when it itself changed or has no job yet.
    """
    study_uid = session.scalar(select(Study.study_uid).where(Study.id == series.study_id))
    siblings = session.scalars(
        select(Series).where(
            Series.study_id == series.study_id,
            Series.modality.in_(manifest.accepts.modalities),
        )
    ).all()
    still_open = [
        s.series_uid
        for s in siblings
        if s.id != series.id and (s.completed_at is None or s.last_received_at > s.completed_at)
    ]
    if still_open:
        _record(
            session,
            series.id,
            manifest,
            f"waiting for series {', '.join(sorted(still_open))} of the study to complete "
            "before choosing one",
            now,
        )
        return []
    complete = [s for s in siblings if s.completed_at is not None and s.instance_count > 0]
    summaries = {s.id: _summary(session, s) for s in complete}
    choice = selection.choose(list(summaries.values()), criteria)
    jobs = []
    for s in complete:
        reason = choice.reasons.get(summaries[s.id].series_uid, "not considered")
        chosen = choice.chosen is not None and choice.chosen.series_uid == s.series_uid
        _record(session, s.id, manifest, None if chosen else reason, now)
        if chosen:
            decision = session.scalar(
                select(RoutingDecision).where(
                    RoutingDecision.series_id == s.id,
                    RoutingDecision.model_name == manifest.name,
                )
            )
            if decision is not None:
                decision.reason = f"{reason} for {manifest.name} {manifest.version}"
            has_job = session.scalar(
                select(Job.id).where(
                    Job.series_id == s.id,
                    Job.model_name == manifest.name,
                    Job.model_version == manifest.version,
                )
            )
            if s.id == series.id or has_job is None:
                jobs.append(queue.enqueue(session, s.id, manifest.name, manifest.version, now))
        elif s.id == series.id:
            eventlog.record(
                session,
                "routing-declined",
                f"{manifest.name}: series {s.series_uid} {reason}",
                now,
                study_uid=study_uid,
                series_uid=s.series_uid,
            )
    if choice.chosen is None:
        eventlog.record(
            session,
            "routing-declined",
            f"{manifest.name}: no series of study {study_uid} is eligible",
            now,
            study_uid=study_uid,
        )
    return jobs


def _summary(session: Session, series: Series) -> selection.SeriesSummary:
    """The series summary from the header of its first instance (by database id)."""
    path, count = session.execute(
        select(func.min(Instance.path), func.count(Instance.id)).where(
            Instance.series_id == series.id
        )
    ).one()
    summary = selection.read_summary(Path(path), count)
    if not summary.series_uid:
        return selection.SeriesSummary(
            **{**summary.__dict__, "series_uid": series.series_uid, "modality": series.modality}
        )
    return summary
