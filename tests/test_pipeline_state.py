"""Completion, routing and the job queue on a real SQLite database, with an injected clock."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacsnode import admin, completion, queue, routing
from pacsnode.config import CompletionConfig, QueueConfig, parse_config
from pacsnode.db import make_engine, make_sessionmaker, upgrade
from pacsnode.errors import ConfigError
from pacsnode.manifest import (
    Accepts,
    LabelSpec,
    Manifest,
    WeightsSpec,
    load_enabled,
    verified_weights_path,
)
from pacsnode.receiver import InstanceHeader, record_instance
from pacsnode.tables import Delivery, Job, JobState, RoutingDecision, Series

T0 = datetime(2026, 1, 1, 8, 0, 0)
DX = "1.2.840.10008.5.1.4.1.1.1.1"


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    return make_sessionmaker(engine)


def manifest(name: str = "cxr", modalities: tuple[str, ...] = ("CR", "DX")) -> Manifest:
    return Manifest(
        name=name,
        version="1",
        kind="cxr-densenet121",
        synthetic=True,
        accepts=Accepts(
            modalities=list(modalities), sop_classes=[DX], view_positions=["PA", "AP", ""]
        ),
        weights=WeightsSpec(sha256="0" * 64),
        labels=[LabelSpec(name="Effusion")],
    )


def receive(
    session: Session, modality: str, series: str, sop: str, now: datetime, view: str = "PA"
) -> None:
    header = InstanceHeader(
        sop_class_uid=DX if modality in ("DX", "CR") else "1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=sop,
        study_uid="1.2.3",
        series_uid=series,
        modality=modality,
        view_position=view,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    record_instance(session, header, Path("/dev/null"), 0, "SCU", now)


def test_radiograph_completes_at_once_ct_after_quiet_period(
    sessions: sessionmaker[Session],
) -> None:
    cfg = CompletionConfig(series_quiet_seconds={"default": 5.0, "CT": 8.0})
    with sessions.begin() as s:
        receive(s, "DX", "1.1", "1.1.1", T0)
        receive(s, "CT", "2.1", "2.1.1", T0)
        receive(s, "CT", "2.1", "2.1.2", T0 + timedelta(seconds=4))
    with sessions.begin() as s:
        assert [x.series_uid for x in completion.complete_due_series(s, cfg, T0)] == ["1.1"]
        assert completion.complete_due_series(s, cfg, T0 + timedelta(seconds=11)) == []
        done = completion.complete_due_series(s, cfg, T0 + timedelta(seconds=12))
        assert [x.series_uid for x in done] == ["2.1"]
        assert completion.next_due(s, cfg, T0 + timedelta(seconds=12)) is None


def test_instance_stored_while_intake_takes_its_clock_does_not_complete_twice(
    sessions: sessionmaker[Session],
) -> None:
    """Intake takes ``now``, then reads: a radiograph stored in between has a receive time
    after ``now``. It is part of the completed series, not a late instance, so the next
    round must not complete it again (which would requeue a job already running)."""
    cfg = CompletionConfig()
    with sessions.begin() as s:
        receive(s, "DX", "1.1", "1.1.1", T0 + timedelta(milliseconds=3))
    with sessions.begin() as s:
        assert [x.series_uid for x in completion.complete_due_series(s, cfg, T0)] == ["1.1"]
    with sessions.begin() as s:
        assert completion.complete_due_series(s, cfg, T0 + timedelta(seconds=1)) == []
        assert completion.next_due(s, cfg, T0 + timedelta(seconds=1)) is None


def test_hard_upper_wait_completes_a_trickling_series(sessions: sessionmaker[Session]) -> None:
    cfg = CompletionConfig(series_max_wait_seconds=30)
    with sessions.begin() as s:
        for i in range(40):
            receive(s, "CT", "3.1", f"3.1.{i}", T0 + timedelta(seconds=i))
    with sessions.begin() as s:
        done = completion.complete_due_series(s, cfg, T0 + timedelta(seconds=39.5))
        assert [x.series_uid for x in done] == ["3.1"]


def test_routing_records_reasons_and_creates_one_job(sessions: sessionmaker[Session]) -> None:
    cfg = CompletionConfig()
    models = [manifest("cxr"), manifest("ctonly", ("CT",))]
    with sessions.begin() as s:
        receive(s, "DX", "1.1", "1.1.1", T0)
        receive(s, "DX", "1.2", "1.2.1", T0, view="LL")
    with sessions.begin() as s:
        for series in completion.complete_due_series(s, cfg, T0):
            routing.route_series(s, series, models, T0)
    with sessions.begin() as s:
        jobs = s.scalars(select(Job)).all()
        assert [(j.model_name, j.state) for j in jobs] == [("cxr", JobState.QUEUED)]
        reasons = sorted(r.reason for r in s.scalars(select(RoutingDecision)) if not r.accepted)
        assert reasons == [
            "modality DX not accepted by ctonly",
            "modality DX not accepted by ctonly",
            "view position LL is not one cxr reads",
        ]


def _one_job(sessions: sessionmaker[Session]) -> int:
    with sessions.begin() as s:
        receive(s, "DX", "1.1", "1.1.1", T0)
        series = s.scalar(select(Series))
        assert series is not None
        return queue.enqueue(s, series.id, "cxr", "1", T0).id


def test_claim_is_exclusive_and_lease_expiry_returns_the_job(
    sessions: sessionmaker[Session],
) -> None:
    cfg = QueueConfig(lease_seconds=60, max_attempts=3)
    job_id = _one_job(sessions)
    with sessions.begin() as s:
        assert [j.id for j in queue.claim(s, ["cxr"], "a:1:x", T0, cfg)] == [job_id]
    with sessions.begin() as s:
        assert queue.claim(s, ["cxr"], "b:2:y", T0 + timedelta(seconds=59), cfg) == []
        taken = queue.claim(s, ["cxr"], "b:2:y", T0 + timedelta(seconds=61), cfg)
        assert [(j.id, j.attempts, j.worker_id) for j in taken] == [(job_id, 2, "b:2:y")]
    with sessions.begin() as s:  # the first worker comes back too late: fenced out
        assert queue.still_owned(s, job_id, "a:1:x", 1) is None
        assert queue.still_owned(s, job_id, "b:2:y", 2) is not None


def test_failures_back_off_then_die_and_requeue_revives(sessions: sessionmaker[Session]) -> None:
    cfg = QueueConfig(max_attempts=3, backoff_base_seconds=10, backoff_max_seconds=600)
    job_id = _one_job(sessions)
    now = T0
    for attempt in (1, 2, 3):
        with sessions.begin() as s:
            (job,) = queue.claim(s, ["cxr"], "w:1:x", now, cfg)
            assert job.attempts == attempt
            queue.fail(s, job, "boom", now, cfg, permanent=False)
            if attempt < 3:
                assert job.state is JobState.FAILED
                assert job.not_before == now + timedelta(seconds=10 * 2 ** (attempt - 1))
                assert queue.claim(s, ["cxr"], "w:1:x", now, cfg) == []
                now = job.not_before
    with sessions.begin() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state is JobState.DEAD
        assert "gave up after 3 attempts" in (job.last_error or "")
        assert admin.requeue(s, [job], now).jobs == [job_id]
        assert job.state is JobState.QUEUED and job.attempts == 0


def test_permanent_error_is_dead_at_once(sessions: sessionmaker[Session]) -> None:
    cfg = QueueConfig()
    _one_job(sessions)
    with sessions.begin() as s:
        (job,) = queue.claim(s, ["cxr"], "w:1:x", T0, cfg)
        queue.fail(s, job, "instance 1.1.1: no pixel data", T0, cfg, permanent=True)
        assert job.state is JobState.DEAD and job.last_error == "instance 1.1.1: no pixel data"


def test_dead_process_lease_is_released_at_once(sessions: sessionmaker[Session]) -> None:
    import socket
    import subprocess

    cfg = QueueConfig(lease_seconds=3600)
    job_id = _one_job(sessions)
    gone = subprocess.Popen(["true"])
    gone.wait()
    owner = f"{socket.gethostname()}:{gone.pid}:dead"
    with sessions.begin() as s:
        queue.claim(s, ["cxr"], owner, T0, cfg)
    with sessions.begin() as s:
        assert queue.release_orphans(s, Delivery, T0 + timedelta(seconds=1)) == 0
        assert queue.release_orphans(s, Job, T0 + timedelta(seconds=1)) == 1
        again = queue.claim(s, ["cxr"], "new:1:x", T0 + timedelta(seconds=1), cfg)
        assert [j.id for j in again] == [job_id]


def test_late_instance_reruns_finished_job(sessions: sessionmaker[Session]) -> None:
    cfg = CompletionConfig()
    job_id = _one_job(sessions)
    with sessions.begin() as s:
        job = s.get(Job, job_id)
        assert job is not None
        completion.complete_due_series(s, cfg, T0)
        (claimed,) = queue.claim(s, ["cxr"], "w:1:x", T0, QueueConfig())
        queue.transition(s, claimed, JobState.SUCCEEDED, T0)
    with sessions.begin() as s:
        receive(s, "DX", "1.1", "1.1.2", T0 + timedelta(seconds=30))
    with sessions.begin() as s:
        (series,) = completion.complete_due_series(s, cfg, T0 + timedelta(seconds=30))
        assert series.instance_count == 2
        jobs = routing.route_series(s, series, [manifest("cxr")], T0 + timedelta(seconds=30))
        assert [(j.id, j.state) for j in jobs] == [(job_id, JobState.QUEUED)]


def test_instance_resent_in_another_series_moves_and_counts_once(
    sessions: sessionmaker[Session],
) -> None:
    from pacsnode.tables import Instance

    with sessions.begin() as s:
        receive(s, "DX", "1.1", "9.9.9", T0)
        receive(s, "DX", "1.2", "9.9.9", T0 + timedelta(seconds=1))
    with sessions.begin() as s:
        counts = {x.series_uid: x.instance_count for x in s.scalars(select(Series))}
        assert counts == {"1.1": 0, "1.2": 1}
        instance = s.scalar(select(Instance))
        assert instance is not None and instance.receive_count == 2
        assert s.get(Series, instance.series_id).series_uid == "1.2"  # type: ignore[union-attr]


def test_config_names_the_offending_key() -> None:
    with pytest.raises(ConfigError, match=r"node\.ae_titel: unknown key"):
        parse_config('[node]\nae_titel = "X"\n')
    with pytest.raises(ConfigError, match=r"destinations\.0\.port"):
        parse_config('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 0\n')
    with pytest.raises(ConfigError, match=r"node\.ae_title"):
        parse_config('[node]\nae_title = "MUCH_TOO_LONG_AE_TITLE"\n')
    config = parse_config(Path("config/pacsnode.toml").read_text())
    assert config.node.port == 11112
    assert config.models.enabled == ["cxr-chexnet", "ct-pe", "ct-kidney"]
    assert [d.name for d in config.destinations] == ["pacs"]
    # `make run` starts on these defaults: every enabled model ships weights that verify
    models = Path("models")
    for manifest in load_enabled(models, config.models.enabled):
        assert verified_weights_path(models / manifest.name, manifest).is_file()


def test_migrations_match_the_tables(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from pacsnode.tables import Base

    engine = make_engine(f"sqlite:///{tmp_path / 'm.sqlite'}")
    upgrade(engine)
    upgrade(engine)  # idempotent
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
    assert mode == "wal"
