"""The SR writer: a TID 1500 Measurement Report checked by dciodvfy, dsr2html and highdicom."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from datetime import datetime
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from peers import dciodvfy
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, ExplicitVRLittleEndian

from pacsnode.errors import InvalidDatasetError
from pacsnode.manifest import CodeSpec, Manifest
from pacsnode.models.base import ImageResult
from pacsnode.uids import derive_uid
from pacsnode.writers.sr import (
    build_measurement_report,
    read_findings,
    read_measurement_report,
    result_uids,
)

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
NOW = datetime(2025, 3, 4, 5, 6, 7, 890000)
STUDY_UID = derive_uid("test-sr", "study")
SERIES_UID = derive_uid("test-sr", "series")


def code_spec(code: Code) -> CodeSpec:
    return CodeSpec(scheme=code.scheme_designator, value=code.value, meaning=code.meaning)


def make_manifest(*, version: str = "1.0.0", synthetic: bool = True) -> Manifest:
    return Manifest(
        name="cxr-demo",
        version=version,
        kind="cxr-densenet121",
        synthetic=synthetic,
        accepts={"modalities": ["DX", "CR"]},
        weights={"sha256": "0" * 64},
        labels=[
            {"name": "no_finding"},
            {
                "name": "effusion",
                "reported": True,
                "threshold": 0.4,
                "code": code_spec(codes.SCT.PleuralEffusion),
            },
            {"name": "cardiomegaly", "code": code_spec(codes.SCT.Cardiomegaly)},
            {
                "name": "pneumothorax",
                "reported": True,
                "threshold": 0.5,
                "code": code_spec(codes.SCT.Pneumothorax),
            },
        ],
    )


def dx_image(
    index: int,
    *,
    charset: str | Sequence[str] = "ISO_IR 192",
    patient_name: str = "Müller^Jürgen",
    series_uid: str = SERIES_UID,
) -> Dataset:
    """A small DX For Presentation image, as the node would receive it (encoded, read back)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = UID(derive_uid("test-sr", series_uid, str(index)))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = patient_name
    ds.PatientID = "PID-0042"
    ds.PatientBirthDate = "19610203"
    ds.PatientSex = "F"
    ds.StudyDate = "20250301"
    ds.StudyTime = "081500"
    ds.AccessionNumber = "ACC-7"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StudyID = "ST1"
    ds.Modality = "DX"
    ds.Manufacturer = "Phantom Imaging"
    ds.AcquisitionDateTime = "20250301081200"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.Rows = 16
    ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.zeros((16, 16), dtype=np.uint16).tobytes()
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()))


def results_for(
    sources: Sequence[Dataset], probabilities: Sequence[dict[str, float]]
) -> list[ImageResult]:
    return [
        ImageResult(str(ds.SOPInstanceUID), str(ds.SOPClassUID), dict(p))
        for ds, p in zip(sources, probabilities, strict=True)
    ]


PROBABILITIES = [
    {"no_finding": 0.25, "effusion": 0.1234567890123456, "cardiomegaly": 0.7, "pneumothorax": 0.5},
    {"no_finding": 0.05, "effusion": 0.4, "cardiomegaly": 0.2, "pneumothorax": 0.4999999},
]


def save(sr: Dataset, path: Path) -> Path:
    sr.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def sources() -> list[Dataset]:
    return [dx_image(1), dx_image(2)]


@pytest.fixture
def sr_path(tmp_path: Path, sources: list[Dataset]) -> Path:
    sr = build_measurement_report(
        sources, results_for(sources, PROBABILITIES), make_manifest(), now=NOW
    )
    return save(sr, tmp_path / "sr.dcm")


def assert_valid(path: Path) -> None:
    errors, warnings = dciodvfy(path)
    for warning in warnings:
        print(f"dciodvfy {path.name}: {warning}")
    assert errors == []


