"""DICOM SEG writer: a volume segmenter's masks as a binary Segmentation on the source slices.

One SEG per (source series, model name, model version), in the source study, in a series
whose UIDs come from ``result_uids(..., kind="seg")``, so a resend replaces it. A series in
which nothing was found gets no SEG (:func:`build_segmentation` returns None); its SR says
so instead (:func:`pacsnode.writers.sr.build_segmentation_report`).

**Segment numbers.** A binary SEG must number its segments 1, 2, 3... without gaps
(PS3.3 C.8.20.2; highdicom refuses anything else), so the numbers follow manifest order
among the segments actually present (:func:`segment_numbers`): with no tumour found, the
cyst is segment 3, not 4. Each segment carries the label name as its Tracking ID and a
Tracking UID derived from (source series, model, label); the SR's measurement group of the
segment repeats both, and readers should match on them (or on the Segmented Property Type)
rather than on a number.

**Frames.** ``Volume.to_source`` turns each canonical mask back into source frames (rows and
columns as stored), and every SEG frame is placed with the Image Position (Patient) of its
own source frame (the header's value, as :func:`pacsnode.volumes.read_slice_refs` read it,
never recomputed from the affine). highdicom matches these positions to the
source frames exactly and writes, per frame, the referenced source instance (and frame, for
Enhanced CT) in the Derivation Image Sequence, with Spatial Locations Preserved YES. Only
source frames holding at least one segment are passed, and frames empty for a segment are
omitted, so the SEG stays small and quick to build whatever the series length.

Sources are either single-frame CT images or one multi-frame (Enhanced CT) instance, which
is what a SEG's source references can express; a series split over several multi-frame
instances is refused. Everything is built by highdicom constructors and never patched
afterwards; highdicom stamps the instance creation time and its own contribution time, and
draws a random Dimension Organization UID, itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from pacsnode.manifest import LabelSpec, Manifest
from pacsnode.models.base import SegmentationResult
from pacsnode.uids import derive_uid
from pacsnode.volumes import SliceRef
from pacsnode.writers.sr import (
    LONG_STRING_MAX,
    _coding_schemes,
    check_sources,
    document_character_set,
    document_provenance,
    result_uids,
    series_description,
)

CODE_STRING_MAX = 16
"""Characters of a CS value (Content Label)."""

ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence
"""DCM 123110 "Artificial Intelligence" (CID 7162 Segmentation Algorithm Family)."""


def segment_numbers(result: SegmentationResult, manifest: Manifest) -> dict[str, int]:
    """``{label name: segment number}`` of the reported, non-empty segments, numbered 1, 2...
    in manifest order (see the module docstring).

    Raises ValueError naming the label when ``result.masks`` does not hold exactly the
    manifest's segment labels as boolean arrays of the volume's shape.
    """
    _check_masks(result, manifest)
    present = [
        label.name
        for label in manifest.segment_labels
        if label.reported and result.masks[label.name].any()
    ]
    return {name: number for number, name in enumerate(present, start=1)}


def _check_masks(result: SegmentationResult, manifest: Manifest) -> None:
    """Refuse masks that are not exactly the manifest's segments on the volume's grid."""
    expected = [label.name for label in manifest.segment_labels]
    unknown = sorted(set(result.masks) - set(expected))
    if unknown:
        raise ValueError(
            f"series {result.series_uid}: model {manifest.name} returned masks "
            f"{', '.join(unknown)} that are not segment labels of its manifest"
        )
    shape = result.volume.array.shape
    for name in expected:
        mask = result.masks.get(name)
        if mask is None:
            raise ValueError(
                f"series {result.series_uid}: model {manifest.name} returned no mask "
                f"for segment {name!r}"
            )
        if mask.dtype != np.bool_ or mask.shape != shape:
            raise ValueError(
                f"series {result.series_uid}: mask {name!r} is {mask.dtype} {mask.shape}; "
                f"expected bool {shape} (the volume's shape)"
            )


def segment_tracking_uid(series_uid: str, manifest: Manifest, label: str) -> str:
    """Tracking UID of one segment: the same for the SEG segment and its SR group."""
    return derive_uid(series_uid, manifest.name, manifest.version, "seg", label, "tracking")


def build_segmentation(
    sources: Sequence[Dataset],
    result: SegmentationResult,
    manifest: Manifest,
    *,
    series_number: int = 7002,
    now: datetime | None = None,
) -> hd.seg.Segmentation | None:
    """Build the binary SEG of ``result`` on the source frames; None when every mask is empty.

    Parameters
    ----------
    sources
        Headers of the series' instances (pixels not needed), e.g. read with
        ``stop_before_pixels=True``; instances the volume left out (localizers) are ignored.
        Patient and study come from the first source (character set as for the SR).
    result
        The segmenter's output: one boolean mask per manifest segment label, on the grid of
        ``result.volume`` (canonical orientation).
    manifest
        The model's manifest: segment codes, category and anatomic region; name and
        version identify the algorithm.
    series_number
        SeriesNumber of the SEG series (fixed, so a resend looks the same).
    now
        Content and series time; defaults to the local wall clock.

    Raises
    ------
    ValueError
        When ``sources`` is empty or spans several series, ``result`` is of another series,
        a mask is missing or malformed, a slice of the volume has no source, or the
        sources are several multi-frame instances.
    InvalidDatasetError
        When the first source lacks an attribute the SEG must carry.
    """
    if len(sources) == 0:
        raise ValueError("sources: at least one instance is needed to build a segmentation")
    first = check_sources(sources, "SEG")
    where = f"series {first.SeriesInstanceUID}"
    if result.series_uid != str(first.SeriesInstanceUID):
        raise ValueError(
            f"result: model {manifest.name} segmented series {result.series_uid}, "
            f"but the sources are of {where}"
        )
    numbers = segment_numbers(result, manifest)
    if not numbers:
        return None
    labels = [label for label in manifest.segment_labels if label.name in numbers]
    stacks = [result.volume.to_source(result.masks[label.name]) for label in labels]
    refs = stacks[0][1]
    occupied = np.flatnonzero(np.logical_or.reduce([f.any(axis=(1, 2)) for f, _ in stacks]))
    pixels = np.stack([f[occupied] for f, _ in stacks], axis=-1)  # (frame, row, column, segment)
    source_images = _source_images(sources, refs, where)
    descriptions = [
        _segment_description(number, label, result.series_uid, manifest)
        for number, label in enumerate(labels, start=1)
    ]
    series_uid, instance_uid = result_uids(result.series_uid, manifest, "seg")
    description = series_description(manifest, "segmentation")
    now = datetime.now() if now is None else now
    used = [c for label in labels for c in _label_codes(label)]
    try:
        return hd.seg.Segmentation(
            source_images=source_images,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=instance_uid,
            instance_number=1,
            **document_provenance(manifest, now),
            device_serial_number=manifest.weights.sha256[:LONG_STRING_MAX],  # which weights
            transfer_syntax_uid=ExplicitVRLittleEndian,
            plane_positions=[_plane_position(refs[int(m)]) for m in occupied],
            omit_empty_frames=True,
            content_label=content_label(manifest),
            content_description=description,
            series_description=description,
            specific_character_set=document_character_set(
                first, manifest, [description, *(c.meaning for c in used)]
            ),
            coding_schemes=_coding_schemes(used),
        )
    except ValueError as exc:
        raise ValueError(f"{where}: cannot build the segmentation: {exc}") from exc


def content_label(manifest: Manifest) -> str:
    """Content Label (CS: upper case, digits, space, underscore; 16 characters)."""
    label = re.sub(r"[^A-Z0-9_ ]", "_", manifest.name.upper())[:CODE_STRING_MAX].strip()
    return label or "SEGMENTATION"


def _source_images(
    sources: Sequence[Dataset], refs: Sequence[SliceRef], where: str
) -> list[Dataset]:
    """The headers behind ``refs``: each single-frame slice's, or the one multi-frame one."""
    by_uid: dict[str, Dataset] = {}
    for ds in sources:
        uid = str(ds.SOPInstanceUID)
        if uid in by_uid:
            raise ValueError(f"sources: instance {uid} appears twice")
        by_uid[uid] = ds
    missing = sorted({ref.sop_instance_uid for ref in refs} - set(by_uid))
    if missing:
        raise ValueError(
            f"{where}: the volume has slices of instance(s) {', '.join(missing)}, "
            "which are not among the sources"
        )
    if all(ref.frame is None for ref in refs):
        return [by_uid[ref.sop_instance_uid] for ref in refs]
    instances = sorted({ref.sop_instance_uid for ref in refs})
    if len(instances) > 1 or any(ref.frame is None for ref in refs):
        raise ValueError(
            f"{where}: the volume spans {len(instances)} instances, some multi-frame; a SEG "
            "references either single-frame images or one multi-frame image"
        )
    return [_with_shared_orientation(by_uid[instances[0]], refs[0])]


