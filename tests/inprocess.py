"""The node's stages in this process, on a fresh database: receive, intake, worker."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from nodeproc import MODELS_DIR
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacsnode.config import Config, parse_config
from pacsnode.db import make_engine, make_sessionmaker, upgrade
from pacsnode.manifest import load_enabled
from pacsnode.receiver import InstanceHeader, record_instance
from pacsnode.service import Intake
from pacsnode.tables import Output
from pacsnode.worker import Worker

NOW = datetime(2026, 5, 6, 7, 8, 9)


def cxr_node(
    root: Path, heatmaps: str, gate_policy: str = "flag"
) -> tuple[Config, sessionmaker[Session]]:
    """Config (chest X-ray model, CPU, ``[outputs] heatmaps``, ``on_gate_failure`` as in
    :class:`nodeproc.NodeProcess`) and sessions of a migrated database under ``root``; the
    spool folder exists."""
    spool = root / "spool"
    spool.mkdir(parents=True)
    config = parse_config(
        f'[storage]\nspool_dir = "{spool}"\noutput_dir = "{root / "outputs"}"\n'
        f'database_url = "sqlite:///{root / "db.sqlite"}"\n'
        f'[models]\ndir = "{MODELS_DIR}"\nenabled = ["cxr-chexnet"]\ndevice = "cpu"\n'
        f'on_gate_failure = {{ default = "{gate_policy}" }}\n'
        f"[outputs]\nheatmaps = {heatmaps}\n"
    )
    engine = make_engine(config.storage.database_url)
    upgrade(engine)
    return config, make_sessionmaker(engine)


def header_of(ds: Dataset) -> InstanceHeader:
    return InstanceHeader(
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.Modality),
        str(ds.ViewPosition),
        str(ds.file_meta.TransferSyntaxUID),
    )


def receive(
    sessions: sessionmaker[Session], path: Path, header: InstanceHeader, ds: Dataset
) -> None:
    """Write ``ds`` to ``path`` and record it under ``header`` as the receiver would."""
    ds.save_as(path, enforce_file_format=True)
    with sessions.begin() as session:
        record_instance(session, header, path, path.stat().st_size, "TEST", NOW)


def intake_and_work(config: Config, sessions: sessionmaker[Session], jobs: int) -> None:
    """Route what was received (``jobs`` jobs expected), then one worker round for them."""
    manifests = load_enabled(config.models.dir, config.models.enabled)
    assert Intake(config, sessions, manifests).loop() == jobs
    worker = Worker(config, sessions)
    worker.initialize()
    try:
        assert worker.loop() == jobs
    finally:
        worker.shutdown()


def run_worker(tmp_path: Path, ds: Dataset, heatmaps: str) -> list[Output]:
    """Receive ``ds`` into a fresh node database and run intake and the worker in process."""
    config, sessions = cxr_node(tmp_path / (heatmaps.strip('[]"') or "none"), heatmaps)
    receive(sessions, config.storage.spool_dir / "cxr.dcm", header_of(ds), ds)
    intake_and_work(config, sessions, 1)
    with sessions() as session:
        outputs = list(session.scalars(select(Output).order_by(Output.id)))
        session.expunge_all()
    return outputs
