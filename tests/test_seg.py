"""The SEG writer: masks land on their source pixels in every acquisition, checked by dciodvfy.

The check does not trust :meth:`Volume.to_source` (the writer uses it): every SEG frame is
put back into the canonical grid with the DICOM formula (PS3.3 C.7.6.2.1.1) from its own
Image Position / Orientation and the ground-truth affine of the phantom.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from ctgen import canonical_affine, default_origin, write_ct_series
from peers import dciodvfy
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pacsnode.manifest import Manifest, load_manifest
from pacsnode.models.base import SegmentationResult
from pacsnode.volumes import load_volume, plan_volume, read_slice_refs
from pacsnode.writers.seg import build_segmentation, content_label, segment_numbers
from pacsnode.writers.sr import DEMO_DISCLAIMER, result_uids

SERIES = "1.2.826.0.1.3680043.8.498.4242"
SHAPE = (24, 40, 48)  # (k, j, i): all different, so a transposition cannot pass
SPACING = (2.5, 0.8, 0.7)
TRUTH = canonical_affine(SPACING, default_origin(SHAPE, SPACING))
MANIFEST = load_manifest(Path(__file__).resolve().parents[1] / "models" / "ct-kidney")
NAMES = [label.name for label in MANIFEST.segment_labels]


def _masks(*, tumour: bool = True) -> dict[str, np.ndarray]:
    """Asymmetric blobs: the left kidney at the patient's left (high i), a tumour in it."""
    k, j, i = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    left = ((k - 9) / 6.0) ** 2 + ((j - 16) / 7.0) ** 2 + ((i - 36) / 5.0) ** 2 <= 1
    left[3:6, 20:24, 38:44] = True  # a superior-posterior-left lobe: breaks every symmetry
    right = ((k - 12) / 7.0) ** 2 + ((j - 22) / 8.0) ** 2 + ((i - 10) / 4.0) ** 2 <= 1
    cyst = np.zeros(SHAPE, dtype=bool)
    cyst[16:18, 20:23, 9:11] = True
    cyst &= right
    masks = {
        "left_kidney": left,
        "right_kidney": right,
        "kidney_tumour": np.zeros(SHAPE, dtype=bool),
        "kidney_cyst": cyst,
    }
    if tumour:
        masks["kidney_tumour"][7:10, 14:17, 36:40] = True
        masks["kidney_tumour"][7, 13, 36] = True
    return masks


def _series(tmp_path: Path, **options: object) -> tuple[list[Dataset], SegmentationResult]:
    rng = np.random.default_rng(5)
    hu = rng.integers(-100, 100, size=SHAPE).astype(np.float64)
    paths = write_ct_series(
        tmp_path / "ct",
        hu,
        SPACING,
        series_uid=SERIES,
        **options,  # type: ignore[arg-type]
    )
    volume = load_volume(plan_volume(read_slice_refs(paths), SERIES))
    headers: list[Dataset] = [dcmread(p, stop_before_pixels=True) for p in paths]
    return headers, SegmentationResult(SERIES, volume, _masks())


def _saved(seg: hd.seg.Segmentation | None, path: Path) -> hd.seg.Segmentation:
    assert seg is not None
    seg.save_as(path)
    errors, _ = dciodvfy(path)
    assert errors == [], errors
    return hd.seg.segread(path)


