"""Every writer on the smallest outputs a model can give (issue 15).

One segment, one finding, one slice, no positive slice, nothing found at all, a single label
reported: each object is built, written to a file, validated by dciodvfy, read back with
highdicom and with our readers (those :mod:`pacsnode.findings` uses), and its content
compared with what the model gave.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from ctgen import write_ct_series
from peers import dciodvfy
from pydicom.dataset import Dataset
from test_pe_outputs import (
    NEGATIVE_EXAM,
    POSITIVE_EXAM,
    TOP_Z,
    ct_series,
    ct_slice,
    enhanced_ct,
    key_object_description,
    series_result,
)
from test_sr import dx_image, make_manifest

from pacsnode.findings import summarize
from pacsnode.manifest import Manifest, load_manifest
from pacsnode.measurements import measure
from pacsnode.models.base import ImageResult, SegmentationResult, SeriesResult, SliceScore
from pacsnode.volumes import load_volume, plan_volume, read_slice_refs
from pacsnode.writers.heatmap import build_heatmap_images
from pacsnode.writers.kos import build_key_images
from pacsnode.writers.seg import build_segmentation
from pacsnode.writers.sr import (
    ReportedSlice,
    build_measurement_report,
    build_segmentation_report,
    build_series_report,
    read_absent_segments,
    read_findings,
    read_heatmap_references,
    read_measurement_report,
    read_segmentation_report,
    read_series_report,
)

MODELS = Path(__file__).resolve().parents[1] / "models"
KIDNEY = load_manifest(MODELS / "ct-kidney")
PE = load_manifest(MODELS / "ct-pe")
NOW = datetime(2025, 6, 7, 8, 9, 10)
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
KIDNEY_SERIES = "1.2.826.0.1.3680043.8.498.1515"
ROWS, COLUMNS = 20, 24
KIDNEY_SPACING = (2.0, 0.8, 0.7)


def only_reported(manifest: Manifest, *names: str) -> Manifest:
    """``manifest`` with only the labels ``names`` reported."""
    labels = [
        label.model_copy(update={"reported": label.name in names}) for label in manifest.labels
    ]
    return manifest.model_copy(update={"labels": labels})


def stored(ds: Dataset, path: Path) -> Dataset:
    """``ds`` written to ``path``, passed by dciodvfy, and read back as a PACS hands it out."""
    ds.save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy(path)
    assert errors == [], (path.name, errors)
    return pydicom.dcmread(path)


def evidence(document: Dataset) -> set[str]:
    return {
        str(instance.ReferencedSOPInstanceUID)
        for study in document.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }


# -- CT kidney: SEG and segmentation report ------------------------------------------------

Frames = set[tuple[str, int | None]]


@dataclasses.dataclass(frozen=True)
class KidneyCase:
    slices: int
    present: dict[str, Any]  # label -> index expression of its voxels on (slices, ROWS, COLUMNS)
    enhanced: bool = False
    reported: tuple[str, ...] | None = None  # None: the manifest's


LEFT = np.s_[1:4, 4:12, 14:20]  # three of six slices, at the patient's left (high i)
RIGHT = np.s_[2:5, 5:13, 2:8]
KIDNEY_CASES = {
    "one-segment": KidneyCase(6, {"left_kidney": LEFT}),
    "one-segment-enhanced-ct": KidneyCase(6, {"left_kidney": LEFT}, enhanced=True),
    "one-voxel-lesion-only": KidneyCase(6, {"kidney_tumour": np.s_[2, 8, 16]}),
    "two-segments": KidneyCase(6, {"left_kidney": LEFT, "right_kidney": RIGHT}),
    "one-slice-one-segment": KidneyCase(1, {"left_kidney": np.s_[0, 4:12, 14:20]}),
    "one-slice-enhanced-ct": KidneyCase(1, {"right_kidney": np.s_[0, 5:13, 2:8]}, enhanced=True),
    "one-slice-two-segments": KidneyCase(
        1, {"left_kidney": np.s_[0, 4:12, 14:20], "right_kidney": np.s_[0, 5:13, 2:8]}
    ),
    "nothing-found": KidneyCase(6, {}),
    "one-slice-nothing-found": KidneyCase(1, {}),
    "single-label-reported-found": KidneyCase(
        6, {"left_kidney": LEFT, "right_kidney": RIGHT}, reported=("right_kidney",)
    ),
    "single-label-reported-absent": KidneyCase(
        6, {"left_kidney": LEFT}, reported=("right_kidney",)
    ),
}


def kidney_inputs(
    tmp_path: Path, case: KidneyCase
) -> tuple[list[Dataset], SegmentationResult, Manifest]:
    shape = (case.slices, ROWS, COLUMNS)
    hu = np.random.default_rng(15).integers(-100, 100, size=shape).astype(np.float64)
    paths = write_ct_series(
        tmp_path / "ct", hu, KIDNEY_SPACING, series_uid=KIDNEY_SERIES, enhanced=case.enhanced
    )
    volume = load_volume(plan_volume(read_slice_refs(paths), KIDNEY_SERIES, min_slices=1))
    masks = {label.name: np.zeros(shape, dtype=bool) for label in KIDNEY.segment_labels}
    for name, where in case.present.items():
        masks[name][where] = True
    manifest = KIDNEY if case.reported is None else only_reported(KIDNEY, *case.reported)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return headers, SegmentationResult(KIDNEY_SERIES, volume, masks), manifest


def mask_frames(result: SegmentationResult, name: str) -> Frames:
    """The source frames holding segment ``name``: where a SEG must put it."""
    frames, refs = result.volume.to_source(result.masks[name])
    return {
        (ref.sop_instance_uid, ref.frame)
        for ref, occupied in zip(refs, frames.any(axis=(1, 2)), strict=True)
        if occupied
    }


def seg_frames(seg: Dataset) -> dict[int, Frames]:
    """``{segment number: source frames}`` of a stored SEG, read tolerantly: a frame's Segment
    Identification is per frame, or shared when the SEG holds one segment."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    out: dict[int, Frames] = {}
    for item in seg.PerFrameFunctionalGroupsSequence:
        identification = item.get("SegmentIdentificationSequence")
        if identification is None:
            identification = shared.SegmentIdentificationSequence
        number = int(identification[0].ReferencedSegmentNumber)
        for derivation in item.DerivationImageSequence:
            for source in derivation.SourceImageSequence:
                frame = source.get("ReferencedFrameNumber")
                out.setdefault(number, set()).add(
                    (str(source.ReferencedSOPInstanceUID), None if frame is None else int(frame))
                )
    return out


