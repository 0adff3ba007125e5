"""The nightly audit: what the node did on one local day, as JSON for scripts and HTML for people.

:func:`run_audit` is a plain function of the database, the day and ``now``; the scheduler
(:mod:`pacsnode.scheduler`) calls it at ``[audit] run_at`` for the previous day, and
``pacsnode audit --date`` calls it for any day. It writes ``<reports_dir>/<day>.json`` and
``<day>.html``. Definitions, so the numbers can be checked by hand:

* **day**: local midnight to midnight in ``[audit] timezone`` (the host's zone when empty);
  timestamps in the database are UTC.
* **received**: a series counts on the day its last instance arrived, with its
  ``instance_count`` (so the counts survive retention); a study counts once per modality
  and calling AE title it sent that day, and once in the total.
* **jobs**: jobs created on the day, by model and their state when the report is made.
* **latency**: per model, over jobs whose result was ready (``to_result``: the job
  succeeded) or delivered (``to_delivered``: the last of its deliveries to every
  destination completed) on the day, the seconds since the series' last instance arrived;
  p50/p95 interpolate linearly between the sorted values (numpy's default).
* **failures**: failed attempts (``job-failed`` events) per model and reason; jobs and
  deliveries that went dead on the day, with their last error.
* **deliveries**: deliveries created on the day, by destination and current state.
* **spool**: files and bytes under ``spool_dir`` and ``output_dir`` (walked), what the
  database counts in the spool, and the free space of the spool's filesystem.
* **drift**: per model and reported label, the share of the day's results that were
  positive (from the ``findings`` table, see :mod:`pacsnode.findings`) next to the share
  over the ``drift_window_days`` before the day; *flagged* when the two differ by more
  than ``drift_bound`` (absolute) and both have at least ``drift_min_results`` results.
  A protocol change at a scanner or a misbehaving model shows here first.
* **history**: the ``drift_window_days`` up to the day: studies, instances and latency per
  day, drawn as the chart.

Each section reads in its own short transaction: on SQLite every transaction takes the
write lock, and the receiver must not wait for the audit.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacsnode.config import Config
from pacsnode.retention import spool_usage
from pacsnode.spool import write_durably
from pacsnode.tables import (
    Delivery,
    DeliveryState,
    Event,
    Finding,
    Job,
    JobState,
    Output,
    Series,
)

JSON_VERSION = 1


@dataclass(frozen=True)
class AuditReport:
    day: date
    data: dict[str, Any]
    json_path: Path
    html_path: Path

    @property
    def flagged(self) -> list[dict[str, Any]]:
        """The drift rows beyond the bound."""
        return [row for row in self.data["drift"] if row["flagged"]]


def zone(config: Config) -> tzinfo:
    """The zone of day boundaries and scheduled times: ``[audit] timezone`` or the host's."""
    if config.audit.timezone:
        return ZoneInfo(config.audit.timezone)
    from tzlocal import get_localzone  # APScheduler's own way of finding the host's zone

    local: tzinfo = get_localzone()
    return local


def day_bounds(day: date, tz: tzinfo) -> tuple[datetime, datetime]:
    """Naive-UTC ``[start, end)`` of the local ``day`` (23 or 25 hours on DST changes)."""

    def utc(d: date) -> datetime:
        return datetime.combine(d, time(0), tzinfo=tz).astimezone(UTC).replace(tzinfo=None)

    return utc(day), utc(day + timedelta(days=1))


def local_day(at: datetime, tz: tzinfo) -> date:
    """The local date of a naive-UTC timestamp."""
    return at.replace(tzinfo=UTC).astimezone(tz).date()


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _stats(values: Sequence[float]) -> dict[str, Any]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    return {
        "count": len(values),
        "p50": r(percentile(values, 50)),
        "p95": r(percentile(values, 95)),
        "max": r(max(values) if values else None),
    }


