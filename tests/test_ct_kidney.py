"""CT kidney segmentation through the whole node: storescu -> pacsnode -> SEG + SR -> Orthanc.

What is judged is geometry: the SEG as stored in Orthanc, mapped frame by frame onto the
source slices by ImagePositionPatient, must give the same Dice against the phantom's ground
truth as the in-memory prediction (no slice shift, no flip), head first and feet first; left
and right must be the patient's for feet-first and prone acquisitions; the SR's volumes must
match the ground truth where the segmentation is good. A patient with one kidney (a SEG of a
single segment, issue 15) gets a SEG and an SR that reports the missing kidney Absent.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch
from nodeproc import MODELS_DIR, NodeProcess
from peers import LOOPBACK, Orthanc, combined_output, dciodvfy, parse_store_statuses, storescu
from pydicom import dcmread
from sqlalchemy import select

from pacsnode.findings import summarize
from pacsnode.manifest import load_manifest
from pacsnode.measurements import volume_ml
from pacsnode.models.kidney import SEGMENT_LABELS, KidneySegmenter
from pacsnode.phantoms.abdomen import AbdomenSeries, make_abdomen_case, write_abdomen_series
from pacsnode.tables import Finding
from pacsnode.volumes import Volume, load_volume, plan_volume, read_slice_refs
from pacsnode.writers.sr import read_absent_segments, read_segmentation_report

KIDNEY_DIR = MODELS_DIR / "ct-kidney"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"
QUIET = "[completion]\nseries_quiet_seconds = { default = 2.0 }\n"
GEOMETRY = {"rows": 192, "slices": 64, "slice_spacing_mm": 4.0, "fov_mm": 400.0}


def volume_of(written: AbdomenSeries) -> Volume:
    return load_volume(plan_volume(read_slice_refs(list(written.paths)), written.series_uid))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum()) + int(b.sum()))


@pytest.fixture(scope="module")
def model() -> KidneySegmenter:
    return KidneySegmenter.load(KIDNEY_DIR, torch.device("cpu"))


LR_CASE = 31


@pytest.fixture(scope="module")
def hfs_reference(tmp_path_factory: pytest.TempPathFactory, model: KidneySegmenter):
    """The head-first supine result the other positions must reproduce."""
    case = make_abdomen_case(LR_CASE, kind="tumour")
    hfs = write_abdomen_series(tmp_path_factory.mktemp("HFS"), case, shuffle=False, **GEOMETRY)
    return model.segment(volume_of(hfs))


@pytest.mark.parametrize("position", ["FFS", "HFP", "FFP"])
def test_left_and_right_are_the_patients_in_every_position(
    tmp_path: Path, model: KidneySegmenter, hfs_reference, position: str
) -> None:
    """The same anatomy scanned another way: same masks, and left stays the patient's left."""
    case = make_abdomen_case(LR_CASE, kind="tumour")
    other = write_abdomen_series(tmp_path / position, case, patient_position=position, **GEOMETRY)
    volume = volume_of(other)
    result = model.segment(volume)
    truth = other.render.masks()
    for name in SEGMENT_LABELS:
        assert np.array_equal(result.masks[name], hfs_reference.masks[name]), (position, name)
    for side, wrong in (("left_kidney", "right_kidney"), ("right_kidney", "left_kidney")):
        assert dice(result.masks[side], truth[side]) > 0.85, (position, side)
        assert not (result.masks[side] & truth[wrong]).any(), (position, side)
    # and in patient coordinates: the left kidney's centroid is at +x (patient left)
    k, j, i = np.argwhere(result.masks["left_kidney"]).mean(axis=0)
    assert (volume.affine @ np.array([i, j, k, 1.0]))[0] > 0


def _frames_by_position(
    seg: hd.seg.Segmentation, number: int
) -> dict[tuple[float, ...], np.ndarray]:
    """Segment ``number`` of a SEG as {ImagePositionPatient: frame}, from the stored frames.

    A frame's Segment Identification is per frame, or shared when the SEG has one segment.
    """
    frames: dict[tuple[float, ...], np.ndarray] = {}
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    shared = seg.SharedFunctionalGroupsSequence[0]
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        identification = item.get("SegmentIdentificationSequence")
        if identification is None:
            identification = shared.SegmentIdentificationSequence
        if int(identification[0].ReferencedSegmentNumber) != number:
            continue
        ipp = item.PlanePositionSequence[0].ImagePositionPatient
        frames[tuple(round(float(v), 2) for v in ipp)] = pixels[index].astype(bool)
    return frames


