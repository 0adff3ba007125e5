"""The event log: what happened, in the database, so `status` and the audit can show it.

Two kinds of rows: :func:`record` adds an event (job state changes, deliveries, series
completion, routing) in the caller's transaction; :class:`AssociationAudit` keeps one
row per DICOM connection (who, from where, TLS, result, counts). Neither carries
patient data: UIDs and AE titles only.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict
from datetime import datetime

from sqlalchemy import Connection, Engine, insert, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from pacsnode.tables import AssociationLog, Event
from pacsnode.upperlayer import AssociationRecord

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


_AUDIT_COLUMNS = (
    "started_at",
    "ended_at",
    "calling_aet",
    "called_aet",
    "peer_address",
    "peer_port",
    "tls",
    "tls_peer",
    "result",
    "outcome",
    "reason",
    "instances",
    "refused",
    "bytes",
)


class AssociationAudit:
    """The upper layer's :class:`~pacsnode.upperlayer.AssociationObserver`, on the database.

    No statement per instance. An accepted association's row is inserted at once,
    after the A-ASSOCIATE-AC (so it survives a crash); ends are queued and written by
    one thread, many per transaction, so a flood of refused connections costs a few
    commits rather than one each, and competes little with the instances' commits.
    A kill -9 loses at most the ends still queued (milliseconds). A database that is
    down costs the audit row, logged, never the association.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._ended: list[AssociationRecord] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

    def initialize(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._write_ends, name="pacsnode-audit", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Write the queued ends and stop the writer."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @staticmethod
    def _values(record: AssociationRecord) -> dict[str, object]:
        values = {key: value for key, value in asdict(record).items() if key in _AUDIT_COLUMNS}
        values["reason"] = str(values["reason"])[:1000]
        return values

    def opened(self, record: AssociationRecord) -> None:
        try:
            with self.engine.begin() as connection:
                record.row_id = connection.execute(
                    insert(AssociationLog)
                    .values(**self._values(record))
                    .returning(AssociationLog.id)
                ).scalar_one()
        except SQLAlchemyError as exc:
            log.error("audit: association from %s not recorded: %s", record.peer_address, exc)

    def closed(self, record: AssociationRecord) -> None:
        if self._thread is None:  # not started (a library user): write it now
            self._write([record])
            return
        with self._cond:
            self._ended.append(record)
            self._cond.notify()

    def _write_ends(self) -> None:
        while True:
            with self._cond:
                while not self._ended and not self._stopping:
                    self._cond.wait()
                batch, self._ended = self._ended, []
                stopping = self._stopping
            if batch:
                self._write(batch)
            if stopping and not batch:
                return

    def _write(self, batch: list[AssociationRecord]) -> None:
        new = [self._values(r) for r in batch if r.row_id is None]
        try:
            with self.engine.begin() as connection:
                if new:
                    connection.execute(insert(AssociationLog), new)
                for record in batch:
                    if record.row_id is not None:
                        connection.execute(
                            update(AssociationLog)
                            .where(AssociationLog.id == record.row_id)
                            .values(**self._values(record))
                        )
        except SQLAlchemyError as exc:
            log.error("audit: the end of %d associations not recorded: %s", len(batch), exc)
