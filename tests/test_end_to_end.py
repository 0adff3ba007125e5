"""The whole path against real peers: Orthanc → pacsnode → model → SR → Orthanc."""

from __future__ import annotations

import re
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch
from nodeproc import MODELS_DIR, NodeProcess
from peers import LOOPBACK, Orthanc, combined_output, dciodvfy, parse_store_statuses, storescu
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless
from sqlalchemy import select

from pacsnode.manifest import load_manifest
from pacsnode.models.cxr import ChexNetClassifier
from pacsnode.phantoms.cxr import make_cxr_dataset
from pacsnode.tables import Delivery, DeliveryState, Instance, Job, JobState
from pacsnode.writers.sr import read_measurement_report

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.34"}


def _srs(orthanc: Orthanc, study_uid: str) -> list[str]:
    return [
        info.orthanc_id
        for info in orthanc.list_instances()
        if info.sop_class_uid in SR_CLASSES and info.study_instance_uid == study_uid
    ]


@pytest.fixture
def pacs_and_node(tmp_path: Path, orthanc_factory):
    orthanc = orthanc_factory()
    node = NodeProcess(
        tmp_path / "node", destinations=[("pacs", orthanc.aet, orthanc.dicom_port)]
    ).start()
    orthanc.add_modality("NODE", node.ae_title, LOOPBACK, node.port)
    yield orthanc, node
    node.stop()


def test_orthanc_sends_cxr_and_receives_the_sr(pacs_and_node, tmp_path: Path) -> None:
    orthanc, node = pacs_and_node
    ds, labels = make_cxr_dataset(
        101,
        findings=["Effusion"],
        patient_name="Müller^Jürgen",
        specific_character_set="ISO_IR 192",
    )
    path = tmp_path / "cxr.dcm"
    ds.save_as(path, enforce_file_format=True)
    uploaded = orthanc.upload(path)
    orthanc.send_to_modality("NODE", [uploaded["ID"]])

    sr_ids = orthanc.wait_for(lambda: _srs(orthanc, ds.StudyInstanceUID), timeout=120)
    assert len(sr_ids) == 1
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(orthanc.download(sr_ids[0]))
    errors, warnings = dciodvfy(sr_path)
    assert errors == [], errors
    sr = dcmread(sr_path)
    assert sr.StudyInstanceUID == ds.StudyInstanceUID
    assert str(sr.PatientName) == "Müller^Jürgen"
    assert isinstance(hd.sr.srread(sr_path), hd.sr.EnhancedSR | hd.sr.Comprehensive3DSR)

    manifest = load_manifest(MODELS_DIR / "cxr-chexnet")
    reported = read_measurement_report(sr, manifest)
    model = ChexNetClassifier.load(MODELS_DIR / "cxr-chexnet", torch.device("cpu"))
    (expected,) = model.predict([dcmread(path)])
    got = reported[ds.SOPInstanceUID]
    assert set(got) == {label.name for label in manifest.reported_labels}
    for name, value in got.items():
        assert value == pytest.approx(expected.probabilities[name], abs=1e-4)
    assert labels["Effusion"] == 1


@pytest.mark.parametrize(
    ("photometric", "transfer_syntax"),
    [("MONOCHROME1", None), ("MONOCHROME2", JPEG2000Lossless)],
)
def test_monochrome1_and_jpeg2000_are_processed(
    pacs_and_node, tmp_path: Path, photometric: str, transfer_syntax: str | None
) -> None:
    orthanc, node = pacs_and_node
    kwargs = {"transfer_syntax": transfer_syntax} if transfer_syntax else {}
    ds, _ = make_cxr_dataset(
        7, modality="CR", photometric=photometric, rows=512, cols=512, **kwargs
    )
    path = tmp_path / "in.dcm"
    ds.save_as(path, enforce_file_format=True)
    extra = ["--propose-j2k-lossless"] if transfer_syntax else []  # stored as received
    result = storescu(LOOPBACK, node.port, [path], called_aet=node.ae_title, extra_args=extra)
    assert parse_store_statuses(combined_output(result)) == [0x0000]
    orthanc.wait_for(lambda: _srs(orthanc, ds.StudyInstanceUID), timeout=120)
    with node.sessions()() as s:
        assert [j.state for j in s.scalars(select(Job))] == [JobState.SUCCEEDED]
        (instance,) = s.scalars(select(Instance))
        assert instance.transfer_syntax_uid == (transfer_syntax or ds.file_meta.TransferSyntaxUID)


