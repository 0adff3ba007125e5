"""Retention: what is done and old leaves the spool; what is still in flight is never touched."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from opsdb import History, make_config, make_sessions
from sqlalchemy import func, select

from pacsnode.cli import main as cli_main
from pacsnode.config import Config
from pacsnode.db import utcnow
from pacsnode.retention import purge
from pacsnode.tables import DeliveryState, Event, Instance, Job, JobState, Series

NOW = datetime(2025, 6, 1, 12, 0)
OLD = NOW - timedelta(days=100)


def days_ago(n: float) -> datetime:
    return NOW - timedelta(days=n)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, "[retention]\ndelivered_days = 7\nfailed_days = 30\n")


def delivered(h: History, at: datetime, **kw: object) -> Series:
    series = h.series(at - timedelta(minutes=5), **kw)  # type: ignore[arg-type]
    job = h.job(series, JobState.SUCCEEDED, at - timedelta(minutes=1))
    h.delivery(h.output(job, at), DeliveryState.DELIVERED, at)
    return series


@dataclass(frozen=True)
class Laid:
    id: int
    series_uid: str
    folder: Path


@pytest.fixture
def layout(config: Config) -> dict[str, Laid]:
    """One series per rule; the key says whether the purge may take it at NOW."""
    sessions = make_sessions(config)
    session = sessions()
    h = History(session, config.storage.spool_dir)
    s: dict[str, Series] = {}
    s["go: delivered 10 days ago"] = delivered(h, days_ago(10))
    s["keep: delivered 2 days ago"] = delivered(h, days_ago(2))
    for state in (JobState.QUEUED, JobState.RUNNING, JobState.FAILED):
        series = h.series(OLD)
        h.job(series, state, OLD)
        s[f"keep: job {state.value} since 100 days"] = series
    for state in (DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.FAILED):
        series = h.series(OLD)
        job = h.job(series, JobState.SUCCEEDED, OLD)
        h.delivery(h.output(job, OLD), state, OLD)
        s[f"keep: delivery {state.value} since 100 days"] = series
    series = h.series(OLD)
    job = h.job(series, JobState.SUCCEEDED, OLD)
    h.delivery(h.output(job, OLD), DeliveryState.DELIVERED, OLD, destination="pacs")
    h.delivery(h.output(job, OLD, "ko"), DeliveryState.PENDING, OLD, destination="pacs")
    s["keep: one of two results undelivered"] = series
    series = delivered(h, OLD)
    h.job(series, JobState.QUEUED, OLD, model="cxr-chexnet")
    s["keep: one model delivered, another queued"] = series
    series = h.series(days_ago(10))
    h.job(series, JobState.DEAD, days_ago(10), error="cannot read")
    s["keep: dead job 10 days ago"] = series
    series = h.series(days_ago(40))
    h.job(series, JobState.DEAD, days_ago(40), error="cannot read")
    s["go: dead job 40 days ago"] = series
    series = delivered(h, days_ago(40))
    job = h.job(series, JobState.SUCCEEDED, days_ago(40), model="ct-kidney")
    h.delivery(h.output(job, days_ago(40)), DeliveryState.DEAD, days_ago(12))
    s["keep: delivery dead 12 days ago"] = series
    s["go: not routed, complete 8 days ago"] = h.series(days_ago(8))
    s["keep: not routed, complete 6 days ago"] = h.series(days_ago(6))
    s["keep: incomplete since 100 days"] = h.series(OLD, completed=False)
    laid = {
        key: Laid(
            series.id,
            series.series_uid,
            config.storage.spool_dir / series.study.study_uid / series.series_uid,
        )
        for key, series in s.items()
    }
    h.commit()
    session.close()
    return laid


def spool_files(config: Config) -> set[Path]:
    return {p for p in config.storage.spool_dir.rglob("*.dcm")}


def test_purges_only_done_and_old_series(config: Config, layout: dict[str, Laid]) -> None:
    sessions = make_sessions(config)
    before = spool_files(config)
    with sessions() as session:
        result = purge(session, NOW, config.retention, config.storage.spool_dir)
    gone = {p.series_uid for p in result.series}
    expected = {s.series_uid for key, s in layout.items() if key.startswith("go:")}
    assert gone == expected, {
        k for k, s in layout.items() if (s.series_uid in gone) != k.startswith("go:")
    }
    assert {p.outcome for p in result.series} == {"delivered", "failed", "not routed"}
    assert result.instances == 3 * len(expected) and result.bytes == 3000 * len(expected)

    with sessions() as session:
        for key, series in layout.items():
            rows = session.scalar(
                select(func.count(Instance.id)).where(Instance.series_id == series.id)
            )
            kept = key.startswith("keep:")
            assert rows == (3 if kept else 0), key
            assert series.folder.is_dir() == kept, key  # emptied series and study folders go too
            # the history stays: series, jobs and instance counts
            assert session.get(Series, series.id).instance_count == 3
        purged_events = session.scalars(select(Event).where(Event.kind == "retention-purged"))
        assert {e.series_uid for e in purged_events} == expected
        assert session.scalar(select(func.count(Job.id))) == 15
    assert len(before - spool_files(config)) == 3 * len(expected)
    assert config.storage.spool_dir.is_dir()

    with sessions() as session:  # nothing left to do the second time
        assert purge(session, NOW, config.retention, config.storage.spool_dir).series == []


def test_dry_run_lists_the_same_and_deletes_nothing(
    config: Config, layout: dict[str, Laid]
) -> None:
    sessions = make_sessions(config)
    before = spool_files(config)
    with sessions() as session:
        dry = purge(session, NOW, config.retention, config.storage.spool_dir, dry_run=True)
        rows = session.scalar(select(func.count(Instance.id)))
    assert spool_files(config) == before
    assert rows == 3 * len(layout)
    assert dry.dry_run and {p.series_uid for p in dry.series} == {
        s.series_uid for k, s in layout.items() if k.startswith("go:")
    }
    with sessions() as session:
        real = purge(session, NOW, config.retention, config.storage.spool_dir)
    assert [p.as_dict() for p in real.series] == [p.as_dict() for p in dry.series]


def test_a_file_already_gone_does_not_stop_the_purge(
    config: Config, layout: dict[str, Laid]
) -> None:
    series = layout["go: delivered 10 days ago"]
    next(series.folder.iterdir()).unlink()
    sessions = make_sessions(config)
    with sessions() as session:
        result = purge(session, NOW, config.retention, config.storage.spool_dir)
        assert series.series_uid in {p.series_uid for p in result.series}
        left = session.scalar(
            select(func.count(Instance.id)).where(Instance.series_id == series.id)
        )
    assert left == 0


def test_cli_purge_dry_run_json_and_disabled_policy(
    tmp_path: Path, config: Config, layout: dict[str, Laid]
) -> None:
    toml = tmp_path / "pacsnode.toml"
    toml.write_text(
        f"""
[storage]
spool_dir = "{config.storage.spool_dir}"
output_dir = "{config.storage.output_dir}"
database_url = "{config.storage.database_url}"
[retention]
enabled = false
delivered_days = 1
"""
    )
    runner = CliRunner()
    result = runner.invoke(cli_main, ["--config", str(toml), "purge", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["dry_run"] is True
    # the CLI runs at the real clock: the same as purge() at utcnow() with that policy
    with make_sessions(config)() as session:
        policy = config.retention.model_copy(update={"delivered_days": 1.0})
        expected = purge(session, utcnow(), policy, config.storage.spool_dir, dry_run=True)
    assert report["series_count"] == len(expected.series) == 7
    assert {row["series_uid"] for row in report["series"]} == {
        p.series_uid for p in expected.series
    }
    refused = runner.invoke(cli_main, ["--config", str(toml), "purge"])
    assert refused.exit_code == 1 and "disabled" in refused.output
    assert len(spool_files(config)) == 3 * len(layout)
