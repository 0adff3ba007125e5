"""The CT PE writers: series SR and key images, checked by dciodvfy, dsr2html and highdicom.

The model is never loaded: the series are small generated CT headers and the
SeriesResults are written by hand, so every expected number is known.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ExplicitVRLittleEndian
from test_sr import assert_valid, dsr2html, save, without_highdicom_wall_clock

from pacsnode.manifest import Manifest, load_manifest
from pacsnode.models.base import SeriesResult, SliceScore
from pacsnode.uids import derive_uid
from pacsnode.writers.kos import build_key_images
from pacsnode.writers.sr import (
    CT_PULMONARY_ANGIOGRAPHY,
    DEMO_DISCLAIMER,
    ReportedSlice,
    build_series_report,
    read_series_report,
    result_uids,
)

CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "ct-pe"
NOW = datetime(2025, 3, 4, 5, 6, 7, 890000)
STUDY_UID = derive_uid("test-pe", "study")
SERIES_UID = derive_uid("test-pe", "series")
SLICES = 30
TOP_Z = 100.0  # mm; 2.5 mm spacing, superior (larger z) first
SPACING = 2.5

# A clear run of positive slices (indices 11-18, peak 0.97 at 14), one slice exactly at the
# threshold inside the run (index 17) and one isolated positive lower down (index 24).
POSITIVE_SLICES = [0.02] * SLICES
for _i, _p in {
    10: 0.31,
    11: 0.62,
    12: 0.81,
    13: 0.93,
    14: 0.97,
    15: 0.95,
    16: 0.74,
    17: 0.5,
    18: 0.55,
    19: 0.2,
    24: 0.51,
}.items():
    POSITIVE_SLICES[_i] = _p
POSITIVE_EXAM = {
    "negative_exam_for_pe": 0.04,
    "indeterminate": 0.02,
    "chronic_pe": 0.1234567890123456,
    "acute_and_chronic_pe": 0.05,
    "central_pe": 0.5,
    "leftsided_pe": 0.35,
    "rightsided_pe": 0.88,
    "rv_lv_ratio_gte_1": 0.61,
    "rv_lv_ratio_lt_1": 0.39,
}
NEGATIVE_SLICES = [0.01 + 0.015 * (i % 7) for i in range(SLICES)]
NEGATIVE_EXAM = {
    **{name: 0.02 for name in POSITIVE_EXAM},
    "negative_exam_for_pe": 0.96,
    "rv_lv_ratio_lt_1": 0.9,
}


def ct_slice(
    index: int,
    *,
    series_uid: str = SERIES_UID,
    charset: str | Sequence[str] = "ISO_IR 192",
    patient_name: str = "Åström^Inga",
) -> Dataset:
    """Header of CT slice ``index`` (0 = most superior), encoded and read back as received."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = UID(derive_uid("test-pe", series_uid, str(index)))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = derive_uid("test-pe", "frame-of-reference")
    ds.PatientName = patient_name
    ds.PatientID = "PID-PE-1"
    ds.PatientBirthDate = "19580712"
    ds.PatientSex = "M"
    ds.StudyDate = "20250302"
    ds.StudyTime = "221000"
    ds.AccessionNumber = "ACC-PE-9"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StudyID = "CTPA1"
    ds.Modality = "CT"
    ds.Manufacturer = "Phantom Imaging"
    ds.SeriesNumber = 3
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-100.0, -100.0, TOP_Z - SPACING * index]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [25.0, 25.0]
    ds.SliceThickness = SPACING
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = np.zeros((8, 8), dtype=np.int16).tobytes()
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()), stop_before_pixels=True)


def ct_series(
    *, charset: str | Sequence[str] = "ISO_IR 192", patient_name: str = "Åström^Inga"
) -> list[Dataset]:
    return [ct_slice(i, charset=charset, patient_name=patient_name) for i in range(SLICES)]


def series_result(
    sources: Sequence[Dataset], slices: Sequence[float], exam: dict[str, float]
) -> SeriesResult:
    return SeriesResult(
        series_uid=str(sources[0].SeriesInstanceUID),
        image_label="pe_present_on_image",
        slices=tuple(
            SliceScore(str(ds.SOPInstanceUID), str(ds.SOPClassUID), None, p)
            for ds, p in zip(sources, slices, strict=True)
        ),
        exam=dict(exam),
    )


