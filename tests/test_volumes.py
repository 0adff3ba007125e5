"""CT volumes: one anatomy from any acquisition, refusal of broken series, bounded memory."""

from __future__ import annotations

import dataclasses
import math
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from ctgen import (
    CORONAL_IOP,
    ENHANCED_CT_IMAGE_STORAGE,
    SAGITTAL_IOP,
    canonical_affine,
    default_origin,
    make_ct_series,
    rotation_about,
    save_series,
    write_ct_series,
)
from peers import dciodvfy
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, RLELossless

from pacsnode.errors import InputError, VolumeError
from pacsnode.volumes import SliceRef, Volume, load_volume, plan_volume, read_slice_refs

SERIES = "1.2.826.0.1.3680043.8.498.77"
SHAPE = (10, 40, 48)  # (k, j, i): deliberately all different, so a transposition cannot pass
SPACING = (2.5, 0.8, 0.7)
POSITIONS = ("HFS", "FFS", "HFP", "FFP")
# a bright blob at the patient's left-anterior-superior, a second marker right-posterior-inferior
LAS = (1, 6, 40)  # (k, j, i)
RPI = (8, 33, 5)


def _anatomy() -> np.ndarray:
    """Random soft tissue with two markers: any flip or transposition changes the array."""
    rng = np.random.default_rng(42)
    hu = rng.integers(-100, 100, size=SHAPE).astype(np.float64)
    hu[LAS] = 2000.0
    hu[RPI] = 1500.0
    return hu


HU = _anatomy()
TRUTH = canonical_affine(SPACING, default_origin(SHAPE, SPACING))


def _lps(affine: np.ndarray, kji: tuple[int, int, int]) -> np.ndarray:
    k, j, i = kji
    return (affine @ np.array([i, j, k, 1.0]))[:3]


def _volume(paths: list[Path], **plan_options: int) -> Volume:
    return load_volume(plan_volume(read_slice_refs(paths), SERIES, **plan_options))


def _refuse(refs: list[SliceRef], *words: str) -> str:
    with pytest.raises(VolumeError) as info:
        plan_volume(refs, SERIES)
    assert isinstance(info.value, InputError)  # the worker fails such jobs permanently
    message = str(info.value)
    assert SERIES in message
    for word in words:
        assert word in message, message
    return message


@pytest.fixture(scope="module")
def hfs_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("hfs"), HU, SPACING, series_uid=SERIES)


@pytest.fixture
def hfs_refs(hfs_paths: list[Path]) -> list[SliceRef]:
    return read_slice_refs(hfs_paths)


# -- the same anatomy from every acquisition ---------------------------------------------