def _received(session: Session, start: datetime, end: datetime) -> dict[str, Any]:
    rows = session.execute(
        select(Series.study_id, Series.modality, Series.calling_aet, Series.instance_count).where(
            Series.last_received_at >= start, Series.last_received_at < end
        )
    ).all()

    def group(key: str) -> list[dict[str, Any]]:
        studies: dict[str, set[int]] = defaultdict(set)
        series: dict[str, int] = defaultdict(int)
        instances: dict[str, int] = defaultdict(int)
        for row in rows:
            value = str(getattr(row, key))
            studies[value].add(row.study_id)
            series[value] += 1
            instances[value] += row.instance_count
        return [
            {key: k, "studies": len(studies[k]), "series": series[k], "instances": instances[k]}
            for k in sorted(series)
        ]

    return {
        "by_modality": group("modality"),
        "by_calling_aet": group("calling_aet"),
        "total": {
            "studies": len({r.study_id for r in rows}),
            "series": len(rows),
            "instances": sum(r.instance_count for r in rows),
        },
    }


def _jobs(session: Session, start: datetime, end: datetime) -> list[dict[str, Any]]:
    rows = session.execute(
        select(Job.model_name, Job.state, func.count(Job.id))
        .where(Job.created_at >= start, Job.created_at < end)
        .group_by(Job.model_name, Job.state)
        .order_by(Job.model_name, Job.state)
    ).all()
    return [{"model": m, "state": s.value, "count": n} for m, s, n in rows]


@dataclass(frozen=True)
class _Timing:
    model: str
    ready_at: datetime
    to_result: float
    delivered_at: datetime | None
    to_delivered: float | None


def _timings(session: Session, start: datetime, end: datetime) -> list[_Timing]:
    """Succeeded jobs whose result was ready or fully delivered in ``[start, end)``."""
    per_job = (
        select(
            Output.job_id.label("job_id"),
            func.max(Delivery.delivered_at).label("last"),
        )
        .join(Output, Delivery.output_id == Output.id)
        .where(Delivery.state == DeliveryState.DELIVERED)
        .group_by(Output.job_id)
        .subquery()
    )
    pending = (
        select(Output.job_id)
        .join(Delivery, Delivery.output_id == Output.id)
        .where(Delivery.state != DeliveryState.DELIVERED)
    )
    rows = session.execute(
        select(Job.id, Job.model_name, Job.finished_at, Series.last_received_at, per_job.c.last)
        .join(Series, Job.series_id == Series.id)
        .outerjoin(per_job, per_job.c.job_id == Job.id)
        .where(
            Job.state == JobState.SUCCEEDED,
            Job.finished_at.is_not(None),
            ((Job.finished_at >= start) & (Job.finished_at < end))
            | ((per_job.c.last >= start) & (per_job.c.last < end)),
        )
    ).all()
    if not rows:
        return []
    undelivered = set(session.scalars(pending.where(Output.job_id.in_([r.id for r in rows]))))
    out = []
    for job_id, model, finished, last_received, last_delivered in rows:
        delivered = None if job_id in undelivered else last_delivered
        out.append(
            _Timing(
                model,
                finished,
                (finished - last_received).total_seconds(),
                delivered,
                None if delivered is None else (delivered - last_received).total_seconds(),
            )
        )
    return out


def _latency(timings: Iterable[_Timing], start: datetime, end: datetime) -> list[dict[str, Any]]:
    ready: dict[str, list[float]] = defaultdict(list)
    delivered: dict[str, list[float]] = defaultdict(list)
    for t in timings:
        if start <= t.ready_at < end:
            ready[t.model].append(t.to_result)
        if (
            t.delivered_at is not None
            and t.to_delivered is not None
            and start <= t.delivered_at < end
        ):
            delivered[t.model].append(t.to_delivered)
    return [
        {"model": m, "to_result": _stats(ready[m]), "to_delivered": _stats(delivered[m])}
        for m in sorted(set(ready) | set(delivered))
    ]


def _reason(message: str) -> str:
    """The error part of a ``job-failed`` event message (see ``queue.transition``)."""
    return message.partition("→ failed: ")[2] or message