def sr_frames(reference: hd.sr.ReferencedSegment) -> Frames:
    """The source frames an SR's Referenced Segment names."""
    out: Frames = set()
    for image in reference.source_images_for_segmentation:
        uid = str(image.referenced_sop_instance_uid)
        numbers = image.referenced_frame_numbers
        out |= {(uid, int(n)) for n in numbers} if numbers else {(uid, None)}
    return out


def seg_pixels(seg: hd.seg.Segmentation, result: SegmentationResult, number: int) -> np.ndarray:
    """Segment ``number`` on every source frame of the volume, as highdicom reads it."""
    refs = result.volume.to_source(np.zeros(result.volume.array.shape, dtype=bool))[1]
    options: dict[str, Any] = {"segment_numbers": [number], "assert_missing_frames_are_empty": True}
    if refs[0].frame is None:
        uids = [ref.sop_instance_uid for ref in refs]
        pixels = seg.get_pixels_by_source_instance(uids, **options)
    else:
        frames = [int(ref.frame) for ref in refs if ref.frame is not None]
        pixels = seg.get_pixels_by_source_frame(refs[0].sop_instance_uid, frames, **options)
    return np.asarray(pixels[..., 0], dtype=bool)


@pytest.mark.parametrize("case", KIDNEY_CASES.values(), ids=KIDNEY_CASES.keys())
def test_kidney_seg_and_report(tmp_path: Path, case: KidneyCase) -> None:
    sources, result, manifest = kidney_inputs(tmp_path, case)
    reported = [label for label in manifest.segment_labels if label.reported]
    found = [label.name for label in reported if label.name in case.present]
    absent = [label.name for label in reported if label.name not in case.present]

    built = build_segmentation(sources, result, manifest, now=NOW)
    if not found:
        assert built is None
        seg = None
    else:
        assert built is not None
        seg = stored(built, tmp_path / "seg.dcm")
        back = hd.seg.segread(tmp_path / "seg.dcm")
        assert back.segment_numbers == list(range(1, len(found) + 1))
        frames = seg_frames(seg)
        assert sorted(frames) == back.segment_numbers
        for number, name in enumerate(found, start=1):
            assert back.get_segment_description(number).tracking_id == name
            assert frames[number] == mask_frames(result, name), name
            expected = result.volume.to_source(result.masks[name])[0]
            assert np.array_equal(seg_pixels(back, result, number), expected), name

    measured = measure(result)
    sr = stored(
        build_segmentation_report(sources, result, seg, measured, manifest, now=NOW),
        tmp_path / "sr.dcm",
    )
    assert evidence(sr) == {str(ds.SOPInstanceUID) for ds in sources} | (
        {str(seg.SOPInstanceUID)} if seg is not None else set()
    )

    report = read_segmentation_report(sr, manifest)
    assert list(report) == found
    for number, name in enumerate(found, start=1):
        assert seg is not None
        got = report[name]
        assert (got.seg_sop_instance_uid, got.segment_number) == (str(seg.SOPInstanceUID), number)
        assert got.volume_ml == pytest.approx(measured[name].volume_ml, rel=1e-12)
        assert got.tracking_uid == seg.SegmentSequence[number - 1].TrackingUID
        if name in ("kidney_tumour", "kidney_cyst"):
            assert got.longest_diameter_mm == pytest.approx(measured[name].longest_diameter_mm)
        else:
            assert got.longest_diameter_mm is None
    assert read_absent_segments(sr, manifest) == absent
    assert summarize(sr, manifest) == {**dict.fromkeys(absent, False), **dict.fromkeys(found, True)}

    content = hd.sr.EnhancedSR.from_dataset(sr).content
    assert isinstance(content, hd.sr.MeasurementReport)
    groups = content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(found)
    for number, (name, group) in enumerate(zip(found, groups, strict=True), start=1):
        reference = group.referenced_segment
        assert reference is not None
        assert str(reference.referenced_sop_class_uid) == SEG_STORAGE
        assert reference.referenced_segment_numbers == [number]
        assert sr_frames(reference) == mask_frames(result, name), name
    assert len(content.get_image_measurement_groups()) == (1 if absent else 0)


