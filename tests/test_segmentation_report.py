"""Segment measurements on shapes with known answers, and the SR that reports them.

The SR is built from a real SEG of a CT phantom, validated by dciodvfy, and read back from
the stored file with highdicom, as a PACS would hand it out.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from ctgen import canonical_affine, rotation_about, write_ct_series
from peers import dciodvfy
from pydicom import dcmread
from pydicom.dataset import Dataset
from scipy import ndimage
from scipy.spatial.distance import pdist

from pacsnode.manifest import load_manifest
from pacsnode.measurements import SegmentMeasurement, longest_diameter_mm, measure, volume_ml
from pacsnode.models.base import SegmentationResult
from pacsnode.volumes import load_volume, plan_volume, read_slice_refs
from pacsnode.writers.seg import build_segmentation
from pacsnode.writers.sr import (
    build_segmentation_report,
    read_absent_segments,
    read_segmentation_report,
    result_uids,
)

SERIES = "1.2.826.0.1.3680043.8.498.4343"
SHAPE = (30, 64, 64)
SPACING = (2.0, 0.8, 0.7)
MANIFEST = load_manifest(Path(__file__).resolve().parents[1] / "models" / "ct-kidney")
NAMES = [label.name for label in MANIFEST.segment_labels]
OBLIQUE = canonical_affine(SPACING, (10.0, -20.0, 30.0), rotation_about((1.0, 2.0, 0.5), 7.0))


def _centres_mm(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """Distance-ready voxel centre grids (k, j, i) in mm."""
    return np.stack(
        np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)), indexing="ij")
    )


def _ball(radius: float, centre: tuple[float, float, float]) -> np.ndarray:
    grid = _centres_mm(SHAPE, SPACING)
    return np.sum((grid - np.array(centre)[:, None, None, None]) ** 2, axis=0) <= radius**2


def _brute_force(mask: np.ndarray, affine: np.ndarray) -> float:
    """Longest diameter over every voxel pair of every 26-connected component."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    best = 0.0
    for number in range(1, count + 1):
        kji = np.argwhere(labels == number)
        points = kji[:, ::-1] @ affine[:3, :3].T
        best = max(best, float(pdist(points).max()) if len(points) > 1 else 0.0)
    return best


# -- measurements ------------------------------------------------------------------------


def test_sphere_volume_and_diameter() -> None:
    radius = 14.0
    ball = _ball(radius, (30.0, 25.0, 22.0))
    affine = canonical_affine(SPACING, (0.0, 0.0, 0.0))
    assert volume_ml(ball, SPACING) == pytest.approx(4 / 3 * math.pi * radius**3 / 1000, rel=0.02)
    diameter = longest_diameter_mm(ball, affine)
    # voxel centres inside the sphere: at most 2r, and at most a slice short of it
    assert 2 * radius - SPACING[0] <= diameter <= 2 * radius
    assert diameter == pytest.approx(_brute_force(ball, affine), abs=1e-9)


def test_box_is_exact_and_the_affine_rotation_does_not_matter() -> None:
    box = np.zeros(SHAPE, dtype=bool)
    box[3:13, 10:50, 5:25] = True  # 10 x 40 x 20 voxels
    expected = math.dist((0, 0, 0), (9 * SPACING[0], 39 * SPACING[1], 19 * SPACING[2]))
    assert volume_ml(box, SPACING) == pytest.approx(10 * 40 * 20 * math.prod(SPACING) / 1000)
    assert longest_diameter_mm(box, canonical_affine(SPACING, (5.0, 6.0, 7.0))) == pytest.approx(
        expected, abs=1e-9
    )
    assert longest_diameter_mm(box, OBLIQUE) == pytest.approx(expected, abs=1e-9)


def test_flat_lesion_single_voxel_and_empty_mask() -> None:
    flat = np.zeros(SHAPE, dtype=bool)
    flat[7, 10:50, 12:52] = True  # one slice, 1600 voxels: coplanar points for the hull
    affine = canonical_affine(SPACING, (0.0, 0.0, 0.0))
    assert longest_diameter_mm(flat, affine) == pytest.approx(
        math.hypot(39 * SPACING[1], 39 * SPACING[2]), abs=1e-9
    )
    single = np.zeros(SHAPE, dtype=bool)
    single[1, 2, 3] = True
    assert longest_diameter_mm(single, affine) == 0.0
    with pytest.raises(ValueError, match="mask"):
        longest_diameter_mm(np.zeros(SHAPE, dtype=bool), affine)


