"""The `pacsnode` command: serve, inspect and repair the node. Tables for people, --json for scripts."""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from pacsnode import __version__, admin, logformat
from pacsnode.config import Config, load_config
from pacsnode.config import config_path as resolve_config_path
from pacsnode.db import make_engine, make_sessionmaker, upgrade, utcnow
from pacsnode.errors import AdminError, PacsnodeError
from pacsnode.gates import GATE_FILE, gate_header, verified_gate_weights
from pacsnode.manifest import Manifest, load_manifest, sha256_file
from pacsnode.service import COMPONENTS, Node
from pacsnode.tables import (
    AssociationLog,
    Delivery,
    Event,
    Instance,
    Job,
    JobState,
    RoutingDecision,
    Series,
    Study,
)

console = Console()


def _config(ctx: click.Context) -> Config:
    obj = ctx.ensure_object(dict)
    if "config" not in obj:
        obj["config"] = load_config(obj["config_path"])
    config: Config = obj["config"]
    return config


def _session(ctx: click.Context, migrate: bool = True) -> Session:
    config = _config(ctx)
    engine = make_engine(config.storage.database_url, config.storage.db_busy_timeout_seconds)
    if migrate:
        upgrade(engine)
    return make_sessionmaker(engine)()


def _emit(rows: list[dict[str, Any]], as_json: bool, title: str) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title=title)
    if not rows:
        console.print(f"{title}: none")
        return
    for key in rows[0]:
        table.add_column(key)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row.values()))
    console.print(table)