def test_a_measured_segment_with_an_empty_mask_is_refused(tmp_path: Path) -> None:
    sources, result, manifest = kidney_inputs(tmp_path, KIDNEY_CASES["one-segment"])
    seg = build_segmentation(sources, result, manifest, now=NOW)
    measured = measure(result)
    emptied = dict(result.masks, left_kidney=np.zeros_like(result.masks["left_kidney"]))
    with pytest.raises(ValueError, match="'left_kidney' was measured, but its mask is empty"):
        build_segmentation_report(
            sources, dataclasses.replace(result, masks=emptied), seg, measured, manifest
        )


# -- CT PE: series report and key images ----------------------------------------------------


def one_frame_enhanced_result(probability: float) -> tuple[list[Dataset], SeriesResult]:
    volume = enhanced_ct(1)
    score = SliceScore(str(volume.SOPInstanceUID), str(volume.SOPClassUID), 1, probability)
    return [volume], SeriesResult(
        str(volume.SeriesInstanceUID), "pe_present_on_image", (score,), POSITIVE_EXAM
    )


def pe_inputs(name: str) -> tuple[list[Dataset], SeriesResult, Manifest]:
    if name == "one-frame-enhanced-ct":
        return (*one_frame_enhanced_result(0.9), PE)
    one = [ct_slice(0)]
    series = ct_series()
    peak = [0.1] * 14 + [0.8] + [0.1] * 15
    cases: dict[str, tuple[list[Dataset], list[float], dict[str, float], Manifest]] = {
        "one-slice-positive": (one, [0.9], POSITIVE_EXAM, PE),
        "one-slice-at-threshold": (one, [0.5], POSITIVE_EXAM, PE),
        "one-slice-negative": (one, [0.1], NEGATIVE_EXAM, PE),
        "no-positive-slice": (series, [0.1] * 30, NEGATIVE_EXAM, PE),
        "all-zero": (series, [0.0] * 30, dict.fromkeys(POSITIVE_EXAM, 0.0), PE),
        "one-positive-slice": (series, peak, POSITIVE_EXAM, PE),
        "single-exam-label-reported": (
            series,
            peak,
            POSITIVE_EXAM,
            only_reported(PE, "pe_present_on_image", "central_pe"),
        ),
        "only-the-image-label-reported": (
            one,
            [0.9],
            POSITIVE_EXAM,
            only_reported(PE, "pe_present_on_image"),
        ),
        "image-label-not-reported": (
            series,
            peak,
            POSITIVE_EXAM,
            only_reported(PE, *(label.name for label in PE.labels if label.level == "exam")),
        ),
    }
    sources, slices, exam, manifest = cases[name]
    return sources, series_result(sources, slices, exam), manifest


