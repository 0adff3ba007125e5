"""The audit trail and patient privacy, through the whole pipeline: a chest X-ray with
distinctive patient data goes in by storescu, the CXR model runs, the SR is delivered to
Orthanc; then the database tells who connected and what happened to the study, the log
holds no patient data, and the spool and database are private to the node's user."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dicomgen import CT_IMAGE, image_dataset
from nodeproc import NodeProcess
from peers import LOOPBACK, Orthanc, combined_output, echoscu, parse_store_statuses, storescu
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select

from pacsnode.phantoms.cxr import make_cxr_dataset
from pacsnode.tables import AssociationLog, Delivery, DeliveryState

PATIENT_NAME = "Zyxwvutsr^Qwertyuiop"
PATIENT_ID = "PID8675309XQ"
BIRTH_DATE = "19230417"
IDENTIFYING = ["Zyxwvutsr", "Qwertyuiop", PATIENT_ID, BIRTH_DATE, "1923-04-17"]


@dataclass
class Pipeline:
    node: NodeProcess
    orthanc: Orthanc
    study_uid: str


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    orthanc = Orthanc(workdir=tmp_path_factory.mktemp("orthanc")).start()
    node = NodeProcess(
        tmp_path_factory.mktemp("audit"),
        enabled=("cxr-chexnet",),
        destinations=[("pacs", orthanc.aet, orthanc.dicom_port)],
    )
    previous = os.umask(0)  # the node must make its files private whatever the umask
    try:
        node.start()
    finally:
        os.umask(previous)
    try:
        ds, _ = make_cxr_dataset(7, findings=["Effusion"], rows=512, cols=512)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
        path = node.workdir.parent / "cxr.dcm"
        ds.save_as(path, enforce_file_format=True)
        result = storescu(LOOPBACK, node.port, [path], called_aet=node.ae_title)
        assert parse_store_statuses(combined_output(result)) == [0x0000]
        refused = echoscu(LOOPBACK, node.port, called_aet="NOTTHENODE")
        assert refused.returncode != 0

        def delivered() -> bool:
            with node.sessions()() as s:
                states = list(s.scalars(select(Delivery.state)))
            return bool(states) and all(state is DeliveryState.DELIVERED for state in states)

        node.wait_until(delivered, timeout=180, what="the SR delivered to Orthanc")
        yield Pipeline(node, orthanc, str(ds.StudyInstanceUID))
    finally:
        node.stop()
        orthanc.close()


def test_no_patient_data_in_the_node_log_or_events(pipeline: Pipeline) -> None:
    log = pipeline.node.log()
    assert "association from TESTSCU" in log  # the log is the node's, and not empty
    for value in IDENTIFYING:
        assert value not in log, f"{value!r} is in the node log"
    events = pipeline.node.cli_json("events")
    text = repr(events)
    for value in IDENTIFYING:
        assert value not in text, f"{value!r} is in the events"


def test_spool_and_database_are_private(pipeline: Pipeline) -> None:
    node = pipeline.node
    assert stat.S_IMODE(node.spool_dir.stat().st_mode) == 0o700
    for path in [node.db_path, *node.db_path.parent.glob(f"{node.db_path.name}-*")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # the received instance, our results and every folder on the way hold patient data too
    tree = [p for root in (node.spool_dir, node.output_dir) for p in root.rglob("*")]
    assert any(p.is_file() for p in tree) and node.output_dir.is_dir()
    for path in [node.output_dir, *tree]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


def test_events_show_associations_job_states_and_deliveries(pipeline: Pipeline) -> None:
    node = pipeline.node
    rows = node.cli_json("events", "--since", "1h")
    associations = [r["association"] for r in rows if "association" in r]
    stored = [a for a in associations if a["calling_aet"] == "TESTSCU" and a["instances"] == 1]
    assert len(stored) == 1
    (accepted,) = stored
    assert accepted["result"] == "accepted" and accepted["outcome"] == "released"
    assert accepted["peer_address"] == LOOPBACK and accepted["tls"] is False
    assert accepted["bytes"] > 512 * 512 and accepted["ended_at"] >= accepted["started_at"]
    rejected = [a for a in associations if a["called_aet"] == "NOTTHENODE"]
    assert len(rejected) == 1 and rejected[0]["result"] == "rejected"
    assert "not ours" in rejected[0]["reason"]

    study = node.cli_json("events", "--study", pipeline.study_uid)
    kinds = [r["kind"] for r in study]
    for kind in ("job-queued", "job-running", "job-succeeded", "delivery-pending", "delivered"):
        assert kind in kinds, f"{kind} missing from {kinds}"
    assert kinds.index("job-queued") < kinds.index("job-running") < kinds.index("job-succeeded")
    assert not any("association" in r for r in study)
    assert node.cli_json("events", "--since", "2999-01-01") == []
    table = node.cli("events", "--since", "30m")
    assert table.returncode == 0 and table.stdout.count("\n") > len(rows)  # one line or more each
    bad = node.cli("events", "--since", "yesterday-ish")
    assert bad.returncode != 0 and "--since" in bad.stderr


def test_association_row_is_written_at_accept_and_survives_a_kill(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", enabled=(), components="receiver").start()
    try:
        ae = AE(ae_title="KILLSCU")
        ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
        assoc = ae.associate(LOOPBACK, node.port, ae_title=node.ae_title)
        assert assoc.is_established
        for _ in range(2):
            status = assoc.send_c_store(image_dataset())
            assert status is not None and int(status.Status) == 0x0000

        def open_row() -> AssociationLog | None:
            with node.sessions()() as s:
                return s.scalar(
                    select(AssociationLog).where(AssociationLog.calling_aet == "KILLSCU")
                )

        row = node.wait_until(open_row, timeout=10, what="the association's row")
        assert row.result == "accepted" and row.ended_at is None
        node.kill()  # mid-association
        assoc.abort()
        row = open_row()
        assert row is not None and row.result == "accepted" and row.ended_at is None
        assert row.instances == 0  # counts are written at the end, never per instance
    finally:
        node.stop()