def _frame_positions(ds: Dataset) -> dict[tuple[str, int | None], np.ndarray]:
    """``{(SOPInstanceUID, frame): ImagePositionPatient}`` of every source frame."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return {(str(ds.SOPInstanceUID), None): np.array(ds.ImagePositionPatient, dtype=float)}
    return {
        (str(ds.SOPInstanceUID), number): np.array(
            item.PlanePositionSequence[0].ImagePositionPatient, dtype=float
        )
        for number, item in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1)
    }


def _canonical(seg: hd.seg.Segmentation, sources: list[Dataset]) -> dict[int, np.ndarray]:
    """Each segment back on the canonical grid, by the DICOM formula; checks the references."""
    positions: dict[tuple[str, int | None], np.ndarray] = {}
    for ds in sources:
        positions.update(_frame_positions(ds))
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    rows, columns = np.nonzero(np.ones((seg.Rows, seg.Columns)))
    inverse = np.linalg.inv(TRUTH)
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    out = {number: np.zeros(SHAPE, dtype=bool) for number in seg.segment_numbers}
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        # per frame, or shared when the SEG holds a single segment
        identification = item.get("SegmentIdentificationSequence")
        if identification is None:
            identification = shared.SegmentIdentificationSequence
        position = np.array(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        key = (str(source.ReferencedSOPInstanceUID), source.get("ReferencedFrameNumber"))
        key = (key[0], None if key[1] is None else int(key[1]))
        np.testing.assert_allclose(position, positions[key], atol=1e-9)  # the right source
        assert source.SpatialLocationsPreserved == "YES"
        on = frame.ravel() > 0
        lps = (
            position
            + np.outer(columns[on] * column_spacing, iop[:3])
            + np.outer(rows[on] * row_spacing, iop[3:])
        )
        ijk = (inverse @ np.c_[lps, np.ones(len(lps))].T)[:3].T
        index = np.round(ijk).astype(int)
        np.testing.assert_allclose(ijk, index, atol=1e-6)  # on the voxel grid, not between
        number = int(identification[0].ReferencedSegmentNumber)
        out[number][index[:, 2], index[:, 1], index[:, 0]] = True
    return out


@pytest.mark.parametrize(
    "options",
    [
        {"patient_position": "HFS"},
        {"patient_position": "FFS"},
        {"patient_position": "HFP", "shuffle": True},
        {"patient_position": "FFP", "reverse": True},
        {"patient_position": "HFS", "enhanced": True, "localizer": True},
        {"patient_position": "FFP", "enhanced": True, "shuffle": True},
    ],
    ids=["HFS", "FFS", "HFP-shuffled", "FFP-reversed", "enhanced-HFS", "enhanced-FFP"],
)
def test_segments_land_on_their_source_pixels(tmp_path: Path, options: dict[str, object]) -> None:
    sources, result = _series(tmp_path, **options)
    seg = _saved(build_segmentation(sources, result, MANIFEST), tmp_path / "seg.dcm")

    assert seg.segment_numbers == [1, 2, 3, 4]
    assert seg.SegmentsOverlap == "YES"  # a kidney includes its tumour and cysts
    back = _canonical(seg, sources)
    for number, name in enumerate(NAMES, start=1):
        assert np.array_equal(back[number], result.masks[name]), name
    # empty frames are left out: every frame holds its segment
    assert all(frame.any() for frame in seg.pixel_array.reshape(-1, seg.Rows, seg.Columns))
    enhanced = bool(options.get("enhanced"))
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert {str(r.ReferencedSOPInstanceUID) for r in referenced} == {
        ref.sop_instance_uid for ref in result.volume.slices
    }  # the localizer is not a source
    assert len(referenced) == (1 if enhanced else SHAPE[0])


@pytest.mark.parametrize(
    "options",
    [{"patient_position": "HFS"}, {"patient_position": "FFP", "enhanced": True, "shuffle": True}],
    ids=["HFS", "enhanced-FFP"],
)
def test_a_single_segment_lands_on_its_source_pixels(
    tmp_path: Path, options: dict[str, object]
) -> None:
    """One segment found (issue 15): segment 1, on its own source frames and no others."""
    sources, result = _series(tmp_path, **options)
    only = {
        name: mask if name == "left_kidney" else np.zeros(SHAPE, dtype=bool)
        for name, mask in result.masks.items()
    }
    result = dataclasses.replace(result, masks=only)
    seg = _saved(build_segmentation(sources, result, MANIFEST), tmp_path / "seg.dcm")
    assert seg.segment_numbers == [1]
    assert seg.get_segment_description(1).tracking_id == "left_kidney"
    assert np.array_equal(_canonical(seg, sources)[1], result.masks["left_kidney"])
    frames, _ = result.volume.to_source(result.masks["left_kidney"])
    assert seg.NumberOfFrames == int(frames.any(axis=(1, 2)).sum())


def test_segment_descriptions_follow_the_manifest(tmp_path: Path) -> None:
    sources, result = _series(tmp_path)
    seg = _saved(build_segmentation(sources, result, MANIFEST), tmp_path / "seg.dcm")
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    for number, label in enumerate(MANIFEST.segment_labels, start=1):
        assert label.code is not None and label.category is not None
        description = seg.get_segment_description(number)
        assert description.segmented_property_type.value == label.code.value
        assert description.segmented_property_category.value == label.category.value
        assert description.segment_label == label.code.meaning
        assert description.tracking_id == label.name
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        assert description.algorithm_identification is not None
        algorithm = description.algorithm_identification[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (
            "ct-kidney",
            "0.1.0-phantom",
        )
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == (
            codes.cid7162.ArtificialIntelligence.value
        )
        assert description.SegmentAlgorithmName == "ct-kidney"
        regions = [region.value for region in description.anatomic_regions]
        expected = [label.anatomic_region.value] if label.anatomic_region else []
        assert regions == expected
    assert DEMO_DISCLAIMER in seg.SeriesDescription and seg.SeriesDescription.startswith("AI")
    assert len(seg.SeriesDescription) <= 64 and len(seg.ContentDescription) <= 64
    assert seg.ContentLabel == content_label(MANIFEST) == "CT_KIDNEY"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.PatientID == sources[0].PatientID


def test_numbers_close_up_over_an_empty_segment(tmp_path: Path) -> None:
    """No tumour: the cyst becomes segment 3 (a binary SEG's numbers have no gaps)."""
    sources, result = _series(tmp_path)
    result = dataclasses.replace(result, masks=_masks(tumour=False))
    assert segment_numbers(result, MANIFEST) == {
        "left_kidney": 1,
        "right_kidney": 2,
        "kidney_cyst": 3,
    }
    seg = _saved(build_segmentation(sources, result, MANIFEST), tmp_path / "seg.dcm")
    assert seg.segment_numbers == [1, 2, 3]
    assert seg.get_segment_description(3).tracking_id == "kidney_cyst"
    assert np.array_equal(_canonical(seg, sources)[3], result.masks["kidney_cyst"])


def test_uids_are_deterministic_and_nothing_found_gives_no_seg(tmp_path: Path) -> None:
    sources, result = _series(tmp_path)
    first = build_segmentation(sources, result, MANIFEST)
    again = build_segmentation(sources, result, MANIFEST)
    assert first is not None and again is not None
    series_uid, instance_uid = result_uids(SERIES, MANIFEST, "seg")
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (series_uid, instance_uid)
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (series_uid, instance_uid)
    assert first.SegmentSequence[0].TrackingUID == again.SegmentSequence[0].TrackingUID
    newer = build_segmentation(sources, result, _version(MANIFEST, "0.2.0"))
    assert newer is not None and newer.SOPInstanceUID != instance_uid
    assert (series_uid, instance_uid) != result_uids(SERIES, MANIFEST, "sr")

    empty = {name: np.zeros(SHAPE, dtype=bool) for name in NAMES}
    assert build_segmentation(sources, dataclasses.replace(result, masks=empty), MANIFEST) is None


def _version(manifest: Manifest, version: str) -> Manifest:
    return manifest.model_copy(update={"version": version})


def test_bad_inputs_are_refused_naming_the_culprit(tmp_path: Path) -> None:
    sources, result = _series(tmp_path)
    masks = _masks()
    masks["kidney_cyst"] = masks["kidney_cyst"][:-1]
    with pytest.raises(ValueError, match="kidney_cyst"):
        build_segmentation(sources, dataclasses.replace(result, masks=masks), MANIFEST)
    masks = _masks()
    del masks["right_kidney"]
    with pytest.raises(ValueError, match="right_kidney"):
        build_segmentation(sources, dataclasses.replace(result, masks=masks), MANIFEST)
    with pytest.raises(ValueError, match="1.2.3.4"):
        build_segmentation(sources, dataclasses.replace(result, series_uid="1.2.3.4"), MANIFEST)
    with pytest.raises(ValueError, match=result.volume.slices[0].sop_instance_uid):
        build_segmentation(
            [ds for ds in sources if ds.SOPInstanceUID != result.volume.slices[0].sop_instance_uid],
            result,
            MANIFEST,
        )