def key_object_description(kos: Dataset) -> str:
    """The TEXT "Key Object Description" (DCM 113012) of a KOS."""
    [text] = [
        item.TextValue
        for item in kos.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "113012"
    ]
    return str(text)


def with_version(manifest: Manifest, version: str) -> Manifest:
    return manifest.model_copy(update={"version": version})


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(MODEL_DIR)


@pytest.fixture(scope="module")
def sources() -> list[Dataset]:
    return ct_series()


@pytest.fixture(scope="module")
def positive(sources: list[Dataset]) -> SeriesResult:
    return series_result(sources, POSITIVE_SLICES, POSITIVE_EXAM)


@pytest.fixture(scope="module")
def negative(sources: list[Dataset]) -> SeriesResult:
    return series_result(sources, NEGATIVE_SLICES, NEGATIVE_EXAM)


@pytest.fixture(scope="module")
def outputs(
    tmp_path_factory: pytest.TempPathFactory,
    sources: list[Dataset],
    manifest: Manifest,
    positive: SeriesResult,
    negative: SeriesResult,
) -> dict[str, Path]:
    """The positive SR and KOS and the negative SR, written once for the module."""
    folder = tmp_path_factory.mktemp("pe")
    kos = build_key_images(sources, positive, manifest, now=NOW)
    assert kos is not None
    return {
        "sr": save(build_series_report(sources, positive, manifest, now=NOW), folder / "sr.dcm"),
        "ko": save(kos, folder / "ko.dcm"),
        "negative-sr": save(
            build_series_report(sources, negative, manifest, now=NOW), folder / "neg.dcm"
        ),
    }


def test_documents_pass_dciodvfy(outputs: dict[str, Path]) -> None:
    for path in outputs.values():
        assert_valid(path)


def test_exam_labels_round_trip_with_present_absent_at_thresholds(
    outputs: dict[str, Path], manifest: Manifest
) -> None:
    report = read_series_report(pydicom.dcmread(outputs["sr"]), manifest)
    assert report.exam_probabilities == POSITIVE_EXAM
    # all thresholds are 0.5; a probability equal to the threshold is Present
    assert report.exam_findings == {name: p >= 0.5 for name, p in POSITIVE_EXAM.items()}
    assert report.exam_findings["central_pe"] is True
    assert list(report.exam_probabilities) == [
        label.name for label in manifest.labels if label.level == "exam"
    ]


def test_slice_summary_round_trips(
    outputs: dict[str, Path], sources: list[Dataset], positive: SeriesResult
) -> None:
    report = read_series_report(pydicom.dcmread(outputs["sr"]))
    positives = [i for i, p in enumerate(POSITIVE_SLICES) if p >= 0.5]
    assert positives == [11, 12, 13, 14, 15, 16, 17, 18, 24]
    assert report.positive_slices == len(positives)

    def at(index: int, value: float) -> ReportedSlice:
        return ReportedSlice(str(sources[index].SOPInstanceUID), None, value)

    assert report.max_probability == at(14, 0.97)
    assert report.superior_z == at(11, TOP_Z - SPACING * 11)
    assert report.inferior_z == at(24, TOP_Z - SPACING * 24)
    assert report.superior_instance == at(11, 12)
    assert report.inferior_instance == at(24, 25)
    # keys are code meanings without a manifest
    assert report.exam_probabilities["Negative for pulmonary embolism"] == 0.04


def test_highdicom_reads_the_report_back(outputs: dict[str, Path], sources: list[Dataset]) -> None:
    document = hd.sr.EnhancedSR.from_dataset(pydicom.dcmread(outputs["sr"]))
    content = document.content
    assert isinstance(content, hd.sr.MeasurementReport)
    procedure = hd.sr.utils.find_content_items(content[0], name=codes.DCM.ProcedureReported)
    assert procedure[0].value == CT_PULMONARY_ANGIOGRAPHY
    exam_group, slice_group = content.get_image_measurement_groups()
    assert exam_group.source_images == []  # the whole series: the evidence
    [key_slice] = slice_group.source_images
    assert key_slice.referenced_sop_instance_uid == sources[14].SOPInstanceUID
    assert key_slice.referenced_sop_class_uid == CT_IMAGE
    for group in (exam_group, slice_group):
        assert group.tracking_identifier is not None
        assert DEMO_DISCLAIMER in group.tracking_identifier
    [evidence] = document.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == STUDY_UID
    [series] = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == SERIES_UID
    assert [item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence] == [
        ds.SOPInstanceUID for ds in sources
    ]
    [scheme] = document.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == "99PACSNODE"


