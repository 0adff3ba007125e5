"""Abdominal CT phantoms: kidney / tumour / cyst truth in patient space, valid DICOM."""

from __future__ import annotations

import collections
import dataclasses
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from peers import dciodvfy
from pydicom import dcmread
from scipy import ndimage

from pacsnode.phantoms.abdomen import (
    CLASSES,
    KINDS,
    SEGMENT_LABELS,
    AbdomenCase,
    AbdomenRender,
    make_abdomen_case,
    render_abdomen,
    write_abdomen_series,
)
from pacsnode.phantoms.ctpa import make_ctpa_case, write_ctpa_series
from pacsnode.phantoms.ctseries import PATIENT_POSITIONS, write_ct_series
from pacsnode.volumes import load_volume, plan_volume, read_slice_refs

MANIFEST = Path(__file__).resolve().parents[1] / "models" / "ct-kidney" / "manifest.toml"
SMALL: dict[str, Any] = dict(rows=96, slices=50, slice_spacing_mm=5.0)


def _seed_where(
    predicate: Callable[[AbdomenCase], bool], kind: str | None = None, start: int = 0
) -> int:
    """The first seed from ``start`` whose case (of ``kind``) satisfies ``predicate``."""
    return next(s for s in range(start, start + 2000) if predicate(make_abdomen_case(s, kind)))


def _median(r: AbdomenRender, mask: np.ndarray) -> float:
    assert mask.any()
    return float(np.median(r.hu[mask]))


def test_labels_match_the_manifest() -> None:
    labels = tomllib.loads(MANIFEST.read_text(encoding="utf-8"))["labels"]
    assert tuple(label["name"] for label in labels if label["level"] == "segment") == SEGMENT_LABELS
    assert CLASSES == ("background", "kidney", "tumour", "cyst")


def test_cases_are_deterministic_and_kinds_drawn_evenly() -> None:
    assert make_abdomen_case(5) == make_abdomen_case(5)
    assert make_abdomen_case(5) != make_abdomen_case(6)
    cases = [make_abdomen_case(s) for s in range(400)]
    counts = collections.Counter(c.kind for c in cases)
    assert set(counts) == set(KINDS)
    assert all(60 <= n <= 140 for n in counts.values()), counts
    assert 0.7 <= sum(c.contrast for c in cases) / len(cases) <= 0.9
    removed = [c for c in cases if c.nephrectomy]
    assert 5 <= len(removed) <= 40
    assert {c.nephrectomy for c in removed} == {"left", "right"}
    for c in removed:
        assert len(c.kidneys) == 1 and c.kidney(str(c.nephrectomy)) is None
    for c in cases:
        assert bool(c.tumours) == (c.kind in ("tumour", "tumour_and_cyst"))
        assert bool(c.cysts) == (c.kind in ("cyst", "tumour_and_cyst"))
        assert 1 <= len(c.kidneys) <= 2
        for t in c.tumours:
            assert 15.0 - 1e-9 <= t.diameter_mm <= 60.0 + 1e-9
        for cyst in c.cysts:
            assert 10.0 - 1e-9 <= cyst.diameter_mm <= 40.0 + 1e-9
        for k in c.kidneys:
            assert 80.0 <= k.length_mm <= 145.0
    lengths = [k.length_mm for c in cases for k in c.kidneys]
    assert 95.0 <= float(np.median(lengths)) <= 125.0
    rises = [
        c.kidney("left").centre[2] - c.kidney("right").centre[2]  # type: ignore[union-attr]
        for c in cases
        if len(c.kidneys) == 2
    ]
    assert 5.0 <= float(np.median(rises)) <= 20.0  # the left kidney usually sits higher


def test_kind_and_contrast_do_not_change_the_anatomy() -> None:
    normal = make_abdomen_case(11, "normal", contrast=True)
    for kind in KINDS:
        for contrast in (True, False):
            other = make_abdomen_case(11, kind, contrast=contrast)
            assert other.kind == kind and other.contrast is contrast
            assert [k.centre for k in other.kidneys] == [k.centre for k in normal.kidneys]
            assert other.cavity_semi == normal.cavity_semi
            assert other.fov_mm == pytest.approx(normal.fov_mm, abs=60.0)