def _failures(session: Session, start: datetime, end: datetime) -> dict[str, Any]:
    retries: dict[tuple[str, str], int] = defaultdict(int)
    for model, message in session.execute(
        select(Job.model_name, Event.message)
        .join(Job, Event.job_id == Job.id)
        .where(Event.kind == "job-failed", Event.at >= start, Event.at < end)
    ):
        retries[(model, _reason(message)[:300])] += 1
    dead_jobs = [
        {
            "job_id": job.id,
            "model": f"{job.model_name} {job.model_version}",
            "series_uid": series_uid,
            "modality": modality,
            "attempts": job.attempts,
            "at": job.finished_at.isoformat(timespec="seconds") if job.finished_at else None,
            "reason": job.last_error or "",
        }
        for job, series_uid, modality in session.execute(
            select(Job, Series.series_uid, Series.modality)
            .join(Series, Job.series_id == Series.id)
            .where(Job.state == JobState.DEAD, Job.finished_at >= start, Job.finished_at < end)
            .order_by(Job.finished_at, Job.id)
        )
    ]
    dead_deliveries = [
        {
            "delivery_id": d.id,
            "destination": d.destination,
            "model": model,
            "kind": kind,
            "attempts": d.attempts,
            "at": d.updated_at.isoformat(timespec="seconds"),
            "reason": d.last_error or "",
        }
        for d, kind, model in session.execute(
            select(Delivery, Output.kind, Job.model_name)
            .join(Output, Delivery.output_id == Output.id)
            .join(Job, Output.job_id == Job.id)
            .where(
                Delivery.state == DeliveryState.DEAD,
                Delivery.updated_at >= start,
                Delivery.updated_at < end,
            )
            .order_by(Delivery.updated_at, Delivery.id)
        )
    ]
    return {
        "retries": [{"model": m, "reason": r, "count": n} for (m, r), n in sorted(retries.items())],
        "dead_jobs": dead_jobs,
        "dead_deliveries": dead_deliveries,
    }


def _deliveries(session: Session, start: datetime, end: datetime) -> list[dict[str, Any]]:
    rows = session.execute(
        select(Delivery.destination, Delivery.state, func.count(Delivery.id))
        .where(Delivery.created_at >= start, Delivery.created_at < end)
        .group_by(Delivery.destination, Delivery.state)
        .order_by(Delivery.destination, Delivery.state)
    ).all()
    return [{"destination": d, "state": s.value, "count": n} for d, s, n in rows]


def _walk(folder: Path) -> dict[str, int]:
    files = size = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            try:
                size += os.stat(os.path.join(root, name), follow_symlinks=False).st_size
            except OSError:  # removed while we walk
                continue
            files += 1
    return {"files": files, "bytes": size}


def _spool(session: Session, config: Config) -> dict[str, Any]:
    spool_dir, output_dir = config.storage.spool_dir, config.storage.output_dir
    out: dict[str, Any] = {
        "spool_dir": str(spool_dir),
        "spool": _walk(spool_dir),
        "output_dir": str(output_dir),
        "outputs": _walk(output_dir),
        "database": spool_usage(session),
    }
    probe = spool_dir if spool_dir.exists() else Path(".")
    usage = shutil.disk_usage(probe)
    out["filesystem"] = {"total_bytes": usage.total, "free_bytes": usage.free}
    return out