def _with_shared_orientation(ds: Dataset, ref: SliceRef) -> Dataset:
    """``ds``, or a view of it whose shared groups hold the frames' Plane Orientation.

    highdicom 0.28 reads a multi-frame source's orientation from the Shared Functional
    Groups only, while Enhanced CT may carry it per frame. The planner has already checked
    that every slice has the same orientation, so the view lends highdicom that of the first
    slice; elements are shared with ``ds``, which is left unchanged.
    """
    shared_groups = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_groups[0] if shared_groups else Dataset()
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if "PlaneOrientationSequence" in shared or not per_frame or ref.frame is None:
        return ds
    orientation = per_frame[ref.frame - 1].get("PlaneOrientationSequence")
    if orientation is None:
        return ds  # highdicom names what is missing
    view_shared = Dataset({element.tag: element for element in shared})
    view_shared.PlaneOrientationSequence = orientation
    view = Dataset({element.tag: element for element in ds})
    view.SharedFunctionalGroupsSequence = [view_shared]
    return view


def _plane_position(ref: SliceRef) -> hd.PlanePositionSequence:
    return hd.PlanePositionSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT, image_position=ref.position
    )


def _segment_description(
    number: int, label: LabelSpec, series_uid: str, manifest: Manifest
) -> hd.seg.SegmentDescription:
    category, property_type, *region = _label_codes(label)
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=property_type.meaning[:LONG_STRING_MAX],
        segmented_property_category=category,
        segmented_property_type=property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=manifest.name, family=ALGORITHM_FAMILY, version=manifest.version
        ),
        tracking_uid=segment_tracking_uid(series_uid, manifest, label.name),
        tracking_id=label.name,
        anatomic_regions=region or None,
    )


def _label_codes(label: LabelSpec) -> list[Code]:
    """Category, property type and (when given) anatomic region of a segment label."""
    if label.code is None or label.category is None:  # the manifest forbids this
        raise ValueError(f"segment {label.name!r} needs a code and a category")
    region = [label.anatomic_region] if label.anatomic_region is not None else []
    return [spec.to_code() for spec in (label.category, label.code, *region)]