def test_negative_report_has_no_range(
    outputs: dict[str, Path], sources: list[Dataset], manifest: Manifest
) -> None:
    report = read_series_report(pydicom.dcmread(outputs["negative-sr"]), manifest)
    assert report.exam_probabilities == NEGATIVE_EXAM
    assert report.exam_findings["negative_exam_for_pe"] is True
    assert report.positive_slices == 0
    top = max(range(SLICES), key=lambda i: (NEGATIVE_SLICES[i], -i))
    assert report.max_probability == ReportedSlice(
        str(sources[top].SOPInstanceUID), None, NEGATIVE_SLICES[top]
    )
    assert report.superior_z is None and report.inferior_z is None
    assert report.superior_instance is None and report.inferior_instance is None


def test_key_images_are_the_top_slices_in_anatomical_order(
    outputs: dict[str, Path], sources: list[Dataset]
) -> None:
    kos = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(outputs["ko"]))
    top5 = sorted(sorted(range(SLICES), key=lambda i: -POSITIVE_SLICES[i])[:5])
    assert top5 == [12, 13, 14, 15, 16]
    expected = [str(sources[i].SOPInstanceUID) for i in top5]
    references = kos.content.get_references()
    assert [str(r.referenced_sop_instance_uid) for r in references] == expected
    assert {str(r.referenced_sop_class_uid) for r in references} == {CT_IMAGE}
    for uid in expected:
        assert kos.resolve_reference(uid) == (STUDY_UID, SERIES_UID, uid)
    [evidence] = kos.CurrentRequestedProcedureEvidenceSequence
    [series] = evidence.ReferencedSeriesSequence
    assert [str(i.ReferencedSOPInstanceUID) for i in series.ReferencedSOPSequence] == expected
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"  # "Of Interest"
    [device] = kos.content.get_observer_contexts(observer_type=codes.DCM.Device)
    assert "ct-pe" in str(device.observer_identifying_attributes.name)
    description = key_object_description(kos)
    assert "the 5 slices with the highest probability of Pulmonary embolism" in description
    assert "among the 9 of 30 slices at or above 0.5" in description
    assert "image 13 (z 70.0 mm) p=0.81; image 14 (z 67.5 mm) p=0.93;" in description
    assert DEMO_DISCLAIMER in description
    assert kos.SeriesNumber == 7002
    assert "not for clinical use" in kos.SeriesDescription


def test_max_images_and_threshold_limit_the_selection(
    sources: list[Dataset], positive: SeriesResult, manifest: Manifest
) -> None:
    def selected(max_images: int) -> list[str]:
        kos = build_key_images(sources, positive, manifest, max_images=max_images, now=NOW)
        assert kos is not None
        return [str(r.referenced_sop_instance_uid) for r in kos.content.get_references()]

    uids = [str(ds.SOPInstanceUID) for ds in sources]
    assert selected(1) == [uids[14]]
    # only positive slices are flagged, however many are asked for
    assert selected(50) == [uids[i] for i in (11, 12, 13, 14, 15, 16, 17, 18, 24)]
    with pytest.raises(ValueError, match="max_images"):
        build_key_images(sources, positive, manifest, max_images=0, now=NOW)


def test_no_key_images_for_a_negative_exam(
    sources: list[Dataset], negative: SeriesResult, manifest: Manifest
) -> None:
    assert build_key_images(sources, negative, manifest, now=NOW) is None


def test_no_key_images_for_an_image_label_that_is_not_reported(
    sources: list[Dataset], positive: SeriesResult, manifest: Manifest
) -> None:
    """Only reported labels reach the PACS: no slice summary in the SR, no key images."""
    labels = [
        label.model_copy(update={"reported": label.level != "image"}) for label in manifest.labels
    ]
    unreported = manifest.model_copy(update={"labels": labels})
    assert build_key_images(sources, positive, unreported, now=NOW) is None
    report = read_series_report(build_series_report(sources, positive, unreported, now=NOW))
    assert report.positive_slices is None