def _drift(session: Session, config: Config, day: date, tz: tzinfo) -> list[dict[str, Any]]:
    cfg = config.audit
    start, end = day_bounds(day, tz)
    window_start, _ = day_bounds(day - timedelta(days=cfg.drift_window_days), tz)
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for model, label, positive, at in session.execute(
        select(Job.model_name, Finding.label, Finding.positive, Finding.recorded_at)
        .join(Job, Finding.job_id == Job.id)
        .where(Finding.recorded_at >= window_start, Finding.recorded_at < end)
    ):
        c = counts[(model, label)]
        offset = 0 if at >= start else 2
        c[offset] += 1
        c[offset + 1] += int(positive)
    rows = []
    for (model, label), (n, k, wn, wk) in sorted(counts.items()):
        rate = k / n if n else None
        window_rate = wk / wn if wn else None
        difference = None if rate is None or window_rate is None else rate - window_rate
        enough = n >= cfg.drift_min_results and wn >= cfg.drift_min_results
        flagged = bool(enough and difference is not None and abs(difference) > cfg.drift_bound)
        rows.append(
            {
                "model": model,
                "label": label,
                "day_results": n,
                "day_positive": k,
                "day_rate": None if rate is None else round(rate, 4),
                "window_results": wn,
                "window_positive": wk,
                "window_rate": None if window_rate is None else round(window_rate, 4),
                "difference": None if difference is None else round(difference, 4),
                "flagged": flagged,
                "note": "" if enough else f"fewer than {cfg.drift_min_results} results",
            }
        )
    return rows


def _history(session: Session, config: Config, day: date, tz: tzinfo) -> list[dict[str, Any]]:
    days = [day - timedelta(days=i) for i in range(config.audit.drift_window_days - 1, -1, -1)]
    start, _ = day_bounds(days[0], tz)
    _, end = day_bounds(day, tz)
    studies: dict[date, set[int]] = defaultdict(set)
    instances: dict[date, int] = defaultdict(int)
    for study_id, count, at in session.execute(
        select(Series.study_id, Series.instance_count, Series.last_received_at).where(
            Series.last_received_at >= start, Series.last_received_at < end
        )
    ):
        d = local_day(at, tz)
        studies[d].add(study_id)
        instances[d] += count
    latency: dict[date, list[float]] = defaultdict(list)
    for t in _timings(session, start, end):
        if t.delivered_at is not None and t.to_delivered is not None:
            latency[local_day(t.delivered_at, tz)].append(t.to_delivered)
    out = []
    for d in days:
        p50, p95 = percentile(latency[d], 50), percentile(latency[d], 95)
        out.append(
            {
                "day": d.isoformat(),
                "studies": len(studies[d]),
                "instances": instances[d],
                "delivered": len(latency[d]),
                "latency_p50_s": None if p50 is None else round(p50, 3),
                "latency_p95_s": None if p95 is None else round(p95, 3),
            }
        )
    return out


def run_audit(
    session: Session, day: date, now: datetime, config: Config, *, tz: tzinfo | None = None
) -> AuditReport:
    """Build the report of local ``day``, write its JSON and HTML, and return it.

    ``session`` must not be inside a transaction (each section takes its own); ``now`` is
    naive UTC, recorded as the time of the report and of the job states it shows.
    """
    tz = tz or zone(config)
    start, end = day_bounds(day, tz)
    data: dict[str, Any] = {
        "version": JSON_VERSION,
        "day": day.isoformat(),
        "timezone": str(tz),
        "start_utc": start.isoformat(),
        "end_utc": end.isoformat(),
        "generated_at_utc": now.isoformat(timespec="seconds"),
        "drift_bound": config.audit.drift_bound,
        "drift_window_days": config.audit.drift_window_days,
        "drift_min_results": config.audit.drift_min_results,
    }
    with session.begin():
        data["received"] = _received(session, start, end)
        data["jobs"] = _jobs(session, start, end)
    with session.begin():
        data["latency"] = _latency(_timings(session, start, end), start, end)
    with session.begin():
        data["failures"] = _failures(session, start, end)
        data["deliveries"] = _deliveries(session, start, end)
    with session.begin():
        data["spool"] = _spool(session, config)
    with session.begin():
        data["drift"] = _drift(session, config, day, tz)
    with session.begin():
        data["history"] = _history(session, config, day, tz)
    folder = config.audit.reports_dir
    json_path = folder / f"{day.isoformat()}.json"
    html_path = folder / f"{day.isoformat()}.html"
    write_durably(json_path, (json.dumps(data, indent=2) + "\n").encode())
    write_durably(html_path, render_html(data).encode())
    return AuditReport(day, data, json_path, html_path)


