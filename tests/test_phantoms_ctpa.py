"""CTPA phantoms: anatomy in patient space, truth that obeys the RSNA rules, valid DICOM."""

from __future__ import annotations

import dataclasses
import subprocess
import tomllib
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from pacsnode.phantoms.ctpa import (
    CT_IMAGE_STORAGE,
    CTPA_EXAM_LABELS,
    KINDS,
    PATIENT_POSITIONS,
    CanonicalRender,
    CtpaCase,
    emboli_mask,
    make_ctpa_case,
    render_canonical,
    render_canonical_annotated,
    truth_violations,
    write_ctpa_series,
    write_scout,
)

MANIFEST = Path(__file__).resolve().parents[1] / "models" / "ct-pe" / "manifest.toml"


def _dciodvfy_problems(path: Path) -> list[str]:
    """dciodvfy errors and warnings (the phantoms are clean of both)."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    lines = (proc.stderr + proc.stdout).splitlines()
    return [line for line in lines if "Error" in line or "Warning" in line]


def _median_hu(r: CanonicalRender, point: tuple[float, float, float], half: int = 1) -> float:
    """Median HU of a small patch around a patient-space point (nearest slice)."""
    k = int(np.argmin(np.abs(r.z_mm - point[2])))
    j = int(np.argmin(np.abs(r.y_mm - point[1])))
    i = int(np.argmin(np.abs(r.x_mm - point[0])))
    return float(np.median(r.hu[k, j - half : j + half + 1, i - half : i + half + 1]))


def _tube_point(case: CtpaCase, name: str, t: float) -> tuple[float, float, float]:
    tube = next(tb for tb in case.tubes if tb.name == name)
    p0, p1 = np.array(tube.p0), np.array(tube.p1)
    p = p0 + t * (p1 - p0)
    return float(p[0]), float(p[1]), float(p[2])


def _without_emboli(case: CtpaCase) -> CtpaCase:
    return dataclasses.replace(case, emboli=())


def test_labels_match_the_manifest() -> None:
    labels = tomllib.loads(MANIFEST.read_text(encoding="utf-8"))["labels"]
    assert tuple(label["name"] for label in labels if label["level"] == "exam") == CTPA_EXAM_LABELS


@pytest.mark.parametrize("seed", range(40))
def test_random_truth_obeys_rsna_rules(seed: int) -> None:
    case = make_ctpa_case(seed)
    _, truth = render_canonical(case, rows=24, slices=64, slice_spacing_mm=2.5)
    assert set(case.truth) == set(CTPA_EXAM_LABELS)
    assert truth_violations(case.truth, bool(truth.any())) == []
    assert bool(truth.any()) == case.positive == (case.kind not in ("negative", "indeterminate"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("location", [None, "central", "left", "right"])
def test_forced_kinds_and_locations(kind: str, location: str | None) -> None:
    if kind in ("negative", "indeterminate") and location is not None:
        with pytest.raises(ValueError, match="location"):
            make_ctpa_case(5, kind=kind, location=location)
        return
    case = make_ctpa_case(5, kind=kind, location=location)
    t = case.truth
    assert case.kind == kind
    assert t["negative_exam_for_pe"] == (kind == "negative")
    assert t["indeterminate"] == (kind == "indeterminate")
    assert t["chronic_pe"] == (kind == "chronic")
    assert t["acute_and_chronic_pe"] == (kind == "acute_and_chronic")
    kinds = {e.kind for e in case.emboli}
    expected = {
        "negative": set(),
        "indeterminate": set(),
        "acute": {"acute"},
        "chronic": {"chronic"},
        "acute_and_chronic": {"acute", "chronic"},
    }[kind]
    assert kinds == expected
    if location is not None:
        flags = (t["central_pe"], t["leftsided_pe"], t["rightsided_pe"])
        assert flags == {"central": (1, 0, 0), "left": (0, 1, 0), "right": (0, 0, 1)}[location]
    _, truth = render_canonical(case, rows=24, slices=64, slice_spacing_mm=2.5)
    assert truth_violations(t, bool(truth.any())) == []


def test_rv_lv_ratio_forced() -> None:
    big = make_ctpa_case(9, kind="acute", rv_lv="gte_1")
    small = make_ctpa_case(9, kind="acute", rv_lv="lt_1")
    assert big.rv_lv_ratio >= 1.1 and big.truth["rv_lv_ratio_gte_1"] == 1
    assert small.rv_lv_ratio <= 0.9 and small.truth["rv_lv_ratio_lt_1"] == 1
    rv = next(b for b in big.blobs if b.name == "rv")
    lv = next(b for b in big.blobs if b.name == "lv")
    assert rv.semi[0] / lv.semi[0] == pytest.approx(big.rv_lv_ratio)
    negative = make_ctpa_case(9, kind="negative", rv_lv="gte_1")
    assert negative.truth["rv_lv_ratio_gte_1"] == negative.truth["rv_lv_ratio_lt_1"] == 0


def test_bad_arguments_named() -> None:
    with pytest.raises(ValueError, match="kind"):
        make_ctpa_case(1, kind="subsegmental")
    with pytest.raises(ValueError, match="rv_lv"):
        make_ctpa_case(1, rv_lv="big")
    with pytest.raises(ValueError, match="patient_position"):
        write_ctpa_series(Path("/nonexistent"), make_ctpa_case(1), patient_position="LFS")


def test_hu_ranges_of_structures() -> None:
    case = make_ctpa_case(21, kind="negative")
    r = render_canonical_annotated(case, rows=256, slices=120, slice_spacing_mm=2.5)
    trunk = _median_hu(r, _tube_point(case, "pa-trunk", 0.5))
    assert 230 <= trunk <= 440 and abs(trunk - case.pa_hu) < 20
    for name in ("lpa-1", "rpa-1", "lul", "ril"):
        assert abs(_median_hu(r, _tube_point(case, name, 0.5)) - case.pa_hu) < 25, name
    aorta = _median_hu(r, _tube_point(case, "aorta-desc-2", 0.1))
    assert abs(aorta - case.systemic_hu) < 20
    cx, cy, zref = case.centre
    chest = int(np.argmin(np.abs(r.z_mm - (zref + 30.0 * case.scale))))
    slab = r.hu[chest]
    lung_fraction = float(((slab > -920) & (slab < -780)).mean())
    assert lung_fraction > 0.15
    j = int(np.argmin(np.abs(r.y_mm - (cy + case.spine_y))))
    i = int(np.argmin(np.abs(r.x_mm - cx)))
    assert float(np.median(r.hu[:, j, i])) > 150  # vertebral bodies (marrow, cortex, discs)
    # body wall: fat outside, muscle inside, air beyond
    a_out = case.cavity_semi[0] + 8 * case.scale + case.muscle_mm + case.fat_mm
    fat_x = cx + a_out - case.fat_mm / 2.0
    assert -160 < _median_hu(r, (fat_x, cy, zref), half=0) < -30
    assert _median_hu(r, (cx + a_out + 8.0, cy, zref)) < -950
    # the RV is opacified like the arteries, the LV like the aorta
    rv = next(b for b in case.blobs if b.name == "rv")
    lv = next(b for b in case.blobs if b.name == "lv")
    assert abs(_median_hu(r, rv.centre) - case.pa_hu) < 20
    assert abs(_median_hu(r, lv.centre) - case.systemic_hu) < 20


def test_embolus_is_a_filling_defect() -> None:
    case = make_ctpa_case(4, kind="acute", location="central")
    r = render_canonical_annotated(case, rows=256, slices=120, slice_spacing_mm=2.5)
    for e in case.emboli:
        assert 30 <= e.hu <= 70
        centre = _median_hu(r, e.centre)  # emboli may overlap: any embolus's HU
        assert min(abs(centre - other.hu) for other in case.emboli) < 25
        assert centre < case.pa_hu - 150
    poor = make_ctpa_case(4, kind="indeterminate", indeterminate_reason="contrast")
    assert 100 <= poor.pa_hu <= 150 and poor.emboli == ()
    rp = render_canonical_annotated(poor, rows=128, slices=60, slice_spacing_mm=2.5)
    assert 80 < _median_hu(rp, _tube_point(poor, "pa-trunk", 0.5), half=2) < 170
    chronic = make_ctpa_case(8, kind="chronic", location="right")
    for e in chronic.emboli:
        vessel = next(t for t in chronic.tubes if t.name == e.vessel)
        p0, p1 = np.array(vessel.p0), np.array(vessel.p1)
        c = np.array(e.centre)
        u = (p1 - p0) / np.linalg.norm(p1 - p0)
        off_axis = np.linalg.norm((c - p0) - ((c - p0) @ u) * u)
        assert off_axis > 0.3 * vessel.r0  # eccentric, towards the wall


@pytest.mark.parametrize(("location", "sign"), [("left", 1.0), ("right", -1.0)])
def test_laterality_in_patient_space(location: str, sign: float) -> None:
    case = make_ctpa_case(12, kind="acute", location=location)
    kw = dict(rows=96, slices=80, slice_spacing_mm=2.0)
    with_emboli = render_canonical(case, **kw)[0]
    without = render_canonical(_without_emboli(case), **kw)[0]
    r = render_canonical_annotated(case, **kw)
    changed = np.argwhere(with_emboli != without)
    assert changed.size
    x = r.x_mm[changed[:, 2]]
    assert np.all(sign * (x - case.centre[0]) > 20.0)  # i runs toward patient left (+x)
    assert np.all(np.diff(r.x_mm) > 0) and np.all(np.diff(r.y_mm) > 0)
    assert np.all(np.diff(r.z_mm) < 0)  # k runs superior to inferior


def test_slice_truth_matches_emboli_z_extent() -> None:
    case = make_ctpa_case(31, kind="acute_and_chronic")
    r = render_canonical_annotated(case, rows=64, slices=150, slice_spacing_mm=1.25)
    extents = [e.z_extent() for e in case.emboli]
    for k in np.nonzero(r.slice_truth)[0]:
        z = r.z_mm[k]
        assert any(lo <= z <= hi for lo, hi in extents)
    for e, (lo, hi) in zip(case.emboli, extents, strict=True):
        inner = (r.z_mm > lo + 0.3 * (hi - lo)) & (r.z_mm < hi - 0.3 * (hi - lo))
        assert inner.any()
        assert r.slice_truth[inner].all(), e.vessel
    assert r.embolus_slices.shape == (150, len(case.emboli))


def test_emboli_mask_marks_the_defect() -> None:
    case = make_ctpa_case(31, kind="acute", location="right")
    grid = np.arange(-150.0, 150.0, 2.0)
    for e in case.emboli:
        mask = emboli_mask(case, grid, grid, e.centre[2])
        assert mask.any()
        ys, xs = np.nonzero(mask)
        assert np.all(grid[xs] < case.centre[0])  # right side: -x
    assert not emboli_mask(_without_emboli(case), grid, grid, case.emboli[0].centre[2]).any()


def test_emboli_outside_the_scan_range_refused() -> None:
    case = make_ctpa_case(31, kind="acute", location="central")
    with pytest.raises(ValueError, match="embolus"):
        render_canonical(case, rows=32, slices=10, slice_spacing_mm=1.0, z_centre_mm=0.0)


def test_deterministic_per_seed(tmp_path: Path) -> None:
    assert make_ctpa_case(77) == make_ctpa_case(77)
    assert make_ctpa_case(77) != make_ctpa_case(78)
    a = render_canonical(make_ctpa_case(77), rows=48, slices=70, slice_spacing_mm=2.5)
    b = render_canonical(make_ctpa_case(77), rows=48, slices=70, slice_spacing_mm=2.5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    case = make_ctpa_case(77, kind="negative")
    s1 = write_ctpa_series(tmp_path / "a", case, rows=32, slices=8, slice_spacing_mm=2.0)
    s2 = write_ctpa_series(tmp_path / "b", case, rows=32, slices=8, slice_spacing_mm=2.0)
    assert s1.series_uid == s2.series_uid and s1.study_uid == s2.study_uid
    assert [p.name for p in s1.paths] == [p.name for p in s2.paths]
    for p, q in zip(s1.paths, s2.paths, strict=True):
        assert dcmread(p).PixelData == dcmread(q).PixelData


def _canonical_from_files(paths: tuple[Path, ...]) -> tuple[np.ndarray, list[str], tuple]:
    """Rebuild the (k, j, i) HU volume from IPP/IOP alone; also the canonical grid origin."""
    items = []
    for path in paths:
        ds = dcmread(path)
        iop = [float(v) for v in ds.ImageOrientationPatient]
        ipp = [float(v) for v in ds.ImagePositionPatient]
        row_dir, col_dir = np.array(iop[:3]), np.array(iop[3:])
        assert np.allclose(np.abs(row_dir), [1, 0, 0]) and np.allclose(np.abs(col_dir), [0, 1, 0])
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        if row_dir[0] < 0:  # columns run toward patient right
            hu = hu[:, ::-1]
        if col_dir[1] < 0:  # rows run anterior
            hu = hu[::-1]
        x0 = ipp[0] if row_dir[0] > 0 else ipp[0] - (ds.Columns - 1) * dc
        y0 = ipp[1] if col_dir[1] > 0 else ipp[1] - (ds.Rows - 1) * dr
        items.append((-ipp[2], hu, str(ds.SOPInstanceUID), (round(x0, 3), round(y0, 3))))
    items.sort(key=lambda item: item[0])
    origins = {item[3] for item in items}
    assert len(origins) == 1
    return np.stack([item[1] for item in items]), [item[2] for item in items], origins.pop()


def test_orientations_give_identical_patient_content(tmp_path: Path) -> None:
    case = make_ctpa_case(3, kind="acute", location="left")
    volumes = {}
    for position in PATIENT_POSITIONS:
        series = write_ctpa_series(
            tmp_path / position,
            case,
            patient_position=position,
            shuffle=True,
            rows=48,
            slices=64,
            slice_spacing_mm=2.5,
        )
        first = dcmread(series.paths[0])
        assert first.PatientPosition == position
        assert [float(v) for v in first.ImageOrientationPatient] == list(
            PATIENT_POSITIONS[position]
        )
        numbers = [int(dcmread(p).InstanceNumber) for p in series.paths]
        assert numbers != sorted(numbers)  # written shuffled
        hu, uids, origin = _canonical_from_files(series.paths)
        assert uids == list(series.canonical_uids)
        truth = [series.slice_truth[u] for u in uids]
        volumes[position] = (hu, truth, origin)
        assert series.truth == case.truth
    ref_hu, ref_truth, ref_origin = volumes["HFS"]
    expected, expected_truth = render_canonical(case, rows=48, slices=64, slice_spacing_mm=2.5)
    assert np.array_equal(ref_hu, np.clip(np.rint(expected), -1024, 3071))
    assert ref_truth == expected_truth.tolist()
    for position, (hu, truth, origin) in volumes.items():
        assert origin == ref_origin, position
        assert truth == ref_truth, position
        assert np.array_equal(hu, ref_hu), position


def test_dicom_attributes_and_dciodvfy(tmp_path: Path) -> None:
    case = make_ctpa_case(2, kind="negative")
    series = write_ctpa_series(
        tmp_path / "ct",
        case,
        patient_position="FFS",
        rows=64,
        slices=6,
        slice_spacing_mm=1.0,
        slice_thickness_mm=1.5,
        convolution_kernel="FC51",
        shuffle=False,
    )
    datasets = [dcmread(p) for p in series.paths]
    ds = datasets[0]
    assert ds.SOPClassUID == CT_IMAGE_STORAGE
    assert ds.Modality == "CT"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.PixelRepresentation == 1 and ds.BitsAllocated == 16
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    assert float(ds.SliceThickness) == 1.5
    assert ds.ConvolutionKernel == "FC51"
    assert ds.ContrastBolusAgent == "Iohexol"
    assert ds.BodyPartExamined == "CHEST"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                    "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName",
                    "Manufacturer", "FrameOfReferenceUID"):  # fmt: skip
        assert keyword in ds, keyword
    assert len({d.FrameOfReferenceUID for d in datasets}) == 1
    assert len({d.SOPInstanceUID for d in datasets}) == 6
    assert sorted(int(d.InstanceNumber) for d in datasets) == list(range(1, 7))
    zs = [float(d.ImagePositionPatient[2]) for d in datasets]
    assert zs == sorted(zs)  # feet first: instance 1 is the most inferior
    assert _dciodvfy_problems(series.paths[0]) == []
    reference = hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)
    assert reference.referenced_sop_instance_uid == ds.SOPInstanceUID

    silent = write_ctpa_series(
        tmp_path / "silent", case, rows=32, slices=2, slice_spacing_mm=1.0, contrast_agent=None
    )
    assert "ContrastBolusAgent" not in dcmread(silent.paths[0])
    assert silent.series_uid != series.series_uid


def test_scout_is_a_localizer(tmp_path: Path) -> None:
    case = make_ctpa_case(2, kind="negative")
    series = write_ctpa_series(tmp_path, case, rows=32, slices=2, slice_spacing_mm=1.0)
    path = write_scout(tmp_path, series.study_uid, case=case, rows=128, columns=96)
    ds = dcmread(path)
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert ds.StudyInstanceUID == series.study_uid
    assert ds.SeriesInstanceUID != series.series_uid
    assert ds.FrameOfReferenceUID == series.frame_of_reference_uid
    assert ds.pixel_array.shape == (128, 96)
    assert _dciodvfy_problems(path) == []