def test_bad_arguments_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        make_abdomen_case(1, "adenoma")
    case = make_abdomen_case(1)
    with pytest.raises(ValueError, match="rows"):
        render_abdomen(case, rows=8, slices=4, slice_spacing_mm=2.0)
    with pytest.raises(ValueError, match="patient_position"):
        write_abdomen_series(tmp_path, case, patient_position="LFS")
    with pytest.raises(ValueError, match="shape"):
        write_ct_series(
            tmp_path,
            np.zeros((2, 4, 4), dtype=np.float32),
            np.arange(4.0),
            np.arange(5.0),
            np.array([1.0, 0.0]),
            seed=1,
            uid_root="x",
            slice_spacing_mm=1.0,
        )


def test_render_is_deterministic() -> None:
    case = make_abdomen_case(3, "tumour_and_cyst")
    a = render_abdomen(case, **SMALL)
    b = render_abdomen(make_abdomen_case(3, "tumour_and_cyst"), **SMALL)
    assert np.array_equal(a.hu, b.hu)
    assert np.array_equal(a.classes, b.classes) and np.array_equal(a.left, b.left)
    assert a.hu.dtype == np.float32 and a.classes.dtype == np.uint8 and a.left.dtype == bool
    assert a.hu.shape == a.classes.shape == a.left.shape == (50, 96, 96)
    assert a.hu.min() >= -1024 and a.hu.max() <= 3071
    assert np.all(np.diff(a.x_mm) > 0) and np.all(np.diff(a.y_mm) > 0)
    assert np.all(np.diff(a.z_mm) < 0)  # k runs superior to inferior
    assert float(a.z_mm.mean()) == pytest.approx(case.scan_centre_z)
    assert float(a.z_mm[0] - a.z_mm[-1]) == pytest.approx(49 * 5.0)
    assert float(a.x_mm.mean()) == pytest.approx(0.0, abs=1e-9)
    assert float(a.y_mm.mean()) == pytest.approx(0.0, abs=1e-9)
    assert a.spacing == pytest.approx((5.0, case.fov_mm / 96, case.fov_mm / 96))


@pytest.mark.parametrize("kind", KINDS)
def test_kinds_produce_their_lesions(kind: str) -> None:
    seed = _seed_where(lambda c: len(c.kidneys) == 2, kind, start=20)
    case = make_abdomen_case(seed, kind, contrast=True)
    r = render_abdomen(case, **SMALL)
    volumes = r.volumes_ml()
    assert (volumes["kidney_tumour"] > 0) == (kind in ("tumour", "tumour_and_cyst"))
    assert (volumes["kidney_cyst"] > 0) == (kind in ("cyst", "tumour_and_cyst"))
    assert volumes["left_kidney"] > 50 and volumes["right_kidney"] > 50
    # the lesions are the only difference from the same abdomen without them
    plain = render_abdomen(dataclasses.replace(case, lesions=()), **SMALL)
    changed = r.hu != plain.hu
    assert not np.any(changed & (r.classes < 2))
    assert plain.classes.max() == 1
    assert changed.any() == bool(case.lesions)
    assert np.all((r.classes > 0) | (plain.classes == 0))  # lesions add to or replace kidney
    # each kidney with its lesions is one connected region (26-connectivity)
    for name in ("left_kidney", "right_kidney"):
        _, n = ndimage.label(r.masks()[name], structure=np.ones((3, 3, 3)))
        assert n == 1, name


def _inside(
    points: np.ndarray, centre: Sequence[float], axes: Sequence, semi: Sequence
) -> np.ndarray:
    """Whether patient-space ``points`` (n, 3) lie inside a rotated ellipsoid (float64)."""
    local = (points - np.asarray(centre)) @ np.asarray(axes).T
    return ((local / np.asarray(semi)) ** 2).sum(axis=-1) < 1.0


def _ellipsoid_q(
    r: AbdomenRender, centre: Sequence[float], axes: Sequence, semi: Sequence
) -> np.ndarray:
    z, y, x = np.meshgrid(r.z_mm, r.y_mm, r.x_mm, indexing="ij")
    local = (np.stack([x, y, z], axis=-1) - np.asarray(centre)) @ np.asarray(axes).T
    return ((local / np.asarray(semi)) ** 2).sum(axis=-1)