def test_diameter_is_the_largest_lesion_not_the_gap_between_lesions() -> None:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[2:6, 5:15, 5:15] = True  # lesion A
    mask[20:28, 40:60, 40:62] = True  # lesion B, the larger, far from A
    rng = np.random.default_rng(3)
    blob = ndimage.gaussian_filter(rng.random(SHAPE), 2.0) > 0.53  # irregular, many components
    mask |= blob
    assert longest_diameter_mm(mask, OBLIQUE) == pytest.approx(_brute_force(mask, OBLIQUE))
    two = np.zeros(SHAPE, dtype=bool)
    two[2:6, 5:15, 5:15] = True
    two[20:28, 40:60, 40:62] = True
    found = longest_diameter_mm(two, OBLIQUE)
    assert found == pytest.approx(math.dist((0, 0, 0), (7 * 2.0, 19 * 0.8, 21 * 0.7)), abs=1e-9)


def test_measure_reports_each_non_empty_segment(tmp_path: Path) -> None:
    _, result = _series(tmp_path)
    got = measure(result)
    assert list(got) == NAMES  # masks' order; all present
    for name, value in got.items():
        mask = result.masks[name]
        assert value.voxels == int(mask.sum())
        assert value.volume_ml == pytest.approx(mask.sum() * math.prod(SPACING) / 1000)
        assert value.longest_diameter_mm == pytest.approx(
            _brute_force(mask, result.volume.affine), abs=1e-9
        )
    assert got["kidney_cyst"].components == 2
    assert got["left_kidney"].components == 1
    empty = dict(result.masks, kidney_tumour=np.zeros(SHAPE, dtype=bool))
    assert "kidney_tumour" not in measure(dataclasses.replace(result, masks=empty))
    with pytest.raises(ValueError, match="left_kidney"):
        measure(dataclasses.replace(result, masks={"left_kidney": np.zeros(SHAPE, dtype=np.uint8)}))


# -- the SR ------------------------------------------------------------------------------


def _masks() -> dict[str, np.ndarray]:
    left = _ball(13.0, (24.0, 25.0, 33.0))  # high i: the patient's left
    right = _ball(12.0, (30.0, 26.0, 11.0))
    tumour = _ball(5.0, (20.0, 22.0, 36.0)) & left
    cyst = (_ball(2.5, (34.0, 24.0, 8.0)) | _ball(2.0, (24.0, 30.0, 14.0))) & right
    return {
        "left_kidney": left,
        "right_kidney": right,
        "kidney_tumour": tumour,
        "kidney_cyst": cyst,
    }


def _series(tmp_path: Path, **options: object) -> tuple[list[Dataset], SegmentationResult]:
    paths = write_ct_series(
        tmp_path / "ct",
        np.zeros(SHAPE),
        SPACING,
        series_uid=SERIES,
        **options,  # type: ignore[arg-type]
    )
    volume = load_volume(plan_volume(read_slice_refs(paths), SERIES))
    headers: list[Dataset] = [dcmread(p, stop_before_pixels=True) for p in paths]
    return headers, SegmentationResult(SERIES, volume, _masks())


def _stored(ds: Dataset, path: Path) -> Dataset:
    ds.save_as(path)
    errors, _ = dciodvfy(path)
    assert errors == [], errors
    return dcmread(path)


