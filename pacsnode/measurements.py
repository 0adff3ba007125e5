"""Measurements of segmentation masks: volume, extent and connected components.

What the SR of a segmenter reports (:func:`pacsnode.writers.sr.build_segmentation_report`),
computed on the volume's own voxel grid, with no resampling:

* **volume** -- voxel count x voxel volume (the product of ``Volume.spacing``), in mL.
* **longest diameter** -- the largest distance, in patient space (``Volume.affine``), between
  the centres of two voxels of the **same connected component**, the largest over the
  components: the long axis of the biggest lesion, never the gap between two separate
  lesions. Components are 26-connected (voxels touching at a face, edge or corner are one
  lesion). Voxel centres make it up to one voxel shorter than the object's outer extent
  (the convention of pyradiomics' Maximum3DDiameter on masks); a single voxel measures 0.
  The farthest pair of a point set lies on its convex hull, and every hull vertex of a
  voxel set is a boundary voxel, so only the hull vertices of the boundary are compared.
* **components** -- the number of connected components (lesions, or kidney fragments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull
from scipy.spatial.distance import cdist

from pacsnode.models.base import SegmentationResult

CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
"""26-connectivity: voxels sharing a face, an edge or a corner belong to one component."""

_BRUTE_FORCE_POINTS = 256
"""Below this many boundary voxels, all pairs are compared directly (no hull)."""

_CHUNK = 2048


@dataclass(frozen=True)
class SegmentMeasurement:
    """What :func:`measure` found for one non-empty segment (see the module docstring)."""

    voxels: int
    volume_ml: float
    longest_diameter_mm: float
    components: int


def volume_ml(mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Volume of the ``True`` voxels of ``mask``, in mL; ``spacing`` is the voxel size in mm."""
    return int(np.count_nonzero(mask)) * math.prod(spacing) / 1000.0


def longest_diameter_mm(mask: np.ndarray, affine: np.ndarray) -> float:
    """Longest diameter (mm) of a canonical ``[k, j, i]`` mask whose voxel ``(i, j, k)`` is at
    ``affine @ (i, j, k, 1)``: the largest over its components (see the module docstring).

    Raises ValueError for an empty mask or an affine that is not 4x4.
    """
    if np.shape(affine) != (4, 4):
        raise ValueError(f"affine: shape {np.shape(affine)} is not 4x4")
    if mask.ndim != 3 or not mask.any():
        raise ValueError(
            f"mask: shape {mask.shape}, {np.count_nonzero(mask)} voxels set; a 3D "
            "mask with at least one voxel is needed for a diameter"
        )
    return _longest_diameter(_components(mask)[0], affine)


def measure(result: SegmentationResult) -> dict[str, SegmentMeasurement]:
    """Measure every non-empty mask of ``result``, keyed by label, in the masks' order.

    Raises ValueError naming the label when a mask is not a boolean array of the volume's
    shape.
    """
    volume = result.volume
    out: dict[str, SegmentMeasurement] = {}
    for name, mask in result.masks.items():
        if mask.dtype != np.bool_ or mask.shape != volume.array.shape:
            raise ValueError(
                f"series {result.series_uid}: mask {name!r} is {mask.dtype} {mask.shape}; "
                f"expected bool {volume.array.shape} (the volume's shape)"
            )
        if not mask.any():
            continue
        labels, count = _components(mask)
        out[name] = SegmentMeasurement(
            voxels=int(np.count_nonzero(mask)),
            volume_ml=volume_ml(mask, volume.spacing),
            longest_diameter_mm=_longest_diameter(labels, volume.affine),
            components=count,
        )
    return out


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The components of a non-empty mask, labelled 1..n within its bounding box (labelling
    only the box keeps big volumes fast; distances do not depend on where the box is)."""
    box = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    labels, count = ndimage.label(mask[tuple(box)], structure=CONNECTIVITY)
    return labels, int(count)


def _longest_diameter(labels: np.ndarray, affine: np.ndarray) -> float:
    """The largest diameter of the labelled components."""
    return max(
        _component_diameter(labels, number, box, affine)
        for number, box in enumerate(ndimage.find_objects(labels), start=1)
        if box is not None
    )


def _component_diameter(
    labels: np.ndarray,
    number: int,
    box: tuple[slice, ...],
    affine: np.ndarray,
) -> float:
    component = labels[box] == number
    boundary = component & ~ndimage.binary_erosion(component, border_value=0)
    points = (
        np.argwhere(boundary)[:, ::-1].astype(np.float64)
        @ np.asarray(affine, dtype=np.float64)[:3, :3].T
    )
    if len(points) > _BRUTE_FORCE_POINTS:
        # "QJ" joggles the input so flat (single-slice) components still get a hull;
        # the vertices are indices into the exact points, which are what is measured
        points = points[ConvexHull(points, qhull_options="QJ").vertices]
    return _max_distance(points)


def _max_distance(points: np.ndarray) -> float:
    """Largest pairwise distance, in chunks so memory stays bounded."""
    best = 0.0
    for start in range(0, len(points), _CHUNK):
        best = max(best, float(cdist(points[start : start + _CHUNK], points).max()))
    return best