def _source_positions(paths: tuple[Path, ...]) -> dict[str, tuple[float, ...]]:
    return {
        str(ds.SOPInstanceUID): tuple(round(float(v), 2) for v in ds.ImagePositionPatient)
        for ds in (dcmread(p, stop_before_pixels=True) for p in paths)
    }


def _seg_as_canonical(
    seg: hd.seg.Segmentation, number: int, volume: Volume, positions: dict[str, tuple[float, ...]]
) -> np.ndarray:
    """The stored segment back on the canonical grid, each frame placed by its position."""
    empty = np.zeros(volume.array.shape, dtype=bool)
    source_frames, refs = volume.to_source(empty.copy())
    stored = _frames_by_position(seg, number)
    rebuilt = np.zeros_like(source_frames)
    for m, ref in enumerate(refs):
        frame = stored.pop(positions[ref.sop_instance_uid], None)
        if frame is not None:
            rebuilt[m] = frame
    assert stored == {}, f"SEG frames at positions no source slice has: {list(stored)[:3]}"
    # to_source is a view built from flips and a transpose: invert it on the rebuilt frames
    canonical = np.zeros_like(empty)
    view, _ = volume.to_source(canonical)
    view[...] = rebuilt
    return canonical


@pytest.fixture
def pacs_and_node(tmp_path: Path, orthanc_factory):
    orthanc = orthanc_factory()
    node = NodeProcess(
        tmp_path / "node",
        enabled=("ct-kidney",),
        destinations=[("pacs", orthanc.aet, orthanc.dicom_port)],
        extra_toml=QUIET,
    ).start()
    yield orthanc, node
    node.stop()


def _results(orthanc: Orthanc, study_uid: str) -> dict[str, str]:
    return {
        info.sop_class_uid: info.orthanc_id
        for info in orthanc.list_instances()
        if info.study_instance_uid == study_uid and info.sop_class_uid in (SEG_CLASS, SR_CLASS)
    }


@pytest.mark.slow
def test_seg_in_orthanc_lines_up_with_the_source_head_and_feet_first(
    pacs_and_node, tmp_path: Path, model: KidneySegmenter
) -> None:
    orthanc, node = pacs_and_node
    manifest = load_manifest(KIDNEY_DIR)
    numbers = {label.name: n for n, label in enumerate(manifest.segment_labels, start=1)}
    studies = {}
    for position, seed in (("HFS", 51), ("FFS", 54)):
        case = make_abdomen_case(seed, kind="tumour_and_cyst", contrast=True)
        studies[position] = write_abdomen_series(
            tmp_path / position, case, patient_position=position, **GEOMETRY
        )
    files = [p for written in studies.values() for p in written.paths]
    result = storescu(LOOPBACK, node.port, files, called_aet=node.ae_title)
    assert parse_store_statuses(combined_output(result)) == [0x0000] * len(files)

    for position, written in studies.items():
        found = orthanc.wait_for(
            lambda w=written: (r := _results(orthanc, w.study_uid)) and len(r) == 2 and r,
            timeout=240,
        )
        seg_path = tmp_path / f"{position}-seg.dcm"
        seg_path.write_bytes(orthanc.download(found[SEG_CLASS]))
        sr_path = tmp_path / f"{position}-sr.dcm"
        sr_path.write_bytes(orthanc.download(found[SR_CLASS]))
        for path in (seg_path, sr_path):
            errors, _ = dciodvfy(path)
            assert errors == [], (position, path.name, errors)

        volume = volume_of(written)
        expected = model.segment(volume)
        truth = written.render.masks()
        seg = hd.seg.segread(seg_path)
        assert str(seg.FrameOfReferenceUID) == written.frame_of_reference_uid
        positions = _source_positions(written.paths)
        present = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
        for name in SEGMENT_LABELS:
            if not expected.masks[name].any():
                continue
            number = _segment_number(seg, manifest.segment_labels[numbers[name] - 1].code)
            assert number in present, (position, name)
            stored = _seg_as_canonical(seg, number, volume, positions)
            assert np.array_equal(stored, expected.masks[name]), (position, name)
            assert dice(stored, truth[name]) == pytest.approx(
                dice(expected.masks[name], truth[name])
            ), (position, name)
        for side in ("left_kidney", "right_kidney"):  # the right organ, on the patient's side
            assert dice(expected.masks[side], truth[side]) > 0.8, (position, side)

        report = read_segmentation_report(dcmread(sr_path), manifest)
        assert {r.seg_sop_instance_uid for r in report.values()} == {str(seg.SOPInstanceUID)}
        checked = []
        for name, measured in report.items():
            true_ml = volume_ml(truth[name], volume.spacing)
            if dice(expected.masks[name], truth[name]) >= 0.9:
                assert measured.volume_ml == pytest.approx(true_ml, rel=0.05), (position, name)
                checked.append(name)
        assert checked, f"{position}: no segment reached Dice 0.9, so no volume was checked"
        assert report["kidney_tumour"].longest_diameter_mm is not None