def _evidence(sr: Dataset) -> set[str]:
    return {
        str(instance.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }


@pytest.mark.parametrize("enhanced", [False, True], ids=["single", "enhanced"])
def test_report_reads_back_what_was_measured(tmp_path: Path, enhanced: bool) -> None:
    sources, result = _series(tmp_path, enhanced=enhanced)
    seg = build_segmentation(sources, result, MANIFEST)
    assert seg is not None
    stored_seg = hd.seg.segread(_stored(seg, tmp_path / "seg.dcm").filename)
    measured = measure(result)
    sr = _stored(
        build_segmentation_report(sources, result, seg, measured, MANIFEST), tmp_path / "sr.dcm"
    )

    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == result_uids(SERIES, MANIFEST, "sr")
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert str(seg.SOPInstanceUID) in _evidence(sr)
    assert {str(ds.SOPInstanceUID) for ds in sources} <= _evidence(sr)

    report = read_segmentation_report(sr, MANIFEST)
    assert list(report) == NAMES
    assert read_absent_segments(sr, MANIFEST) == []
    for name, got in report.items():
        label = next(label for label in MANIFEST.segment_labels if label.name == name)
        assert got.volume_ml == pytest.approx(measured[name].volume_ml, rel=1e-12)
        if label.anatomic_region is not None:  # the lesions
            assert got.longest_diameter_mm == pytest.approx(
                measured[name].longest_diameter_mm, rel=1e-12
            )
        else:
            assert got.longest_diameter_mm is None
        assert got.seg_sop_instance_uid == str(seg.SOPInstanceUID)
        description = stored_seg.get_segment_description(got.segment_number)
        assert label.code is not None
        assert description.segmented_property_type.value == label.code.value
        assert description.tracking_uid == got.tracking_uid
    # without a manifest the keys are the findings' meanings
    assert set(read_segmentation_report(sr)) == {"Left kidney", "Right kidney", "Neoplasm", "Cyst"}


def test_missing_segments_are_reported_absent(tmp_path: Path) -> None:
    sources, result = _series(tmp_path)
    masks = dict(result.masks, kidney_tumour=np.zeros(SHAPE, dtype=bool))
    result = dataclasses.replace(result, masks=masks)
    seg = build_segmentation(sources, result, MANIFEST)
    assert seg is not None
    _stored(seg, tmp_path / "seg.dcm")
    sr = _stored(
        build_segmentation_report(sources, result, seg, measure(result), MANIFEST),
        tmp_path / "sr.dcm",
    )
    report = read_segmentation_report(sr, MANIFEST)
    assert list(report) == ["left_kidney", "right_kidney", "kidney_cyst"]
    assert report["kidney_cyst"].segment_number == 3
    assert read_absent_segments(sr, MANIFEST) == ["kidney_tumour"]


@pytest.mark.parametrize("enhanced", [False, True], ids=["single", "enhanced"])
def test_one_segment_found_gives_a_seg_and_a_report(tmp_path: Path, enhanced: bool) -> None:
    """Issue 15: a SEG of one segment keeps its Segment Identification in the shared
    functional groups; the report must still reference it, with the images it is on."""
    sources, result = _series(tmp_path, enhanced=enhanced)
    only = {
        n: m if n == "right_kidney" else np.zeros(SHAPE, dtype=bool)
        for n, m in result.masks.items()
    }
    result = dataclasses.replace(result, masks=only)
    seg = build_segmentation(sources, result, MANIFEST)
    assert seg is not None
    _stored(seg, tmp_path / "seg.dcm")
    sr = _stored(
        build_segmentation_report(sources, result, seg, measure(result), MANIFEST),
        tmp_path / "sr.dcm",
    )
    report = read_segmentation_report(sr, MANIFEST)
    assert list(report) == ["right_kidney"]
    assert report["right_kidney"].segment_number == 1
    assert report["right_kidney"].seg_sop_instance_uid == str(seg.SOPInstanceUID)
    assert report["right_kidney"].volume_ml == pytest.approx(
        result.masks["right_kidney"].sum() * math.prod(SPACING) / 1000
    )
    assert read_absent_segments(sr, MANIFEST) == ["left_kidney", "kidney_tumour", "kidney_cyst"]
    [group] = hd.sr.EnhancedSR.from_dataset(sr).content.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment is not None
    images = group.referenced_segment.source_images_for_segmentation
    frames, refs = result.volume.to_source(result.masks["right_kidney"])
    on = [ref for ref, hit in zip(refs, frames.any(axis=(1, 2)), strict=True) if hit]
    if enhanced:  # one image, the frames the kidney is on
        [image] = images
        assert image.referenced_frame_numbers == sorted(int(ref.frame or 0) for ref in on)
    else:
        assert {str(i.referenced_sop_instance_uid) for i in images} == {
            ref.sop_instance_uid for ref in on
        }


def test_nothing_found_still_gives_a_valid_report(tmp_path: Path) -> None:
    sources, result = _series(tmp_path)
    result = dataclasses.replace(result, masks={n: np.zeros(SHAPE, dtype=bool) for n in NAMES})
    assert build_segmentation(sources, result, MANIFEST) is None
    measured = measure(result)
    assert measured == {}
    sr = _stored(
        build_segmentation_report(sources, result, None, measured, MANIFEST), tmp_path / "sr.dcm"
    )
    assert read_segmentation_report(sr, MANIFEST) == {}
    assert read_absent_segments(sr, MANIFEST) == NAMES
    assert _evidence(sr) == {str(ds.SOPInstanceUID) for ds in sources}


def test_seg_and_measurements_must_agree(tmp_path: Path) -> None:
    sources, result = _series(tmp_path)
    seg = build_segmentation(sources, result, MANIFEST)
    measured = measure(result)
    with pytest.raises(ValueError, match="no SEG"):
        build_segmentation_report(sources, result, None, measured, MANIFEST)
    fewer = {k: v for k, v in measured.items() if k != "kidney_cyst"}
    with pytest.raises(ValueError, match="kidney_cyst"):
        build_segmentation_report(sources, result, seg, fewer, MANIFEST)
    extra = dict(measured, kidney_cyst=SegmentMeasurement(1, 0.001, 0.0, 1))
    other = dataclasses.replace(result, series_uid="1.2.3.4")
    with pytest.raises(ValueError, match="1.2.3.4"):
        build_segmentation_report(sources, other, seg, extra, MANIFEST)
