"""Engine, sessions, migrations and the job/delivery claim: everything dialect-specific lives here.

SQLite runs in WAL mode with ``synchronous=FULL`` (a committed row survives power
loss) and every transaction opens with ``BEGIN IMMEDIATE``, so a read-then-write
transaction can never fail with ``SQLITE_BUSY_SNAPSHOT``; writers queue on the
busy timeout instead. PostgreSQL needs none of this: the claim below renders
``FOR UPDATE SKIP LOCKED`` there and is a no-op hint on SQLite.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from pacsnode.tables import Delivery, DeliveryState, Job, JobState

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def utcnow() -> datetime:
    """Naive UTC, the form every timestamp column stores."""
    return datetime.now(UTC).replace(tzinfo=None)


def _private_file(path: Path) -> None:
    """Create the SQLite file 0600 whatever the umask; SQLite gives its -wal and -shm
    files the database file's mode, so they stay private too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def make_engine(url: str, busy_timeout_seconds: float = 10.0) -> Engine:
    """Create the engine for ``url``; for SQLite, create the folder and set the pragmas."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        _private_file(Path(parsed.database))
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": busy_timeout_seconds},
        pool_size=8,
        max_overflow=16,
    )
    busy_ms = int(busy_timeout_seconds * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the Alembic migrations up to ``revision`` on ``engine``."""
    cfg = alembic_config(engine)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def _claim(
    session: Session,
    table: type[Job] | type[Delivery],
    ready: Sequence[Any],
    busy: Any,
    where: Sequence[Any],
    worker_id: str,
    now: datetime,
    lease_seconds: float,
    limit: int,
) -> list[int]:
    """Take up to ``limit`` rows that are ready and due, or busy with a lapsed lease.

    One UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED) RETURNING id:
    atomic on PostgreSQL by the row locks, on SQLite by BEGIN IMMEDIATE.
    """
    runnable = or_(
        table.state.in_(list(ready)) & (table.not_before <= now),
        (table.state == busy) & (table.lease_until < now),
    )
    candidates = (
        select(table.id)
        .where(runnable, *where)
        .order_by(table.not_before, table.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    stmt = (
        update(table)
        .where(table.id.in_(candidates))
        .values(
            state=busy,
            attempts=table.attempts + 1,
            lease_until=now + timedelta(seconds=lease_seconds),
            worker_id=worker_id,
            updated_at=now,
        )
        .returning(table.id)
        .execution_options(synchronize_session=False)
    )
    return list(session.scalars(stmt))


def claim_jobs(
    session: Session,
    model_names: Sequence[str],
    worker_id: str,
    now: datetime,
    lease_seconds: float,
    limit: int = 1,
    first_attempts_only: bool = False,
) -> list[int]:
    """Atomically take runnable jobs of ``model_names``: queued, due for retry, or orphaned.

    ``first_attempts_only``: only jobs never tried since they were queued.
    """
    ready = [JobState.QUEUED, JobState.FAILED]
    where: list[Any] = [Job.model_name.in_(list(model_names))]
    if first_attempts_only:
        where.append(Job.attempts == 0)
    return _claim(
        session, Job, ready, JobState.RUNNING, where, worker_id, now, lease_seconds, limit
    )


def claim_deliveries(
    session: Session, worker_id: str, now: datetime, lease_seconds: float, limit: int = 16
) -> list[int]:
    """Atomically take deliveries that are pending, due for retry, or whose sender died."""
    ready = [DeliveryState.PENDING, DeliveryState.FAILED]
    return _claim(
        session, Delivery, ready, DeliveryState.SENDING, [], worker_id, now, lease_seconds, limit
    )