def test_markers_are_where_the_canonical_orientation_says() -> None:
    """The ground truth itself: +x is patient left, +y posterior, +z superior (LPS)."""
    centre = _lps(TRUTH, (SHAPE[0] // 2, SHAPE[1] // 2, SHAPE[2] // 2))
    las, rpi = _lps(TRUTH, LAS), _lps(TRUTH, RPI)
    assert las[0] > centre[0] and las[1] < centre[1] and las[2] > centre[2]
    assert rpi[0] < centre[0] and rpi[1] > centre[1] and rpi[2] < centre[2]


@pytest.mark.parametrize("enhanced", [False, True], ids=["single", "enhanced"])
@pytest.mark.parametrize("order", ["acquired", "reversed", "shuffled"])
@pytest.mark.parametrize("position", POSITIONS)
def test_every_acquisition_gives_the_same_volume(
    tmp_path: Path, position: str, order: str, enhanced: bool
) -> None:
    paths = write_ct_series(
        tmp_path,
        HU,
        SPACING,
        patient_position=position,
        reverse=order == "reversed",
        shuffle=order == "shuffled",
        seed=7,
        enhanced=enhanced,
    )
    plan = plan_volume(read_slice_refs(paths), SERIES)
    along = [np.dot(ref.position, plan.normal) for ref in plan.slices]
    assert along == sorted(along)
    assert plan.slice_spacing == pytest.approx(SPACING[0])

    volume = load_volume(plan)
    assert volume.array.dtype == np.float32
    assert volume.array.flags.c_contiguous
    assert np.array_equal(volume.array, HU.astype(np.float32))
    np.testing.assert_allclose(volume.affine, TRUTH, atol=1e-6)
    np.testing.assert_allclose(_lps(volume.affine, LAS), _lps(TRUTH, LAS), atol=1e-6)
    assert volume.spacing == pytest.approx(SPACING)
    assert volume.series_uid == SERIES
    assert volume.excluded == ()
    # slices[k] is the source of array[k]: superior first
    z_of_k = [_lps(volume.affine, (k, 0, 0))[2] for k in range(SHAPE[0])]
    np.testing.assert_allclose([s.position[2] for s in volume.slices], z_of_k, atol=1e-6)
    assert enhanced == all(s.frame is not None for s in volume.slices)


@pytest.mark.parametrize(
    "geometry",
    [*POSITIONS, "coronal", "sagittal", "coronal-reversed"],
)
def test_to_source_puts_every_voxel_back_on_its_source_pixel(tmp_path: Path, geometry: str) -> None:
    """What a DICOM SEG needs: canonical masks mapped back onto each source frame exactly."""
    kwargs: dict[str, object] = {"shuffle": True, "seed": 3}
    if geometry.startswith("coronal"):
        kwargs.update(iop=CORONAL_IOP, reverse=geometry.endswith("reversed"))
    elif geometry == "sagittal":
        kwargs.update(iop=SAGITTAL_IOP)
    else:
        kwargs.update(patient_position=geometry)
    paths = write_ct_series(tmp_path, HU, SPACING, **kwargs)  # type: ignore[arg-type]
    volume = _volume(paths)
    frames, refs = volume.to_source(volume.array)
    assert len(refs) == frames.shape[0] == len(paths)
    for frame, ref in zip(frames, refs, strict=True):
        ds = dcmread(ref.path)
        assert str(ds.SOPInstanceUID) == ref.sop_instance_uid
        pixels = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert frame.shape == pixels.shape
        assert np.array_equal(frame, pixels.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        volume.to_source(volume.array[:-1])


def test_marker_position_agrees_with_the_dicom_formula(tmp_path: Path) -> None:
    """Independent of pacsnode: locate the marker pixel with PS3.3 C.7.6.2.1.1 by hand."""
    paths = write_ct_series(tmp_path, HU, SPACING, patient_position="FFP", shuffle=True)
    for path in paths:
        ds = dcmread(path)
        pixels = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
            ds.RescaleIntercept
        )
        if pixels.max() == 2000.0:
            row, col = np.unravel_index(int(np.argmax(pixels)), pixels.shape)
            iop = np.array(ds.ImageOrientationPatient, dtype=np.float64)
            spacing = [float(v) for v in ds.PixelSpacing]
            found = (
                np.array(ds.ImagePositionPatient, dtype=np.float64)
                + iop[:3] * spacing[1] * col
                + iop[3:] * spacing[0] * row
            )
            break
    else:
        pytest.fail("no file holds the marker")
    np.testing.assert_allclose(found, _lps(TRUTH, LAS), atol=1e-6)
    np.testing.assert_allclose(_lps(_volume(paths).affine, LAS), found, atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("iop", [CORONAL_IOP, SAGITTAL_IOP], ids=["coronal", "sagittal"])
def test_coronal_and_sagittal_stacks_are_permuted_to_canonical(
    tmp_path: Path, iop: tuple[float, ...], reverse: bool
) -> None:
    paths = write_ct_series(tmp_path, HU, SPACING, iop=iop, reverse=reverse, shuffle=True)
    volume = _volume(paths)
    assert np.array_equal(volume.array, HU.astype(np.float32))
    np.testing.assert_allclose(volume.affine, TRUTH, atol=1e-6)
    assert volume.spacing == pytest.approx(SPACING)
    stacked_along = 1 if iop == CORONAL_IOP else 0  # j (posterior) or i (left)
    coordinate = [s.position[stacked_along] for s in volume.slices]
    assert coordinate == sorted(coordinate)


@pytest.mark.parametrize("enhanced", [False, True], ids=["single", "enhanced"])
@pytest.mark.parametrize("position", ["HFS", "FFP"])
def test_slightly_oblique_stack_keeps_its_exact_geometry(
    tmp_path: Path, position: str, enhanced: bool
) -> None:
    rotation = rotation_about((1.0, 0.4, 0.2), 6.0)
    origin = default_origin(SHAPE, SPACING)
    paths = write_ct_series(
        tmp_path,
        HU,
        SPACING,
        patient_position=position,
        rotation=rotation,
        origin=origin,
        shuffle=True,
        enhanced=enhanced,
    )
    volume = _volume(paths)
    assert np.array_equal(volume.array, HU.astype(np.float32))
    truth = canonical_affine(SPACING, origin, rotation)
    assert abs(truth[0, 1]) > 0.01  # really oblique: the affine is not diagonal
    np.testing.assert_allclose(volume.affine, truth, atol=1e-5)
    np.testing.assert_allclose(_lps(volume.affine, RPI), _lps(truth, RPI), atol=1e-5)


def test_more_oblique_stack_is_refused(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, HU, SPACING, rotation=rotation_about((1, 0, 0), 20.0))
    _refuse(read_slice_refs(paths), "oblique", "20.0°")


@pytest.mark.parametrize("enhanced", [False, True], ids=["single", "enhanced"])
def test_rescale_slope_and_intercept_are_applied(tmp_path: Path, enhanced: bool) -> None:
    hu = HU * 2  # even values, so slope 2 represents them exactly
    paths = write_ct_series(tmp_path, hu, SPACING, rescale=(2.0, -3000.0), enhanced=enhanced)
    raw = dcmread(paths[0]).pixel_array
    assert raw.max() < hu.max() / 2 + 3000  # stored values really are scaled
    assert np.array_equal(_volume(paths).array, hu.astype(np.float32))


def test_compressed_frames_decode_like_native(tmp_path: Path) -> None:
    datasets = make_ct_series(HU, SPACING, patient_position="HFP")
    for ds in datasets:
        ds.compress(RLELossless)
    paths = save_series(datasets, tmp_path)
    assert dcmread(paths[0]).file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(_volume(paths).array, HU.astype(np.float32))


# -- localizers ---------------------------------------------------------------------------


@pytest.mark.parametrize("enhanced", [False, True], ids=["single", "enhanced"])
def test_localizer_is_excluded_with_a_reason(tmp_path: Path, enhanced: bool) -> None:
    paths = write_ct_series(tmp_path, HU, SPACING, localizer=True, enhanced=enhanced, shuffle=True)
    scout = dcmread(paths[-1], stop_before_pixels=True)
    assert scout.ImageType[2] == "LOCALIZER"
    volume = _volume(paths)
    assert np.array_equal(volume.array, HU.astype(np.float32))
    assert len(volume.excluded) == 1
    assert scout.SOPInstanceUID in volume.excluded[0]
    assert "localizer" in volume.excluded[0]
    assert all(s.sop_instance_uid != scout.SOPInstanceUID for s in volume.slices)


def test_enhanced_localizer_frame_is_excluded_by_its_frame_type(tmp_path: Path) -> None:
    def scout_first_frame(ds: Dataset, index: int) -> None:
        ds.PerFrameFunctionalGroupsSequence[0].CTImageFrameTypeSequence[0].FrameType = [
            "ORIGINAL",
            "PRIMARY",
            "LOCALIZER",
            "NONE",
        ]

    paths = write_ct_series(tmp_path, HU, SPACING, enhanced=True, mutate=scout_first_frame)
    volume = _volume(paths)
    # frame 1 is the first acquired, i.e. the most superior slice of a head-first scan
    assert np.array_equal(volume.array, HU[1:].astype(np.float32))
    assert volume.excluded == (
        f"{volume.slices[0].sop_instance_uid} frame(s) 1: localizer "
        "(FrameType value 3 is LOCALIZER)",
    )


def test_only_localizers_are_refused(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, HU, SPACING, localizer=True)
    _refuse(read_slice_refs(paths[-1:]), "only localizers")


# -- reading headers ----------------------------------------------------------------------


def test_enhanced_gives_one_ref_per_frame(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, HU, SPACING, enhanced=True, shuffle=True)
    assert len(paths) == 1
    refs = read_slice_refs(paths)
    assert [r.frame for r in refs] == list(range(1, SHAPE[0] + 1))
    assert {r.path for r in refs} == {paths[0]}
    assert {r.sop_class_uid for r in refs} == {ENHANCED_CT_IMAGE_STORAGE}
    assert {r.pixel_spacing for r in refs} == {SPACING[1:]}
    assert {r.image_type for r in refs} == {("ORIGINAL", "PRIMARY", "VOLUME", "NONE")}
    assert len({r.position for r in refs}) == SHAPE[0]


def test_single_frame_refs_carry_the_header(hfs_paths: list[Path]) -> None:
    ref = read_slice_refs(hfs_paths[:1])[0]
    ds = dcmread(hfs_paths[0], stop_before_pixels=True)
    assert ref.path == hfs_paths[0]
    assert ref.sop_instance_uid == ds.SOPInstanceUID
    assert ref.frame is None
    assert ref.instance_number == 1
    assert ref.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert (ref.rows, ref.columns) == SHAPE[1:]
    assert ref.slice_thickness == SPACING[0]
    assert ref.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")


@pytest.mark.parametrize("content", [b"not dicom at all", b""], ids=["garbage", "empty"])
def test_unreadable_file_is_named(tmp_path: Path, hfs_paths: list[Path], content: bytes) -> None:
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(content)
    with pytest.raises(VolumeError, match="broken.dcm"):
        read_slice_refs([*hfs_paths[:2], bad])


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="nowhere.dcm"):
        read_slice_refs([tmp_path / "nowhere.dcm"])


def test_headers_only_then_load_refuses_short_pixel_data(tmp_path: Path) -> None:
    def truncate(ds: Dataset, index: int) -> None:
        if index == 3:
            ds.PixelData = ds.PixelData[:-64]

    paths = write_ct_series(tmp_path, HU, SPACING, mutate=truncate)
    plan = plan_volume(read_slice_refs(paths), SERIES)  # headers are fine
    uid = dcmread(paths[3], stop_before_pixels=True).SOPInstanceUID
    with pytest.raises(VolumeError, match="Pixel Data has") as info:
        load_volume(plan)
    assert uid in str(info.value)


def test_undecodable_transfer_syntax_is_named(tmp_path: Path) -> None:
    datasets = make_ct_series(HU[:3], SPACING)
    victim = datasets[1]
    victim.file_meta.TransferSyntaxUID = MPEG2MPML
    victim.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    victim["PixelData"].VR = "OB"
    paths = save_series(datasets, tmp_path)
    with pytest.raises(VolumeError) as info:
        _volume(paths)
    assert victim.SOPInstanceUID in str(info.value)
    assert str(MPEG2MPML) in str(info.value)


# -- refusals -----------------------------------------------------------------------------


def _shift(ref: SliceRef, dx: float = 0.0, dy: float = 0.0, dz: float = 0.0) -> SliceRef:
    x, y, z = ref.position
    return dataclasses.replace(ref, position=(x + dx, y + dy, z + dz))


def _by_z(refs: list[SliceRef]) -> list[SliceRef]:
    return sorted(refs, key=lambda r: -r.position[2])  # superior first, like acquisition


Mutation = Callable[[list[SliceRef]], list[SliceRef]]

REFUSALS: dict[str, tuple[Mutation, tuple[str, ...]]] = {
    "gap": (lambda refs: refs[:4] + refs[5:], ("gap after slice at z=", "2.5 to 5.0 mm")),
    "uneven spacing": (
        lambda refs: refs[:5] + [_shift(r, dz=-0.3) for r in refs[5:]],
        ("slice spacing varies from 2.5 to 2.8 mm",),
    ),
    "drifting spacing": (
        lambda refs: refs[:5] + [_shift(r, dz=-0.2 * (n + 1)) for n, r in enumerate(refs[5:])],
        ("drifts",),
    ),
    "mixed orientation": (
        lambda refs: (
            refs[:3]
            + [dataclasses.replace(refs[3], orientation=(0.9998, 0.0175, 0, -0.0175, 0.9998, 0))]
            + refs[4:]
        ),
        ("mixed orientations", "ImageOrientationPatient"),
    ),
    "inconsistent spacing": (
        lambda refs: (
            refs[:6] + [dataclasses.replace(refs[6], pixel_spacing=(0.8, 0.75))] + refs[7:]
        ),
        ("inconsistent pixel spacing", "[0.8, 0.75]"),
    ),
    "inconsistent size": (
        lambda refs: refs[:2] + [dataclasses.replace(refs[2], rows=41)] + refs[3:],
        ("inconsistent image size", "41x48"),
    ),
    "duplicate position": (
        lambda refs: [*refs, dataclasses.replace(refs[4], sop_instance_uid="9.9.9")],
        ("duplicate position", "9.9.9"),
    ),
    "missing position": (
        lambda refs: [dataclasses.replace(refs[0], position=(math.nan,) * 3), *refs[1:]],
        ("ImagePositionPatient",),
    ),
    "missing orientation": (
        lambda refs: [*refs[:-1], dataclasses.replace(refs[-1], orientation=(math.nan,) * 6)],
        ("ImageOrientationPatient",),
    ),
    "missing pixel spacing": (
        lambda refs: [*refs[:-1], dataclasses.replace(refs[-1], pixel_spacing=(math.nan,) * 2)],
        ("PixelSpacing",),
    ),
    "tilt": (
        lambda refs: [
            _shift(r, dy=math.tan(math.radians(5)) * 2.5 * n) for n, r in enumerate(refs)
        ],
        ("gantry tilt", "rejected rather than resampled"),
    ),
    "misaligned slice": (
        lambda refs: refs[:4] + [_shift(refs[4], dx=1.0)] + refs[5:],
        ("not stacked in line",),
    ),
    "single slice": (lambda refs: refs[:1], ("1 slice(s)", "at least 2")),
    "no instances": (lambda refs: [], ("no instances",)),
    "not orthogonal": (
        lambda refs: [dataclasses.replace(r, orientation=(1, 0, 0, 0.2, 0.98, 0)) for r in refs],
        ("not two orthogonal unit vectors",),
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_broken_series_is_refused_naming_the_problem(hfs_refs: list[SliceRef], case: str) -> None:
    mutate, words = REFUSALS[case]
    refs = _by_z(hfs_refs)
    plan_volume(refs, SERIES)  # the untouched series is fine
    _refuse(mutate(refs), *words)


def test_refusals_name_the_culprit_instance(hfs_refs: list[SliceRef]) -> None:
    refs = _by_z(hfs_refs)
    broken = dataclasses.replace(refs[5], pixel_spacing=(0.9, 0.9))
    message = _refuse([*refs[:5], broken, *refs[6:]], "pixel spacing")
    assert broken.sop_instance_uid in message


def test_skipped_slice_file_is_refused_with_the_example_message(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, HU, SPACING, skip=(4,), shuffle=True, series_uid=SERIES)
    message = _refuse(read_slice_refs(paths), "refusing to build a volume")
    z_before = _lps(TRUTH, (5, 0, 0))[2]  # ascending along +z: the slice below the gap
    assert f"slice spacing varies from 2.5 to 5.0 mm (gap after slice at z={z_before}" in message


def test_gantry_tilt_tag_is_refused_on_reading(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, HU, SPACING, tilt_deg=12.0, series_uid=SERIES)
    with pytest.raises(VolumeError, match="GantryDetectorTilt 12°") as info:
        read_slice_refs(paths)
    assert SERIES in str(info.value)


@pytest.mark.parametrize("enhanced", [False, True], ids=["single", "enhanced"])
def test_gantry_tilt_tag_alone_is_refused(tmp_path: Path, enhanced: bool) -> None:
    """Some scanners write axial geometry for tilted images: the tag is all there is."""

    def tilt_tag(ds: Dataset, index: int) -> None:
        if enhanced:
            ds.SharedFunctionalGroupsSequence[0].CTAcquisitionDetailsSequence[
                0
            ].GantryDetectorTilt = -7.5
        else:
            ds.GantryDetectorTilt = -7.5

    paths = write_ct_series(tmp_path, HU, SPACING, enhanced=enhanced, mutate=tilt_tag)
    with pytest.raises(VolumeError, match="GantryDetectorTilt -7.5°"):
        read_slice_refs(paths)


def test_sheared_positions_without_tag_are_refused_as_tilt(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, HU, SPACING, tilt_deg=3.0, write_tilt_tag=False)
    _refuse(read_slice_refs(paths), "gantry tilt", "3.00°")


@pytest.mark.parametrize("enhanced", [False, True], ids=["single", "enhanced"])
def test_mixed_orientation_file_is_refused(tmp_path: Path, enhanced: bool) -> None:
    paths = write_ct_series(tmp_path, HU, SPACING, mixed_orientation=True, enhanced=enhanced)
    _refuse(read_slice_refs(paths), "mixed orientations")


@pytest.mark.parametrize("enhanced", [False, True], ids=["single", "enhanced"])
def test_missing_position_in_file_is_refused(tmp_path: Path, enhanced: bool) -> None:
    def drop_position(ds: Dataset, index: int) -> None:
        if enhanced:
            del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
        elif index == 2:
            del ds.ImagePositionPatient

    paths = write_ct_series(tmp_path, HU, SPACING, enhanced=enhanced, mutate=drop_position)
    refs = read_slice_refs(paths)  # tolerant when reading...
    message = _refuse(refs, "no valid ImagePositionPatient")  # ...strict when building
    assert ("frame 3" in message) == enhanced


def test_min_slices(hfs_refs: list[SliceRef]) -> None:
    with pytest.raises(VolumeError, match="at least 11"):
        plan_volume(hfs_refs, SERIES, min_slices=11)
    plan = plan_volume(hfs_refs[:1], SERIES, min_slices=1)
    volume = load_volume(plan)
    assert volume.array.shape == (1, *SHAPE[1:])
    assert plan.slice_spacing == SPACING[0]  # from SliceThickness
    with pytest.raises(ValueError, match="min_slices"):
        plan_volume(hfs_refs, SERIES, min_slices=0)


# -- memory and validity ------------------------------------------------------------------


@pytest.mark.parametrize("enhanced", [False, True], ids=["single", "enhanced"])
def test_load_volume_needs_little_more_than_the_volume(tmp_path: Path, enhanced: bool) -> None:
    hu = np.zeros((100, 256, 256))
    hu[10:20, 30:40, 200:210] = 1000.0
    paths = write_ct_series(
        tmp_path, hu, (1.0, 0.7, 0.7), patient_position="FFP", enhanced=enhanced
    )
    plan = plan_volume(read_slice_refs(paths), SERIES)
    tracemalloc.start()
    try:
        volume = load_volume(plan)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert volume.array.nbytes == 100 * 256 * 256 * 4
    assert peak < 3 * volume.array.nbytes, f"peak {peak / volume.array.nbytes:.2f}x the volume"
    assert volume.array[15, 35, 205] == 1000.0 and volume.array[15, 35, 50] == 0.0


@pytest.mark.parametrize("enhanced", [False, True], ids=["single", "enhanced"])
def test_generated_series_passes_dciodvfy(tmp_path: Path, enhanced: bool) -> None:
    paths = write_ct_series(tmp_path, HU[:3], SPACING, enhanced=enhanced, localizer=True)
    for path in (paths[0], paths[-1]):
        errors, _warnings = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
