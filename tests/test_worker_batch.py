"""The worker's radiograph batch: one job whose results cannot be written fails alone.

Three chest X-ray series are received into a fresh database and inferred in one batch, in
process; one of them lacks its StudyInstanceUID in the file (the receiver's row has it), so
its SR cannot be built. That job goes dead with the reason; its neighbours get their SRs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from inprocess import cxr_node, header_of, intake_and_work, receive
from sqlalchemy import select

from pacsnode.phantoms.cxr import make_cxr_dataset
from pacsnode.tables import Job, JobState, Output, Series


def test_a_job_whose_results_cannot_be_written_fails_alone(tmp_path: Path) -> None:
    config, sessions = cxr_node(tmp_path, "[]")
    broken_series = ""
    for i in range(3):
        ds, _ = make_cxr_dataset(9300 + i, rows=256, cols=256)
        header = header_of(ds)
        if i == 1:
            del ds.StudyInstanceUID
            broken_series = header.series_uid
        receive(sessions, config.storage.spool_dir / f"cxr{i}.dcm", header, ds)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        intake_and_work(config, sessions, 3)  # one batch of three
    finally:
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