def test_lesions_overlap_their_kidney_away_from_hilum_and_spine() -> None:
    g = np.linspace(-1.0, 1.0, 13)
    unit = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
    unit = unit[(unit**2).sum(axis=1) < 1.0]
    for seed in range(150):
        case = make_abdomen_case(seed, "tumour_and_cyst")
        for e in case.lesions:
            k = case.kidney(e.side)
            assert k is not None
            points = np.asarray(e.centre) + (unit * np.asarray(e.semi)) @ np.asarray(e.axes)
            parenchyma = _inside(points, k.centre, k.axes, k.semi)
            parenchyma &= ~_inside(points, k.hilum, k.axes, k.notch_semi)
            assert parenchyma.mean() > 0.05, (seed, e.kind)  # connected to its kidney
            sign = 1.0 if e.side == "left" else -1.0
            medial = sign * (e.centre[0] - case.centre[0]) - e.half_extent()[0]
            assert medial > case.spine.radius, (seed, e.kind)


def test_truth_is_sampled_at_the_voxel_centres() -> None:
    seed = _seed_where(lambda c: len(c.lesions) == 1 and c.lesions[0].diameter_mm > 20, "tumour")
    case = make_abdomen_case(seed, "tumour")
    tumour = case.tumours[0]
    r = render_abdomen(
        case, rows=128, slices=30, slice_spacing_mm=3.0, z_centre_mm=tumour.centre[2]
    )
    q = _ellipsoid_q(r, tumour.centre, tumour.axes, tumour.semi)
    assert (q < 0.99).sum() > 50
    assert np.all(r.classes[q < 0.99] == 2)
    assert not np.any(r.classes[q > 1.01] == 2)
    k = case.kidney(tumour.side)
    assert k is not None
    qk = _ellipsoid_q(r, k.centre, k.axes, k.semi)
    qn = _ellipsoid_q(r, k.hilum, k.axes, k.notch_semi)
    parenchyma = (qk < 0.99) & (qn > 1.01) & (q > 1.01)
    assert parenchyma.sum() > 50
    assert np.all(r.classes[parenchyma] == 1)
    outside = q > 1.01
    for other in case.kidneys:
        outside &= _ellipsoid_q(r, other.centre, other.axes, other.semi) > 1.01
    assert outside.sum() > 1000 and not np.any(r.classes[outside] != 0)
    assert np.all(r.left[qk < 1.0] == (tumour.side == "left"))


def test_noise_is_as_drawn() -> None:
    case = make_abdomen_case(9)
    r = render_abdomen(case, **SMALL)
    clean = render_abdomen(dataclasses.replace(case, noise_hu=0.0), **SMALL)
    body = clean.hu > -900.0
    assert 10.0 <= case.noise_hu <= 20.0
    assert float(np.std(r.hu[body] - clean.hu[body])) == pytest.approx(case.noise_hu, rel=0.05)
    assert np.array_equal(r.classes, clean.classes)


def _check_sides(case: AbdomenCase, r: AbdomenRender) -> None:
    masks = r.masks()
    cx = case.centre[0]
    for side, sign in (("left", 1.0), ("right", -1.0)):
        mask = masks[f"{side}_kidney"]
        assert mask.any() == (case.kidney(side) is not None), side
        if mask.any():
            x = r.x_mm[np.nonzero(mask)[2]]
            assert np.all(sign * (x - cx) > 10.0), side  # i runs toward patient left (+x)
    assert not np.any(masks["left_kidney"] & masks["right_kidney"])
    lesions = r.classes >= 2
    assert np.array_equal(
        lesions,
        (masks["left_kidney"] | masks["right_kidney"])
        & (masks["kidney_tumour"] | masks["kidney_cyst"]),
    )


