"""The worker's radiograph batch: one job whose results cannot be written fails alone.

Three chest X-ray series are received into a fresh database and inferred in one batch, in
process; one of them lacks its StudyInstanceUID in the file (the receiver's row has it), so
its SR cannot be built. That job goes dead with the reason; its neighbours get their SRs.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import torch
from nodeproc import MODELS_DIR
from sqlalchemy import select

from pacsnode.config import parse_config
from pacsnode.db import make_engine, make_sessionmaker, upgrade
from pacsnode.manifest import load_enabled
from pacsnode.phantoms.cxr import make_cxr_dataset
from pacsnode.receiver import InstanceHeader, record_instance
from pacsnode.service import Intake
from pacsnode.tables import Job, JobState, Output, Series
from pacsnode.worker import Worker

NOW = datetime(2026, 5, 6, 7, 8, 9)


def test_a_job_whose_results_cannot_be_written_fails_alone(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    config = parse_config(
        f'[storage]\nspool_dir = "{spool}"\noutput_dir = "{tmp_path / "outputs"}"\n'
        f'database_url = "sqlite:///{tmp_path / "db.sqlite"}"\n'
        f'[models]\ndir = "{MODELS_DIR}"\nenabled = ["cxr-chexnet"]\ndevice = "cpu"\n'
        "[outputs]\nheatmaps = []\n"
    )
    engine = make_engine(config.storage.database_url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    broken_series = ""
    for i in range(3):
        ds, _ = make_cxr_dataset(9300 + i, rows=256, cols=256)
        header = InstanceHeader(
            str(ds.SOPClassUID),
            str(ds.SOPInstanceUID),
            str(ds.StudyInstanceUID),
            str(ds.SeriesInstanceUID),
            str(ds.Modality),
            str(ds.ViewPosition),
            str(ds.file_meta.TransferSyntaxUID),
        )
        if i == 1:
            del ds.StudyInstanceUID
            broken_series = header.series_uid
        path = spool / f"cxr{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        with sessions.begin() as session:
            record_instance(session, header, path, path.stat().st_size, "TEST", NOW)
    manifests = load_enabled(config.models.dir, config.models.enabled)
    assert Intake(config, sessions, manifests).loop() == 3
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    worker = Worker(config, sessions)
    try:
        worker.initialize()
        assert worker.loop() == 3  # one batch of three
    finally:
        worker.shutdown()
        torch.set_num_threads(before)
    with sessions() as session:
        rows = session.execute(
            select(Series.series_uid, Job.state, Job.attempts, Job.last_error).join(
                Series, Job.series_id == Series.id
            )
        ).all()
        outputs = {o.job_id for o in session.scalars(select(Output))}
    states = {series: (state, attempts, error) for series, state, attempts, error in rows}
    state, attempts, error = states.pop(broken_series)
    assert state is JobState.DEAD and attempts == 1
    assert error is not None and "missing StudyInstanceUID" in error
    assert [s for s, _, _ in states.values()] == [JobState.SUCCEEDED, JobState.SUCCEEDED]
    assert len(outputs) == 2
