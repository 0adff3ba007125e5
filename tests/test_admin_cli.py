"""The admin commands a PACS administrator repairs the node with: requeue, cancel, replay,
destinations test; their exit codes, --json and --help examples.

The database is filled through the receiver's and router's own functions with an injected
clock; the commands run through click in this process (the same entry point as the
``pacsnode`` script), and ``destinations test`` talks to a real Orthanc.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from nodeproc import MODELS_DIR
from peers import LOOPBACK, Orthanc, free_port
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from pacsnode import admin, completion, queue, routing
from pacsnode.cli import main
from pacsnode.config import CompletionConfig, QueueConfig
from pacsnode.db import make_engine, make_sessionmaker, upgrade, utcnow
from pacsnode.errors import AdminError
from pacsnode.manifest import load_manifest
from pacsnode.receiver import InstanceHeader, header_values, part10_prefix, record_instance
from pacsnode.tables import Event, Instance, Job, JobState, Series, Study
from pacsnode.upperlayer import StoreRequest

DX = "1.2.840.10008.5.1.4.1.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
CXR = "cxr-chexnet"


@pytest.fixture
def node_db(tmp_path: Path) -> Iterator[tuple[Path, sessionmaker[Session]]]:
    """A config file and its (migrated) database; no node process is needed."""
    db = tmp_path / "pacsnode.db"
    config = tmp_path / "pacsnode.toml"
    config.write_text(
        "[storage]\n"
        f'spool_dir = "{tmp_path / "spool"}"\n'
        f'output_dir = "{tmp_path / "outputs"}"\n'
        f'database_url = "sqlite:///{db}"\n'
        "[models]\n"
        f'dir = "{MODELS_DIR}"\n'
        f'enabled = ["{CXR}"]\n'
    )
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine)
    yield config, make_sessionmaker(engine)
    engine.dispose()


def cli(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(config), *args], catch_exceptions=False)


def receive(
    sessions: sessionmaker[Session],
    study: str,
    series: str,
    sop: str,
    now: datetime,
    *,
    modality: str = "DX",
    accession: str = "",
) -> None:
    header = InstanceHeader(
        sop_class_uid=DX if modality == "DX" else CT,
        sop_instance_uid=sop,
        study_uid=study,
        series_uid=series,
        modality=modality,
        view_position="PA" if modality == "DX" else "",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        accession_number=accession,
    )
    with sessions.begin() as session:
        record_instance(session, header, Path("/dev/null"), 0, "MODALITY", now)


def complete_and_route(sessions: sessionmaker[Session], now: datetime) -> list[int]:
    manifests = [load_manifest(MODELS_DIR / CXR)]
    with sessions.begin() as session:
        due = completion.complete_due_series(session, CompletionConfig(), now)
        return [job.id for s in due for job in routing.route_series(session, s, manifests, now)]


def finish(sessions: sessionmaker[Session], job_id: int, state: JobState, now: datetime) -> None:
    """Drive a queued job to ``state`` through the queue's own transitions."""
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        queue.transition(session, job, JobState.RUNNING, now)
        if state is JobState.DEAD:
            queue.fail(session, job, "unreadable pixels", now, QueueConfig(), permanent=True)
        elif state is not JobState.RUNNING:
            queue.transition(session, job, state, now)


def states(sessions: sessionmaker[Session]) -> dict[int, str]:
    with sessions() as session:
        return {j.id: j.state.value for j in session.scalars(select(Job).order_by(Job.id))}


@pytest.fixture
def three_studies(node_db: tuple[Path, sessionmaker[Session]]) -> dict[str, int]:
    """Three radiograph studies a day apart, each with a job that has finished."""
    _, sessions = node_db
    base = utcnow() - timedelta(days=3)
    jobs = {}
    for day, (accession, state) in enumerate(
        [("ACC-1", JobState.SUCCEEDED), ("ACC-2", JobState.DEAD), ("ACC-3", JobState.SUCCEEDED)]
    ):
        now = base + timedelta(days=day)
        receive(sessions, f"1.2.{day}", f"1.2.{day}.1", f"1.2.{day}.1.1", now, accession=accession)
        (job_id,) = complete_and_route(sessions, now + timedelta(seconds=1))
        finish(sessions, job_id, state, now + timedelta(seconds=2))
        jobs[accession] = job_id
    return jobs


