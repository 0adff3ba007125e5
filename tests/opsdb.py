"""Synthetic node history for the audit and retention tests: rows with chosen timestamps.

Rows are written the way the node writes them (the same tables, naive-UTC times), but
directly, so a test can lay out weeks of work in milliseconds with an injected clock.
"""

from __future__ import annotations

import itertools
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from pacsnode.config import Config, parse_config
from pacsnode.db import make_engine, make_sessionmaker, upgrade
from pacsnode.tables import (
    Delivery,
    DeliveryState,
    Event,
    Finding,
    Instance,
    Job,
    JobState,
    Output,
    Series,
    Study,
)

_ids = itertools.count(1)


def uid(kind: str) -> str:
    return f"1.2.826.0.1.3680043.10.543.{kind}.{next(_ids)}"


def make_config(tmp_path: Path, extra: str = "") -> Config:
    return parse_config(
        f"""
[storage]
spool_dir = "{tmp_path / "spool"}"
output_dir = "{tmp_path / "outputs"}"
database_url = "sqlite:///{tmp_path / "pacsnode.db"}"
[audit]
reports_dir = "{tmp_path / "reports"}"
{extra}
"""
    )


def make_sessions(config: Config) -> sessionmaker[Session]:
    engine = make_engine(config.storage.database_url)
    upgrade(engine)
    return make_sessionmaker(engine)


class History:
    """Adds rows in one open session; call :meth:`commit` when done."""

    def __init__(self, session: Session, spool_dir: Path) -> None:
        self.session = session
        self.spool_dir = spool_dir

    def series(
        self,
        last_received: datetime,
        *,
        modality: str = "CT",
        aet: str = "CT_SCANNER",
        instances: int = 3,
        completed: bool = True,
        study: Study | None = None,
        size: int = 1000,
    ) -> Series:
        if study is None:
            study = Study(study_uid=uid("study"), created_at=last_received)
            self.session.add(study)
            self.session.flush()
        series = Series(
            series_uid=uid("series"),
            study_id=study.id,
            modality=modality,
            calling_aet=aet,
            instance_count=instances,
            first_received_at=last_received,
            last_received_at=last_received,
            completed_at=last_received if completed else None,
        )
        self.session.add(series)
        self.session.flush()
        folder = self.spool_dir / study.study_uid / series.series_uid
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(instances):
            sop = uid("sop")
            path = folder / f"{sop}.dcm"
            path.write_bytes(b"\0" * size)
            self.session.add(
                Instance(
                    sop_instance_uid=sop,
                    series_id=series.id,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=str(path),
                    size_bytes=size,
                    received_at=last_received,
                )
            )
        self.session.flush()
        return series

    def job(
        self,
        series: Series,
        state: JobState,
        at: datetime,
        *,
        model: str = "ct-pe",
        created: datetime | None = None,
        error: str | None = None,
        attempts: int = 1,
    ) -> Job:
        done = state in (JobState.SUCCEEDED, JobState.DEAD)
        job = Job(
            series_id=series.id,
            model_name=model,
            model_version="1.0",
            state=state,
            attempts=attempts,
            not_before=created or series.last_received_at,
            created_at=created or series.last_received_at,
            updated_at=at,
            finished_at=at if done else None,
            last_error=error,
        )
        self.session.add(job)
        self.session.flush()
        return job

    def output(self, job: Job, at: datetime, kind: str = "sr") -> Output:
        output = Output(
            job_id=job.id,
            sop_instance_uid=uid("out"),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
            series_uid=uid("outseries"),
            kind=kind,
            path=f"/nonexistent/{job.id}.dcm",
            created_at=at,
        )
        self.session.add(output)
        self.session.flush()
        return output

    def delivery(
        self,
        output: Output,
        state: DeliveryState,
        at: datetime,
        *,
        destination: str = "pacs",
        created: datetime | None = None,
        error: str | None = None,
    ) -> Delivery:
        delivery = Delivery(
            output_id=output.id,
            destination=destination,
            state=state,
            attempts=1,
            not_before=created or at,
            created_at=created or at,
            updated_at=at,
            delivered_at=at if state is DeliveryState.DELIVERED else None,
            last_error=error,
        )
        self.session.add(delivery)
        self.session.flush()
        return delivery

    def finding(self, job: Job, label: str, positive: bool, at: datetime) -> None:
        self.session.add(Finding(job_id=job.id, label=label, positive=positive, recorded_at=at))

    def event(self, kind: str, at: datetime, message: str, job_id: int | None = None) -> None:
        self.session.add(Event(at=at, level="warning", kind=kind, job_id=job_id, message=message))

    def commit(self) -> None:
        self.session.commit()
