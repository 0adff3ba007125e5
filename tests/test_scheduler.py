"""The scheduler fires the nightly jobs at the configured local times; nothing here sleeps.

Next fire times are computed by the APScheduler triggers from an injected ``now``; the jobs
themselves are called directly with ``now``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from opsdb import make_config, make_sessions

from pacsnode.config import Config
from pacsnode.errors import ConfigError
from pacsnode.scheduler import NightlyScheduler, nightly_audit, nightly_purge
from pacsnode.service import COMPONENTS, Node

BERLIN = ZoneInfo("Europe/Berlin")


def berlin(*args: int) -> datetime:
    return datetime(*args, tzinfo=BERLIN)  # type: ignore[misc]


def naive_utc(local: datetime) -> datetime:
    return local.astimezone(UTC).replace(tzinfo=None)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(
        tmp_path, 'timezone = "Europe/Berlin"\nrun_at = "02:00"\n[retention]\nrun_at = "03:30"\n'
    )


def scheduler_at(config: Config, now: datetime) -> NightlyScheduler:
    nightly = NightlyScheduler(
        config,
        make_sessions(config),
        scheduler=BackgroundScheduler(timezone=BERLIN),
        clock=lambda: now,
    )
    nightly.configure()  # jobs added, scheduler not started
    return nightly


def test_next_fire_times_follow_the_configured_local_times(config: Config) -> None:
    (config.audit.reports_dir).mkdir(parents=True)
    (config.audit.reports_dir / "2025-03-11.json").write_text("{}")
    now = naive_utc(berlin(2025, 3, 12, 1, 30))
    nightly = scheduler_at(config, now)
    assert nightly.next_runs(now) == {
        "audit": berlin(2025, 3, 12, 2, 0),
        "retention": berlin(2025, 3, 12, 3, 30),
    }
    later = naive_utc(berlin(2025, 3, 12, 2, 30))
    assert nightly.next_runs(later) == {
        "audit": berlin(2025, 3, 13, 2, 0),
        "retention": berlin(2025, 3, 12, 3, 30),
    }
    # across the change to summer time the audit stays at 02:00 local... where it exists
    summer = nightly.next_runs(naive_utc(berlin(2025, 3, 30, 12, 0)))
    assert summer["audit"] == berlin(2025, 3, 31, 2, 0)
    assert summer["audit"].utcoffset().total_seconds() == 7200  # type: ignore[union-attr]


def test_a_missed_audit_is_caught_up_after_start(config: Config) -> None:
    now = naive_utc(berlin(2025, 3, 12, 9, 0))  # down at 02:00, no report for the 11th
    nightly = scheduler_at(config, now)
    runs = nightly.next_runs(now)
    assert set(runs) == {"audit", "retention", "audit-catch-up"}
    assert runs["audit-catch-up"] == berlin(2025, 3, 12, 9, 1)
    early = scheduler_at(config, naive_utc(berlin(2025, 3, 12, 1, 0)))  # before run_at
    assert set(early.next_runs(now)) == {"audit", "retention"}


def test_nightly_audit_reports_the_previous_local_day(config: Config) -> None:
    sessions = make_sessions(config)
    now = naive_utc(berlin(2025, 3, 13, 0, 30))  # 23:30 UTC on the 12th
    report = nightly_audit(config, sessions, now)
    assert report.day.isoformat() == "2025-03-12"
    data = json.loads((config.audit.reports_dir / "2025-03-12.json").read_text())
    assert data["start_utc"] == "2025-03-11T23:00:00"


def test_nightly_purge_respects_the_enabled_switch(config: Config) -> None:
    sessions = make_sessions(config)
    now = naive_utc(berlin(2025, 3, 13, 3, 30))
    result = nightly_purge(config, sessions, now)
    assert result is not None and result.series == []
    off = config.model_copy(
        update={"retention": config.retention.model_copy(update={"enabled": False})}
    )
    assert nightly_purge(off, sessions, now) is None


def test_bad_times_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"audit\.run_at"):
        make_config(tmp_path, 'run_at = "2:00"')
    with pytest.raises(ConfigError, match=r"audit\.timezone"):
        make_config(tmp_path, 'timezone = "Mars/Olympus"')


def test_serve_runs_the_scheduler_as_a_component(config: Config) -> None:
    assert "scheduler" in COMPONENTS
    node = Node(config, ("scheduler",))
    node.start()
    try:
        assert node.nightly is not None and node.nightly.scheduler.running
        assert {job.id for job in node.nightly.scheduler.get_jobs()} >= {"audit", "retention"}
    finally:
        node.shutdown()
    assert not node.nightly.scheduler.running