def _segment_number(seg: hd.seg.Segmentation, code) -> int:
    """The number of the segment whose Segmented Property Type is ``code``."""
    for item in seg.SegmentSequence:
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        if (str(prop.CodeValue), str(prop.CodingSchemeDesignator)) == (code.value, code.scheme):
            return int(item.SegmentNumber)
    raise AssertionError(f"no segment with property type {code}")


ONE_KIDNEY_CASE = 69
"""A right nephrectomy without lesions, in which the model finds the left kidney only."""


@pytest.mark.slow
def test_one_kidney_gets_a_seg_of_one_segment_and_the_other_kidney_absent(
    pacs_and_node, tmp_path: Path, model: KidneySegmenter
) -> None:
    """Issue 15: a study with exactly one segment found used to get no SEG and no SR."""
    orthanc, node = pacs_and_node
    manifest = load_manifest(KIDNEY_DIR)
    case = make_abdomen_case(ONE_KIDNEY_CASE, kind="normal", contrast=True)
    assert case.nephrectomy == "right" and [k.side for k in case.kidneys] == ["left"]
    written = write_abdomen_series(tmp_path / "one-kidney", case, **GEOMETRY)
    volume = volume_of(written)
    expected = model.segment(volume)
    found = [name for name in SEGMENT_LABELS if expected.masks[name].any()]
    assert found == ["left_kidney"], f"case {ONE_KIDNEY_CASE}: the model found {found}"
    truth = written.render.masks()
    assert not truth["right_kidney"].any()
    assert dice(expected.masks["left_kidney"], truth["left_kidney"]) > 0.9

    result = storescu(LOOPBACK, node.port, list(written.paths), called_aet=node.ae_title)
    assert parse_store_statuses(combined_output(result)) == [0x0000] * len(written.paths)
    stored = orthanc.wait_for(
        lambda: (r := _results(orthanc, written.study_uid)) and len(r) == 2 and r, timeout=120
    )
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg_path.write_bytes(orthanc.download(stored[SEG_CLASS]))
    sr_path.write_bytes(orthanc.download(stored[SR_CLASS]))
    for path in (seg_path, sr_path):
        errors, _ = dciodvfy(path)
        assert errors == [], (path.name, errors)

    seg = hd.seg.segread(seg_path)
    assert seg.segment_numbers == [1]
    assert seg.get_segment_description(1).tracking_id == "left_kidney"
    assert str(seg.FrameOfReferenceUID) == written.frame_of_reference_uid
    positions = _source_positions(written.paths)
    stored_mask = _seg_as_canonical(seg, 1, volume, positions)
    assert np.array_equal(stored_mask, expected.masks["left_kidney"])

    sr = dcmread(sr_path)
    report = read_segmentation_report(sr, manifest)
    assert list(report) == ["left_kidney"]
    left = report["left_kidney"]
    assert (left.seg_sop_instance_uid, left.segment_number) == (str(seg.SOPInstanceUID), 1)
    assert left.tracking_uid == seg.get_segment_description(1).tracking_uid
    true_ml = volume_ml(truth["left_kidney"], volume.spacing)
    assert left.volume_ml == pytest.approx(true_ml, rel=0.05)
    absent = ["right_kidney", "kidney_tumour", "kidney_cyst"]
    assert read_absent_segments(sr, manifest) == absent
    verdicts = {**dict.fromkeys(absent, False), "left_kidney": True}
    assert summarize(sr, manifest) == verdicts
    with node.sessions()() as session:  # what the node recorded for the audit, from this SR
        assert dict(session.execute(select(Finding.label, Finding.positive)).all()) == verdicts
    # the SR's segment names the source images the kidney is on, as the SEG's frames do
    content = hd.sr.EnhancedSR.from_dataset(sr).content
    [group] = content.get_volumetric_roi_measurement_groups()
    reference = group.referenced_segment
    assert reference is not None
    assert str(reference.referenced_sop_instance_uid) == str(seg.SOPInstanceUID)
    frames, refs = volume.to_source(expected.masks["left_kidney"])
    hits = frames.any(axis=(1, 2))
    on = {ref.sop_instance_uid for ref, hit in zip(refs, hits, strict=True) if hit}
    images = reference.source_images_for_segmentation
    assert {str(image.referenced_sop_instance_uid) for image in images} == on