def test_uids_are_deterministic_and_distinct(
    sources: list[Dataset], positive: SeriesResult, manifest: Manifest
) -> None:
    def uids(document: Dataset | None) -> tuple[str, str]:
        assert document is not None
        return str(document.SeriesInstanceUID), str(document.SOPInstanceUID)

    sr = uids(build_series_report(sources, positive, manifest, now=NOW))
    ko = uids(build_key_images(sources, positive, manifest, now=NOW))
    assert sr == uids(build_series_report(sources, positive, manifest, now=datetime(2031, 1, 1)))
    assert ko == uids(build_key_images(sources, positive, manifest, now=datetime(2031, 1, 1)))
    assert sr == result_uids(SERIES_UID, manifest) == result_uids(SERIES_UID, manifest, "sr")
    assert ko == result_uids(SERIES_UID, manifest, "ko")
    newer = with_version(manifest, "0.2.0")
    other = manifest.model_copy(update={"name": "ct-pe-other"})
    all_uids = [
        *sr,
        *ko,
        *uids(build_series_report(sources, positive, newer, now=NOW)),
        *uids(build_key_images(sources, positive, newer, now=NOW)),
        *uids(build_series_report(sources, positive, other, now=NOW)),
        *uids(build_key_images(sources, positive, other, now=NOW)),
        SERIES_UID,
        *(str(ds.SOPInstanceUID) for ds in sources),
    ]
    assert len(set(all_uids)) == len(all_uids)


def test_fixed_inputs_give_identical_bytes(
    tmp_path: Path, sources: list[Dataset], positive: SeriesResult, manifest: Manifest
) -> None:
    def documents() -> dict[str, Dataset | None]:
        return {
            "sr": build_series_report(sources, positive, manifest, now=NOW),
            "ko": build_key_images(sources, positive, manifest, now=NOW),
        }

    first, second = documents(), documents()
    for kind, document in first.items():
        again = second[kind]
        assert document is not None and again is not None
        a = without_highdicom_wall_clock(save(document, tmp_path / f"{kind}-1.dcm"))
        b = without_highdicom_wall_clock(save(again, tmp_path / f"{kind}-2.dcm"))
        assert a == b, kind


@pytest.mark.parametrize(
    ("charset", "patient_name", "document_charset"),
    [
        ("ISO_IR 192", "Åström^Inga=アストレム^インガ", "ISO_IR 192"),
        (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "ISO_IR 192"),
    ],
    ids=["utf8", "korean-iso2022"],
)
def test_patient_and_study_come_from_the_source(
    tmp_path: Path, manifest: Manifest, charset: str, patient_name: str, document_charset: str
) -> None:
    series = ct_series(charset=charset, patient_name=patient_name)
    result = series_result(series, POSITIVE_SLICES, POSITIVE_EXAM)
    kos = build_key_images(series, result, manifest, now=NOW)
    assert kos is not None
    for name, document in (
        ("sr", build_series_report(series, result, manifest, now=NOW)),
        ("ko", kos),
    ):
        path = save(document, tmp_path / f"{name}.dcm")
        assert_valid(path)
        back = pydicom.dcmread(path)
        assert back.SpecificCharacterSet == document_charset
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
            assert str(back[keyword].value) == str(series[0][keyword].value), (name, keyword)


def test_dsr2html_shows_the_label_meanings(outputs: dict[str, Path], manifest: Manifest) -> None:
    html = dsr2html(outputs["sr"])
    for label in manifest.reported_labels:
        assert label.code is not None
        assert label.code.meaning in html, label.name
    for text in (
        "Number of positive slices",
        "Most superior positive slice, z position",
        "Most inferior positive slice, instance number",
        "CT pulmonary angiography",
        "not for clinical use",
    ):
        assert text in html


def test_clinical_model_has_no_disclaimer(
    tmp_path: Path, sources: list[Dataset], positive: SeriesResult, manifest: Manifest
) -> None:
    clinical = manifest.model_copy(update={"synthetic": False})
    sr = build_series_report(sources, positive, clinical, now=NOW)
    kos = build_key_images(sources, positive, clinical, now=NOW)
    assert kos is not None
    assert "not for clinical use" not in dsr2html(save(sr, tmp_path / "sr.dcm")).lower()
    assert "not for clinical use" not in sr.SeriesDescription
    assert "not for clinical use" not in kos.SeriesDescription
    assert "clinical use" not in key_object_description(kos)