def dsr2html(path: Path) -> str:
    proc = subprocess.run(
        ["dsr2html", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_sr_passes_dciodvfy(sr_path: Path) -> None:
    assert_valid(sr_path)


def test_probabilities_round_trip_and_only_reported_labels_appear(
    sr_path: Path, sources: list[Dataset]
) -> None:
    sr = pydicom.dcmread(sr_path)
    assert read_measurement_report(sr, make_manifest()) == {
        ds.SOPInstanceUID: {"effusion": p["effusion"], "pneumothorax": p["pneumothorax"]}
        for ds, p in zip(sources, PROBABILITIES, strict=True)
    }
    # Without the manifest the keys are the code meanings.
    assert set(read_measurement_report(sr)[sources[0].SOPInstanceUID]) == {
        "Pleural effusion",
        "Pneumothorax",
    }
    document = hd.sr.EnhancedSR.from_dataset(sr)
    names = {
        (item.name.scheme_designator, item.name.value)
        for item in hd.sr.utils.find_content_items(document, recursive=True)
    }
    assert ("SCT", codes.SCT.Cardiomegaly.value) not in names
    groups = document.content.get_image_measurement_groups()
    assert [g.source_images[0].referenced_sop_instance_uid for g in groups] == [
        ds.SOPInstanceUID for ds in sources
    ]
    for group in groups:
        measurements = group.get_measurements()
        assert [m.name.meaning for m in measurements] == ["Pleural effusion", "Pneumothorax"]
        assert {(m.unit.scheme_designator, m.unit.value) for m in measurements} == {("UCUM", "1")}
        for measurement in measurements:
            algorithm = {item.name.meaning: item.value for item in measurement[0].ContentSequence}
            assert algorithm["Algorithm Name"] == "cxr-demo"
            assert algorithm["Algorithm Version"] == "1.0.0"
        assert group.source_images[0].referenced_sop_class_uid == DX_FOR_PRESENTATION


def test_qualitative_evaluations_follow_label_thresholds(
    sr_path: Path, sources: list[Dataset]
) -> None:
    findings = read_findings(pydicom.dcmread(sr_path), make_manifest())
    # effusion threshold 0.4, pneumothorax 0.5; a probability equal to the threshold is Present
    assert findings == {
        sources[0].SOPInstanceUID: {"effusion": False, "pneumothorax": True},
        sources[1].SOPInstanceUID: {"effusion": True, "pneumothorax": False},
    }


def test_uids_are_deterministic_and_in_the_source_study(sources: list[Dataset]) -> None:
    results = results_for(sources, PROBABILITIES)
    first = build_measurement_report(sources, results, make_manifest(), now=NOW)
    again = build_measurement_report(sources, results, make_manifest(), now=datetime(2030, 1, 1))
    other = build_measurement_report(sources, results, make_manifest(version="1.1.0"), now=NOW)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        again.SeriesInstanceUID,
        again.SOPInstanceUID,
    )
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == result_uids(
        SERIES_UID, make_manifest()
    )
    assert other.SeriesInstanceUID != first.SeriesInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert first.StudyInstanceUID == STUDY_UID
    assert first.SeriesInstanceUID != SERIES_UID
    assert first.SeriesNumber == 7001


def without_highdicom_wall_clock(path: Path) -> bytes:
    """The file's bytes less the three stamps highdicom takes from the wall clock itself."""
    ds = pydicom.dcmread(path)
    del ds.InstanceCreationDate, ds.InstanceCreationTime
    for item in ds.ContributingEquipmentSequence:
        if item.get("ManufacturerModelName") == "highdicom":
            del item.ContributionDateTime
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_fixed_inputs_give_identical_bytes(tmp_path: Path, sources: list[Dataset]) -> None:
    results = results_for(sources, PROBABILITIES)
    paths = [
        save(
            build_measurement_report(sources, results, make_manifest(), now=NOW),
            tmp_path / f"sr{i}.dcm",
        )
        for i in range(2)
    ]
    assert without_highdicom_wall_clock(paths[0]) == without_highdicom_wall_clock(paths[1])
    sr = pydicom.dcmread(paths[0])
    assert (sr.ContentDate, sr.ContentTime) == ("20250304", "050607.890000")


@pytest.mark.parametrize(
    ("charset", "patient_name", "sr_charset"),
    [
        ("ISO_IR 192", "Müller^Jürgen=ミュラー^ユルゲン", "ISO_IR 192"),
        (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "ISO_IR 192"),
        ("GB18030", "Wang^XiaoDong=王^小东", "GB18030"),
        ("ISO_IR 100", "Strauß^Bärbel", "ISO_IR 100"),
    ],
    ids=["utf8", "korean-iso2022", "gb18030", "latin1"],
)
def test_patient_and_study_attributes_are_carried_exactly(
    tmp_path: Path, charset: str | list[str], patient_name: str, sr_charset: str
) -> None:
    source = dx_image(1, charset=charset, patient_name=patient_name)
    assert str(source.PatientName) == patient_name
    sr = build_measurement_report(
        [source], results_for([source], PROBABILITIES[:1]), make_manifest(), now=NOW
    )
    path = save(sr, tmp_path / "sr.dcm")
    assert_valid(path)
    back = pydicom.dcmread(path)
    assert back.SpecificCharacterSet == sr_charset
    assert str(back.PatientName) == patient_name
    for keyword in (
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
    ):
        assert str(back[keyword].value) == str(source[keyword].value), keyword


def test_dsr2html_renders_the_report(sr_path: Path) -> None:
    html = dsr2html(sr_path)
    assert "Pleural effusion" in html
    assert "Pneumothorax" in html


def test_synthetic_model_is_labelled_not_for_clinical_use(
    tmp_path: Path, sources: list[Dataset]
) -> None:
    results = results_for(sources, PROBABILITIES)
    demo = build_measurement_report(sources, results, make_manifest(synthetic=True), now=NOW)
    assert "not for clinical use" in demo.SeriesDescription
    assert "not for clinical use" in dsr2html(save(demo, tmp_path / "demo.dcm"))

    clinical = build_measurement_report(sources, results, make_manifest(synthetic=False), now=NOW)
    html = dsr2html(save(clinical, tmp_path / "clinical.dcm"))
    assert "not for clinical use" not in clinical.SeriesDescription
    assert "not for clinical use" not in html.lower()


def test_results_must_match_sources(sources: list[Dataset]) -> None:
    manifest = make_manifest()
    results = results_for(sources, PROBABILITIES)
    with pytest.raises(
        ValueError, match=f"no result for source instance {sources[1].SOPInstanceUID}"
    ):
        build_measurement_report(sources, results[:1], manifest, now=NOW)
    stray = ImageResult("1.2.3.4", DX_FOR_PRESENTATION, PROBABILITIES[0])
    with pytest.raises(ValueError, match=r"no source image for instance\(s\) 1\.2\.3\.4"):
        build_measurement_report(sources, [*results, stray], manifest, now=NOW)
    incomplete = ImageResult(sources[0].SOPInstanceUID, DX_FOR_PRESENTATION, {"effusion": 0.3})
    with pytest.raises(ValueError, match="'pneumothorax'"):
        build_measurement_report(sources[:1], [incomplete], manifest, now=NOW)
    other_series = dx_image(3, series_uid=derive_uid("test-sr", "other-series"))
    with pytest.raises(ValueError, match="one SR covers one series"):
        build_measurement_report(
            [*sources, other_series],
            results_for([*sources, other_series], [*PROBABILITIES, PROBABILITIES[0]]),
            manifest,
            now=NOW,
        )


def test_a_source_without_type2_patient_and_study_attributes_still_gets_a_valid_sr(
    tmp_path: Path,
) -> None:
    """Some modalities leave out Type 2 attributes (birth date, accession...): tolerant when
    reading, the SR carries them empty instead of the job failing; the UIDs stay required."""
    sources = [dx_image(1), dx_image(2)]
    lacking = ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyTime")
    for ds in sources:
        for keyword in lacking:
            delattr(ds, keyword)
    sr = build_measurement_report(
        sources, results_for(sources, PROBABILITIES), make_manifest(), now=NOW
    )
    path = save(sr, tmp_path / "sr.dcm")
    assert_valid(path)
    back = pydicom.dcmread(path)
    assert all(back[keyword].value in ("", None) for keyword in lacking)
    assert (back.PatientID, str(back.PatientName)) == ("PID-0042", "Müller^Jürgen")
    broken = dx_image(3)
    del broken.StudyInstanceUID
    with pytest.raises(InvalidDatasetError, match="missing StudyInstanceUID"):
        build_measurement_report(
            [broken], results_for([broken], PROBABILITIES[:1]), make_manifest(), now=NOW
        )
