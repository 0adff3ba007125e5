"""CT volumes: assemble the instances of a series into one HU volume in patient space (LPS).

CONTRACT (filled in by the volumes work; the dataclasses and signatures are fixed):

* :func:`read_slice_refs` reads headers only and expands multi-frame (Enhanced CT) files
  into one :class:`SliceRef` per frame.
* :func:`plan_volume` sorts by position along the slice normal, drops localizers with a
  recorded reason, and raises :class:`~pacsnode.errors.VolumeError` naming the series and
  the problem for anything it cannot build.
* :func:`load_volume` decodes lazily into one preallocated array, in the **canonical
  orientation**: ``array[k, j, i]`` with i toward patient left (+x), j toward posterior
  (+y), k from superior to inferior (-z), whatever the acquisition (head/feet first,
  supine/prone, instance order). ``slices[k]`` is the source frame of ``array[k]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


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


def read_slice_refs(paths: Sequence[Path]) -> list[SliceRef]:
    raise NotImplementedError


def plan_volume(refs: Sequence[SliceRef], series_uid: str) -> VolumePlan:
    raise NotImplementedError


def load_volume(plan: VolumePlan) -> Volume:
    raise NotImplementedError