PE_CASES = [
    "one-slice-positive",
    "one-slice-at-threshold",
    "one-slice-negative",
    "no-positive-slice",
    "all-zero",
    "one-positive-slice",
    "one-frame-enhanced-ct",
    "single-exam-label-reported",
    "only-the-image-label-reported",
    "image-label-not-reported",
]


@pytest.mark.parametrize("name", PE_CASES)
def test_pe_series_report_and_key_images(tmp_path: Path, name: str) -> None:
    sources, result, manifest = pe_inputs(name)
    image_label = next(label for label in manifest.labels if label.level == "image")
    exam_labels = [label for label in manifest.reported_labels if label.level == "exam"]
    sr = stored(build_series_report(sources, result, manifest, now=NOW), tmp_path / "sr.dcm")
    report = read_series_report(sr, manifest)
    assert report.exam_probabilities == {
        label.name: result.exam[label.name] for label in exam_labels
    }
    assert report.exam_findings == {
        label.name: result.exam[label.name] >= label.threshold for label in exam_labels
    }
    positive = [s for s in result.slices if s.probability >= image_label.threshold]
    verdicts = summarize(sr, manifest)
    assert {k: v for k, v in verdicts.items() if k != image_label.name} == report.exam_findings

    if not image_label.reported:
        assert report.positive_slices is None and report.max_probability is None
        assert image_label.name not in verdicts
    else:
        assert report.positive_slices == len(positive)
        assert verdicts[image_label.name] == bool(positive)
        top = max(result.slices, key=lambda s: s.probability)
        assert report.max_probability == ReportedSlice(
            top.sop_instance_uid, top.frame, top.probability
        )
        if positive:
            first, last = positive[0], positive[-1]
            assert report.superior_z is not None and report.inferior_z is not None
            assert (report.superior_z.sop_instance_uid, report.superior_z.frame) == (
                first.sop_instance_uid,
                first.frame,
            )
            assert (report.inferior_z.sop_instance_uid, report.inferior_z.frame) == (
                last.sop_instance_uid,
                last.frame,
            )
            if len(positive) == 1:
                assert report.superior_z == report.inferior_z
        else:
            assert report.superior_z is None and report.inferior_z is None
            assert report.superior_instance is None and report.inferior_instance is None
    content = hd.sr.EnhancedSR.from_dataset(sr).content
    assert isinstance(content, hd.sr.MeasurementReport)
    assert len(content.get_image_measurement_groups()) == (2 if image_label.reported else 1)

    kos = build_key_images(sources, result, manifest, now=NOW)
    if not (image_label.reported and positive):
        assert kos is None
        return
    assert kos is not None
    back = hd.ko.KeyObjectSelectionDocument.from_dataset(stored(kos, tmp_path / "ko.dcm"))
    references = [str(r.referenced_sop_instance_uid) for r in back.content.get_references()]
    top5 = sorted(positive, key=lambda s: -s.probability)[:5]
    assert references == list(dict.fromkeys(s.sop_instance_uid for s in result.slices if s in top5))
    if len(positive) == 1:
        assert "the slice with the highest probability" in key_object_description(back)


def test_one_slice_range_is_that_slice(tmp_path: Path) -> None:
    """One slice, positive: the most superior and most inferior positive slice are it."""
    sources, result, manifest = pe_inputs("one-slice-positive")
    sr = stored(build_series_report(sources, result, manifest, now=NOW), tmp_path / "sr.dcm")
    report = read_series_report(sr, manifest)
    uid = str(sources[0].SOPInstanceUID)
    assert report.superior_z == report.inferior_z == ReportedSlice(uid, None, TOP_Z)
    assert report.superior_instance == report.inferior_instance == ReportedSlice(uid, None, 1)
    assert report.max_probability == ReportedSlice(uid, None, 0.9)


# -- chest X-ray: measurement report and heatmaps -------------------------------------------

