"""The scheduler: yesterday's audit every night and the retention purge, on APScheduler.

Both jobs are the plain functions :func:`nightly_audit` and :func:`nightly_purge`, called
with ``now``; this module only decides when. Times are local to ``[audit] timezone``
(the host's zone when empty): the audit at ``[audit] run_at`` (default 02:00), the purge
at ``[retention] run_at`` (default 03:00, after the audit has counted the day).

Jobs live in memory, so a node that was down at ``run_at`` would skip that night; to
avoid it, :meth:`NightlyScheduler.initialize` schedules a catch-up audit a minute after
start when yesterday's report is missing and today's ``run_at`` has passed.

Runs inside ``pacsnode serve`` (component ``scheduler``) or alone as ``pacsnode
scheduler`` (the systemd unit ``pacsnode-scheduler.service``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta, tzinfo

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from sqlalchemy.orm import Session, sessionmaker

from pacsnode.audit import AuditReport, local_day, run_audit, zone
from pacsnode.config import Config
from pacsnode.db import utcnow
from pacsnode.retention import PurgeResult, purge

log = logging.getLogger(__name__)

CATCH_UP_DELAY = timedelta(seconds=60)


def nightly_audit(
    config: Config, sessions: sessionmaker[Session], now: datetime | None = None
) -> AuditReport:
    """Write the report of the local day before ``now`` (naive UTC)."""
    now = now or utcnow()
    tz = zone(config)
    day = local_day(now, tz) - timedelta(days=1)
    with sessions() as session:
        report = run_audit(session, day, now, config, tz=tz)
    if report.flagged:
        labels = ", ".join(f"{r['model']}/{r['label']}" for r in report.flagged)
        log.warning("audit %s: output drift flagged for %s", day, labels)
    log.info("audit %s written to %s", day, report.html_path)
    return report


def nightly_purge(
    config: Config, sessions: sessionmaker[Session], now: datetime | None = None
) -> PurgeResult | None:
    """Apply the retention policy; None when ``[retention] enabled = false``."""
    if not config.retention.enabled:
        return None
    with sessions() as session:
        return purge(session, now or utcnow(), config.retention, config.storage.spool_dir)


def _clock(value: str) -> time:
    hour, minute = value.split(":")
    return time(int(hour), int(minute))


def triggers(config: Config, tz: tzinfo | None = None) -> dict[str, CronTrigger]:
    """The daily triggers of the two jobs, by job id."""
    tz = tz or zone(config)
    out = {}
    for name, at in (("audit", config.audit.run_at), ("retention", config.retention.run_at)):
        clock = _clock(at)
        out[name] = CronTrigger(hour=clock.hour, minute=clock.minute, timezone=tz)
    return out


def audit_missed(config: Config, now: datetime, tz: tzinfo | None = None) -> bool:
    """True when today's ``run_at`` has passed (local) and yesterday's report is missing."""
    tz = tz or zone(config)
    local_now = now.replace(tzinfo=UTC).astimezone(tz)
    if local_now.time() < _clock(config.audit.run_at):
        return False
    yesterday = local_now.date() - timedelta(days=1)
    return not (config.audit.reports_dir / f"{yesterday.isoformat()}.json").exists()


class NightlyScheduler:
    """The APScheduler instance with the audit and retention jobs; ``initialize`` starts it."""

    def __init__(
        self,
        config: Config,
        sessions: sessionmaker[Session],
        scheduler: BaseScheduler | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.tz = zone(config)
        self.scheduler = scheduler or BackgroundScheduler(timezone=self.tz)
        self.clock = clock

    def configure(self) -> None:
        """Add the jobs without starting, so their next fire times can be inspected."""
        for name, trigger in triggers(self.config, self.tz).items():
            job = nightly_audit if name == "audit" else nightly_purge
            self.scheduler.add_job(
                job,
                trigger,
                args=(self.config, self.sessions),
                id=name,
                name=f"pacsnode {name}",
                coalesce=True,
                max_instances=1,
                misfire_grace_time=3600,
                replace_existing=True,
            )
        now = self.clock()
        if audit_missed(self.config, now, self.tz):
            run_at = (now + CATCH_UP_DELAY).replace(tzinfo=UTC)
            self.scheduler.add_job(
                nightly_audit,
                DateTrigger(run_date=run_at),
                args=(self.config, self.sessions),
                id="audit-catch-up",
                name="pacsnode audit (missed while down)",
                replace_existing=True,
            )

    def next_runs(self, now: datetime) -> dict[str, datetime | None]:
        """Each job's next fire time after naive-UTC ``now``, in local time."""
        aware = now.replace(tzinfo=UTC).astimezone(self.tz)
        return {
            job.id: job.trigger.get_next_fire_time(None, aware) for job in self.scheduler.get_jobs()
        }

    def initialize(self) -> None:
        self.configure()
        self.scheduler.start()
        for name, at in self.next_runs(self.clock()).items():
            log.info("scheduled %s: next run %s", name, at)

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
