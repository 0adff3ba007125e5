"""Routing: send each complete series to every enabled model whose manifest accepts it.

Every decision, yes or no, is recorded with its reason, so `pacsnode jobs` can
answer "why did this study get no result?".
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacsnode import eventlog, queue
from pacsnode.manifest import Manifest
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
        decision = session.scalar(
            select(RoutingDecision).where(
                RoutingDecision.series_id == series.id,
                RoutingDecision.model_name == manifest.name,
            )
        )
        if decision is None:
            decision = RoutingDecision(series_id=series.id, model_name=manifest.name)
            session.add(decision)
        decision.accepted = reason is None
        decision.reason = reason or f"accepted by {manifest.name} {manifest.version}"
        decision.decided_at = now
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