NOTHING = {"no_finding": 0.9, "effusion": 0.1, "cardiomegaly": 0.1, "pneumothorax": 0.1}
EFFUSION = {"no_finding": 0.1, "effusion": 0.9, "cardiomegaly": 0.1, "pneumothorax": 0.1}
BOTH = {"no_finding": 0.1, "effusion": 0.9, "cardiomegaly": 0.1, "pneumothorax": 0.9}
HOT = np.zeros((7, 7), dtype=np.float32)
HOT[3, 3] = 1.0
CXR_CASES: dict[str, tuple[dict[str, float], dict[str, np.ndarray], tuple[str, ...] | None]] = {
    "nothing-present": (NOTHING, {}, None),
    "nothing-present-a-stray-map": (NOTHING, {"effusion": HOT}, None),
    "one-finding": (EFFUSION, {"effusion": HOT}, None),
    "one-finding-without-a-map": (EFFUSION, {}, None),
    "one-finding-a-flat-zero-map": (EFFUSION, {"effusion": np.zeros((7, 7), np.float32)}, None),
    "one-finding-a-one-cell-map": (EFFUSION, {"effusion": np.ones((1, 1), np.float32)}, None),
    "single-label-reported-present": (
        BOTH,
        {"effusion": HOT, "pneumothorax": HOT},
        ("pneumothorax",),
    ),
    "single-label-reported-absent": (EFFUSION, {"effusion": HOT}, ("pneumothorax",)),
}


@pytest.mark.parametrize("encoding", ["jpeg", "uncompressed"])
@pytest.mark.parametrize("name", CXR_CASES)
def test_one_radiograph_report_and_heatmaps(tmp_path: Path, name: str, encoding: str) -> None:
    probabilities, maps, reported = CXR_CASES[name]
    manifest = make_manifest()
    if reported is not None:
        manifest = only_reported(manifest, *reported)
    source = dx_image(1)  # no Body Part Examined, as many radiographs arrive
    uid = str(source.SOPInstanceUID)
    result = ImageResult(uid, str(source.SOPClassUID), dict(probabilities), dict(maps))
    present = [
        label.name
        for label in manifest.reported_labels
        if probabilities[label.name] >= label.threshold
    ]
    images = build_heatmap_images(
        source,
        result,
        manifest,
        now=NOW,
        encoding=encoding,  # type: ignore[arg-type]
    )
    assert list(images) == [label for label in present if label in maps]
    heatmaps: dict[tuple[str, str], Dataset] = {}
    for label, sc in images.items():
        back = stored(sc, tmp_path / f"sc-{label}.dcm")
        assert back.Laterality == ""  # present: dciodvfy takes an unnamed body part for paired
        assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == uid
        assert (back.Rows, back.Columns) == (source.Rows, source.Columns)
        heatmaps[(uid, label)] = sc

    sr = stored(
        build_measurement_report([source], [result], manifest, now=NOW, heatmaps=heatmaps),
        tmp_path / "sr.dcm",
    )
    names = [label.name for label in manifest.reported_labels]
    assert read_measurement_report(sr, manifest) == {uid: {n: probabilities[n] for n in names}}
    assert read_findings(sr, manifest) == {uid: {n: n in present for n in names}}
    assert read_heatmap_references(sr, manifest) == {
        uid: {label: str(sc.SOPInstanceUID) for (_, label), sc in heatmaps.items()}
    }
    assert summarize(sr, manifest) == {n: n in present for n in names}
    assert evidence(sr) == {uid} | {str(sc.SOPInstanceUID) for sc in heatmaps.values()}
    [group] = hd.sr.EnhancedSR.from_dataset(sr).content.get_image_measurement_groups()
    assert [str(image.referenced_sop_instance_uid) for image in group.source_images] == [uid]


@pytest.mark.parametrize(
    ("body_part", "laterality", "image_laterality", "expected"),
    [
        ("CHEST", None, "U", None),
        (None, None, "U", ""),
        (None, "L", None, "L"),
        ("HAND", None, "R", "R"),
    ],
    ids=["chest", "unnamed", "series-laterality", "image-laterality"],
)
def test_heatmap_laterality_follows_the_source(
    tmp_path: Path,
    body_part: str | None,
    laterality: str | None,
    image_laterality: str | None,
    expected: str | None,
) -> None:
    source = dx_image(1)
    for keyword, value in (
        ("BodyPartExamined", body_part),
        ("Laterality", laterality),
        ("ImageLaterality", image_laterality),
    ):
        if value is not None:
            setattr(source, keyword, value)
    result = ImageResult(
        str(source.SOPInstanceUID), str(source.SOPClassUID), dict(EFFUSION), {"effusion": HOT}
    )
    [sc] = build_heatmap_images(source, result, make_manifest(), now=NOW).values()
    back = stored(sc, tmp_path / "sc.dcm")
    assert back.get("Laterality") == expected