def test_left_kidney_is_at_plus_x_and_the_liver_at_minus_x() -> None:
    nephrectomy = _seed_where(lambda c: c.nephrectomy is not None, "tumour_and_cyst")
    for seed in (0, 1, 2, nephrectomy):
        case = make_abdomen_case(seed, "tumour_and_cyst", contrast=True)
        r = render_abdomen(case, rows=96, slices=40, slice_spacing_mm=6.0)
        _check_sides(case, r)
        for e in case.lesions:
            assert (e.side == "left") == (e.centre[0] > case.centre[0])
        # the liver: on a slice above the kidneys, liver-dense voxels sit at -x
        liver = next(o for o in case.organs if o.name == "liver-right")
        k = int(np.argmin(np.abs(r.z_mm - (liver.centre[2] + 0.4 * liver.semi[2]))))
        dense = np.abs(r.hu[k] - liver.hu) < 12.0
        x = r.x_mm[np.nonzero(dense)[1]] - case.centre[0]
        assert float(x.mean()) < -15.0 and (x < 0).sum() > 2 * (x > 0).sum(), seed


def test_default_scan_holds_both_kidneys() -> None:
    for seed in range(24):
        case = make_abdomen_case(seed)
        r = render_abdomen(case, rows=48, slices=100, slice_spacing_mm=2.5)
        fg = r.classes > 0
        assert fg.any()
        assert not fg[:2].any() and not fg[-2:].any(), seed
        lo, hi = case.kidney_z_extent()
        assert r.z_mm[-1] < lo < hi < r.z_mm[0]


def test_hu_of_structures() -> None:
    seed = _seed_where(lambda c: len(c.kidneys) == 2, "tumour_and_cyst", start=40)
    kw: dict[str, Any] = dict(rows=128, slices=60, slice_spacing_mm=4.0)
    case = make_abdomen_case(seed, "tumour_and_cyst", contrast=True)
    r = render_abdomen(case, **kw)
    kidney = r.classes == 1
    assert 90.0 <= _median(r, kidney) <= 200.0
    tumour = _median(r, r.classes == 2)
    assert 40.0 <= tumour <= 110.0
    assert _median(r, kidney) - tumour > 20.0  # tumours are visible against the kidney
    assert -5.0 <= _median(r, r.classes == 3) <= 25.0
    cortex = max(k.cortex_hu for k in case.kidneys)
    assert float(np.percentile(r.hu[kidney], 90)) > cortex - 20.0
    spine = case.spine
    j = int(np.argmin(np.abs(r.y_mm - spine.centre_y)))
    i = int(np.argmin(np.abs(r.x_mm - case.centre[0])))
    assert float(np.median(r.hu[:, j, i])) > 200.0  # vertebral bodies
    aorta = next(v for v in case.vessels if v.name == "aorta")
    assert 150.0 <= aorta.hu <= 250.0
    plain = render_abdomen(make_abdomen_case(seed, "tumour_and_cyst", contrast=False), **kw)
    assert np.array_equal(plain.classes, r.classes)
    assert 28.0 <= _median(plain, plain.classes == 1) <= 42.0
    assert -5.0 <= _median(plain, plain.classes == 3) <= 25.0


def test_volumes_are_voxel_counts_and_match_the_analytic_tumour() -> None:
    case = make_abdomen_case(4, "tumour")
    r = render_abdomen(case, **SMALL)
    voxel_ml = 5.0 * (case.fov_mm / 96) ** 2 / 1000.0
    for name, mask in r.masks().items():
        assert r.volumes_ml()[name] == pytest.approx(mask.sum() * voxel_ml)
    seed = _seed_where(lambda c: len(c.tumours) == 1 and c.tumours[0].diameter_mm >= 25, "tumour")
    case = make_abdomen_case(seed, "tumour")
    tumour = case.tumours[0]
    half_z = tumour.half_extent()[2]
    fine = render_abdomen(
        case,
        rows=384,
        slices=int(2 * half_z / 1.2) + 4,
        slice_spacing_mm=1.2,
        z_centre_mm=tumour.centre[2],
    )
    assert fine.volumes_ml()["kidney_tumour"] == pytest.approx(tumour.volume_ml(), rel=0.1)
    k = case.kidney(tumour.side)
    assert k is not None and 0.3 * k.volume_ml() < fine.volumes_ml()[f"{tumour.side}_kidney"]