def enhanced_ct(frames: int) -> Dataset:
    """Header of a multi-frame Enhanced CT volume: per-frame positions, no pixels."""
    ds = ct_slice(0)
    ds.SOPClassUID = ENHANCED_CT_IMAGE
    ds.SOPInstanceUID = derive_uid("test-pe", "enhanced")
    ds.SeriesInstanceUID = derive_uid("test-pe", "enhanced-series")
    ds.NumberOfFrames = frames
    del ds.ImagePositionPatient, ds.InstanceNumber
    ds.InstanceNumber = 1
    per_frame = []
    for frame in range(frames):
        position = Dataset()
        position.ImagePositionPatient = [-100.0, -100.0, TOP_Z - SPACING * frame]
        item = Dataset()
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    return ds


def test_multi_frame_sources_are_referenced_by_frame_in_the_sr(
    tmp_path: Path, manifest: Manifest
) -> None:
    volume = enhanced_ct(SLICES)
    result = SeriesResult(
        series_uid=str(volume.SeriesInstanceUID),
        image_label="pe_present_on_image",
        slices=tuple(
            SliceScore(str(volume.SOPInstanceUID), ENHANCED_CT_IMAGE, i + 1, p)
            for i, p in enumerate(POSITIVE_SLICES)
        ),
        exam=POSITIVE_EXAM,
    )
    sr_path = save(build_series_report([volume], result, manifest, now=NOW), tmp_path / "sr.dcm")
    kos = build_key_images([volume], result, manifest, now=NOW)
    assert kos is not None
    ko_path = save(kos, tmp_path / "ko.dcm")
    for path in (sr_path, ko_path):
        assert_valid(path)
    report = read_series_report(pydicom.dcmread(sr_path), manifest)
    uid = str(volume.SOPInstanceUID)
    assert report.max_probability == ReportedSlice(uid, 15, 0.97)
    assert report.superior_z == ReportedSlice(uid, 12, TOP_Z - SPACING * 11)
    assert report.inferior_z == ReportedSlice(uid, 25, TOP_Z - SPACING * 24)
    assert report.superior_instance is None  # a multi-frame instance number is not a slice's
    # highdicom's KOS references instances only: the volume once
    back = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(ko_path))
    assert [str(r.referenced_sop_instance_uid) for r in back.content.get_references()] == [uid]


def test_results_must_match_sources(
    sources: list[Dataset], positive: SeriesResult, manifest: Manifest
) -> None:
    stray = SliceScore("1.2.3.4", str(CT_IMAGE), None, 0.9)
    with_stray = SeriesResult(SERIES_UID, positive.image_label, (*positive.slices, stray), {})
    not_a_source = r"1\.2\.3\.4, which is not among the sources"
    with pytest.raises(ValueError, match=not_a_source):
        build_series_report(sources, with_stray, manifest, now=NOW)
    with pytest.raises(ValueError, match=not_a_source):
        build_key_images(sources, with_stray, manifest, now=NOW)
    other_series = SeriesResult("1.2.3", positive.image_label, positive.slices, positive.exam)
    with pytest.raises(ValueError, match="scored series 1.2.3"):
        build_series_report(sources, other_series, manifest, now=NOW)
    incomplete = SeriesResult(SERIES_UID, positive.image_label, positive.slices, {})
    with pytest.raises(ValueError, match="'negative_exam_for_pe'"):
        build_series_report(sources, incomplete, manifest, now=NOW)
    framed = SeriesResult(
        SERIES_UID,
        positive.image_label,
        (SliceScore(str(sources[0].SOPInstanceUID), str(CT_IMAGE), 2, 0.9),),
        positive.exam,
    )
    with pytest.raises(ValueError, match="single-frame, not frame 2"):
        build_series_report(sources, framed, manifest, now=NOW)
    with pytest.raises(ValueError, match="one KOS covers one series"):
        build_key_images([*sources, ct_slice(0, series_uid="1.2.3")], positive, manifest)
