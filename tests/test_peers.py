"""The peer helpers themselves, against real dcmtk, dciodvfy and Orthanc processes."""

from __future__ import annotations

import os
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import OrthancFactory
from peers import (
    LOOPBACK,
    Orthanc,
    OrthancError,
    dciodvfy,
    echoscu,
    find_binary,
    free_port,
    parse_store_statuses,
    storescu,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

SUCCESS = 0x0000
TIMEOUT = 60.0


def write_secondary_capture(path: Path, *, broken: bool = False) -> Dataset:
    """Write a small, complete Secondary Capture image; ``broken`` drops type 1 attributes."""
    sop_instance_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Peer^Test"
    ds.PatientID = "PEER-0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.Modality = "OT"
    # Without an unpaired BodyPartExamined, dciodvfy reports the absent Laterality (2C).
    ds.BodyPartExamined = "CHEST"
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 16
    ds.Columns = 16
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(256, dtype=np.uint8).reshape(16, 16).tobytes()
    if broken:
        del ds.StudyInstanceUID
        del ds.SamplesPerPixel
        del ds.Rows
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_find_binary_skips_pynetdicom_apps(monkeypatch: pytest.MonkeyPatch) -> None:
    venv_bin = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", os.pathsep.join([venv_bin, os.environ.get("PATH", "")]))
    for name in ("storescu", "echoscu"):
        found = find_binary(name)
        assert found is not None
        assert not Path(found).read_bytes().startswith(b"#!"), found


def test_orthanc_starts_and_answers_echoscu(orthanc: Orthanc) -> None:
    assert orthanc.system()["DicomAet"] == orthanc.aet
    proc = echoscu(LOOPBACK, orthanc.dicom_port, called_aet=orthanc.aet)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_echoscu_reports_failure_when_nobody_listens(orthanc: Orthanc) -> None:
    orthanc.stop(graceful=False)
    proc = echoscu(LOOPBACK, orthanc.dicom_port, called_aet=orthanc.aet, timeout=5)
    assert proc.returncode != 0


def test_storescu_into_orthanc_and_download(orthanc: Orthanc, tmp_path: Path) -> None:
    path = tmp_path / "sc.dcm"
    ds = write_secondary_capture(path)

    proc = storescu(LOOPBACK, orthanc.dicom_port, [path], called_aet=orthanc.aet)

    assert parse_store_statuses(proc.stdout + proc.stderr) == [SUCCESS], proc.stderr[-2000:]
    assert proc.returncode == 0
    instance_id = orthanc.wait_for_sop_instance(ds.SOPInstanceUID, TIMEOUT)
    assert orthanc.instances() == [instance_id]
    info = orthanc.instance_info(instance_id)
    assert info.sop_class_uid == SecondaryCaptureImageStorage
    assert info.study_instance_uid == ds.StudyInstanceUID
    assert info.modality == "OT"
    assert info.remote_aet == "TESTSCU"
    assert len(orthanc.studies()) == 1
    assert orthanc.study_instances(orthanc.studies()[0]) == [instance_id]
    downloaded = pydicom.dcmread(BytesIO(orthanc.download(instance_id)))
    assert downloaded.SOPInstanceUID == ds.SOPInstanceUID
    new = [c for c in orthanc.changes()["Changes"] if c["ChangeType"] == "NewInstance"]
    assert [c["ID"] for c in new] == [instance_id]


def test_parse_store_statuses_reports_refusal_per_file(orthanc: Orthanc, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.dcm", tmp_path / "bad.dcm"
    write_secondary_capture(good)
    write_secondary_capture(bad, broken=True)  # Orthanc refuses: no StudyInstanceUID

    proc = storescu(LOOPBACK, orthanc.dicom_port, [good, bad], called_aet=orthanc.aet)

    statuses = parse_store_statuses(proc.stdout + proc.stderr)
    assert len(statuses) == 2, proc.stderr[-2000:]
    assert statuses[0] == SUCCESS
    assert statuses[1] != SUCCESS
    assert proc.returncode != 0


def test_parse_store_statuses_ignores_other_messages() -> None:
    output = "\n".join(
        [
            "D: Message Type                  : C-ECHO RSP",
            "D: DIMSE Status                  : 0x0000: Success",
            "D: ======================= END DIMSE MESSAGE =======================",
            "D: Message Type                  : C-STORE RSP",
            "D: DIMSE Status                  : 0xB000: Warning",
            "D: ======================= END DIMSE MESSAGE =======================",
        ]
    )
    assert parse_store_statuses(output) == [0xB000]


def test_dciodvfy_accepts_complete_object(tmp_path: Path) -> None:
    path = tmp_path / "sc.dcm"
    write_secondary_capture(path)
    errors, _warnings = dciodvfy(path)
    assert errors == []


def test_dciodvfy_reports_missing_type1_attributes(tmp_path: Path) -> None:
    path = tmp_path / "broken.dcm"
    write_secondary_capture(path, broken=True)
    errors, _warnings = dciodvfy(path)
    assert any("StudyInstanceUID" in line for line in errors), errors
    assert any("Rows" in line for line in errors), errors


def test_dciodvfy_reports_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"not dicom at all")
    errors, _warnings = dciodvfy(path)
    assert errors


def test_send_to_modality_between_two_orthancs(
    orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    source = orthanc_factory(aet="SOURCE", start=False)
    destination = orthanc_factory(aet="DEST", start=False)
    source.modalities["dest"] = (destination.aet, LOOPBACK, destination.dicom_port)
    destination.modalities["source"] = (source.aet, LOOPBACK, source.dicom_port)
    source.start()
    destination.start()
    path = tmp_path / "sc.dcm"
    ds = write_secondary_capture(path)
    uploaded = source.upload(path)

    source.send_to_modality("dest", [uploaded["ID"]])

    received = destination.wait_for_sop_instance(ds.SOPInstanceUID, TIMEOUT)
    assert destination.instance_info(received).remote_aet == "SOURCE"
    assert source.echo_modality("dest")
    assert destination.echo_modality("source")


def test_send_to_modality_that_is_down(orthanc: Orthanc, tmp_path: Path) -> None:
    path = tmp_path / "sc.dcm"
    write_secondary_capture(path)
    instance_id = orthanc.upload(path)["ID"]
    orthanc.add_modality("down", "DOWN", LOOPBACK, free_port())

    with pytest.raises(OrthancError) as caught:
        orthanc.send_to_modality("down", [instance_id])
    assert caught.value.status == 500
    job = orthanc.send_to_modality("down", [instance_id], synchronous=False)
    assert orthanc.wait_for_job(job["ID"], TIMEOUT)["State"] == "Failure"
    assert not orthanc.echo_modality("down")


@pytest.mark.parametrize("graceful", [True, False], ids=["sigterm", "sigkill"])
def test_restart_keeps_storage_and_ports(orthanc: Orthanc, tmp_path: Path, graceful: bool) -> None:
    path = tmp_path / "sc.dcm"
    write_secondary_capture(path)
    instance_id = orthanc.upload(path)["ID"]
    ports = (orthanc.dicom_port, orthanc.http_port)

    orthanc.stop(graceful=graceful)
    assert not orthanc.running
    assert echoscu(LOOPBACK, ports[0], called_aet=orthanc.aet, timeout=5).returncode != 0
    orthanc.restart()

    assert (orthanc.dicom_port, orthanc.http_port) == ports
    assert orthanc.instances() == [instance_id]
