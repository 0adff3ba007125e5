"""CT volumes: assemble the instances of a series into one HU volume in patient space (LPS).

* :func:`read_slice_refs` reads headers only and expands multi-frame (Enhanced CT) files
  into one :class:`SliceRef` per frame. Geometry comes from the Image Plane module, or for
  Enhanced CT from the Shared/Per-Frame Functional Groups (Plane Position, Plane
  Orientation, Pixel Measures, CT Image Frame Type). Missing or malformed geometry is read
  as NaN so that the planner, not the reader, names the problem (and a localizer without
  geometry can still be dropped).
* :func:`plan_volume` sorts by position along the slice normal (``ImagePositionPatient ·
  normal``, never InstanceNumber or file order), drops localizers with a recorded reason,
  and raises :class:`~pacsnode.errors.VolumeError` naming the series and the problem for
  anything it cannot build.
* :func:`load_volume` decodes one file at a time into one preallocated float32 array, in
  the **canonical orientation**: ``array[k, j, i]`` with i toward patient left (+x), j
  toward posterior (+y), k from superior to inferior (-z), whatever the acquisition
  (head/feet first, supine/prone, instance order). ``slices[k]`` is the source frame of
  ``array[k]`` for axial series; a coronal (sagittal) series is stacked along j (i)
  instead, and ``Volume.slices`` is then in the order of that axis.

The canonical orientation is reached by axis permutations and flips of the decoded
frames only (no interpolation): each of the three source axes (slice, row, column) is
assigned to the patient axis it is closest to, and reversed when it points the other way.
Because only flips and permutations happen, the acquisition must be near a patient axis:
row, column and normal directions each within :data:`MAX_OBLIQUE_DEG` of one. The affine
is the exact geometry of the canonical array — its columns are the (flipped, permuted)
row, column and slice step vectors from the headers, so a slightly oblique stack gets a
non-diagonal affine rather than a resampled array: ``affine @ (i, j, k, 1)`` is the LPS
centre of voxel ``array[k, j, i]``. The slice step is the mean displacement between the
first and last slice, so the affine is exact at both ends.

Localizers are frames whose ImageType (or, in Enhanced CT, per-frame FrameType) value 3
is ``LOCALIZER``; they are dropped and recorded in ``excluded``, one reason per SOP
instance.

Refusals, each a :class:`~pacsnode.errors.VolumeError` whose message names the series
and the culprit:

* missing or malformed ImagePositionPatient, ImageOrientationPatient or PixelSpacing;
* mixed orientations (any direction cosine differs by more than :data:`IOP_TOLERANCE`),
  pixel spacing differing by more than :data:`PIXEL_SPACING_RTOL` (relative), or
  different Rows/Columns;
* oblique stacks (more than :data:`MAX_OBLIQUE_DEG` from a patient axis);
* two frames within :data:`DUPLICATE_TOLERANCE_MM` along the normal;
* fewer than ``min_slices`` slices left after the localizers;
* more than :data:`MAX_VOXELS` voxels claimed by the headers (checked before allocating);
* uneven slices: a spacing above :data:`GAP_FACTOR` × the median (a gap, e.g. a missing
  slice), spacings that vary by more than :data:`SPACING_VARIATION` × the median, or a
  slice further than that fraction of a spacing from the uniform grid the affine assumes;
* gantry tilt: a nonzero GantryDetectorTilt (checked on reading the headers, and again on
  loading), or positions displaced more than :data:`MAX_TILT_DEG` off the slice normal, or
  slices offset in-plane from the line through the first and last by more than
  :data:`ALIGNMENT_TOLERANCE` of a pixel. **Tilted acquisitions are rejected, not
  resampled**: resampling would invent voxels the model never saw in training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import iter_pixels

from pacsnode.errors import VolumeError

IOP_TOLERANCE = 1e-3
"""Largest difference of any ImageOrientationPatient direction cosine within one series."""

ORTHONORMAL_TOLERANCE = 1e-2
"""How far the two IOP vectors may be from unit length / orthogonal before we refuse them."""

PIXEL_SPACING_RTOL = 1e-3
"""Relative difference of PixelSpacing tolerated between the slices of one series."""

MAX_OBLIQUE_DEG = 10.0
"""Row, column and normal directions must each be this close to a patient axis."""

DUPLICATE_TOLERANCE_MM = 0.01
"""Two frames closer than this along the normal are duplicates."""

GAP_FACTOR = 1.5
"""A slice spacing above this multiple of the median spacing is a gap."""

SPACING_VARIATION = 0.10
"""Spacings may vary by this fraction of the median; slices may sit this fraction of a
spacing off the uniform grid."""

MAX_TILT_DEG = 0.5
"""Largest angle between the slice normal and the line through the first and last slice."""

ALIGNMENT_TOLERANCE = 0.25
"""Largest in-plane offset of a slice from the stack's line, as a fraction of a pixel."""

