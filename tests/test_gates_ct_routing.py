"""Issue 15 for CT: region and contrast come from the pixels, so headers that lie do not
decide which model reads a series, or which series of a study it reads.

Phantoms whose headers lie (an abdomen labelled CHEST with "no contrast"; a contrast chest
labelled non-contrast; an unenhanced chest labelled Iohexol; a two-phase abdomen whose
phase labels are swapped) go through intake and the worker in process, with both CT models
enabled and ``on_gate_failure = "decline"``.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from nodeproc import MODELS_DIR
from peers import dciodvfy
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacsnode.config import Config, parse_config
from pacsnode.db import make_engine, make_sessionmaker, upgrade, utcnow
from pacsnode.manifest import load_enabled
from pacsnode.phantoms.abdomen import make_abdomen_case, write_abdomen_series
from pacsnode.phantoms.ctpa import make_ctpa_case, write_ctpa_series
from pacsnode.phantoms.ctregions import make_region_case, write_region_series
from pacsnode.receiver import InstanceHeader, record_instance
from pacsnode.service import Intake
from pacsnode.tables import Job, JobState, Output, RoutingDecision, Series
from pacsnode.worker import Worker


@pytest.fixture
def node(tmp_path: Path) -> tuple[Config, sessionmaker[Session]]:
    spool = tmp_path / "spool"
    spool.mkdir()
    config = parse_config(
        f'[storage]\nspool_dir = "{spool}"\noutput_dir = "{tmp_path / "outputs"}"\n'
        f'database_url = "sqlite:///{tmp_path / "db.sqlite"}"\n'
        f'[models]\ndir = "{MODELS_DIR}"\nenabled = ["ct-pe", "ct-kidney"]\ndevice = "cpu"\n'
        'on_gate_failure = { default = "decline" }\n'
    )
    engine = make_engine(config.storage.database_url)
    upgrade(engine)
    return config, make_sessionmaker(engine)


def _receive(sessions: sessionmaker[Session], paths: tuple[Path, ...]) -> None:
    now = utcnow()
    with sessions.begin() as session:
        for path in paths:
            ds = dcmread(path, stop_before_pixels=True)
            header = InstanceHeader(
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
                "CT",
                "",
                str(ds.file_meta.TransferSyntaxUID),
            )
            record_instance(session, header, path, path.stat().st_size, "TEST", now)


def _run(config: Config, sessions: sessionmaker[Session]) -> dict[tuple[str, str], Job]:
    """Complete and route everything received, then work until the queue is empty."""
    manifests = load_enabled(config.models.dir, config.models.enabled)
    later = utcnow() + timedelta(seconds=60)  # past every series' quiet period
    Intake(config, sessions, manifests).loop(later)
    worker = Worker(config, sessions)
    worker.initialize()
    try:
        while worker.loop(later):
            pass
    finally:
        worker.shutdown()
    with sessions() as session:
        jobs = {
            (series_uid, job.model_name): job
            for job, series_uid in session.execute(
                select(Job, Series.series_uid).join(Series, Job.series_id == Series.id)
            )
        }
        session.expunge_all()
    return jobs


def _kinds(sessions: sessionmaker[Session], job: Job) -> list[str]:
    with sessions() as session:
        return sorted(
            o.kind for o in session.scalars(select(Output).where(Output.job_id == job.id))
        )


def test_an_abdomen_labelled_chest_gets_no_pe_finding(node, tmp_path: Path) -> None:
    config, sessions = node
    case = make_abdomen_case(31, contrast=True)
    written = write_abdomen_series(
        tmp_path / "abd", case, rows=160, body_part="CHEST", contrast_agent="NONE"
    )
    _receive(sessions, written.paths)
    jobs = _run(config, sessions)
    pe = jobs[(written.series_uid, "ct-pe")]
    assert pe.state is JobState.DECLINED
    assert "CT looks like an abdomen" in (pe.last_error or ""), pe.last_error
    assert _kinds(sessions, pe) == ["notice", "notice-sc"]
    kidney = jobs[(written.series_uid, "ct-kidney")]  # the header says CHEST: never read
    assert kidney.state is JobState.DECLINED
    assert "body part CHEST is outside this model's scope" in (kidney.last_error or "")


def test_a_contrast_chest_labelled_non_contrast_is_read(node, tmp_path: Path) -> None:
    """The header says "NONE"; before the content gate, require_contrast refused it."""
    config, sessions = node
    written = write_ctpa_series(
        tmp_path / "ctpa",
        make_ctpa_case(8 * 100_000 + 3),
        rows=160,
        slices=64,
        slice_spacing_mm=2.5,
        contrast_agent="NONE",
    )
    _receive(sessions, written.paths)
    jobs = _run(config, sessions)
    pe = jobs[(written.series_uid, "ct-pe")]
    assert pe.state is JobState.SUCCEEDED, pe.last_error
    assert "sr" in _kinds(sessions, pe)


def test_an_unenhanced_chest_labelled_with_an_agent_is_declined(node, tmp_path: Path) -> None:
    config, sessions = node
    written = write_region_series(
        tmp_path / "plain",
        make_region_case("chest", 12, contrast=False),
        rows=160,
        slices=64,
        slice_spacing_mm=2.5,
        body_part="CHEST",
        contrast_agent="Iohexol",
        series_description="CTPA",
    )
    _receive(sessions, written.paths)
    jobs = _run(config, sessions)
    pe = jobs[(written.series_uid, "ct-pe")]
    assert pe.state is JobState.DECLINED
    assert "CT shows no intravenous contrast" in (pe.last_error or ""), pe.last_error
    assert _kinds(sessions, pe) == ["notice", "notice-sc"]


def test_swapped_phase_labels_do_not_choose_the_kidney_series(node, tmp_path: Path) -> None:
    """Two phases of one abdomen: the unenhanced one says Iohexol, the portal venous one
    says NONE. Routing ranks by the header; the worker sees no contrast in its choice and
    reads the sibling that shows contrast instead, with no notice."""
    config, sessions = node
    plain = write_abdomen_series(
        tmp_path / "plain",
        make_abdomen_case(41, contrast=False),
        rows=160,
        contrast_agent="Iohexol",
        series_number=2,
    )
    venous = write_abdomen_series(
        tmp_path / "venous",
        make_abdomen_case(41, contrast=True),
        rows=160,
        contrast_agent="NONE",
        study_uid=plain.study_uid,
        series_number=3,
    )
    _receive(sessions, plain.paths + venous.paths)
    jobs = _run(config, sessions)
    first = jobs[(plain.series_uid, "ct-kidney")]
    assert first.state is JobState.DECLINED
    assert f"series {venous.series_uid}, which shows contrast" in (first.last_error or "")
    assert _kinds(sessions, first) == []
    second = jobs[(venous.series_uid, "ct-kidney")]
    assert second.state is JobState.SUCCEEDED, second.last_error
    assert "sr" in _kinds(sessions, second)
    with sessions() as session:
        decision = session.scalar(
            select(RoutingDecision)
            .join(Series, RoutingDecision.series_id == Series.id)
            .where(
                Series.series_uid == venous.series_uid, RoutingDecision.model_name == "ct-kidney"
            )
        )
        assert decision is not None and decision.accepted
        assert decision.reason.startswith("selected by the content gate")


# J2K_pixelrep_mismatch's Patient Name has one component; highdicom warns as it copies it
@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person")
@pytest.mark.parametrize("name", ["CT_small.dcm", "693_UNCR.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_real_ct_slices_get_a_recorded_reason(node, tmp_path: Path, name: str) -> None:
    """Real single CT slices from pydicom and pydicom-data: no model runs on one slice, and
    each model's reason is recorded in words; nothing dies. A slice whose header puts it out
    of a model's scope (J2K_pixelrep_mismatch: HEAD) gets that model's notice, which is
    valid DICOM."""
    from pydicom.data import get_testdata_file

    config, sessions = node
    path = tmp_path / name
    shutil.copy(get_testdata_file(name), path)
    _receive(sessions, (path,))
    jobs = _run(config, sessions)
    assert all(job.state is not JobState.DEAD for job in jobs.values()), jobs
    with sessions() as session:
        reasons = {d.model_name: d.reason for d in session.scalars(select(RoutingDecision))}
    assert set(reasons) == {"ct-pe", "ct-kidney"}
    for model, reason in reasons.items():
        assert reason.startswith("not eligible: "), (model, reason)
        assert "Error" not in reason
    for (_, model), job in jobs.items():  # only scope refusals make a job: the notice
        assert job.state is JobState.DECLINED, (model, job.state)
        assert job.last_error == reasons[model].removeprefix("not eligible: ")
        assert _kinds(sessions, job) == ["notice", "notice-sc"]
    with sessions() as session:
        for output in session.scalars(select(Output)):
            errors, _ = dciodvfy(Path(output.path))
            assert errors == [], (output.kind, errors)