# -- HTML ------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d2733; max-width: 1100px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #5a6878; }
table { border-collapse: collapse; margin: 4px 0 8px; }
th, td { border: 1px solid #cfd6de; padding: 3px 10px; text-align: left; vertical-align: top; }
th { background: #eef2f6; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.flag td { background: #fde2e1; } .none { color: #7a8794; font-style: italic; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 9px; background: #c0392b;
         color: #fff; font-weight: 600; } .ok { background: #2e7d32; }
svg text { font: 11px system-ui, sans-serif; fill: #3b4a5a; }
"""


def _cell(value: Any) -> str:
    if value is None:
        return "<td class=n>–</td>"
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, int | float):
        return (
            f"<td class=n>{value:,}</td>"
            if isinstance(value, int)
            else f"<td class=n>{value:g}</td>"
        )
    return f"<td>{html.escape(str(value))}</td>"


def _table(rows: Sequence[dict[str, Any]], flag_key: str | None = None) -> str:
    if not rows:
        return "<p class=none>none</p>"
    head = "".join(f"<th>{html.escape(k.replace('_', ' '))}</th>" for k in rows[0])
    body = []
    for row in rows:
        cls = " class=flag" if flag_key and row.get(flag_key) else ""
        body.append(f"<tr{cls}>" + "".join(_cell(v) for v in row.values()) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


def chart_svg(history: Sequence[dict[str, Any]], width: int = 900, height: int = 240) -> str:
    """Studies per day as bars (left axis) and delivery latency p50/p95 as lines (right)."""
    left, right, top, bottom = 48, 56, 16, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(len(history), 1)
    step = plot_w / n
    max_studies = max([h["studies"] for h in history] + [1])
    latencies = [h[k] for h in history for k in ("latency_p50_s", "latency_p95_s") if h[k]]
    max_latency = max(latencies + [1.0])

    def y_studies(v: float) -> float:
        return top + plot_h - plot_h * v / max_studies

    def y_latency(v: float) -> float:
        return top + plot_h - plot_h * v / max_latency

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="daily volume and latency">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafbfc" '
        'stroke="#cfd6de"/>',
    ]
    for i in range(5):
        frac = i / 4
        y = top + plot_h - plot_h * frac
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e8ee"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{max_studies * frac:.0f}</text>'
            f'<text x="{left + plot_w + 6}" y="{y + 4:.1f}">{max_latency * frac:.3g}</text>'
        )
    for i, h in enumerate(history):
        x = left + i * step
        y = y_studies(h["studies"])
        parts.append(
            f'<rect x="{x + step * 0.15:.1f}" y="{y:.1f}" width="{step * 0.7:.1f}" '
            f'height="{top + plot_h - y:.1f}" fill="#7fa7d1"><title>{html.escape(h["day"])}: '
            f"{h['studies']} studies, {h['instances']} instances</title></rect>"
        )
        if (n - 1 - i) % max(1, math.ceil(n / 8)) == 0:  # the day itself always labelled
            parts.append(
                f'<text x="{x + step / 2:.1f}" y="{top + plot_h + 14}" text-anchor="middle">'
                f"{html.escape(h['day'][5:])}</text>"
            )
    for key, colour in (("latency_p50_s", "#2e7d32"), ("latency_p95_s", "#c0392b")):
        points = [
            f"{left + i * step + step / 2:.1f},{y_latency(h[key]):.1f}"
            for i, h in enumerate(history)
            if h[key] is not None
        ]
        if points:
            parts.append(
                f'<polyline points="{" ".join(points)}" fill="none" stroke="{colour}" '
                'stroke-width="2"/>'
            )
            parts += [
                f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="2.5" fill="{colour}"/>'
                for p in points
            ]
    legend_y = height - 8
    parts.append(
        f'<rect x="{left}" y="{legend_y - 9}" width="12" height="10" fill="#7fa7d1"/>'
        f'<text x="{left + 16}" y="{legend_y}">studies per day (left axis)</text>'
        f'<line x1="{left + 200}" x2="{left + 220}" y1="{legend_y - 4}" y2="{legend_y - 4}" '
        'stroke="#2e7d32" stroke-width="2"/>'
        f'<text x="{left + 224}" y="{legend_y}">p50 last instance → delivered, s (right)</text>'
        f'<line x1="{left + 470}" x2="{left + 490}" y1="{legend_y - 4}" y2="{legend_y - 4}" '
        'stroke="#c0392b" stroke-width="2"/>'
        f'<text x="{left + 494}" y="{legend_y}">p95</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _latency_rows(latency: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for row in latency:
        r, d = row["to_result"], row["to_delivered"]
        rows.append(
            {
                "model": row["model"],
                "results": r["count"],
                "to result p50 s": r["p50"],
                "p95 s": r["p95"],
                "max s": r["max"],
                "delivered": d["count"],
                "to delivered p50 s": d["p50"],
                "p95 s ": d["p95"],
                "max s ": d["max"],
            }
        )
    return rows


def render_html(data: dict[str, Any]) -> str:
    """The report as one self-contained page: a table per section and an inline SVG chart."""
    received = data["received"]
    spool = data["spool"]
    flagged = [row for row in data["drift"] if row["flagged"]]
    badge = (
        f"<span class=badge>{len(flagged)} label(s) drifted</span>"
        if flagged
        else "<span class='badge ok'>no drift flagged</span>"
    )
    total = received["total"]
    spool_rows = [
        {
            "where": "spool (received)",
            "path": spool["spool_dir"],
            "files": spool["spool"]["files"],
            "size": _bytes(spool["spool"]["bytes"]),
        },
        {
            "where": "outputs (our results)",
            "path": spool["output_dir"],
            "files": spool["outputs"]["files"],
            "size": _bytes(spool["outputs"]["bytes"]),
        },
        {
            "where": "spool per database",
            "path": "",
            "files": spool["database"]["instances"],
            "size": _bytes(spool["database"]["bytes"]),
        },
        {
            "where": "filesystem free",
            "path": "",
            "files": None,
            "size": f"{_bytes(spool['filesystem']['free_bytes'])} of "
            f"{_bytes(spool['filesystem']['total_bytes'])}",
        },
    ]
    failures = data["failures"]
    sections = [
        ("Received", _table(received["by_modality"]) + _table(received["by_calling_aet"])),
        ("Jobs created, by model and state now", _table(data["jobs"])),
        ("Latency from last instance received (seconds)", _table(_latency_rows(data["latency"]))),
        ("Failed attempts (retried)", _table(failures["retries"])),
        ("Dead jobs", _table(failures["dead_jobs"])),
        ("Dead deliveries", _table(failures["dead_deliveries"])),
        ("Deliveries created, by destination and state now", _table(data["deliveries"])),
        ("Disk", _table(spool_rows)),
        (
            f"Output drift: day vs trailing {data['drift_window_days']} days "
            f"(flag beyond ±{data['drift_bound']:g}, at least {data['drift_min_results']} "
            "results each)",
            _table(data["drift"], flag_key="flagged"),
        ),
        (f"Last {len(data['history'])} days", chart_svg(data["history"])),
    ]
    body = "".join(f"<h2>{html.escape(title)}</h2>{content}" for title, content in sections)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>pacsnode audit {html.escape(data['day'])}</title><style>{_CSS}</style></head>"
        f"<body><h1>pacsnode audit — {html.escape(data['day'])} {badge}</h1>"
        f"<p class=meta>{html.escape(data['timezone'])} day; generated "
        f"{html.escape(data['generated_at_utc'])} UTC. {total['studies']} studies, "
        f"{total['series']} series, {total['instances']:,} instances received.</p>"
        f"{body}</body></html>\n"
    )