class _Main(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PacsnodeError as exc:
            click.echo(f"pacsnode: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Main)
@click.version_option(__version__, prog_name="pacsnode")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Configuration file used by every subcommand [default: $PACSNODE_CONFIG, else "
    "config/pacsnode.toml, else /etc/pacsnode/pacsnode.toml].",
)
@click.option("--log-level", default=None, help="Override [logging] level.")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, log_level: str | None) -> None:
    """pacsnode: a DICOM AI inference node.

    Every command takes --help; listing commands take --json for scripts.

    \b
    Exit codes, for scripts:
      0  done
      1  the command ran but found a problem or nothing to act on (an unknown job, a
         destination that does not answer, a requeue that matched nothing)
      2  bad usage or configuration (the message names the option or key)
      3  `pacsnode audit` only: report written, output drift flagged

    \b
    Example:
      pacsnode --config /etc/pacsnode/pacsnode.toml status
    """
    ctx.ensure_object(dict)["config_path"] = resolve_config_path(config_path)
    ctx.obj["log_level"] = log_level


@main.command()
@click.option(
    "--components",
    default=",".join(COMPONENTS),
    show_default=True,
    help="Comma-separated parts to run (receiver, worker, dispatch, scheduler).",
)
@click.pass_context
def serve(ctx: click.Context, components: str) -> None:
    """Run the node until SIGINT/SIGTERM.

    \b
    Examples:
      pacsnode serve
      pacsnode serve --components receiver
    """
    config = _config(ctx)
    logformat.configure(config.logging, ctx.obj["log_level"])
    node = Node(config, tuple(c.strip() for c in components.split(",") if c.strip()))
    stopped = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    node.start()
    logformat.announce(
        config.logging,
        f"pacsnode listening as {config.node.ae_title} on {config.node.host}:{config.node.port}"
        if "receiver" in node.components
        else f"pacsnode running: {components}",
    )
    try:
        stopped.wait()
    finally:
        node.shutdown()


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Counts by state and the latest errors.

    \b
    Example:
      pacsnode status --json
    """
    with _session(ctx) as s:
        report: dict[str, Any] = {
            "studies": s.scalar(select(func.count(Study.id))),
            "series": s.scalar(select(func.count(Series.id))),
            "series_waiting": s.scalar(
                select(func.count(Series.id)).where(Series.completed_at.is_(None))
            ),
            "instances": s.scalar(select(func.count(Instance.id))),
            "jobs": {
                str(k): v
                for k, v in s.execute(select(Job.state, func.count(Job.id)).group_by(Job.state))
            },
            "deliveries": {
                str(k): v
                for k, v in s.execute(
                    select(Delivery.state, func.count(Delivery.id)).group_by(Delivery.state)
                )
            },
            "last_errors": [
                {"at": e.at.isoformat(timespec="seconds"), "kind": e.kind, "message": e.message}
                for e in s.scalars(
                    select(Event).where(Event.level == "error").order_by(Event.id.desc()).limit(10)
                )
            ],
        }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    counts = Table(title="pacsnode status")
    counts.add_column("what")
    counts.add_column("count", justify="right")
    for key in ("studies", "series", "series_waiting", "instances"):
        counts.add_row(key.replace("_", " "), str(report[key]))
    for group in ("jobs", "deliveries"):
        for state, n in sorted(report[group].items()):
            counts.add_row(f"{group} {state}", str(n))
    console.print(counts)
    _emit(report["last_errors"], False, "last errors")


@main.command()
@click.option("--state", type=click.Choice([s.value for s in JobState]), default=None)
@click.option("--study", "study_uid", default=None, help="StudyInstanceUID")
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def jobs(
    ctx: click.Context, state: str | None, study_uid: str | None, limit: int, as_json: bool
) -> None:
    """Jobs, newest first; with --study, every routing decision for the study and its reason.

    For CT volume models that is the series selection: which series was chosen and why
    each other series (scout, thick slices, lung kernel...) was not.

    \b
    Examples:
      pacsnode jobs --state dead
      pacsnode jobs --study 1.2.826.0.1.3680043.8.498.1234 --json
    """
    with _session(ctx) as s:
        query = (
            select(Job, Series, Study)
            .join(Series, Job.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
        )
        if state:
            query = query.where(Job.state == JobState(state))
        if study_uid:
            query = query.where(Study.study_uid == study_uid)
        rows = [
            {
                "id": job.id,
                "study": study.study_uid,
                "series": series.series_uid,
                "modality": series.modality,
                "model": f"{job.model_name} {job.model_version}",
                "state": job.state.value,
                "attempts": job.attempts,
                "updated": job.updated_at.isoformat(timespec="seconds"),
                "error": job.last_error,
            }
            for job, series, study in s.execute(query.order_by(Job.id.desc()).limit(limit))
        ]
        routing = []
        if study_uid:
            routing = [
                {
                    "series": series.series_uid,
                    "modality": series.modality,
                    "model": d.model_name,
                    "accepted": d.accepted,
                    "reason": d.reason,
                }
                for d, series in s.execute(
                    select(RoutingDecision, Series)
                    .join(Series, RoutingDecision.series_id == Series.id)
                    .join(Study, Series.study_id == Study.id)
                    .where(Study.study_uid == study_uid)
                    .order_by(RoutingDecision.model_name, Series.id)
                )
            ]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "jobs": rows,
                    "routing": routing,
                    "declined": [r for r in routing if not r["accepted"]],
                },
                indent=2,
            )
        )
        return
    _emit(rows, False, "jobs")
    if study_uid:
        _emit(routing, False, "routing decisions")


_RELATIVE = re.compile(r"^(\d+)\s*([smhd])$")


def _since(value: str | None, option: str = "--since") -> datetime | None:
    """``--since`` (or ``option``): an ISO date/time (UTC unless it names a zone) or an age like
    30m, 2h, 7d."""
    if value is None:
        return None
    relative = _RELATIVE.match(value.strip())
    if relative:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[relative.group(2)]
        return utcnow() - timedelta(**{unit: int(relative.group(1))})
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise click.BadParameter(
            f"{value!r} is neither an ISO date/time nor an age like 30m, 2h, 7d",
            param_hint=option,
        ) from exc
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def _association_row(a: AssociationLog) -> dict[str, Any]:
    counts = f"{a.instances} instances, {a.refused} refused, {a.bytes} bytes"
    message = (
        f"{a.calling_aet or '?'} at {a.peer_address}:{a.peer_port} → {a.called_aet or '?'}"
        f"{' over TLS' if a.tls else ''}{f' ({a.tls_peer})' if a.tls_peer else ''}: {a.result}"
        f"{', ' + a.outcome if a.outcome and a.outcome != a.result else ''}"
        f"{', still open' if a.ended_at is None else ''}"
        f"{', ' + counts if a.result == 'accepted' else ''}{f' — {a.reason}' if a.reason else ''}"
    )
    return {
        "at": a.started_at.isoformat(timespec="seconds"),
        "kind": f"association-{a.result}",
        "level": "info" if a.result == "accepted" else "warning",
        "study": None,
        "job": None,
        "message": message,
        "association": {
            "id": a.id,
            "calling_aet": a.calling_aet,
            "called_aet": a.called_aet,
            "peer_address": a.peer_address,
            "peer_port": a.peer_port,
            "tls": a.tls,
            "tls_peer": a.tls_peer,
            "result": a.result,
            "outcome": a.outcome,
            "reason": a.reason,
            "started_at": a.started_at.isoformat(),
            "ended_at": a.ended_at.isoformat() if a.ended_at else None,
            "instances": a.instances,
            "refused": a.refused,
            "bytes": a.bytes,
        },
    }


@main.command()
@click.option("--since", default=None, help="ISO date/time (UTC) or an age: 30m, 2h, 7d.")
@click.option("--study", "study_uid", default=None, help="StudyInstanceUID")
@click.option("--limit", default=200, show_default=True, help="Newest rows kept.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def events(
    ctx: click.Context, since: str | None, study_uid: str | None, limit: int, as_json: bool
) -> None:
    """The audit trail, oldest first: associations, job state changes, deliveries.

    With --study, the events of that study, its series, jobs and their deliveries;
    associations are not tied to a study and are left out.

    \b
    Examples:
      pacsnode events --since 2h
      pacsnode events --study 1.2.826.0.1.3680043.8.498.1234 --json
    """
    start = _since(since)
    rows: list[tuple[datetime, int, dict[str, Any]]] = []  # (time, id, row): oldest first
    with _session(ctx) as s:
        query = select(Event)
        if start is not None:
            query = query.where(Event.at >= start)
        if study_uid:
            series_uids = select(Series.series_uid).join(Study).where(Study.study_uid == study_uid)
            job_ids = select(Job.id).join(Series).join(Study).where(Study.study_uid == study_uid)
            query = query.where(
                or_(
                    Event.study_uid == study_uid,
                    Event.series_uid.in_(series_uids),
                    Event.job_id.in_(job_ids),
                )
            )
        for e in s.scalars(query.order_by(Event.id.desc()).limit(limit)):
            rows.append(
                (
                    e.at,
                    e.id,
                    {
                        "at": e.at.isoformat(timespec="seconds"),
                        "kind": e.kind,
                        "level": e.level,
                        "study": e.study_uid,
                        "job": e.job_id,
                        "message": e.message,
                    },
                )
            )
        if not study_uid:
            assoc = select(AssociationLog)
            if start is not None:
                assoc = assoc.where(
                    or_(AssociationLog.started_at >= start, AssociationLog.ended_at >= start)
                )
            for a in s.scalars(assoc.order_by(AssociationLog.id.desc()).limit(limit)):
                rows.append((a.started_at, a.id, _association_row(a)))
    ordered = [row for _, _, row in sorted(rows, key=lambda r: (r[0], r[1]))[-limit:]]
    if as_json:
        click.echo(json.dumps(ordered, indent=2))
        return
    _emit(
        [{k: v for k, v in row.items() if k != "association"} for row in ordered], False, "events"
    )


@main.command()
@click.argument("job_id", type=int, required=False)
@click.option("--study", "study_uid", default=None, help="Jobs of this StudyInstanceUID.")
@click.option("--accession", default=None, help="Jobs of the study with this AccessionNumber.")
@click.option(
    "--since", default=None, help="Jobs created since: ISO date/time (UTC) or 30m, 2h, 7d."
)
@click.option("--until", default=None, help="Jobs created before: ISO date/time (UTC) or an age.")
@click.option("--model", default=None, help="Jobs of this model (name).")
@click.option(
    "--failed", is_flag=True, help="Failed and dead jobs, and every failed or dead delivery."
)
@click.option("--dry-run", is_flag=True, help="List what would be requeued; change nothing.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def requeue(
    ctx: click.Context,
    job_id: int | None,
    study_uid: str | None,
    accession: str | None,
    since: str | None,
    until: str | None,
    model: str | None,
    failed: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Put jobs back in the queue; the criteria given all apply.

    Queued and running jobs, and jobs whose series has no instances left (purged), are
    skipped with the reason. Exit code 1 when nothing matched.

    \b
    Examples:
      pacsnode requeue 42
      pacsnode requeue --accession A2026-0017
      pacsnode requeue --model ct-pe --since 2026-12-01T02:00 --until 2026-12-01T06:00
      pacsnode requeue --failed --since 1d --json
    """
    criteria = admin.JobFilter(
        job_id=job_id,
        study_uid=study_uid,
        accession=accession,
        since=_since(since, "--since"),
        until=_since(until, "--until"),
        model=model,
        failed=failed,
    )
    now = utcnow()
    with _session(ctx) as s, s.begin():
        selected = admin.select_jobs(s, criteria)
        if dry_run:
            rows = [_job_row(job) for job in selected]
            _emit(rows, as_json, "would requeue")
            if not selected:
                sys.exit(1)
            return
        with _progress_bar(as_json or len(selected) < 500, "requeueing") as progress:
            done = admin.requeue(s, selected, now, deliveries=failed, progress=progress)
    report = {"requeued": done.jobs, "skipped": done.skipped, "deliveries": done.deliveries}
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(
            f"requeued {len(done.jobs)} jobs"
            + (f" and {done.deliveries} deliveries" if failed else "")
        )
        for skipped_id, why in done.skipped.items():
            click.echo(f"  skipped job {skipped_id}: {why}")
    if not selected and not done.deliveries:
        sys.exit(1)


def _job_row(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "model": f"{job.model_name} {job.model_version}",
        "state": job.state.value,
        "created": job.created_at.isoformat(timespec="seconds"),
        "error": job.last_error,
    }


@contextmanager
def _progress_bar(quiet: bool, what: str) -> Iterator[Callable[[int, int], None] | None]:
    """A ``progress(done, total)`` callback drawing a bar on stderr for people at a terminal."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance


@main.command()
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def cancel(ctx: click.Context, job_id: int, as_json: bool) -> None:
    """Stop a queued, failed or running job (a running job's result is discarded).

    `pacsnode requeue JOB_ID` brings it back. Exit code 1 when the job does not exist or
    has already finished.

    \b
    Example:
      pacsnode cancel 42
    """
    with _session(ctx) as s, s.begin():
        try:
            job = admin.cancel(s, job_id, utcnow())
        except AdminError as exc:
            click.echo(f"pacsnode: {exc}", err=True)
            sys.exit(1)
        row = _job_row(job)
    if as_json:
        click.echo(json.dumps(row, indent=2))
    else:
        click.echo(f"job {job_id} cancelled")


@main.command()
@click.argument("series_uid")
@click.option("--model", "model_name", required=True, help="An enabled model's name.")
@click.option(
    "--force", is_flag=True, help="Run it even where the model's manifest declines the series."
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def replay(
    ctx: click.Context, series_uid: str, model_name: str, force: bool, as_json: bool
) -> None:
    """Run a model on a stored series again, e.g. after installing new weights.

    The installed version of the model runs; results of a new version go out as new
    objects, a rerun of the same version replaces its earlier ones. Exit code 1 when the
    series or model is unknown, the series is not stored or not complete, or the model
    declines it (the reason is printed).

    \b
    Example:
      pacsnode replay 1.2.826.0.1.3680043.8.498.1234 --model ct-pe
    """
    config = _config(ctx)
    if model_name not in config.models.enabled:
        click.echo(
            f"pacsnode: model {model_name!r} is not enabled "
            f"(enabled: {', '.join(config.models.enabled) or 'none'})",
            err=True,
        )
        sys.exit(1)
    manifest = load_manifest(config.models.dir / model_name)
    with _session(ctx) as s, s.begin():
        try:
            job = admin.replay(s, series_uid, manifest, utcnow(), force=force)
        except AdminError as exc:
            click.echo(f"pacsnode: {exc}", err=True)
            sys.exit(1)
        row = _job_row(job)
    if as_json:
        click.echo(json.dumps(row, indent=2))
    else:
        click.echo(
            f"series {series_uid} queued for {manifest.name} {manifest.version} as job {row['id']}"
        )


@main.group()
def destinations() -> None:
    """The PACS and other nodes results are sent to ([[destinations]] in the config)."""


@destinations.command("test")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds per destination.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def destinations_test(ctx: click.Context, timeout: float, as_json: bool) -> None:
    """C-ECHO every destination with the AE title deliveries use.

    Exit code 1 when any destination does not answer (or none is configured).

    \b
    Example:
      pacsnode destinations test
    """
    config = _config(ctx)
    rows = []
    for dest in config.destinations:
        calling = dest.calling_ae_title or config.node.ae_title
        result = admin.echo(dest, calling, timeout)
        rows.append(
            {
                "name": dest.name,
                "ae_title": dest.ae_title,
                "address": f"{dest.host}:{dest.port}",
                "calling_ae_title": calling,
                "ok": result.ok,
                "ms": result.milliseconds,
                "detail": result.detail,
            }
        )
    _emit(rows, as_json, "destinations")
    if not rows or not all(row["ok"] for row in rows):
        sys.exit(1)


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply the migrations up to the newest revision (run it after every upgrade).

    \b
    Example:
      pacsnode db upgrade
    """
    config = _config(ctx)
    upgrade(make_engine(config.storage.database_url))
    click.echo(f"database {config.storage.database_url} is up to date")


@main.command()
@click.option(
    "--date",
    "day",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="Local day to report, YYYY-MM-DD (default: yesterday in [audit] timezone).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@click.pass_context
def audit(ctx: click.Context, day: Any, as_json: bool) -> None:
    """Write the audit report of one day to [audit] reports_dir and summarise it.

    \b
    Example:  pacsnode audit --date 2025-03-04
    Writes <reports_dir>/2025-03-04.html (open it in a browser) and .json.
    Exit status: 0 written; 3 written and output drift flagged; 2 bad configuration.
    """
    from datetime import timedelta

    from pacsnode.audit import local_day, run_audit, zone

    config = _config(ctx)
    now = utcnow()
    tz = zone(config)
    target = day.date() if day else local_day(now, tz) - timedelta(days=1)
    with _session(ctx) as s:
        report = run_audit(s, target, now, config, tz=tz)
    if as_json:
        click.echo(
            json.dumps(
                {"json": str(report.json_path), "html": str(report.html_path), **report.data},
                indent=2,
            )
        )
    else:
        total = report.data["received"]["total"]
        console.print(
            f"audit {target} ({report.data['timezone']}): {total['studies']} studies, "
            f"{total['instances']} instances received"
        )
        _emit(report.data["jobs"], False, "jobs created, by state now")
        _emit(
            [
                {"model": r["model"], "delivered": r["to_delivered"]["count"]}
                | {f"{k} s": r["to_delivered"][k] for k in ("p50", "p95", "max")}
                for r in report.data["latency"]
            ],
            False,
            "last instance to delivered",
        )
        _emit(report.flagged, False, "output drift flagged")
        click.echo(f"wrote {report.html_path} and {report.json_path}")
    if report.flagged:
        sys.exit(3)


@main.command()
@click.option("--dry-run", is_flag=True, help="List what the policy would delete; delete nothing.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def purge(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Delete received instances the [retention] policy lets go, and list them.

    A series goes `delivered_days` after all its results were delivered (or it completed,
    when no model took it), `failed_days` after it when a job or delivery of it is dead;
    nothing queued, running, retrying or undelivered is ever touched.

    \b
    Example:  pacsnode purge --dry-run
    Exit status: 0 done (or nothing to do); 1 retention disabled; 2 bad configuration.
    """
    from pacsnode import retention

    config = _config(ctx)
    if not config.retention.enabled and not dry_run:
        raise click.ClickException(
            "retention is disabled ([retention] enabled = false); "
            "`pacsnode purge --dry-run` shows what the policy would delete"
        )
    with _session(ctx) as s, _progress_bar(as_json, "purging") as progress:
        result = retention.purge(
            s,
            utcnow(),
            config.retention,
            config.storage.spool_dir,
            dry_run=dry_run,
            progress=progress,
        )
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    _emit([p.as_dict() for p in result.series], False, "would delete" if dry_run else "deleted")
    verb = "would delete" if dry_run else "deleted"
    click.echo(
        f"{verb} {result.instances} instances ({result.bytes} bytes) of {len(result.series)} series"
    )


@main.command("scheduler")
@click.option("--next", "show_next", is_flag=True, help="Print each job's next run and exit.")
@click.pass_context
def scheduler_command(ctx: click.Context, show_next: bool) -> None:
    """Run only the nightly jobs: the audit at [audit] run_at, the purge at [retention] run_at.

    The same as `pacsnode serve --components scheduler`; this is what the
    pacsnode-scheduler systemd unit runs.

    \b
    Example:  pacsnode scheduler --next
    """
    if show_next:
        from pacsnode.scheduler import NightlyScheduler

        config = _config(ctx)
        nightly = NightlyScheduler(
            config, make_sessionmaker(make_engine(config.storage.database_url))
        )
        nightly.configure()
        for name, at in nightly.next_runs(utcnow()).items():
            click.echo(f"{name}: {at.isoformat() if at else 'never'}")
        return
    ctx.invoke(serve, components="scheduler")


@main.group()
def models() -> None:
    """Installed models."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """Every model folder, whether enabled, and whether its weights match the manifest.

    \b
    Example:
      pacsnode models list --json
    """
    config = _config(ctx)
    rows: list[dict[str, Any]] = []
    gate_users: dict[str, list[str]] = {}
    for folder in sorted(p for p in config.models.dir.iterdir() if (p / "manifest.toml").is_file()):
        try:
            m = load_manifest(folder)
        except PacsnodeError as exc:
            rows.append({"name": folder.name, "error": str(exc)})
            continue
        weights = folder / m.weights.file
        ok = weights.is_file() and sha256_file(weights) == m.weights.sha256
        gate = m.accepts.scope.content_gate
        if gate and m.name in config.models.enabled:
            gate_users.setdefault(gate, []).append(m.name)
        rows.append(
            {
                "name": m.name,
                "version": m.version,
                "kind": m.kind,
                "enabled": m.name in config.models.enabled,
                "weights": "ok" if ok else "MISMATCH or missing",
                "training": "synthetic phantoms (not clinical)" if m.synthetic else "site weights",
                "reported": ", ".join(label.name for label in m.reported_labels),
                "gates": ", ".join(_gates_of(m)),
            }
        )
    for path in sorted((config.models.dir / "gates").glob(f"*/{GATE_FILE}")):
        rows.append(_gate_row(path.parent, gate_users.get(path.parent.name, [])))
    _emit(rows, as_json, "models")


def _gates_of(manifest: Manifest) -> list[str]:
    """What keeps a model off inputs it was not made for, in a few words."""
    scope = manifest.accepts.scope
    gates = ["header scope"] if scope.body_parts or scope.refuse_words else []
    if scope.content_gate:
        gates.append(f"content: {scope.content_gate}")
    if manifest.ood is not None:
        gates.append("out of distribution")
    return gates


def _gate_row(folder: Path, users: list[str]) -> dict[str, Any]:
    """A content gate's row: whether its weights match, and which enabled models use it."""
    try:
        spec = gate_header(folder)
    except PacsnodeError as exc:
        return {"name": f"gates/{folder.name}", "error": str(exc)}
    try:
        verified_gate_weights(folder, spec.name, spec.weights.file, spec.weights.sha256)
        ok = True
    except PacsnodeError:
        ok = False
    return {
        "name": f"gates/{spec.name}",
        "version": spec.version,
        "kind": spec.kind,
        "enabled": bool(users),
        "weights": "ok" if ok else "MISMATCH or missing",
        "training": "synthetic phantoms (not clinical)" if spec.synthetic else "site weights",
        "reported": "content gate of " + (", ".join(users) or "no enabled model"),
        "gates": "",
    }


@models.command("import-chexnet")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--model-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Target model folder (default: <models.dir>/cxr-chexnet).",
)
@click.pass_context
def models_import_chexnet(ctx: click.Context, checkpoint: Path, model_dir: Path | None) -> None:
    """Convert a public CheXNet checkpoint into this node's weights format.

    \b
    Example:
      pacsnode models import-chexnet model.pth.tar
    """
    from pacsnode.models.cxr import import_chexnet

    target = model_dir or _config(ctx).models.dir / "cxr-chexnet"
    path = import_chexnet(checkpoint, target)
    click.echo(f"wrote {path}; update {target / 'MODEL_CARD.md'} with the weights' provenance")


@models.command("calibrate")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--images",
    "folder",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of the site's own DICOM (searched recursively), of the kind the model reads.",
)
@click.option(
    "--quantile",
    default=0.99,
    show_default=True,
    help="Share of in-distribution inputs the threshold admits (0.99: 1 % flagged).",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def models_calibrate(
    ctx: click.Context, model_dir: Path, folder: Path, quantile: float, as_json: bool
) -> None:
    """Compute a model's out-of-distribution statistics from a folder of the site's DICOM.

    Half the usable inputs fit the distribution of the model's features, the other half
    set the threshold; the result is written to MODEL_DIR/ood.safetensors and pinned in its
    manifest. Restart the worker to use it.

    \b
    Example:
      pacsnode models calibrate models/cxr-chexnet --images /srv/validation/cxr
    """
    from pacsnode.gates.calibrate import FEW_INPUTS, calibrate_folder

    config = _config(ctx)
    try:
        result = calibrate_folder(
            model_dir,
            folder,
            gates_dir=config.models.dir / "gates",
            quantile=quantile,
            progress=lambda line: click.echo(line, err=True),
        )
    except (PacsnodeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    row = {
        "model": model_dir.name,
        "inputs": result.inputs,
        "fitted": result.stats.n_fit,
        "threshold_set_on": result.stats.n_calibration,
        "threshold": round(result.stats.threshold, 3),
        "quantile": quantile,
        "held_out_flagged": round(result.held_out_flagged, 4),
        "skipped": ", ".join(f"{k}: {v}" for k, v in sorted(result.skipped.items())) or "none",
        "sha256": result.sha256,
        "note": (
            f"fewer than {FEW_INPUTS} inputs: the threshold is rough; check the flag rate on "
            "new studies"
            if result.inputs < FEW_INPUTS
            else ""
        ),
    }
    _emit([row], as_json, "out-of-distribution calibration")


@main.group("config")
def config_group() -> None:
    """Configuration."""


@config_group.command("check")
@click.pass_context
def config_check(ctx: click.Context) -> None:
    """Validate the configuration and print the effective values.

    \b
    Example:
      pacsnode --config /etc/pacsnode/pacsnode.toml config check
    """
    config = _config(ctx)
    click.echo(json.dumps(config.model_dump(mode="json"), indent=2))
    click.echo(f"{ctx.obj['config_path']}: OK", err=True)


if __name__ == "__main__":
    main()