GANTRY_TILT_TOLERANCE_DEG = 0.01
"""|GantryDetectorTilt| above this is a tilted acquisition."""

MAX_VOXELS = 1 << 30
"""Largest volume decoded (4 GiB as float32): a header claiming more is refused before the
array is allocated, whatever the files really hold."""

LOCALIZER_TYPES = frozenset({"LOCALIZER"})
"""ImageType/FrameType value 3 that marks a scout/localizer."""

# canonical array axis t (k, j, i) -> (patient axis, direction): k runs toward -z, j +y, i +x
_CANONICAL = ((2, -1.0), (1, 1.0), (0, 1.0))
_AXIS_NAMES = "xyz"
_FRAME_TYPE_SEQUENCES = ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence")


@dataclass(frozen=True)
class SliceRef:
    """One 2D frame of a series, from its header (no pixels)."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    frame: int | None  # 1-based frame number in a multi-frame instance; None for single-frame
    instance_number: int | None
    position: tuple[float, float, float]  # ImagePositionPatient, mm (LPS)
    orientation: tuple[float, float, float, float, float, float]  # ImageOrientationPatient
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    rows: int
    columns: int
    slice_thickness: float | None
    image_type: tuple[str, ...]


@dataclass(frozen=True)
class VolumePlan:
    """A validated, sorted series ready to decode; ``excluded`` says what was dropped and why."""

    series_uid: str
    slices: tuple[SliceRef, ...]  # sorted by position along the slice normal, ascending
    normal: tuple[float, float, float]
    slice_spacing: float  # mm between slice centres
    excluded: tuple[str, ...] = ()


@dataclass
class Volume:
    """HU voxels in canonical orientation with the affine that maps them to patient space."""

    array: np.ndarray  # float32, shape (k, j, i), Hounsfield units
    affine: np.ndarray  # 4x4: (x, y, z, 1) LPS mm = affine @ (i, j, k, 1)
    spacing: tuple[float, float, float]  # (k, j, i) mm
    slices: tuple[SliceRef, ...]  # slices[k] is the source of array[k]
    series_uid: str
    excluded: tuple[str, ...] = field(default=())
    perm: tuple[int, int, int] = (0, 1, 2)
    """Canonical axis t (k, j, i) comes from source axis ``perm[t]`` (slice, row, column)."""
    flip: tuple[bool, bool, bool] = (False, False, False)
    """Canonical axis t runs against its source axis."""

    def to_source(self, canonical: np.ndarray) -> tuple[np.ndarray, tuple[SliceRef, ...]]:
        """A view of a canonical-shaped array as source frames: ``frames[m]`` is ``refs[m]``.

        ``frames[m]`` has the source's (Rows, Columns) in the source's own row and column
        order, so a mask computed on the volume lands on its source slice pixel for pixel
        (what a DICOM SEG referencing the source needs).
        """
        if canonical.shape != self.array.shape:
            raise ValueError(f"shape {canonical.shape} is not the volume's {self.array.shape}")
        flipped = canonical[tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)]
        frames = flipped.transpose(tuple(int(a) for a in np.argsort(self.perm)))
        slice_axis = self.perm.index(0)
        refs = self.slices[::-1] if self.flip[slice_axis] else self.slices
        return frames, tuple(refs)


# ------------------------------------------------------------------------ reading headers


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """``value`` as ``n`` finite floats, or None when absent or malformed."""
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value) if n > 1 else (float(value),)
    except (TypeError, ValueError):
        return None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        return None
    return values


def _vector2(value: Any) -> tuple[float, float]:
    got = _floats(value, 2) or (math.nan,) * 2
    return got[0], got[1]


def _vector3(value: Any) -> tuple[float, float, float]:
    got = _floats(value, 3) or (math.nan,) * 3
    return got[0], got[1], got[2]


def _vector6(value: Any) -> tuple[float, float, float, float, float, float]:
    got = _floats(value, 6) or (math.nan,) * 6
    return got[0], got[1], got[2], got[3], got[4], got[5]


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value.strip().upper(),) if value else ()
    return tuple(str(v).strip().upper() for v in value)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def _float_or_none(value: Any) -> float | None:
    got = _floats(value, 1) if value is not None and value != "" else None
    return got[0] if got else None


def _is_localizer(image_type: Sequence[str]) -> bool:
    return len(image_type) > 2 and image_type[2] in LOCALIZER_TYPES


def _item(groups: Sequence[Dataset | None], keyword: str) -> Dataset | None:
    """First item of the functional-group macro ``keyword``: per-frame first, then shared."""
    for group in groups:
        if group is not None:
            seq = group.get(keyword)
            if seq:
                item: Dataset = seq[0]
                return item
    return None


def _gantry_tilt(ds: Dataset, groups: Sequence[Dataset | None] = ()) -> float | None:
    tilt = _float_or_none(ds.get("GantryDetectorTilt"))
    if tilt is None:
        details = _item(groups, "CTAcquisitionDetailsSequence")
        if details is not None:
            tilt = _float_or_none(details.get("GantryDetectorTilt"))
    return tilt


def _check_gantry_tilt(tilt: float | None, ds: Dataset, path: Path) -> None:
    if tilt is not None and abs(tilt) > GANTRY_TILT_TOLERANCE_DEG:
        raise VolumeError(
            f"series {ds.get('SeriesInstanceUID', '<unknown>')}: instance "
            f"{ds.get('SOPInstanceUID', '<unknown>')} ({path}) has GantryDetectorTilt "
            f"{tilt:g}°; tilted acquisitions are rejected rather than resampled"
        )


def _ref(
    path: Path,
    ds: Dataset,
    frame: int | None,
    *,
    position: Any,
    orientation: Any,
    measures: Dataset,
    image_type: tuple[str, ...],
) -> SliceRef:
    return SliceRef(
        path=path,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        frame=frame,
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        position=_vector3(position),
        orientation=_vector6(orientation),
        pixel_spacing=_vector2(measures.get("PixelSpacing")),
        rows=int(ds.Rows),  # checked by _refs_of
        columns=int(ds.Columns),
        slice_thickness=_float_or_none(measures.get("SliceThickness")),
        image_type=image_type,
    )


def _refs_of(path: Path, ds: Dataset) -> list[SliceRef]:
    """The SliceRefs of one parsed header: one for a single frame, one per frame otherwise."""
    if not _int_or_none(ds.get("Rows")) or not _int_or_none(ds.get("Columns")):
        raise VolumeError(f"file {path}: no valid Rows/Columns; not an image")
    top_type = _strings(ds.get("ImageType"))
    frames = _int_or_none(ds.get("NumberOfFrames")) or 1
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    if per_frame is None and shared_seq is None:
        if frames != 1:
            raise VolumeError(
                f"file {path}: {frames} frames without functional groups; only single-frame "
                "or Enhanced (functional-group) multi-frame instances can be stacked"
            )
        if not _is_localizer(top_type):
            _check_gantry_tilt(_gantry_tilt(ds), ds, path)
        return [
            _ref(
                path,
                ds,
                None,
                position=ds.get("ImagePositionPatient"),
                orientation=ds.get("ImageOrientationPatient"),
                measures=ds,
                image_type=top_type,
            )
        ]
    shared = shared_seq[0] if shared_seq else None
    if per_frame is not None and len(per_frame) != frames:
        raise VolumeError(
            f"file {path}: NumberOfFrames is {frames} but PerFrameFunctionalGroupsSequence "
            f"has {len(per_frame)} items"
        )
    refs = []
    for number in range(1, frames + 1):
        groups = (per_frame[number - 1] if per_frame is not None else None, shared)
        frame_type = top_type
        for keyword in _FRAME_TYPE_SEQUENCES:
            item = _item(groups, keyword)
            if item is not None and "FrameType" in item:
                frame_type = _strings(item.FrameType)
                break
        if not _is_localizer(frame_type):
            _check_gantry_tilt(_gantry_tilt(ds, groups), ds, path)
        plane_position = _item(groups, "PlanePositionSequence")
        plane_orientation = _item(groups, "PlaneOrientationSequence")
        measures = _item(groups, "PixelMeasuresSequence") or Dataset()
        refs.append(
            _ref(
                path,
                ds,
                number,
                position=plane_position.get("ImagePositionPatient") if plane_position else None,
                orientation=(
                    plane_orientation.get("ImageOrientationPatient") if plane_orientation else None
                ),
                measures=measures,
                image_type=frame_type,
            )
        )
    return refs


def read_slice_refs(paths: Sequence[Path]) -> list[SliceRef]:
    """Read the headers of ``paths`` (no pixel data) into SliceRefs, in the given order.

    Raises :class:`VolumeError` naming the file when one cannot be read as DICOM, is not an
    image, or (unless it is a localizer) has a nonzero GantryDetectorTilt.
    """
    refs: list[SliceRef] = []
    for raw in paths:
        path = Path(raw)
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError) as exc:
            raise VolumeError(f"file {path}: unreadable DICOM header: {exc}") from exc
        refs.extend(_refs_of(path, ds))
    return refs


# ------------------------------------------------------------------------ planning


def _name(ref: SliceRef) -> str:
    frame = f" frame {ref.frame}" if ref.frame is not None else ""
    return f"instance {ref.sop_instance_uid}{frame}"


def _mm(value: float) -> str:
    return f"{round(float(value), 3) + 0.0}"


def _directions(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Orthonormal (row, column, normal) from an IOP, or None when it is not near one."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    if (
        abs(np.linalg.norm(row) - 1.0) > ORTHONORMAL_TOLERANCE
        or abs(np.linalg.norm(col) - 1.0) > ORTHONORMAL_TOLERANCE
        or abs(float(row @ col)) > ORTHONORMAL_TOLERANCE
    ):
        return None
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    return row, col, np.cross(row, col)


def _split_localizers(refs: Sequence[SliceRef]) -> tuple[list[SliceRef], tuple[str, ...]]:
    """Non-localizer refs and one reason per SOP instance that had localizer frames."""
    kept: list[SliceRef] = []
    dropped: dict[str, list[SliceRef]] = {}
    for ref in refs:
        if _is_localizer(ref.image_type):
            dropped.setdefault(ref.sop_instance_uid, []).append(ref)
        else:
            kept.append(ref)
    reasons = []
    for uid, frames in dropped.items():
        if frames[0].frame is None:
            reasons.append(f"{uid}: localizer (ImageType value 3 is LOCALIZER)")
        else:
            numbers = ", ".join(str(r.frame) for r in frames)
            reasons.append(f"{uid} frame(s) {numbers}: localizer (FrameType value 3 is LOCALIZER)")
    return kept, tuple(reasons)


def _check_present(refs: Sequence[SliceRef], where: str) -> None:
    for ref in refs:
        for values, attribute in (
            (ref.position, "ImagePositionPatient"),
            (ref.orientation, "ImageOrientationPatient"),
            (ref.pixel_spacing, "PixelSpacing"),
        ):
            if not all(math.isfinite(v) for v in values):
                raise VolumeError(
                    f"{where}: {_name(ref)} has no valid {attribute}; refusing to build a volume"
                )
        if min(ref.pixel_spacing) <= 0:
            raise VolumeError(
                f"{where}: {_name(ref)} has PixelSpacing {list(ref.pixel_spacing)}; "
                "refusing to build a volume"
            )


def _check_consistent(refs: Sequence[SliceRef], where: str) -> None:
    first = refs[0]
    spacing0 = np.asarray(first.pixel_spacing)
    orientation0 = np.asarray(first.orientation)
    for ref in refs[1:]:
        if (ref.rows, ref.columns) != (first.rows, first.columns):
            raise VolumeError(
                f"{where}: inconsistent image size: {_name(ref)} is {ref.rows}x{ref.columns} "
                f"but {_name(first)} is {first.rows}x{first.columns}; refusing to build a volume"
            )
        if np.any(np.abs(np.asarray(ref.pixel_spacing) - spacing0) > PIXEL_SPACING_RTOL * spacing0):
            raise VolumeError(
                f"{where}: inconsistent pixel spacing: {_name(ref)} has "
                f"{list(ref.pixel_spacing)} mm but {_name(first)} has "
                f"{list(first.pixel_spacing)} mm; refusing to build a volume"
            )
        if np.max(np.abs(np.asarray(ref.orientation) - orientation0)) > IOP_TOLERANCE:
            raise VolumeError(
                f"{where}: mixed orientations: {_name(ref)} has ImageOrientationPatient "
                f"{list(ref.orientation)} but {_name(first)} has {list(first.orientation)}; "
                "refusing to build a volume"
            )


def _check_size(count: int, rows: int, columns: int, where: str) -> None:
    voxels = count * rows * columns
    if voxels > MAX_VOXELS:
        raise VolumeError(
            f"{where}: {count} slice(s) of {rows}x{columns} are {voxels} voxels "
            f"({voxels * 4 / 2**30:.1f} GiB as float32), above the limit of {MAX_VOXELS}; "
            "refusing to decode"
        )


def _dominant_axis(vector: np.ndarray) -> int:
    return int(np.argmax(np.abs(vector)))


def _check_not_oblique(directions: Iterable[np.ndarray], where: str) -> None:
    limit = math.cos(math.radians(MAX_OBLIQUE_DEG))
    for name, vector in zip(("row", "column", "slice normal"), directions, strict=True):
        cosine = float(np.max(np.abs(vector)))
        if cosine < limit:
            angle = math.degrees(math.acos(min(cosine, 1.0)))
            raise VolumeError(
                f"{where}: oblique acquisition: the {name} direction is {angle:.1f}° from the "
                f"nearest patient axis (at most {MAX_OBLIQUE_DEG:g}° is supported, as only "
                "flips and permutations are applied); refusing to build a volume"
            )


def _at(ref: SliceRef, axis: int) -> str:
    return f"{_AXIS_NAMES[axis]}={_mm(ref.position[axis])}"


def _check_spacing(
    ordered: Sequence[SliceRef], distances: np.ndarray, axis: int, where: str
) -> float:
    """Validate the spacing along the normal; return the mean slice spacing."""
    gaps = np.diff(distances)
    duplicate = int(np.argmin(gaps))
    if gaps[duplicate] < DUPLICATE_TOLERANCE_MM:
        a, b = ordered[duplicate], ordered[duplicate + 1]
        raise VolumeError(
            f"{where}: duplicate position: {_name(a)} and {_name(b)} are both at "
            f"{_at(a, axis)} ({_mm(gaps[duplicate])} mm apart along the normal); "
            "refusing to build a volume"
        )
    median = float(np.median(gaps))
    lo, hi = float(gaps.min()), float(gaps.max())
    widest = int(np.argmax(gaps))
    if hi > GAP_FACTOR * median:
        raise VolumeError(
            f"{where}: slice spacing varies from {_mm(lo)} to {_mm(hi)} mm (gap after slice "
            f"at {_at(ordered[widest], axis)}, next at {_at(ordered[widest + 1], axis)}); "
            "refusing to build a volume"
        )
    if hi - lo > SPACING_VARIATION * median:
        raise VolumeError(
            f"{where}: slice spacing varies from {_mm(lo)} to {_mm(hi)} mm (more than "
            f"{SPACING_VARIATION:.0%} of the median {_mm(median)} mm); refusing to build a volume"
        )
    step = float(distances[-1] - distances[0]) / (len(distances) - 1)
    off_grid = np.abs(distances - (distances[0] + step * np.arange(len(distances))))
    worst = int(np.argmax(off_grid))
    if off_grid[worst] > SPACING_VARIATION * step:
        raise VolumeError(
            f"{where}: slice spacing drifts: the slice at {_at(ordered[worst], axis)} is "
            f"{_mm(off_grid[worst])} mm off a uniform {_mm(step)} mm grid; "
            "refusing to build a volume"
        )
    return step


def _check_stacked(
    ordered: Sequence[SliceRef], positions: np.ndarray, normal: np.ndarray, where: str
) -> None:
    """Refuse gantry tilt (positions off the normal) and in-plane misaligned slices."""
    span = positions[-1] - positions[0]
    along = float(span @ normal)
    across = float(np.linalg.norm(span - along * normal))
    angle = math.degrees(math.atan2(across, abs(along)))
    if angle > MAX_TILT_DEG:
        raise VolumeError(
            f"{where}: gantry tilt: slice positions move {angle:.2f}° off the slice normal "
            f"(at most {MAX_TILT_DEG:g}°); tilted acquisitions are rejected rather than resampled"
        )
    fraction = (positions - positions[0]) @ normal / along
    residual = positions - (positions[0] + fraction[:, None] * span[None, :])
    residual -= (residual @ normal)[:, None] * normal[None, :]
    offsets = np.linalg.norm(residual, axis=1)
    worst = int(np.argmax(offsets))
    limit = ALIGNMENT_TOLERANCE * min(ordered[0].pixel_spacing)
    if offsets[worst] > limit:
        raise VolumeError(
            f"{where}: slices are not stacked in line: {_name(ordered[worst])} is offset "
            f"{_mm(offsets[worst])} mm in-plane from the line through the first and last slice "
            f"(at most {_mm(limit)} mm); refusing to build a volume"
        )


def plan_volume(refs: Sequence[SliceRef], series_uid: str, *, min_slices: int = 2) -> VolumePlan:
    """Validate and sort the frames of one series; see the module docstring for the checks.

    Pure: reads no files. ``min_slices`` counts frames left after dropping localizers.
    """
    if min_slices < 1:
        raise ValueError(f"min_slices: {min_slices} is not at least 1")
    where = f"series {series_uid}"
    if not refs:
        raise VolumeError(f"{where}: no instances; refusing to build a volume")
    kept, excluded = _split_localizers(refs)
    if not kept:
        raise VolumeError(
            f"{where}: only localizers ({len(refs)} frame(s)); nothing left to build a volume from"
        )
    if len(kept) < min_slices:
        raise VolumeError(
            f"{where}: {len(kept)} slice(s) after excluding {len(refs) - len(kept)} localizer "
            f"frame(s); at least {min_slices} needed to build a volume"
        )
    _check_present(kept, where)
    _check_consistent(kept, where)
    _check_size(len(kept), kept[0].rows, kept[0].columns, where)
    directions = _directions(kept[0].orientation)
    if directions is None:
        raise VolumeError(
            f"{where}: ImageOrientationPatient {list(kept[0].orientation)} of "
            f"{_name(kept[0])} is not two orthogonal unit vectors; refusing to build a volume"
        )
    _check_not_oblique(directions, where)
    normal = directions[2]
    positions = np.array([ref.position for ref in kept], dtype=np.float64)
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    ordered = [kept[int(i)] for i in order]
    positions, distances = positions[order], distances[order]
    axis = _dominant_axis(normal)
    if len(ordered) == 1:
        thickness = ordered[0].slice_thickness
        spacing = thickness if thickness is not None and thickness > 0 else 1.0
    else:
        spacing = _check_spacing(ordered, distances, axis, where)
        _check_stacked(ordered, positions, normal, where)
    return VolumePlan(
        series_uid=series_uid,
        slices=tuple(ordered),
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        slice_spacing=spacing,
        excluded=excluded,
    )


# ------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class _Layout:
    """How the source stack (slice, row, column) maps onto the canonical array."""

    perm: tuple[int, int, int]  # canonical axis t (k, j, i) comes from source axis perm[t]
    flip: tuple[bool, bool, bool]  # canonical axis t runs against its source axis
    shape: tuple[int, int, int]  # canonical (k, j, i)
    affine: np.ndarray
    spacing: tuple[float, float, float]  # canonical (k, j, i), mm


def _layout(plan: VolumePlan) -> _Layout:
    first, last = plan.slices[0], plan.slices[-1]
    directions = _directions(first.orientation)
    if directions is None:
        raise VolumeError(f"series {plan.series_uid}: invalid ImageOrientationPatient")
    row, col, normal = directions
    count = len(plan.slices)
    if count > 1:
        step = (np.asarray(last.position) - np.asarray(first.position)) / (count - 1)
    else:
        step = normal * plan.slice_spacing
    # source axes: 0 = slice (sorted), 1 = image row index (along the column direction),
    # 2 = image column index (along the row direction)
    vectors = (step, col * first.pixel_spacing[0], row * first.pixel_spacing[1])
    axes = (_dominant_axis(normal), _dominant_axis(col), _dominant_axis(row))
    sizes = (count, first.rows, first.columns)
    lengths = (plan.slice_spacing, first.pixel_spacing[0], first.pixel_spacing[1])
    k_axis, j_axis, i_axis = (axes.index(patient_axis) for patient_axis, _ in _CANONICAL)
    perm = (k_axis, j_axis, i_axis)
    k_flip, j_flip, i_flip = (
        bool(vectors[perm[t]][patient_axis] * sign < 0)
        for t, (patient_axis, sign) in enumerate(_CANONICAL)
    )
    flip = (k_flip, j_flip, i_flip)
    affine = np.eye(4)
    origin = np.asarray(first.position, dtype=np.float64).copy()
    for t in range(3):
        source = perm[t]
        vector = vectors[source]
        if flip[t]:
            origin += vector * (sizes[source] - 1)
            vector = -vector
        affine[:3, 2 - t] = vector
    affine[:3, 3] = origin
    return _Layout(
        perm=perm,
        flip=flip,
        shape=(sizes[k_axis], sizes[j_axis], sizes[i_axis]),
        affine=affine,
        spacing=(float(lengths[k_axis]), float(lengths[j_axis]), float(lengths[i_axis])),
    )


def _rescale(groups: Sequence[Dataset | None], ds: Dataset) -> tuple[float, float]:
    item = _item(groups, "PixelValueTransformationSequence")
    source = item if item is not None else ds
    slope = _float_or_none(source.get("RescaleSlope"))
    intercept = _float_or_none(source.get("RescaleIntercept"))
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def _check_pixel_module(ds: Dataset, ref: SliceRef, frames: int, where: str) -> None:
    """Refuse a file that changed since planning or whose native Pixel Data is the wrong size."""
    name = f"{where}: instance {ref.sop_instance_uid} ({ref.path})"
    if str(ds.get("SOPInstanceUID", "")) != ref.sop_instance_uid:
        raise VolumeError(f"{name}: the file now holds {ds.get('SOPInstanceUID')}")
    if (_int_or_none(ds.get("Rows")), _int_or_none(ds.get("Columns"))) != (ref.rows, ref.columns):
        raise VolumeError(f"{name}: Rows/Columns differ from the planned {ref.rows}x{ref.columns}")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise VolumeError(f"{name}: SamplesPerPixel {ds.SamplesPerPixel}; CT must be greyscale")
    if "PixelData" not in ds:
        raise VolumeError(f"{name}: no Pixel Data")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or not syntax.is_compressed:
        bits = _int_or_none(ds.get("BitsAllocated")) or 0
        expected = ref.rows * ref.columns * frames * bits // 8
        actual = len(ds.PixelData)
        if actual not in (expected, expected + expected % 2):
            raise VolumeError(
                f"{name}: Pixel Data has {actual} bytes; {frames} frame(s) of "
                f"{ref.rows}x{ref.columns} at {bits} bits need {expected}"
            )


def _decode_error(exc: Exception, ds: Dataset, ref: SliceRef, where: str) -> VolumeError:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    label = f"{syntax.name} ({syntax})" if syntax is not None else "unknown transfer syntax"
    return VolumeError(
        f"{where}: cannot decode instance {ref.sop_instance_uid} ({ref.path}), transfer syntax "
        f"{label}: {exc}"
    )


_DECODE_ERRORS = (
    AttributeError,
    KeyError,
    NotImplementedError,
    RuntimeError,
    ValueError,
    TypeError,
    OSError,
    EOFError,
)


def _store(target: np.ndarray, frame: np.ndarray, slope: float, intercept: float) -> None:
    target[...] = frame
    if slope != 1.0:
        target *= np.float32(slope)
    if intercept != 0.0:
        target += np.float32(intercept)


def _load_file(
    path: Path, members: Sequence[tuple[int, SliceRef]], stack: np.ndarray, where: str
) -> None:
    """Decode the frames of one file into ``stack[m]`` (source order: slice, row, column)."""
    first = members[0][1]
    try:
        ds = dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError) as exc:
        raise VolumeError(f"{where}: file {path}: unreadable: {exc}") from exc
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    multi = first.frame is not None
    frames = (_int_or_none(ds.get("NumberOfFrames")) or 1) if multi else 1
    _check_pixel_module(ds, first, frames, where)
    shape = (first.rows, first.columns)
    if not multi:
        _check_gantry_tilt(_gantry_tilt(ds), ds, path)
        try:
            pixels = ds.pixel_array
        except _DECODE_ERRORS as exc:
            raise _decode_error(exc, ds, first, where) from exc
        if pixels.shape != shape:
            raise VolumeError(
                f"{where}: instance {first.sop_instance_uid} ({path}) decoded to shape "
                f"{pixels.shape}, expected {shape}"
            )
        _store(stack[members[0][0]], pixels, *_rescale((), ds))
        return
    wanted: list[tuple[int, int, SliceRef]] = []  # (frame index, m, ref), in file order
    for m, ref in members:
        if ref.frame is None or not 1 <= ref.frame <= frames:
            raise VolumeError(f"{where}: {_name(ref)} ({path}) is not one of its {frames} frames")
        wanted.append((ref.frame - 1, m, ref))
    wanted.sort(key=lambda member: member[0])
    indices = [index for index, _, _ in wanted]
    try:
        for (index, m, ref), pixels in zip(wanted, iter_pixels(ds, indices=indices), strict=True):
            groups = (per_frame[index] if per_frame is not None else None, shared)
            _check_gantry_tilt(_gantry_tilt(ds, groups), ds, path)
            if pixels.shape != shape:
                raise VolumeError(
                    f"{where}: {_name(ref)} ({path}) decoded to shape {pixels.shape}, "
                    f"expected {shape}"
                )
            _store(stack[m], pixels, *_rescale(groups, ds))
    except _DECODE_ERRORS as exc:
        raise _decode_error(exc, ds, first, where) from exc


def load_volume(plan: VolumePlan) -> Volume:
    """Decode ``plan`` into a float32 HU array in canonical orientation, one file at a time.

    The output is allocated once; each frame is written through a flipped/transposed view
    of it, so peak memory is the volume plus one file's pixels.
    """
    where = f"series {plan.series_uid}"
    layout = _layout(plan)
    _check_size(len(plan.slices), plan.slices[0].rows, plan.slices[0].columns, where)
    array = np.empty(layout.shape, dtype=np.float32)
    flipped = array[tuple(slice(None, None, -1) if f else slice(None) for f in layout.flip)]
    stack = flipped.transpose(tuple(int(a) for a in np.argsort(layout.perm)))
    by_file: dict[Path, list[tuple[int, SliceRef]]] = {}
    for m, ref in enumerate(plan.slices):
        by_file.setdefault(ref.path, []).append((m, ref))
    for path, members in by_file.items():
        _load_file(path, members, stack, where)
    slice_axis = layout.perm.index(0)
    slices = plan.slices[::-1] if layout.flip[slice_axis] else plan.slices
    return Volume(
        array=array,
        affine=layout.affine,
        spacing=layout.spacing,
        slices=tuple(slices),
        series_uid=plan.series_uid,
        excluded=plan.excluded,
        perm=layout.perm,
        flip=layout.flip,
    )
