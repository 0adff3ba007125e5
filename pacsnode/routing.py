"""Routing: send each complete series to every enabled model whose manifest accepts it.

Image models (chest X-ray) take every series they accept. Volume models (CT PE) take
one series per study, chosen by :mod:`pacsnode.selection` once no other series of the
study is still arriving. Every decision, yes or no, is recorded with its reason, so
`pacsnode jobs --study` can answer "why did this study get no result?".

Two kinds of no: the contract (modality, SOP class: the model is not for this kind of
object at all) and the scope (:mod:`pacsnode.scope`: the model would take this modality,
but the header puts the input outside what it was made for). A scope refusal is counted
(``declined``) and, with ``notices``, still gets a job: its worker writes the "not
analysed" notice (:mod:`pacsnode.writers.notice`) instead of running the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacsnode import eventlog, queue, scope, selection
from pacsnode.manifest import CtCriteria, Manifest
from pacsnode.tables import Instance, Job, RoutingDecision, Series, Study

Declined = Callable[[str, str], None]
"""Told (model name, refusal kind) for every scope refusal: the metrics count them."""


def _ignore(model: str, kind: str) -> None:
    pass


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


def read_facts(path: Path) -> scope.HeaderFacts | None:
    """The header scope facts of one spooled instance; None when it cannot be read (the
    worker reads it again and records what is wrong with it)."""
    try:
        return scope.facts(dcmread(path, stop_before_pixels=True))
    except (OSError, InvalidDicomError, ValueError, EOFError):
        return None


def header_scope(
    manifest: Manifest, facts: scope.HeaderFacts | None, views: set[str]
) -> scope.Refusal | None:
    """The scope refusal of an image series from its views and one instance's header facts.

    The series is refused for its views only when none is one the model reads (a PA and a
    lateral in one series go to the worker, which declines the lateral image by image).
    """
    accepted = manifest.accepts.view_positions
    if accepted and not views & set(accepted):
        shown = ", ".join(sorted(v or "(none)" for v in views))
        return scope.Refusal("view", f"view position {shown} is not one {manifest.name} reads")
    if facts is None:
        return None
    refusal = scope.check(facts, manifest.accepts, manifest.name)
    if refusal is not None and refusal.kind == "view" and views & set(accepted):
        return None  # another instance has a view the model reads: judged per image
    return refusal


def route_series(
    session: Session,
    series: Series,
    manifests: Sequence[Manifest],
    now: datetime,
    *,
    notices: bool = False,
    declined: Declined = _ignore,
) -> list[Job]:
    """Create one job per accepting model; record the reason for each model that declined.

    ``notices``: a model that declined for scope gets a job all the same, which writes the
    "not analysed" notice; ``declined`` is told of every scope refusal.
    """
    rows = session.execute(
        select(Instance.sop_class_uid, Instance.view_position).where(
            Instance.series_id == series.id
        )
    ).all()
    sop_classes = {r[0] for r in rows}
    views = {(r[1] or "").strip() for r in rows}
    study_uid = session.scalar(select(Study.study_uid).where(Study.id == series.study_id))
    first = session.scalar(select(func.min(Instance.path)).where(Instance.series_id == series.id))
    facts = None  # one header read per series, only for image models of this modality
    if first is not None and any(
        m.accepts.ct is None and series.modality in m.accepts.modalities for m in manifests
    ):
        facts = read_facts(Path(first))
    jobs = []
    for manifest in manifests:
        reason = decide(manifest, series.modality, sop_classes, set())
        if not rows:  # each instance was re-sent in another series (routed on its own)
            reason = f"series {series.series_uid} has no instances left; nothing to route"
        if reason is None and manifest.accepts.ct is not None:
            jobs.extend(
                _select_in_study(
                    session, series, manifest, manifest.accepts.ct, now, notices, declined
                )
            )
            continue
        refusal = None
        if reason is None and first is not None:
            refusal = header_scope(manifest, facts, views)
        if refusal is not None:
            reason = refusal.reason
            declined(manifest.name, refusal.kind)
        _record(session, series.id, manifest, reason, now)
        if reason is None or (refusal is not None and notices):
            jobs.append(queue.enqueue(session, series.id, manifest.name, manifest.version, now))
        if reason is not None:
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
    session: Session,
    series: Series,
    manifest: Manifest,
    criteria: CtCriteria,
    now: datetime,
    notices: bool,
    declined: Declined,
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
    refusals: dict[str, scope.Refusal] = {}

    def in_scope(summary: selection.SeriesSummary) -> str | None:
        if summary.facts is None:
            return None
        refusal = scope.check(summary.facts, manifest.accepts, manifest.name)
        if refusal is not None:
            refusals[summary.series_uid] = refusal
        return refusal.reason if refusal is not None else None

    if manifest.accepts.scope.content_gate is not None:
        # the content gate sees the contrast in the pixels; a header that lies must not
        # refuse the series first (prefer_contrast still ranks by the header, and the
        # worker corrects the choice when the pixels disagree)
        criteria = criteria.model_copy(update={"require_contrast": False})
    choice = selection.choose(list(summaries.values()), criteria, in_scope)
    if (own := refusals.get(series.series_uid)) is not None:
        declined(manifest.name, own.kind)  # counted once, when the series itself completes
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
        notice_on = _notice_series(complete, summaries, refusals)
        if notices and notice_on is not None:
            jobs.append(queue.enqueue(session, notice_on.id, manifest.name, manifest.version, now))
    return jobs


def _notice_series(
    complete: Sequence[Series],
    summaries: dict[int, selection.SeriesSummary],
    refusals: dict[str, scope.Refusal],
) -> Series | None:
    """The series whose scope refusal speaks for the study: the largest refused for scope.

    None when no series was refused for scope (too thick, too few slices, localizers only:
    the model would not normally take this study, so no notice is written).
    """
    refused = [s for s in complete if summaries[s.id].series_uid in refusals]
    return max(refused, key=lambda s: (s.instance_count, -s.id), default=None)


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
