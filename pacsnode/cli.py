"""The `pacsnode` command: serve, inspect and repair the node. Tables for people, --json for scripts."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacsnode import queue
from pacsnode.config import DEFAULT_CONFIG, Config, load_config
from pacsnode.db import make_engine, make_sessionmaker, upgrade, utcnow
from pacsnode.errors import PacsnodeError
from pacsnode.manifest import load_manifest, sha256_file
from pacsnode.service import COMPONENTS, Node
from pacsnode.tables import (
    Delivery,
    DeliveryState,
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
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="Configuration file used by every subcommand.",
)
@click.option("--log-level", default=None, help="Override [logging] level.")
@click.pass_context
def main(ctx: click.Context, config_path: Path, log_level: str | None) -> None:
    """pacsnode: a DICOM AI inference node."""
    ctx.ensure_object(dict)["config_path"] = config_path
    ctx.obj["log_level"] = log_level


@main.command()
@click.option(
    "--components",
    default=",".join(COMPONENTS),
    show_default=True,
    help="Comma-separated parts to run (receiver, worker, dispatch).",
)
@click.pass_context
def serve(ctx: click.Context, components: str) -> None:
    """Run the node until SIGINT/SIGTERM."""
    config = _config(ctx)
    logging.basicConfig(
        level=(ctx.obj["log_level"] or config.logging.level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    node = Node(config, tuple(c.strip() for c in components.split(",") if c.strip()))
    stopped = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    node.start()
    click.echo(
        f"pacsnode listening as {config.node.ae_title} on {config.node.host}:{config.node.port}"
        if "receiver" in node.components
        else f"pacsnode running: {components}",
        err=True,
    )
    try:
        stopped.wait()
    finally:
        node.shutdown()


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Counts by state and the latest errors."""
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


@main.command()
@click.argument("job_id", type=int, required=False)
@click.option("--study", "study_uid", default=None, help="Requeue every job of this study.")
@click.option("--failed", is_flag=True, help="Requeue failed and dead jobs and deliveries.")
@click.pass_context
def requeue(ctx: click.Context, job_id: int | None, study_uid: str | None, failed: bool) -> None:
    """Put jobs (and with --failed, dead deliveries) back in the queue."""
    if sum(x is not None and x is not False for x in (job_id, study_uid, failed)) != 1:
        raise click.UsageError("give exactly one of JOB_ID, --study UID, --failed")
    now = utcnow()
    with _session(ctx) as s, s.begin():
        query = select(Job)
        if job_id is not None:
            query = query.where(Job.id == job_id)
        elif study_uid:
            query = (
                query.join(Series, Job.series_id == Series.id)
                .join(Study, Series.study_id == Study.id)
                .where(Study.study_uid == study_uid)
            )
        else:
            query = query.where(Job.state.in_([JobState.FAILED, JobState.DEAD]))
        selected = list(s.scalars(query))
        if job_id is not None and not selected:
            raise click.ClickException(f"no job {job_id}")
        count = queue.requeue(s, selected, now)
        revived = 0
        if failed:
            for delivery in s.scalars(
                select(Delivery).where(
                    Delivery.state.in_([DeliveryState.FAILED, DeliveryState.DEAD])
                )
            ):
                delivery.state = DeliveryState.PENDING
                delivery.attempts = 0
                delivery.not_before = now
                delivery.updated_at = now
                revived += 1
    click.echo(f"requeued {count} jobs" + (f" and {revived} deliveries" if failed else ""))


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply the migrations up to the newest revision."""
    config = _config(ctx)
    upgrade(make_engine(config.storage.database_url))
    click.echo(f"database {config.storage.database_url} is up to date")


@main.group()
def models() -> None:
    """Installed models."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """Every model folder, whether enabled, and whether its weights match the manifest."""
    config = _config(ctx)
    rows: list[dict[str, Any]] = []
    for folder in sorted(p for p in config.models.dir.iterdir() if (p / "manifest.toml").is_file()):
        try:
            m = load_manifest(folder)
        except PacsnodeError as exc:
            rows.append({"name": folder.name, "error": str(exc)})
            continue
        weights = folder / m.weights.file
        ok = weights.is_file() and sha256_file(weights) == m.weights.sha256
        rows.append(
            {
                "name": m.name,
                "version": m.version,
                "kind": m.kind,
                "enabled": m.name in config.models.enabled,
                "weights": "ok" if ok else "MISMATCH or missing",
                "training": "synthetic phantoms (not clinical)" if m.synthetic else "site weights",
                "reported": ", ".join(label.name for label in m.reported_labels),
            }
        )
    _emit(rows, as_json, "models")


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
    """Convert a public CheXNet checkpoint into this node's weights format."""
    from pacsnode.models.cxr import import_chexnet

    target = model_dir or _config(ctx).models.dir / "cxr-chexnet"
    path = import_chexnet(checkpoint, target)
    click.echo(f"wrote {path}; update {target / 'MODEL_CARD.md'} with the weights' provenance")


@main.group("config")
def config_group() -> None:
    """Configuration."""


@config_group.command("check")
@click.pass_context
def config_check(ctx: click.Context) -> None:
    """Validate the configuration and print the effective values."""
    config = _config(ctx)
    click.echo(json.dumps(config.model_dump(mode="json"), indent=2))
    click.echo(f"{ctx.obj['config_path']}: OK", err=True)


if __name__ == "__main__":
    main()