def _read_back(
    paths: tuple[Path, ...], series_uid: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    volume = load_volume(plan_volume(read_slice_refs(list(paths)), series_uid))
    return volume.array, volume.affine, [ref.sop_instance_uid for ref in volume.slices]


def test_orientations_read_back_identically(tmp_path: Path) -> None:
    case = make_abdomen_case(_seed_where(lambda c: len(c.kidneys) == 2, "tumour_and_cyst"))
    kw: dict[str, Any] = dict(rows=96, slices=40, slice_spacing_mm=5.0)
    arrays: dict[str, np.ndarray] = {}
    affines: dict[str, np.ndarray] = {}
    for position, shuffle in (("HFS", False), ("FFS", True), ("HFP", True), ("FFP", False)):
        series = write_abdomen_series(
            tmp_path / position, case, patient_position=position, shuffle=shuffle, **kw
        )
        first = dcmread(series.paths[0], stop_before_pixels=True)
        assert first.PatientPosition == position
        assert [float(v) for v in first.ImageOrientationPatient] == list(
            PATIENT_POSITIONS[position]
        )
        numbers = [int(dcmread(p, stop_before_pixels=True).InstanceNumber) for p in series.paths]
        assert (numbers != sorted(numbers)) == shuffle
        array, affine, uids = _read_back(series.paths, series.series_uid)
        assert uids == list(series.canonical_uids)
        assert np.array_equal(array, np.clip(np.rint(series.render.hu), -1024, 3071)), position
        arrays[position] = array
        affines[position] = affine
        for side, sign in (("left", 1.0), ("right", -1.0)):
            kji = np.argwhere(series.render.masks()[f"{side}_kidney"]).mean(axis=0)
            lps = affine @ np.array([kji[2], kji[1], kji[0], 1.0])
            assert sign * lps[0] > 20.0, (position, side)  # +x is the patient's left
    r = render_abdomen(case, **kw)
    expected = np.array(
        [[r.spacing[2], 0, 0, r.x_mm[0]], [0, r.spacing[1], 0, r.y_mm[0]]]
        + [[0, 0, -r.spacing[0], r.z_mm[0]], [0, 0, 0, 1]]
    )
    for position, array in arrays.items():
        assert np.array_equal(array, arrays["HFS"]), position
        assert np.allclose(affines[position], expected, atol=1e-3), position


def test_dicom_attributes_and_dciodvfy(tmp_path: Path) -> None:
    seed = _seed_where(lambda c: c.contrast, "cyst")
    case = make_abdomen_case(seed, "cyst")
    series = write_abdomen_series(
        tmp_path / "pv", case, rows=64, slices=4, slice_spacing_mm=2.5, shuffle=False
    )
    ds = dcmread(series.paths[0])
    assert ds.Modality == "CT" and ds.BodyPartExamined == "ABDOMEN"
    assert ds.ContrastBolusAgent == "Iohexol"
    assert ds.SeriesDescription == "CT abdomen portal venous"
    assert ds.PatientName == "PHANTOM^ABDOMEN"
    assert ds.SliceThickness == 2.5
    assert ds.StudyInstanceUID == series.study_uid and ds.SeriesInstanceUID == series.series_uid
    errors, warnings = dciodvfy(series.paths[0])
    assert errors == [] and warnings == []
    ctpa = write_ctpa_series(
        tmp_path / "ctpa", make_ctpa_case(seed, kind="negative"), rows=32, slices=2
    )
    assert ctpa.study_uid != series.study_uid
    assert dcmread(ctpa.paths[0]).PatientID != ds.PatientID

    plain_case = make_abdomen_case(seed, "cyst", contrast=False)
    plain = write_abdomen_series(tmp_path / "nc", plain_case, rows=32, slices=2)
    assert "ContrastBolusAgent" not in dcmread(plain.paths[0])
    forced = write_abdomen_series(
        tmp_path / "forced", plain_case, rows=32, slices=2, contrast_agent="Omnipaque"
    )
    assert dcmread(forced.paths[0]).ContrastBolusAgent == "Omnipaque"
    silent = write_abdomen_series(tmp_path / "silent", case, rows=32, slices=2, contrast_agent=None)
    assert "ContrastBolusAgent" not in dcmread(silent.paths[0])