def test_receiver_keeps_the_accession_number_it_reads(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = DX, "1.2.3.4.5"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    ds.Modality, ds.AccessionNumber, ds.PatientName = "DX", "A2026-0017", "Doe^Jane"
    request = StoreRequest(DX, "1.2.3.4.5", "1.2.840.10008.1.2.1", "MODALITY", LOOPBACK)
    prefix = part10_prefix(request)
    path = tmp_path / "x.dcm"
    buffer = __import__("io").BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    path.write_bytes(prefix + buffer.getvalue())
    assert header_values(path, len(prefix), request.transfer_syntax_uid)["AccessionNumber"] == (
        "A2026-0017"
    )


def test_requeue_by_accession_by_time_window_and_by_model(
    node_db: tuple[Path, sessionmaker[Session]], three_studies: dict[str, int]
) -> None:
    config, sessions = node_db
    before = states(sessions)
    result = cli(config, "requeue", "--accession", "ACC-2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["requeued"] == [three_studies["ACC-2"]]
    after = states(sessions)
    assert after[three_studies["ACC-2"]] == "queued"
    assert {k: v for k, v in after.items() if k != three_studies["ACC-2"]} == {
        k: v for k, v in before.items() if k != three_studies["ACC-2"]
    }
    # a window holding only the middle day's and last day's jobs; the queued one is skipped
    with sessions() as session:
        created = {j.id: j.created_at for j in session.scalars(select(Job))}
    since = (created[three_studies["ACC-2"]] - timedelta(minutes=1)).isoformat()
    until = (created[three_studies["ACC-3"]] + timedelta(minutes=1)).isoformat()
    result = cli(config, "requeue", "--since", since, "--until", until, "--json")
    report = json.loads(result.output)
    assert report["requeued"] == [three_studies["ACC-3"]]
    assert report["skipped"] == {str(three_studies["ACC-2"]): "already queued"}
    assert states(sessions)[three_studies["ACC-1"]] == "succeeded"
    result = cli(config, "requeue", "--model", CXR, "--json")
    assert json.loads(result.output)["requeued"] == [three_studies["ACC-1"]]
    with sessions() as session:
        kinds = [e.kind for e in session.scalars(select(Event).where(Event.job_id.is_not(None)))]
    assert kinds.count("job-queued") == 3 + 3  # created, then requeued once each


def test_requeue_dry_run_changes_nothing_and_an_empty_match_exits_1(
    node_db: tuple[Path, sessionmaker[Session]], three_studies: dict[str, int]
) -> None:
    config, sessions = node_db
    before = states(sessions)
    result = cli(config, "requeue", "--failed", "--dry-run", "--json")
    assert result.exit_code == 0
    assert [row["id"] for row in json.loads(result.output)] == [three_studies["ACC-2"]]
    assert states(sessions) == before
    assert cli(config, "requeue", "--accession", "NO-SUCH").exit_code == 1
    assert cli(config, "requeue", "--model", "no-such-model").exit_code == 1
    nothing = cli(config, "requeue")
    assert nothing.exit_code == 2 and "name the jobs" in nothing.output
    backwards = cli(config, "requeue", "--since", "1d", "--until", "3d")
    assert backwards.exit_code == 2 and "is not after" in backwards.output
    bad = cli(config, "requeue", "--since", "yesterday")
    assert bad.exit_code == 2 and "--since" in bad.output


def test_cancel_stops_queued_and_running_jobs_and_requeue_revives(
    node_db: tuple[Path, sessionmaker[Session]],
) -> None:
    config, sessions = node_db
    now = utcnow()
    receive(sessions, "1.3", "1.3.1", "1.3.1.1", now)
    receive(sessions, "1.4", "1.4.1", "1.4.1.1", now)
    queued, running = complete_and_route(sessions, now + timedelta(seconds=1))
    with sessions.begin() as session:
        later = now + timedelta(seconds=2)
        (ticket,) = queue.claim(session, [CXR], "worker-1", later, QueueConfig(), 1)
        assert ticket.id == queued
    running, queued = queued, running
    result = cli(config, "cancel", str(queued), "--json")
    assert result.exit_code == 0 and json.loads(result.output)["state"] == "cancelled"
    assert cli(config, "cancel", str(running)).exit_code == 0
    # the worker that held the running job finds it is no longer its own: no result is kept
    with sessions() as session:
        assert queue.still_owned(session, running, "worker-1", 1) is None
        job = session.get(Job, running)
        assert job is not None and job.last_error == "cancelled by an administrator"
    assert states(sessions) == {queued: "cancelled", running: "cancelled"}
    again = cli(config, "cancel", str(queued))
    assert again.exit_code == 1 and "nothing to cancel" in again.output
    assert cli(config, "cancel", "999").exit_code == 1
    assert cli(config, "requeue", str(queued)).exit_code == 0
    assert states(sessions)[queued] == "queued"


def test_replay_requeues_the_same_version_and_makes_a_job_for_a_new_one(
    node_db: tuple[Path, sessionmaker[Session]], three_studies: dict[str, int]
) -> None:
    config, sessions = node_db
    result = cli(config, "replay", "1.2.0.1", "--model", CXR, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["id"] == three_studies["ACC-1"]
    assert states(sessions)[three_studies["ACC-1"]] == "queued"
    busy = cli(config, "replay", "1.2.0.1", "--model", CXR)
    assert busy.exit_code == 1 and "already queued" in busy.output
    # new weights installed: the same series gets a job of its own for the new version
    newer = load_manifest(MODELS_DIR / CXR).model_copy(update={"version": "99"})
    with sessions.begin() as session:
        job = admin.replay(session, "1.2.2.1", newer, utcnow())
        assert (job.model_version, job.state) == ("99", JobState.QUEUED)
        assert job.id not in three_studies.values()
        replayed = session.scalars(select(Event).where(Event.kind == "job-replayed")).all()
        assert [e.series_uid for e in replayed] == ["1.2.0.1", "1.2.2.1"]


def test_replay_refuses_what_it_cannot_run(node_db: tuple[Path, sessionmaker[Session]]) -> None:
    config, sessions = node_db
    now = utcnow()
    receive(sessions, "1.5", "1.5.1", "1.5.1.1", now, modality="CT")
    receive(sessions, "1.6", "1.6.1", "1.6.1.1", now)
    assert cli(config, "replay", "1.5.1", "--model", CXR).exit_code == 1  # still arriving
    complete_and_route(sessions, now + timedelta(minutes=10))
    declined = cli(config, "replay", "1.5.1", "--model", CXR)
    assert declined.exit_code == 1 and "modality CT not accepted" in declined.output
    forced = cli(config, "replay", "1.5.1", "--model", CXR, "--force", "--json")
    assert forced.exit_code == 0 and json.loads(forced.output)["state"] == "queued"
    assert cli(config, "replay", "9.9.9", "--model", CXR).exit_code == 1
    not_enabled = cli(config, "replay", "1.6.1", "--model", "ct-pe")
    assert not_enabled.exit_code == 1 and "not enabled" in not_enabled.output
    # a purged series (its instance rows are gone) is neither replayed nor requeued
    with sessions() as session:
        series_id = session.scalar(select(Series.id).where(Series.series_uid == "1.6.1"))
        (job_id,) = session.scalars(select(Job.id).where(Job.series_id == series_id))
    finish(sessions, job_id, JobState.SUCCEEDED, now)
    with sessions.begin() as session:
        session.execute(delete(Instance).where(Instance.series_id == series_id))
    purged = cli(config, "replay", "1.6.1", "--model", CXR)
    assert purged.exit_code == 1 and "no instances left" in purged.output
    skipped = json.loads(cli(config, "requeue", str(job_id), "--json").output)
    assert skipped["requeued"] == [] and "no instances left" in skipped["skipped"][str(job_id)]


def test_destinations_test_echoes_each_and_fails_on_one_down(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    config = tmp_path / "pacsnode.toml"
    base = f'[storage]\ndatabase_url = "sqlite:///{tmp_path / "db.sqlite"}"\n'
    up = f'[[destinations]]\nname = "pacs"\nae_title = "{orthanc.aet}"\n'
    up += f'host = "{LOOPBACK}"\nport = {orthanc.dicom_port}\n'
    down = f'[[destinations]]\nname = "gone"\nae_title = "GONE"\nhost = "{LOOPBACK}"\n'
    down += f"port = {free_port()}\n"
    config.write_text(base + up)
    result = cli(config, "destinations", "test", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["name"] == "pacs" and row["ok"] is True and row["ms"] > 0
    config.write_text(base + up + down)
    result = cli(config, "destinations", "test", "--json", "--timeout", "3")
    assert result.exit_code == 1
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["pacs"]["ok"] and not rows["gone"]["ok"]
    assert "unreachable" in rows["gone"]["detail"]
    table = cli(config, "destinations", "test", "--timeout", "3")
    assert table.exit_code == 1 and "gone" in table.output and "pacs" in table.output
    config.write_text(base)
    assert cli(config, "destinations", "test").exit_code == 1  # none configured


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


def test_every_command_has_help_with_an_example() -> None:
    commands = list(_commands(main))
    assert {("requeue",), ("cancel",), ("replay",), ("destinations", "test")} <= set(commands)
    assert {("events",), ("audit",), ("purge",)} <= set(commands)
    for path in commands:
        result = CliRunner().invoke(main, [*path, "--help"])
        assert result.exit_code == 0, path
        assert "Example" in result.output, f"pacsnode {' '.join(path)} --help has no example"
    assert "Exit codes" in CliRunner().invoke(main, ["--help"]).output


def test_admin_functions_refuse_with_the_reason(
    node_db: tuple[Path, sessionmaker[Session]],
) -> None:
    _, sessions = node_db
    with sessions() as session:
        with pytest.raises(AdminError, match="name the jobs"):
            admin.select_jobs(session, admin.JobFilter())
        with pytest.raises(AdminError, match="no job 7"):
            admin.cancel(session, 7, utcnow())
        assert session.scalar(select(Study.id)) is None