def test_kill_minus_9_between_store_and_send_yields_exactly_one_sr(
    tmp_path: Path, orthanc_factory
) -> None:
    orthanc = orthanc_factory()
    dest = [("pacs", orthanc.aet, orthanc.dicom_port)]
    workdir = tmp_path / "node"
    sr_only = "[outputs]\nheatmaps = []\n"  # one result per job (heatmaps: test_heatmaps.py)
    ds, _ = make_cxr_dataset(55, findings=["Pneumothorax"], rows=512, cols=512)
    path = tmp_path / "cxr.dcm"
    ds.save_as(path, enforce_file_format=True)

    # 1. only the receiver runs: the instance is stored and its job queued, then SIGKILL
    node = NodeProcess(
        workdir, destinations=dest, components="receiver", extra_toml=sr_only
    ).start()
    result = storescu(LOOPBACK, node.port, [path], called_aet=node.ae_title)
    assert parse_store_statuses(combined_output(result)) == [0x0000]
    sessions = node.sessions()

    def job_state() -> JobState | None:
        with sessions() as s:
            job = s.scalar(select(Job))
            return job.state if job else None

    node.wait_until(lambda: job_state() is JobState.QUEUED, what="job queued")
    node.kill()

    # 2. receiver + worker: the SR is written and its delivery pending, then SIGKILL
    node = NodeProcess(
        workdir, destinations=dest, components="receiver,worker", extra_toml=sr_only
    ).start()

    def pending() -> bool:
        with sessions() as s:
            return [d.state for d in s.scalars(select(Delivery))] == [DeliveryState.PENDING]

    node.wait_until(pending, what="delivery pending")
    node.kill()
    assert _srs(orthanc, ds.StudyInstanceUID) == []

    # 3. a full restart delivers by itself, once
    node = NodeProcess(workdir, destinations=dest, extra_toml=sr_only).start()
    try:
        orthanc.wait_for(lambda: _srs(orthanc, ds.StudyInstanceUID), timeout=120)

        def delivered() -> bool:
            with sessions() as s:
                return [d.state for d in s.scalars(select(Delivery))] == [DeliveryState.DELIVERED]

        node.wait_until(delivered, what="delivery recorded")
        # 4. a deliberate rerun replaces rather than duplicates (deterministic UIDs)
        with sessions() as s:
            job_id = s.scalar(select(Job.id))
        assert node.cli("requeue", str(job_id)).returncode == 0
        node.wait_until(
            lambda: job_state() is JobState.SUCCEEDED and delivered(), what="rerun delivered"
        )
        assert len(_srs(orthanc, ds.StudyInstanceUID)) == 1
        jobs = node.cli_json("jobs")["jobs"]
        assert [(j["state"], j["modality"]) for j in jobs] == [("succeeded", ds.Modality)]
    finally:
        node.stop()


def test_demo_model_is_honest_about_its_training() -> None:
    manifest = load_manifest(MODELS_DIR / "cxr-chexnet")
    card = (MODELS_DIR / "cxr-chexnet" / "MODEL_CARD.md").read_text()
    assert manifest.synthetic
    assert "not for clinical use" in card.lower()
    assert manifest.reported_labels, "the demo model reports nothing"
    for label in manifest.reported_labels:
        assert label.name in card
    assert np.isfinite([label.threshold for label in manifest.reported_labels]).all()


def test_destination_down_backs_off_dies_and_requeue_delivers(
    tmp_path: Path, orthanc_factory
) -> None:
    orthanc = orthanc_factory()
    orthanc.stop(graceful=False)
    node = NodeProcess(
        tmp_path / "node",
        destinations=[("pacs", orthanc.aet, orthanc.dicom_port)],
        extra_toml="[dispatch]\nmax_attempts = 3\nbackoff_base_seconds = 0.2\n"
        "backoff_max_seconds = 0.5\ntimeout_seconds = 5\n"
        "[outputs]\nheatmaps = []\n",  # one delivery to follow (heatmaps: test_heatmaps.py)
    ).start()
    try:
        ds, _ = make_cxr_dataset(9, rows=512, cols=512)
        path = tmp_path / "cxr.dcm"
        ds.save_as(path, enforce_file_format=True)
        result = storescu(LOOPBACK, node.port, [path], called_aet=node.ae_title)
        assert parse_store_statuses(combined_output(result)) == [0x0000]

        def delivery() -> Delivery | None:
            with node.sessions()() as s:
                return s.scalar(select(Delivery))

        node.wait_until(
            lambda: (d := delivery()) is not None and d.state is DeliveryState.DEAD,
            what="delivery dead",
        )
        dead = delivery()
        assert dead is not None and dead.attempts == 3
        assert "association to ORTHANC" in (dead.last_error or "")
        status = node.cli_json("status")
        assert status["deliveries"] == {"dead": 1}
        assert status["jobs"] == {"succeeded": 1}
        assert any("gave up after 3 attempts" in e["message"] for e in status["last_errors"])
        assert re.search(r"deliveries dead\s*│\s*1\b", node.cli("status").stdout)  # for people

        orthanc.start()
        assert "1 deliveries" in node.cli("requeue", "--failed").stdout
        orthanc.wait_for(lambda: _srs(orthanc, ds.StudyInstanceUID), timeout=120)
        node.wait_until(
            lambda: (d := delivery()) is not None and d.state is DeliveryState.DELIVERED,
            what="delivered after requeue",
        )
        assert node.cli_json("status")["deliveries"] == {"delivered": 1}
    finally:
        node.stop()


def test_cli_reports_models_and_rejects_bad_config(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node")
    models = node.cli_json("models", "list")
    (cxr,) = [m for m in models if m["name"] == "cxr-chexnet"]
    assert cxr["weights"] == "ok" and cxr["enabled"] is True
    assert cxr["gates"] == "header scope, content: radiograph-view, out of distribution"
    (gate,) = [m for m in models if m["name"] == "gates/radiograph-view"]
    assert gate["weights"] == "ok" and gate["reported"] == "content gate of cxr-chexnet"
    bad = tmp_path / "bad.toml"
    bad.write_text('[storage]\nspool = "x"\n')
    proc = node.cli("--config", str(bad), "config", "check")
    assert proc.returncode == 2
    assert "storage.spool: unknown key" in proc.stderr
