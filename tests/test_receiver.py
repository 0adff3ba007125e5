"""The receiver against real dcmtk and pynetdicom peers: statuses, durability, refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from dicomgen import MR_IMAGE, image_dataset, save
from nodeproc import NodeProcess
from peers import LOOPBACK, combined_output, echoscu, parse_store_statuses, storescu
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from sqlalchemy import select

from pacsnode.spool import spool_path
from pacsnode.tables import Instance, Series


@pytest.fixture
def node(tmp_path: Path):
    proc = NodeProcess(tmp_path / "node", enabled=[]).start()
    yield proc
    proc.stop()


def _dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, after its file meta group."""
    raw = path.read_bytes()
    return raw[144 + int.from_bytes(raw[140:144], "little") :]


def _store(node: NodeProcess, files: list[Path], calling: str = "TESTSCU") -> list[int]:
    result = storescu(
        LOOPBACK,
        node.port,
        files,
        called_aet=node.ae_title,
        calling_aet=calling,
        extra_args=["--no-halt"],
    )
    return parse_store_statuses(combined_output(result))


def test_echo_and_wrong_called_aet(node: NodeProcess) -> None:
    assert echoscu(LOOPBACK, node.port, called_aet="PACSNODE").returncode == 0
    wrong = echoscu(LOOPBACK, node.port, called_aet="SOMEONEELSE")
    assert wrong.returncode != 0
    assert "called ae title not recognized" in combined_output(wrong).lower()


def test_store_is_on_disk_and_recorded_once(node: NodeProcess, tmp_path: Path) -> None:
    ds = image_dataset()
    path = save(ds, tmp_path / "ct.dcm")
    assert _store(node, [path, path]) == [0x0000, 0x0000]
    spooled = spool_path(
        node.spool_dir, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    assert _dataset_bytes(spooled) == _dataset_bytes(path)  # stored as received
    with node.sessions()() as s:
        instance = s.scalar(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID))
        assert instance is not None and instance.receive_count == 2
        series = s.scalar(select(Series).where(Series.series_uid == ds.SeriesInstanceUID))
        assert series is not None and series.instance_count == 1
    assert not list(node.spool_dir.rglob("*.tmp"))


def test_missing_uid_gets_failure_status_and_node_keeps_serving(
    node: NodeProcess, tmp_path: Path
) -> None:
    bad = image_dataset()
    del bad.StudyInstanceUID
    good = image_dataset()
    statuses = _store(node, [save(bad, tmp_path / "bad.dcm"), save(good, tmp_path / "good.dcm")])
    assert statuses == [0xC001, 0x0000]
    assert "missing StudyInstanceUID" in node.log()
    assert echoscu(LOOPBACK, node.port, called_aet="PACSNODE").returncode == 0
    assert not (node.spool_dir / "None").exists()


def test_truncated_dataset_gets_c210(
    node: NodeProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = image_dataset()
    path = save(ds, tmp_path / "ct.dcm")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(path.read_bytes()[:-100])
    # pynetdicom's chunked mode sends a file's bytes as they are, without re-encoding
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate(LOOPBACK, node.port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(truncated)
    finally:
        assoc.release()
    assert status is not None and int(status.Status) == 0xC210
    assert "declares" in str(status.ErrorComment)
    assert not list(node.spool_dir.rglob("*.dcm"))
    assert _store(node, [path]) == [0x0000]


def test_other_sop_class_refused_at_negotiation(node: NodeProcess, tmp_path: Path) -> None:
    mr = save(image_dataset(sop_class=MR_IMAGE, modality="MR"), tmp_path / "mr.dcm")
    result = storescu(LOOPBACK, node.port, [mr], called_aet="PACSNODE")
    assert parse_store_statuses(combined_output(result)) == []
    assert result.returncode != 0
    ae = AE()
    ae.add_requested_context(MR_IMAGE)
    assoc = ae.associate(LOOPBACK, node.port, ae_title="PACSNODE")
    try:
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == []
    finally:
        if assoc.is_established:
            assoc.release()


def test_unwritable_spool_answers_out_of_resources(node: NodeProcess, tmp_path: Path) -> None:
    ds = image_dataset()
    path = save(ds, tmp_path / "ct.dcm")
    shutil.rmtree(node.spool_dir)
    node.spool_dir.write_text("a file where the spool folder should be")
    assert _store(node, [path]) == [0xA700]
    with node.sessions()() as s:
        assert (
            s.scalar(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)) is None
        )
    node.spool_dir.unlink()
    assert _store(node, [path]) == [0x0000]
    assert not list(node.spool_dir.rglob("*.tmp"))


def test_calling_aet_not_allowed(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", enabled=[], allowed_calling_aets=["MODALITY1"])
    node.start()
    try:
        allowed = echoscu(LOOPBACK, node.port, called_aet="PACSNODE", calling_aet="MODALITY1")
        assert allowed.returncode == 0
        refused = echoscu(LOOPBACK, node.port, called_aet="PACSNODE", calling_aet="INTRUDER")
        assert refused.returncode != 0
        assert "calling ae title not recognized" in combined_output(refused).lower()
    finally:
        node.stop()
