"""The event log: what happened, in the database, so `status` and the audit can show it."""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import Connection, insert
from sqlalchemy.orm import Session

from pacsnode.tables import Event

log = logging.getLogger("pacsnode")


def record(
    session: Session | Connection,
    kind: str,
    message: str,
    now: datetime,
    *,
    level: str = "info",
    study_uid: str | None = None,
    series_uid: str | None = None,
    job_id: int | None = None,
) -> None:
    """Add an event row in the caller's transaction and mirror it to the log (no patient data)."""
    session.execute(
        insert(Event).values(
            at=now,
            level=level,
            kind=kind,
            study_uid=study_uid,
            series_uid=series_uid,
            job_id=job_id,
            message=message,
        )
    )
    log.log(
        logging.getLevelNamesMapping().get(level.upper(), logging.INFO), "%s: %s", kind, message
    )
