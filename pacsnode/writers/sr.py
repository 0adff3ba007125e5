"""Structured Report writers: classifier probabilities as TID 1500 Measurement Reports.

One SR document per (source series, model name, model version). It lives in the source
study, in a new series whose UIDs are derived from those three values (:func:`result_uids`),
so resending the same series replaces the earlier report at the PACS instead of adding a
second one. Two writers share everything but the measurement groups:

* :func:`build_measurement_report` -- an image classifier (chest X-ray): one group per image.
* :func:`build_series_report` -- a volume classifier (CT pulmonary embolism): the exam labels
  and a summary of the per-slice probabilities of the series.

Image classifier layout (TID 1500 "Imaging Measurement Report")::

    Language; Observation Context (device observer = the model, run by pacsnode);
    Procedure Reported = SCT 399208008 "Plain chest X-ray" (overridable)
    Imaging Measurements
      Measurement Group (TID 1501), one per source image, in the order of ``sources``
        Tracking Identifier (text + derived UID), Algorithm Identification (TID 4019)
        per reported label, in manifest order:
          NUM   <label code> = probability, unit UCUM "1" (no units), with TID 4019;
                when the finding has a heatmap (Present, see pacsnode.writers.heatmap):
                Source of Measurement -> the heatmap Secondary Capture, where the
                radiologist sees what the probability rests on
        per reported label, in manifest order:
          CODE  <label code> = SCT Present / SCT Absent (probability >= label threshold)
        Source of Measurement -> the image (SOP class + instance)
    The heatmap SCs are evidence too (Current Requested Procedure Evidence Sequence).

Volume classifier layout (same header; the evidence lists every instance of the series)::

    Procedure Reported = 99PACSNODE "CT pulmonary angiography" (overridable; see
                         CT_PULMONARY_ANGIOGRAPHY)
    Imaging Measurements
      Measurement Group (TID 1501) "exam findings"; no source image, so it is about the
      whole series (PS3.16 TID 1501: the evidence images are the source)
        Tracking Identifier, Algorithm Identification
        per reported exam label, in manifest order:
          NUM   <label code> = probability, UCUM "1", with TID 4019
        per reported exam label, in manifest order:
          CODE  <label code> = SCT Present / SCT Absent (probability >= label threshold)
      Measurement Group (TID 1501) "slice findings" (when the image label is reported)
        Tracking Identifier, Algorithm Identification
        NUM   99PACSNODE pos-slices "Number of positive slices" = n, UCUM "{slices}", TID 4019
        NUM   <image label code> = highest slice probability, UCUM "1", TID 4019,
              Derivation SCT 56851009 "Maximum", Source of Measurement -> that slice
        when n > 0, for the most superior and then the most inferior positive slice:
          NUM 99PACSNODE pos-sup-z / pos-inf-z = z of its ImagePositionPatient, UCUM "mm"
          NUM 99PACSNODE pos-sup-instance / pos-inf-instance = its InstanceNumber,
              UCUM "{instance}" (single-frame sources only)
          each with Source of Measurement -> that slice (with the frame, if multi-frame)
        Source of Measurement (group) -> the highest-probability slice, where a viewer
        that follows TID 1501 opens the series

Segmenter layout (CT kidney; same header, the evidence lists the series and the SEG)::

    Procedure Reported = 99PACSNODE "CT of kidneys" (overridable; see CT_KIDNEYS)
    Imaging Measurements
      per reported segment found, in manifest order: Measurement Group (TID 1411)
        Tracking Identifier (label name; the SEG segment's Tracking UID), Finding Category
        and Finding (the segment's category and property type), Finding Site (its anatomic
        region, when the manifest gives one), Algorithm Identification
        Referenced Segment -> the SEG instance and segment number, with the source images
        (and frames, when multi-frame) that hold the segment
        NUM SCT 118565006 "Volume", UCUM "cm3" (= mL), TID 4019
        lesions only (category SCT 49755003 "Morphologically Abnormal Structure"):
          NUM SCT 103339001 "Long axis" = longest diameter, UCUM "mm", TID 4019
      Measurement Group (TID 1501) "segments not found", when a reported segment is empty
        Tracking Identifier, Algorithm Identification
        per empty segment: CODE <property type> = SCT Absent
      (nothing found at all: no SEG, and only this group, every segment Absent)

The numbers are those of :mod:`pacsnode.measurements`; see there for what a diameter is.

A slice is *positive* when its probability is at least the image label's threshold. The
range is the extent from the first to the last positive slice in anatomical order
(superior to inferior); slices in between may be negative. Instance numbers and z (mm,
patient LPS, larger is more superior) are what a radiologist reads off the viewer's overlay
to scroll there. Numbers whose unit is UCUM "1" are always probabilities.

The SOP class is **Enhanced SR**: the content has no spatial coordinates, and Enhanced SR is
the least capable SOP class that holds it, which makes it the one most PACS and viewers
accept and render (Comprehensive 3D SR would only be needed for SCOORD3D content).

Everything is built by highdicom constructors and never patched afterwards. Two notes:

* The three CONTAINERs (report, Imaging Measurements, each Measurement Group) are made with
  ``ContainerContentItem(is_content_continuous=False)`` and filled with highdicom's template
  items (TrackingIdentifier, AlgorithmIdentification, Measurement, QualitativeEvaluation,
  SourceImageForMeasurementGroup), the way highdicom's own ``MeasurementReport`` assembles
  them. highdicom's ``MeasurementReport`` fixes ContinuityOfContent to CONTINUOUS, which
  renderers that follow PS3.3 C.17.3.2.2 (dcmtk's ``dsr2html``) show as running prose
  *without concept names*: "0.83 1 / Present", no finding name. SEPARATE renders
  "Pleural effusion: 0.83 1". highdicom reads the result back as a ``MeasurementReport``.
* highdicom stamps three wall-clock values itself (``InstanceCreationDate``,
  ``InstanceCreationTime`` and the ``ContributionDateTime`` of its own Contributing
  Equipment item) and offers no parameter for them. Every other byte -- UIDs, content,
  ``ContentDate``/``ContentTime``/``SeriesDate``/``SeriesTime`` (taken from ``now``) --
  is a function of the inputs.

Codes of the private scheme ``99PACSNODE`` (the manifest's and :data:`LOCAL_CODES`) are
declared in the Coding Scheme Identification Sequence of the documents that use them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.enum import SpecificCharacterSetValues
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pacsnode import __version__
from pacsnode.errors import InvalidDatasetError
from pacsnode.manifest import LabelSpec, Manifest
from pacsnode.measurements import SegmentMeasurement
from pacsnode.models.base import ImageResult, SegmentationResult, SeriesResult, SliceScore
from pacsnode.uids import derive_uid

log = logging.getLogger(__name__)

PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
"""Default "Procedure Reported" (CID 100 is extensible; it has no chest radiograph entry)."""

CT_PULMONARY_ANGIOGRAPHY = Code(
    "ct-pulmonary-angiography", "99PACSNODE", "CT pulmonary angiography"
)
"""Default "Procedure Reported" of the CT PE report: a local code on purpose.

CID 100 has no CT angiography entry, and the only SNOMED CT identifier we found for it is a
US-extension concept we could not verify in an official browser; a wrong public code is
worse than an honest local one. Sites that have a verified code pass ``procedure_reported``.
"""

CT_KIDNEYS = Code("ct-kidneys", "99PACSNODE", "CT of kidneys")
"""Default "Procedure Reported" of the kidney segmentation report, local for the same reason
as :data:`CT_PULMONARY_ANGIOGRAPHY`: pydicom's code dictionary has no CT of the abdomen or
kidneys, and CID 100's only CT entries are LOINC "CT unspecified body region" and a head
perfusion."""

MANUFACTURER = "pacsnode"
DEMO_DISCLAIMER = "DEMO, synthetic-trained, not for clinical use"
"""Shown wherever a human reads the report when ``manifest.synthetic`` is true."""

UTF8 = "ISO_IR 192"
ENGLISH = hd.sr.CodedConcept(
    value="en-US", scheme_designator="RFC5646", meaning="English (United States)"
)
PROBABILITY_UNIT = codes.UCUM.NoUnits
"""UCUM ``1`` "no units" (CID 7181): a probability is a dimensionless number in [0, 1]."""

LOCAL_SCHEME = "99PACSNODE"
"""Private coding scheme (PS3.16 8.2: "99" prefix) for concepts no public scheme has."""

POSITIVE_SLICE_COUNT = Code("pos-slices", LOCAL_SCHEME, "Number of positive slices")
SUPERIOR_POSITIVE_Z = Code("pos-sup-z", LOCAL_SCHEME, "Most superior positive slice, z position")
INFERIOR_POSITIVE_Z = Code("pos-inf-z", LOCAL_SCHEME, "Most inferior positive slice, z position")
SUPERIOR_POSITIVE_INSTANCE = Code(
    "pos-sup-instance", LOCAL_SCHEME, "Most superior positive slice, instance number"
)
INFERIOR_POSITIVE_INSTANCE = Code(
    "pos-inf-instance", LOCAL_SCHEME, "Most inferior positive slice, instance number"
)
LOCAL_CODES = (
    POSITIVE_SLICE_COUNT,
    SUPERIOR_POSITIVE_Z,
    INFERIOR_POSITIVE_Z,
    SUPERIOR_POSITIVE_INSTANCE,
    INFERIOR_POSITIVE_INSTANCE,
)
INPUT_CHECK = Code("input-check", LOCAL_SCHEME, "Input check")
WITHIN_RANGE = Code("within-range", LOCAL_SCHEME, "Within the model's validated input range")
OUTSIDE_RANGE = Code("outside-range", LOCAL_SCHEME, "Outside the model's validated input range")
OOD_DISTANCE = Code("ood-distance", LOCAL_SCHEME, "Out-of-distribution distance")
OOD_LIMIT = Code("ood-limit", LOCAL_SCHEME, "Out-of-distribution limit")
DISTANCE_UNIT = Code("{Mahalanobis}", "UCUM", "Mahalanobis distance")
INPUT_CHECK_CODES = (
    INPUT_CHECK,
    WITHIN_RANGE,
    OUTSIDE_RANGE,
    OOD_DISTANCE,
    OOD_LIMIT,
    DISTANCE_UNIT,
)
SLICES_UNIT = Code("{slices}", "UCUM", "slices")
"""A count of slices: UCUM ``1`` with an annotation, so it is never taken for a probability."""
INSTANCE_NUMBER_UNIT = Code("{instance}", "UCUM", "instance number")
MILLIMETRE = codes.UCUM.Millimeter
VOLUME = codes.SCT.Volume
"""SCT 118565006 "Volume" (CID 7472 Volume Measurement)."""
VOLUME_UNIT = codes.UCUM.CubicCentimeter
"""UCUM ``cm3`` (CID 7181): one mL; pydicom's code dictionary has no ``ml`` unit."""
LONGEST_DIAMETER = codes.SCT.LongAxis
"""SCT 103339001 "Long axis" (CID 7470 Linear Measurement): a lesion's longest diameter."""
LESION_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
"""Segments of this Segmented Property Category get a longest diameter in the report."""
SEGMENT_REPORT_CODES = (VOLUME, VOLUME_UNIT, LONGEST_DIAMETER, MILLIMETRE, codes.SCT.Absent)

LONG_STRING_MAX = 64
"""Characters of a LO value (SeriesDescription, ManufacturerModelName, Code Meaning)."""

# Type 1/2 attributes highdicom reads from the first source without checking.
_REQUIRED_SOURCE_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)
_TYPE2_SOURCE_ATTRIBUTES = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
)
"""Type 2 in the source's Patient and General Study modules: present, possibly empty. Some
modalities leave them out; the results then carry them empty, as the standard allows."""

_HIGHDICOM_STAND_ALONE = frozenset(
    v.value for v in SpecificCharacterSetValues if not v.value.startswith("ISO 2022")
)
"""Specific Character Set terms highdicom accepts as a single value."""

_SR_READERS: dict[
    str, type[hd.sr.EnhancedSR] | type[hd.sr.ComprehensiveSR] | type[hd.sr.Comprehensive3DSR]
] = {
    "1.2.840.10008.5.1.4.1.1.88.22": hd.sr.EnhancedSR,
    "1.2.840.10008.5.1.4.1.1.88.33": hd.sr.ComprehensiveSR,
    "1.2.840.10008.5.1.4.1.1.88.34": hd.sr.Comprehensive3DSR,
}


@dataclass(frozen=True)
class InputCheck:
    """What the node's gates made of one input (an image or a series), as its SR reports it:
    the out-of-distribution distance and its limit (:mod:`pacsnode.gates.ood`), and, when
    ``on_gate_failure = "flag"`` let a failed input through, why it is outside the range
    the model was validated on."""

    ood_distance: float | None = None
    ood_limit: float | None = None
    outside: str | None = None


def result_uids(source_series_uid: str, manifest: Manifest, kind: str = "sr") -> tuple[str, str]:
    """Return ``(SeriesInstanceUID, SOPInstanceUID)`` of the ``kind`` document for this series.

    ``kind`` is ``"sr"`` for the report, ``"ko"`` for the key images. Derived from the source
    series, the model's name and version and ``kind`` only, so a resend of the series
    replaces the earlier document, a new model version gives a new series, and each kind
    of document has a series of its own.
    """
    base = (source_series_uid, manifest.name, manifest.version, kind)
    return derive_uid(*base, "series"), derive_uid(*base, "instance")


def series_description(manifest: Manifest, what: str = "") -> str:
    """SeriesDescription of a result series (``what``: e.g. "key images"); says plainly when
    the model is a synthetic demo."""
    subject = f"{manifest.name} {what}" if what else manifest.name
    if manifest.synthetic:
        text = f"AI {subject} ({DEMO_DISCLAIMER})"
        if len(text) <= LONG_STRING_MAX:
            return text
        return f"AI {what} ({DEMO_DISCLAIMER})" if what else f"AI ({DEMO_DISCLAIMER})"
    return f"AI {subject} {manifest.version}"[:LONG_STRING_MAX]


def software_versions(manifest: Manifest) -> str:
    """SoftwareVersions of a result document: pacsnode's and the model's."""
    return f"pacsnode {__version__}; {manifest.name} {manifest.version}"[:LONG_STRING_MAX]


def document_provenance(manifest: Manifest, now: datetime) -> dict[str, Any]:
    """The constructor arguments every result object (SR, SEG, KOS, SC) shares: who made it
    (pacsnode and the model, by name and version) and when."""
    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": manifest.name[:LONG_STRING_MAX],
        "software_versions": software_versions(manifest),
        "content_date": now.date(),
        "content_time": now.time(),
        "series_date": now.date(),
        "series_time": now.time(),
    }


def device_observer_context(manifest: Manifest) -> hd.sr.ObserverContext:
    """The model as the observing device (TID 1004); its UID is derived from name and version."""
    name = manifest.name
    if manifest.synthetic:
        name = f"{name} ({DEMO_DISCLAIMER})"
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derive_uid(manifest.name, manifest.version, "device-observer"),
        name=name,
        manufacturer_name=MANUFACTURER,
        model_name=f"{manifest.name} {manifest.version}",
    )
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=device,
    )


def check_sources(sources: Sequence[Dataset], document: str) -> Dataset:
    """Return the first source after checking all are of one series and it carries the UIDs
    the ``document`` ("SR", "KOS") copies from it; Type 2 patient and study attributes a
    non-conformant source leaves out are added to the in-memory sources, empty."""
    first = sources[0]
    missing = [kw for kw in _REQUIRED_SOURCE_ATTRIBUTES if kw not in first]
    if missing:
        raise InvalidDatasetError(
            f"instance {first.get('SOPInstanceUID', '?')}: missing {', '.join(missing)}; "
            f"cannot carry patient and study into the {document}"
        )
    absent = [kw for kw in _TYPE2_SOURCE_ATTRIBUTES if kw not in first]
    if absent:  # tolerant when reading: the in-memory source gets them empty
        log.warning(
            "series %s: source lacks Type 2 %s; the %s carries them empty",
            first.SeriesInstanceUID,
            ", ".join(absent),
            document,
        )
        for ds in sources:
            for keyword in _TYPE2_SOURCE_ATTRIBUTES:
                if keyword not in ds:
                    setattr(ds, keyword, "")
    series_uid = str(first.SeriesInstanceUID)
    for ds in sources[1:]:
        if ds.get("SeriesInstanceUID") != series_uid:
            raise ValueError(
                f"sources: instance {ds.get('SOPInstanceUID', '?')} is in series "
                f"{ds.get('SeriesInstanceUID')}, not {series_uid}; one {document} covers one series"
            )
    return first


def document_character_set(
    source: Dataset, manifest: Manifest, texts: Iterable[str] = ()
) -> str | None:
    """Specific Character Set of a result document of ``source`` (see
    :func:`build_measurement_report`); ``texts``: more of our own strings it will hold."""
    return _character_set(source, [*_own_text(manifest), *texts])


@dataclass(frozen=True)
class ScoredSlice:
    """One slice of a :class:`SeriesResult`, with the source header it came from."""

    index: int  # 0-based position in ``SeriesResult.slices`` (superior to inferior)
    score: SliceScore
    source: Dataset

    @property
    def probability(self) -> float:
        return self.score.probability

    @property
    def frames(self) -> list[int] | None:
        """``[frame]`` for a multi-frame source, else None (highdicom's referenced frames)."""
        return [self.score.frame] if _is_multiframe(self.source) and self.score.frame else None

    @property
    def z(self) -> float | None:
        """z (mm, LPS) of the slice's ImagePositionPatient, when the header has it."""
        position = _frame_position(self.source, self.score.frame)
        if position is None:
            return None
        try:
            return float(position[2])
        except (IndexError, TypeError, ValueError):
            return None

    @property
    def instance_number(self) -> int | None:
        """InstanceNumber of a single-frame source (a multi-frame one's is not the slice's)."""
        if _is_multiframe(self.source):
            return None
        value = self.source.get("InstanceNumber")
        try:
            return None if value in (None, "") else int(value)
        except (TypeError, ValueError):
            return None

    def describe(self) -> str:
        """How a radiologist finds the slice: "image 12 (z -40.0 mm)", "frame 7 of <uid>"."""
        if self.frames is not None:
            where = f"frame {self.score.frame} of instance {self.score.sop_instance_uid}"
        elif self.instance_number is not None:
            where = f"image {self.instance_number}"
        else:
            where = f"instance {self.score.sop_instance_uid}"
        z = self.z
        return where if z is None else f"{where} (z {z:.1f} mm)"


def match_slices(
    sources: Sequence[Dataset], result: SeriesResult, manifest: Manifest
) -> tuple[LabelSpec, list[ScoredSlice]]:
    """Return the image label of ``result`` and its slices, each matched to its source.

    Sources may hold instances the model did not score (a localizer the volume left out);
    every scored slice must have a source. Raises ValueError naming the culprit.
    """
    series_uid = str(sources[0].SeriesInstanceUID)
    if result.series_uid != series_uid:
        raise ValueError(
            f"result: model {manifest.name} scored series {result.series_uid}, "
            f"but the sources are of series {series_uid}"
        )
    label = _label(manifest, result.image_label, "image")
    if not result.slices:
        raise ValueError(f"series {series_uid}: model {manifest.name} scored no slice")
    by_uid: dict[str, Dataset] = {}
    for ds in sources:
        uid = str(ds.SOPInstanceUID)
        if uid in by_uid:
            raise ValueError(f"sources: instance {uid} appears twice")
        by_uid[uid] = ds
    seen: set[tuple[str, int | None]] = set()
    scored = []
    for index, score in enumerate(result.slices):
        source = by_uid.get(score.sop_instance_uid)
        if source is None:
            raise ValueError(
                f"result: slice {index + 1} is instance {score.sop_instance_uid}, "
                f"which is not among the sources of series {series_uid}"
            )
        key = (score.sop_instance_uid, score.frame)
        if key in seen:
            raise ValueError(f"result: slice {key} scored twice")
        seen.add(key)
        _check_frame(source, score)
        _check_probability(score.probability, manifest, label.name, f"slice {index + 1}")
        scored.append(ScoredSlice(index, score, source))
    return label, scored


def build_measurement_report(
    sources: Sequence[Dataset],
    results: Sequence[ImageResult],
    manifest: Manifest,
    *,
    series_number: int = 7001,
    now: datetime | None = None,
    procedure_reported: Code = PLAIN_CHEST_XRAY,
    heatmaps: Mapping[tuple[str, str], Dataset] | None = None,
    input_checks: Mapping[str, InputCheck] | None = None,
) -> hd.sr.EnhancedSR:
    """Build the Measurement Report of ``results`` for the images ``sources`` of one series.

    Parameters
    ----------
    sources
        The classified images (headers suffice), all of one series. Patient and study
        attributes are copied from ``sources[0]`` by highdicom, element by element.
    results
        Exactly one :class:`ImageResult` per source, matched by SOPInstanceUID; each holds a
        probability in [0, 1] for every reported label of ``manifest``.
    manifest
        The model's manifest; only ``manifest.reported_labels`` appear, in manifest order.
    series_number
        SeriesNumber of the SR series (fixed, not random, so a resend looks the same).
    now
        Content, series and observation time; defaults to the local wall clock.
    procedure_reported
        TID 1500 "Procedure Reported" (CID 100, extensible).
    heatmaps
        The heatmap images of the findings (:mod:`pacsnode.writers.heatmap`), keyed by
        (source SOPInstanceUID, label name): each becomes the Source of Measurement of that
        label's probability and part of the evidence. Only findings reported Present may
        have one.
    input_checks
        By source SOPInstanceUID: each becomes an "input check" group (TID 1501) of that
        image with the out-of-distribution distance and limit and whether the image lies
        inside the model's validated input range (see :class:`InputCheck`).

    Character set: the source's Specific Character Set is kept when highdicom accepts it
    as a stand-alone term (e.g. ``ISO_IR 192``, ``GB18030``, ``ISO_IR 100``) and our own
    text (model name, code meanings) is encodable in it. Otherwise -- notably ISO 2022 code
    extensions such as Korean ``\\ISO 2022 IR 149``, which highdicom 0.28 rejects (its
    enumeration lists Korean as ``ISO 2022 IR 159``) -- the SR is written in UTF-8
    (``ISO_IR 192``); pydicom re-encodes the decoded names, so they read back unchanged.

    Raises
    ------
    ValueError
        When ``sources`` is empty, spans several series, or ``results`` do not match
        ``sources`` one to one or lack a reported label's probability, or a heatmap is of
        another image or of a finding that is not Present.
    InvalidDatasetError
        When the first source lacks an attribute the SR must carry.
    """
    if len(sources) == 0:
        raise ValueError("sources: at least one image is needed to build a measurement report")
    check_sources(sources, "SR")
    by_instance = _match_results(sources, results, manifest)
    illustrations = _match_heatmaps(heatmaps or {}, by_instance, manifest)
    algorithm = _algorithm(manifest)
    groups = [
        _measurement_group(
            ds,
            by_instance[str(ds.SOPInstanceUID)],
            manifest,
            algorithm,
            index,
            illustrations.get(str(ds.SOPInstanceUID), {}),
        )
        for index, ds in enumerate(sources, start=1)
    ]
    checks = input_checks or {}
    groups += [
        _input_check_group(
            checks[str(ds.SOPInstanceUID)],
            manifest,
            algorithm,
            f"image {index}",
            str(ds.SOPInstanceUID),
            hd.sr.SourceImageForMeasurementGroup.from_source_image(ds),
        )
        for index, ds in enumerate(sources, start=1)
        if str(ds.SOPInstanceUID) in checks
    ]
    return _enhanced_sr(
        sources,
        groups,
        manifest,
        procedure_reported=procedure_reported,
        series_number=series_number,
        now=now,
        codes_used=INPUT_CHECK_CODES if checks else [],
        evidence=list((heatmaps or {}).values()),
    )


def build_series_report(
    sources: Sequence[Dataset],
    result: SeriesResult,
    manifest: Manifest,
    *,
    series_number: int = 7001,
    now: datetime | None = None,
    procedure_reported: Code = CT_PULMONARY_ANGIOGRAPHY,
    input_check: InputCheck | None = None,
) -> hd.sr.EnhancedSR:
    """Build the Measurement Report of a volume model's ``result`` for one series.

    Parameters
    ----------
    sources
        Headers of the series' instances (pixels not needed); every instance becomes
        evidence, patient and study come from ``sources[0]`` (see
        :func:`build_measurement_report` for the character set).
    result
        The model's :class:`SeriesResult`: every scored slice must be one of ``sources``
        (with a frame number for multi-frame instances); ``exam`` must hold a probability
        in [0, 1] for every reported exam label.
    manifest
        The model's manifest: reported ``level = "exam"`` labels appear in manifest order;
        the slice summary appears when ``result.image_label`` is reported, and counts the
        slices whose probability is at least that label's threshold.
    series_number, now, procedure_reported
        As for :func:`build_measurement_report`; the procedure defaults to CT pulmonary
        angiography (:data:`CT_PULMONARY_ANGIOGRAPHY`).
    input_check
        The series' :class:`InputCheck`, reported in an "input check" group.

    Raises
    ------
    ValueError
        When ``sources`` is empty or spans several series, or ``result`` is of another
        series, scores a slice that is not a source, or lacks a probability.
    InvalidDatasetError
        When the first source lacks an attribute the SR must carry.
    """
    if len(sources) == 0:
        raise ValueError("sources: at least one instance is needed to build a series report")
    check_sources(sources, "SR")
    image_label, scored = match_slices(sources, result, manifest)
    exam_labels = [label for label in manifest.reported_labels if label.level == "exam"]
    for label in exam_labels:
        _check_probability(result.exam.get(label.name), manifest, label.name, "exam")
    series_uid = result.series_uid
    algorithm = _algorithm(manifest)
    groups = [
        _label_group(
            _identifier(manifest, f"{manifest.name} exam findings"),
            derive_uid(series_uid, manifest.name, manifest.version, "sr", "exam-group"),
            algorithm,
            _label_items(exam_labels, result.exam, algorithm),
        )
    ]
    if image_label.reported:
        groups.append(_slice_group(series_uid, image_label, scored, manifest, algorithm))
    if input_check is not None:
        groups.append(_input_check_group(input_check, manifest, algorithm, "series", series_uid))
    return _enhanced_sr(
        sources,
        groups,
        manifest,
        procedure_reported=procedure_reported,
        series_number=series_number,
        now=now,
        codes_used=[
            *(LOCAL_CODES if image_label.reported else ()),
            *(INPUT_CHECK_CODES if input_check is not None else ()),
        ],
    )


def read_measurement_report(
    sr: Dataset, manifest: Manifest | None = None
) -> dict[str, dict[str, float]]:
    """Return ``{source SOPInstanceUID: {label: probability}}`` from an SR of this writer.

    Keys are the manifest label NAMES when ``manifest`` is given and a measurement's code
    matches a label's code; otherwise the code meaning. Only NUM items whose unit is
    :data:`PROBABILITY_UNIT` count as probabilities.
    """
    names = _names_by_code(manifest)
    out: dict[str, dict[str, float]] = {}
    for uid, group in _groups_by_source(sr):
        values = out.setdefault(uid, {})
        for measurement in group.get_measurements():
            if _same_code(measurement.unit, PROBABILITY_UNIT):
                key = names.get(_code_key(measurement.name), measurement.name.meaning)
                values[key] = float(measurement.value)
    return out


def read_heatmap_references(
    sr: Dataset, manifest: Manifest | None = None
) -> dict[str, dict[str, str]]:
    """Return ``{source SOPInstanceUID: {label: heatmap SOPInstanceUID}}`` from an SR of
    :func:`build_measurement_report`: the image each probability points to as its Source of
    Measurement. Keys as in :func:`read_measurement_report`."""
    names = _names_by_code(manifest)
    out: dict[str, dict[str, str]] = {}
    for uid, group in _groups_by_source(sr):
        refs = out.setdefault(uid, {})
        for measurement in group.get_measurements():
            images = measurement.referenced_images
            if images and _same_code(measurement.unit, PROBABILITY_UNIT):
                key = names.get(_code_key(measurement.name), measurement.name.meaning)
                refs[key] = str(images[0].referenced_sop_instance_uid)
    return out


def read_findings(sr: Dataset, manifest: Manifest | None = None) -> dict[str, dict[str, bool]]:
    """Return ``{source SOPInstanceUID: {label: present}}`` from the qualitative evaluations.

    Keys as in :func:`read_measurement_report`; ``True`` for SCT Present, ``False`` for
    SCT Absent; other coded values are ignored.
    """
    names = _names_by_code(manifest)
    out: dict[str, dict[str, bool]] = {}
    for uid, group in _groups_by_source(sr):
        out.setdefault(uid, {}).update(_presence(group, names))
    return out


@dataclass(frozen=True)
class ReportedSlice:
    """A slice a series report points at, and what it says of it."""

    sop_instance_uid: str
    frame: int | None
    value: float  # the number the report gives (probability, z in mm or instance number)


@dataclass(frozen=True)
class SeriesReport:
    """What :func:`build_series_report` wrote, read back from the stored SR.

    Slice fields are None when the report has no slice summary (image label not reported)
    or, for the range, no positive slice (or a header without the value).
    """

    exam_probabilities: dict[str, float]
    exam_findings: dict[str, bool]
    positive_slices: int | None
    max_probability: ReportedSlice | None
    superior_z: ReportedSlice | None
    inferior_z: ReportedSlice | None
    superior_instance: ReportedSlice | None
    inferior_instance: ReportedSlice | None


def read_series_report(sr: Dataset, manifest: Manifest | None = None) -> SeriesReport:
    """Read a series report of :func:`build_series_report` back, with highdicom.

    Label keys as in :func:`read_measurement_report`. Raises ValueError when ``sr`` is not
    a TID 1500 report or has no exam group.
    """
    names = _names_by_code(manifest)
    exam: hd.sr.MeasurementsAndQualitativeEvaluations | None = None
    slices: hd.sr.MeasurementsAndQualitativeEvaluations | None = None
    for group in _measurement_report(sr).get_image_measurement_groups():
        if group.get_measurements(name=POSITIVE_SLICE_COUNT):
            slices = group
        elif exam is None:
            exam = group
    if exam is None:
        raise ValueError(f"SR {sr.get('SOPInstanceUID', '?')}: no exam measurement group")
    probabilities = {
        names.get(_code_key(m.name), m.name.meaning): float(m.value)
        for m in exam.get_measurements()
        if _same_code(m.unit, PROBABILITY_UNIT)
    }
    if slices is None:
        return SeriesReport(
            probabilities, _presence(exam, names), None, None, None, None, None, None
        )
    count = slices.get_measurements(name=POSITIVE_SLICE_COUNT)[0]
    maxima = [
        m
        for m in slices.get_measurements()
        if _same_code(m.unit, PROBABILITY_UNIT)
        and m.derivation is not None
        and _same_code(m.derivation, codes.SCT.Maximum)
    ]
    return SeriesReport(
        exam_probabilities=probabilities,
        exam_findings=_presence(exam, names),
        positive_slices=int(count.value),
        max_probability=_reported_slice(maxima[0]) if maxima else None,
        superior_z=_reported(slices, SUPERIOR_POSITIVE_Z),
        inferior_z=_reported(slices, INFERIOR_POSITIVE_Z),
        superior_instance=_reported(slices, SUPERIOR_POSITIVE_INSTANCE),
        inferior_instance=_reported(slices, INFERIOR_POSITIVE_INSTANCE),
    )


def build_segmentation_report(
    sources: Sequence[Dataset],
    result: SegmentationResult,
    seg: Dataset | None,
    measurements: dict[str, SegmentMeasurement],
    manifest: Manifest,
    *,
    series_number: int = 7001,
    now: datetime | None = None,
    procedure_reported: Code = CT_KIDNEYS,
    input_check: InputCheck | None = None,
) -> hd.sr.EnhancedSR:
    """Build the Measurement Report of a segmenter's ``result``: what it found, and how big.

    Parameters
    ----------
    sources
        Headers of the series' instances; all become evidence, patient and study come from
        ``sources[0]`` (character set as for :func:`build_measurement_report`).
    result
        The segmenter's output for the series of ``sources``.
    seg
        The SEG of ``result`` (:func:`pacsnode.writers.seg.build_segmentation`), or None
        when nothing was found. Its segments are matched to labels by Tracking ID, and
        each measurement group references its segment by number.
    measurements
        :func:`pacsnode.measurements.measure` of ``result``: the non-empty segments.
    manifest
        The model's manifest: reported ``level = "segment"`` labels appear in manifest
        order, found ones with their measurements, the others as Absent.
    series_number, now
        As for :func:`build_measurement_report`.
    procedure_reported
        TID 1500 "Procedure Reported"; defaults to :data:`CT_KIDNEYS`.
    input_check
        The series' :class:`InputCheck`, reported in an "input check" group.

    Raises
    ------
    ValueError
        When ``sources`` is empty or spans several series, ``result`` is of another series,
        ``seg`` and ``measurements`` disagree on which segments were found, or a measured
        segment's mask in ``result`` is empty.
    InvalidDatasetError
        When the first source lacks an attribute the SR must carry.
    """
    if len(sources) == 0:
        raise ValueError("sources: at least one instance is needed to build a segmentation report")
    first = check_sources(sources, "SR")
    series_uid = str(first.SeriesInstanceUID)
    if result.series_uid != series_uid:
        raise ValueError(
            f"result: model {manifest.name} segmented series {result.series_uid}, "
            f"but the sources are of series {series_uid}"
        )
    labels = [label for label in manifest.segment_labels if label.reported]
    unknown = sorted(set(measurements) - {label.name for label in manifest.segment_labels})
    if unknown:
        raise ValueError(
            f"measurements: {', '.join(unknown)} are not segment labels of model {manifest.name}"
        )
    found = [label for label in labels if label.name in measurements]
    segments = _seg_segments(seg, series_uid, [label.name for label in found])
    algorithm = _algorithm(manifest)
    groups = []
    if seg is not None:
        groups = [
            _segment_group(
                seg,
                label,
                *segments[label.name],
                _segment_sources(result, label.name),
                measurements[label.name],
                algorithm,
            )
            for label in found
        ]
    absent = [label for label in labels if label.name not in measurements]
    if absent:
        groups.append(
            _label_group(
                _identifier(manifest, f"{manifest.name} segments not found"),
                derive_uid(series_uid, manifest.name, manifest.version, "sr", "absent-group"),
                algorithm,
                [
                    item
                    for label in absent
                    for item in hd.sr.QualitativeEvaluation(
                        name=_label_code(label), value=codes.SCT.Absent
                    )
                ],
            )
        )
    if input_check is not None:
        groups.append(_input_check_group(input_check, manifest, algorithm, "series", series_uid))
    extra = [
        spec.to_code()
        for label in labels
        for spec in (label.category, label.anatomic_region)
        if spec
    ]
    if input_check is not None:
        extra += INPUT_CHECK_CODES
    return _enhanced_sr(
        sources,
        groups,
        manifest,
        procedure_reported=procedure_reported,
        series_number=series_number,
        now=now,
        codes_used=[*SEGMENT_REPORT_CODES, *extra],
        evidence=[seg] if seg is not None else [],
    )


@dataclass(frozen=True)
class SegmentReport:
    """One segment's measurement group of :func:`build_segmentation_report`, read back."""

    volume_ml: float
    longest_diameter_mm: float | None  # lesions only
    seg_sop_instance_uid: str
    segment_number: int
    tracking_uid: str | None


def read_segmentation_report(
    sr: Dataset, manifest: Manifest | None = None
) -> dict[str, SegmentReport]:
    """Return ``{segment: SegmentReport}`` of the segments a segmentation report found.

    Keys are manifest label names when ``manifest`` is given and the group's Finding matches
    a label's code, else the Finding's meaning. Read with highdicom; raises ValueError when
    ``sr`` is not a TID 1500 report or a group's volume has a unit other than cm3/mL.
    """
    names = _names_by_code(manifest)
    out: dict[str, SegmentReport] = {}
    for group in _measurement_report(sr).get_volumetric_roi_measurement_groups():
        finding, reference = group.finding_type, group.referenced_segment
        volumes = group.get_measurements(name=VOLUME)
        if finding is None or reference is None or not volumes:
            continue
        if not (
            _same_code(volumes[0].unit, VOLUME_UNIT) or str(volumes[0].unit.value) in ("ml", "mL")
        ):
            raise ValueError(
                f"SR {sr.get('SOPInstanceUID', '?')}: volume of {finding.meaning} is in "
                f"{volumes[0].unit.value}, not cm3 or mL"
            )
        segment = cast(hd.sr.ImageContentItem, reference[0])
        diameters = group.get_measurements(name=LONGEST_DIAMETER)
        out[names.get(_code_key(finding), finding.meaning)] = SegmentReport(
            volume_ml=float(volumes[0].value),
            longest_diameter_mm=float(diameters[0].value) if diameters else None,
            seg_sop_instance_uid=str(segment.referenced_sop_instance_uid),
            segment_number=int((segment.referenced_segment_numbers or [0])[0]),
            tracking_uid=None if group.tracking_uid is None else str(group.tracking_uid),
        )
    return out


def read_absent_segments(sr: Dataset, manifest: Manifest | None = None) -> list[str]:
    """The segments a segmentation report says were not found (SCT Absent), in its order;
    names as in :func:`read_segmentation_report`."""
    names = _names_by_code(manifest)
    return [
        names.get(_code_key(evaluation.name), evaluation.name.meaning)
        for group in _measurement_report(sr).get_image_measurement_groups()
        for evaluation in group.get_qualitative_evaluations()
        if _same_code(cast(hd.sr.CodedConcept, evaluation.value), codes.SCT.Absent)
    ]


def _seg_segments(
    seg: Dataset | None, series_uid: str, found: Sequence[str]
) -> dict[str, tuple[int, str]]:
    """``{label: (segment number, tracking UID)}`` from the SEG, checked against ``found``."""
    if seg is None:
        if found:
            raise ValueError(
                f"series {series_uid}: segments {', '.join(found)} were measured but no SEG "
                "was given to reference them"
            )
        return {}
    where = f"SEG {seg.get('SOPInstanceUID', '?')}"
    referenced = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
    if series_uid not in referenced:
        raise ValueError(f"{where} does not reference series {series_uid}")
    segments = {
        str(item.get("TrackingID", "")): (int(item.SegmentNumber), str(item.get("TrackingUID", "")))
        for item in seg.SegmentSequence
    }
    if sorted(segments) != sorted(found):
        raise ValueError(
            f"{where} has segments {', '.join(sorted(segments))}, but the measurements found "
            f"{', '.join(sorted(found)) or 'none'}"
        )
    return segments


def _segment_sources(
    result: SegmentationResult, name: str
) -> list[hd.sr.SourceImageForSegmentation]:
    """The source images holding segment ``name`` (with their frames, when multi-frame):
    the source frames its SEG frames are on (:func:`pacsnode.writers.seg.build_segmentation`
    maps the mask the same way and leaves the frames empty for a segment out)."""
    frames, refs = result.volume.to_source(result.masks[name])
    hits = cast(list[bool], frames.any(axis=(1, 2)).tolist())
    by_instance: dict[str, tuple[str, list[int]]] = {}
    for ref, occupied in zip(refs, hits, strict=True):
        if occupied:
            _, numbers = by_instance.setdefault(ref.sop_instance_uid, (ref.sop_class_uid, []))
            if ref.frame is not None:
                numbers.append(ref.frame)
    if not by_instance:
        raise ValueError(
            f"series {result.series_uid}: segment {name!r} was measured, but its mask is empty"
        )
    return [
        hd.sr.SourceImageForSegmentation(sop_class, uid, sorted(numbers) or None)
        for uid, (sop_class, numbers) in by_instance.items()
    ]


def _segment_group(
    seg: Dataset,
    label: LabelSpec,
    number: int,
    tracking_uid: str,
    sources: Sequence[hd.sr.SourceImageForSegmentation],
    measurement: SegmentMeasurement,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.ContainerContentItem:
    """TID 1411 for one segment, in a SEPARATE container like the other groups (see the
    module docstring); highdicom's template orders and checks the items.

    The Referenced Segment is built from what the writer knows (the SEG's UIDs, the segment
    number and ``sources``), not with highdicom's ``ReferencedSegment.from_segmentation``:
    that reads each frame's Segment Identification from the per-frame functional groups,
    where a SEG of a single segment has none (highdicom puts it in the shared groups), and
    fails on exactly the studies in which one segment was found."""
    category = label.category.to_code() if label.category is not None else None
    values = [
        hd.sr.Measurement(
            name=VOLUME, value=measurement.volume_ml, unit=VOLUME_UNIT, algorithm_id=algorithm
        )
    ]
    if category is not None and _same_code(category, LESION_CATEGORY):
        values.append(
            hd.sr.Measurement(
                name=LONGEST_DIAMETER,
                value=measurement.longest_diameter_mm,
                unit=MILLIMETRE,
                algorithm_id=algorithm,
            )
        )
    region = label.anatomic_region
    template = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=label.name),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=number,
            source_images=sources,
        ),
        finding_category=category,
        finding_type=_label_code(label),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(region.to_code())] if region is not None else None,
        measurements=values,
    )
    return container(
        codes.DCM.MeasurementGroup,
        template_id="1411",
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        items=template[0].ContentSequence,
    )


def _enhanced_sr(
    sources: Sequence[Dataset],
    groups: Sequence[hd.sr.ContainerContentItem],
    manifest: Manifest,
    *,
    procedure_reported: Code,
    series_number: int,
    now: datetime | None,
    codes_used: Iterable[Code],
    evidence: Sequence[Dataset] = (),
) -> hd.sr.EnhancedSR:
    """The TID 1500 document around ``groups``; ``codes_used``: codes beyond the manifest's;
    ``evidence``: instances referenced besides ``sources`` (a SEG)."""
    measurements = container(
        codes.DCM.ImagingMeasurements,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        items=groups,
    )
    labels = [label.code.to_code() for label in manifest.reported_labels if label.code]
    return report_document(
        sources,
        [measurements],
        manifest,
        procedure_reported=procedure_reported,
        series_number=series_number,
        now=now,
        codes_used=[*codes_used, *labels],
        evidence=evidence,
    )


def report_document(
    sources: Sequence[Dataset],
    body: Sequence[Dataset],
    manifest: Manifest,
    *,
    procedure_reported: Code,
    series_number: int,
    now: datetime | None,
    codes_used: Iterable[Code] = (),
    evidence: Sequence[Dataset] = (),
    kind: str = "sr",
    description: str | None = None,
    texts: Sequence[str] = (),
) -> hd.sr.EnhancedSR:
    """An Enhanced SR whose root is TID 1500 "Imaging Measurement Report": language, the
    model as device observer, Procedure Reported, then ``body`` (Imaging Measurements, or a
    notice's Qualitative Evaluations). ``kind`` picks the UIDs (:func:`result_uids`);
    ``codes_used`` and ``texts``: our own codes and strings, for the character set."""
    first = sources[0]
    now = datetime.now() if now is None else now
    report = container(
        codes.cid7021.ImagingMeasurementReport,
        template_id="1500",
        items=[
            *hd.sr.LanguageOfContentItemAndDescendants(ENGLISH),
            *hd.sr.ObservationContext(observer_device_context=device_observer_context(manifest)),
            hd.sr.CodeContentItem(
                name=codes.DCM.ProcedureReported,
                value=procedure_reported,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            ),
            *body,
        ],
    )
    used = [*codes_used, procedure_reported]
    sr_series_uid, sr_instance_uid = result_uids(str(first.SeriesInstanceUID), manifest, kind)
    return hd.sr.EnhancedSR(
        evidence=[*sources, *evidence],
        content=hd.sr.ContentSequence([report], is_root=True),
        series_instance_uid=sr_series_uid,
        series_number=series_number,
        sop_instance_uid=sr_instance_uid,
        instance_number=1,
        **document_provenance(manifest, now),
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=description or series_description(manifest),
        specific_character_set=document_character_set(
            first, manifest, [*(c.meaning for c in used), *texts]
        ),
        coding_schemes=_coding_schemes(used),
    )


def _coding_schemes(used: Iterable[Code]) -> list[CodingSchemeIdentificationItem] | None:
    """Identify :data:`LOCAL_SCHEME` when a code of it is used (PS3.3 C.12.1.1.2.1)."""
    if not any(code.scheme_designator == LOCAL_SCHEME for code in used):
        return None
    return [
        CodingSchemeIdentificationItem(
            designator=LOCAL_SCHEME,
            name="pacsnode local codes",
            responsible_organization=MANUFACTURER,
        )
    ]


def _match_results(
    sources: Sequence[Dataset], results: Sequence[ImageResult], manifest: Manifest
) -> dict[str, ImageResult]:
    by_instance: dict[str, ImageResult] = {}
    for result in results:
        if result.sop_instance_uid in by_instance:
            raise ValueError(f"results: two results for instance {result.sop_instance_uid}")
        by_instance[result.sop_instance_uid] = result
    source_uids = [str(ds.SOPInstanceUID) for ds in sources]
    if len(set(source_uids)) != len(source_uids):
        raise ValueError("sources: an instance appears twice")
    unmatched = sorted(set(by_instance) - set(source_uids))
    if unmatched:
        raise ValueError(f"results: no source image for instance(s) {', '.join(unmatched)}")
    for uid in source_uids:
        if uid not in by_instance:
            raise ValueError(f"results: no result for source instance {uid}")
        for label in manifest.reported_labels:
            p = by_instance[uid].probabilities.get(label.name)
            _check_probability(p, manifest, label.name, f"instance {uid}")
    return by_instance


def _match_heatmaps(
    heatmaps: Mapping[tuple[str, str], Dataset],
    by_instance: dict[str, ImageResult],
    manifest: Manifest,
) -> dict[str, dict[str, Dataset]]:
    """``{source uid: {label: heatmap}}`` after checking each heatmap belongs to a source
    image and to a finding reported Present there."""
    labels = {label.name: label for label in manifest.reported_labels}
    out: dict[str, dict[str, Dataset]] = {}
    for (uid, name), heatmap in heatmaps.items():
        result = by_instance.get(uid)
        if result is None:
            raise ValueError(f"heatmaps: instance {uid} is not one of the sources")
        label = labels.get(name)
        if label is None:
            raise ValueError(f"heatmaps: {name!r} is not a reported label of model {manifest.name}")
        if result.probabilities[name] < label.threshold:
            raise ValueError(
                f"heatmaps: instance {uid}: {name} is {result.probabilities[name]:.3f}, below "
                f"its threshold {label.threshold}; only a finding reported Present has a heatmap"
            )
        out.setdefault(uid, {})[name] = heatmap
    return out


def _check_probability(p: float | None, manifest: Manifest, label: str, where: str) -> None:
    if p is None or not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise ValueError(
            f"{where}: model {manifest.name} gave probability {p!r} for "
            f"reported label {label!r}; expected a number in [0, 1]"
        )


def _label(manifest: Manifest, name: str, level: str) -> LabelSpec:
    for label in manifest.labels:
        if label.name == name:
            if label.level != level:
                raise ValueError(f"model {manifest.name}: label {name!r} is not {level}-level")
            return label
    raise ValueError(f"model {manifest.name}: no label {name!r} in the manifest")


def _is_multiframe(ds: Dataset) -> bool:
    return "NumberOfFrames" in ds


def _check_frame(source: Dataset, score: SliceScore) -> None:
    uid = score.sop_instance_uid
    if _is_multiframe(source):
        frames = int(source.NumberOfFrames)
        if score.frame is None or not 1 <= score.frame <= frames:
            raise ValueError(
                f"result: instance {uid} has {frames} frames; slice frame {score.frame!r} "
                "must be one of them"
            )
    elif score.frame not in (None, 1):
        raise ValueError(f"result: instance {uid} is single-frame, not frame {score.frame}")


def _frame_position(ds: Dataset, frame: int | None) -> Sequence[float] | None:
    """ImagePositionPatient of a frame: top level, per-frame or shared functional groups."""
    if _is_multiframe(ds) and frame is not None:
        candidates = [
            (ds.get("PerFrameFunctionalGroupsSequence"), frame - 1),
            (ds.get("SharedFunctionalGroupsSequence"), 0),
        ]
        for groups, index in candidates:
            try:
                item = groups[index].PlanePositionSequence[0]
                return cast(Sequence[float], item.ImagePositionPatient)
            except (AttributeError, IndexError, TypeError):
                continue
    return cast(Sequence[float] | None, ds.get("ImagePositionPatient"))


def _algorithm(manifest: Manifest) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=manifest.name, version=manifest.version, manufacturer=MANUFACTURER
    )


def _identifier(manifest: Manifest, text: str) -> str:
    return f"{text} ({DEMO_DISCLAIMER})" if manifest.synthetic else text


def _label_items(
    labels: Sequence[LabelSpec],
    probabilities: dict[str, float],
    algorithm: hd.sr.AlgorithmIdentification,
    illustrations: Mapping[str, Dataset] | None = None,
) -> list[Dataset]:
    """Per label a probability NUM, then per label a Present/Absent CODE at its threshold;
    ``illustrations``: label name -> the image a probability refers to (its heatmap)."""
    measurements: list[Dataset] = []
    evaluations: list[Dataset] = []
    for label in labels:
        code = _label_code(label)
        p = float(probabilities[label.name])
        illustration = (illustrations or {}).get(label.name)
        measurements.extend(
            hd.sr.Measurement(
                name=code,
                value=p,
                unit=PROBABILITY_UNIT,
                algorithm_id=algorithm,
                referenced_images=(
                    [hd.sr.SourceImageForMeasurement.from_source_image(illustration)]
                    if illustration is not None
                    else None
                ),
            )
        )
        present = p >= label.threshold
        evaluations.extend(
            hd.sr.QualitativeEvaluation(
                name=code, value=codes.SCT.Present if present else codes.SCT.Absent
            )
        )
    return [*measurements, *evaluations]


def _label_group(
    identifier: str,
    tracking_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
    items: Sequence[Dataset],
    source: hd.sr.SourceImageForMeasurementGroup | None = None,
) -> hd.sr.ContainerContentItem:
    """TID 1501, items in the order highdicom's template uses."""
    tracking = hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=identifier)
    return container(
        codes.DCM.MeasurementGroup,
        template_id="1501",
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        items=[*tracking, *algorithm, *items, *([source] if source is not None else [])],
    )


def _input_check_group(
    check: InputCheck,
    manifest: Manifest,
    algorithm: hd.sr.AlgorithmIdentification,
    what: str,
    key: str,
    source: hd.sr.SourceImageForMeasurementGroup | None = None,
) -> hd.sr.ContainerContentItem:
    """TID 1501 "input check" of one image or series: distance, limit, inside or outside the
    validated input range, and why (a Comment) when outside."""
    items: list[Dataset] = []
    if check.ood_distance is not None:
        items += hd.sr.Measurement(
            name=OOD_DISTANCE, value=check.ood_distance, unit=DISTANCE_UNIT, algorithm_id=algorithm
        )
    if check.ood_limit is not None:
        items += hd.sr.Measurement(
            name=OOD_LIMIT, value=check.ood_limit, unit=DISTANCE_UNIT, algorithm_id=algorithm
        )
    items += hd.sr.QualitativeEvaluation(
        name=INPUT_CHECK, value=OUTSIDE_RANGE if check.outside else WITHIN_RANGE
    )
    if check.outside:
        items.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=check.outside[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    return _label_group(
        _identifier(manifest, f"{manifest.name} input check, {what}"),
        derive_uid(key, manifest.name, manifest.version, "sr", "input-check"),
        algorithm,
        items,
        source,
    )


def read_input_checks(sr: Dataset) -> dict[str, InputCheck]:
    """``{tracking identifier: InputCheck}`` of the "input check" groups of an SR."""
    out: dict[str, InputCheck] = {}
    for group in _measurement_group_items(sr):
        values: dict[str, Any] = {}
        name = ""
        for item in group.get("ContentSequence", []):
            concept = item.ConceptNameCodeSequence[0]
            if item.ValueType == "TEXT" and concept.CodeValue == "112039":
                name = str(item.TextValue)
            elif item.ValueType == "NUM" and concept.CodeValue in (
                OOD_DISTANCE.value,
                OOD_LIMIT.value,
            ):
                values[str(concept.CodeValue)] = float(item.MeasuredValueSequence[0].NumericValue)
            elif item.ValueType == "CODE" and concept.CodeValue == INPUT_CHECK.value:
                values["inside"] = item.ConceptCodeSequence[0].CodeValue == WITHIN_RANGE.value
            elif item.ValueType == "TEXT" and concept.CodeValue == codes.DCM.Comment.value:
                values["outside"] = str(item.TextValue)
        if "inside" in values:
            out[name] = InputCheck(
                values.get(OOD_DISTANCE.value),
                values.get(OOD_LIMIT.value),
                None if values["inside"] else values.get("outside", OUTSIDE_RANGE.meaning),
            )
    return out


def _measurement_group_items(sr: Dataset) -> list[Dataset]:
    """Every TID 1501/1411 group under Imaging Measurements, as datasets."""
    groups = []
    for item in sr.get("ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeValue != codes.DCM.ImagingMeasurements.value:
            continue
        groups += [g for g in item.get("ContentSequence", []) if g.ValueType == "CONTAINER"]
    return groups


def _measurement_group(
    source: Dataset,
    result: ImageResult,
    manifest: Manifest,
    algorithm: hd.sr.AlgorithmIdentification,
    index: int,
    illustrations: Mapping[str, Dataset],
) -> hd.sr.ContainerContentItem:
    """TID 1501 for one image; ``illustrations``: its heatmaps by label name."""
    return _label_group(
        _identifier(manifest, f"{manifest.name} findings, image {index}"),
        derive_uid(str(source.SOPInstanceUID), manifest.name, manifest.version, "sr", "group"),
        algorithm,
        _label_items(manifest.reported_labels, result.probabilities, algorithm, illustrations),
        hd.sr.SourceImageForMeasurementGroup.from_source_image(source),
    )


def _slice_group(
    series_uid: str,
    label: LabelSpec,
    scored: Sequence[ScoredSlice],
    manifest: Manifest,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.ContainerContentItem:
    """TID 1501 summarising the per-slice probabilities (see the module docstring)."""
    top = max(scored, key=lambda s: (s.probability, -s.index))  # ties: the most superior
    positive = [s for s in scored if s.probability >= label.threshold]
    items: list[Dataset] = [
        *hd.sr.Measurement(
            name=POSITIVE_SLICE_COUNT, value=len(positive), unit=SLICES_UNIT, algorithm_id=algorithm
        ),
        *hd.sr.Measurement(
            name=_label_code(label),
            value=top.probability,
            unit=PROBABILITY_UNIT,
            algorithm_id=algorithm,
            derivation=codes.SCT.Maximum,
            referenced_images=[_source_for_measurement(top)],
        ),
    ]
    if positive:
        for end, z_code, instance_code in (
            (positive[0], SUPERIOR_POSITIVE_Z, SUPERIOR_POSITIVE_INSTANCE),
            (positive[-1], INFERIOR_POSITIVE_Z, INFERIOR_POSITIVE_INSTANCE),
        ):
            for code, value, unit in (
                (z_code, end.z, MILLIMETRE),
                (instance_code, end.instance_number, INSTANCE_NUMBER_UNIT),
            ):
                if value is not None:
                    items.extend(
                        hd.sr.Measurement(
                            name=code,
                            value=value,
                            unit=unit,
                            referenced_images=[_source_for_measurement(end)],
                        )
                    )
    return _label_group(
        _identifier(manifest, f"{manifest.name} slice findings"),
        derive_uid(series_uid, manifest.name, manifest.version, "sr", "slice-group"),
        algorithm,
        items,
        hd.sr.SourceImageForMeasurementGroup.from_source_image(top.source, top.frames),
    )


def _source_for_measurement(scored: ScoredSlice) -> hd.sr.SourceImageForMeasurement:
    return hd.sr.SourceImageForMeasurement.from_source_image(scored.source, scored.frames)


def container(
    name: Code,
    *,
    items: Sequence[Dataset],
    template_id: str | None = None,
    relationship_type: hd.sr.RelationshipTypeValues | None = None,
) -> hd.sr.ContainerContentItem:
    """A CONTAINER with ContinuityOfContent SEPARATE (see the module docstring)."""
    container = hd.sr.ContainerContentItem(
        name=name,
        is_content_continuous=False,
        template_id=template_id,
        relationship_type=relationship_type,
    )
    # highdicom's templates are ContentSequences whose items are typed as plain Datasets
    container.ContentSequence = hd.sr.ContentSequence(cast(Sequence[hd.sr.ContentItem], items))
    return container


def _label_code(label: LabelSpec) -> Code:
    if label.code is None:  # the manifest forbids this for reported labels
        raise ValueError(f"label {label.name!r} is reported but has no code")
    return label.code.to_code()


def _own_text(manifest: Manifest) -> list[str]:
    """Every string this writer puts into the SR itself (not copied from the source)."""
    texts = [manifest.name, manifest.version, DEMO_DISCLAIMER, MANUFACTURER]
    texts += [label.code.meaning for label in manifest.reported_labels if label.code]
    return texts


def _character_set(source: Dataset, own_text: Iterable[str]) -> str | None:
    """The source's Specific Character Set if highdicom takes it and our text fits, else UTF-8."""
    value = source.get("SpecificCharacterSet")
    if value is None:
        terms: list[str] = []
    elif isinstance(value, str):
        terms = [value.strip()]
    else:
        terms = [str(v).strip() for v in value]
    if terms in ([], [""]):
        term, codec = None, "ascii"
    elif len(terms) == 1 and terms[0] in _HIGHDICOM_STAND_ALONE:
        term, codec = terms[0], python_encoding.get(terms[0], "")
    else:
        return UTF8
    try:
        for text in own_text:
            text.encode(codec)
    except (LookupError, UnicodeEncodeError):
        return UTF8
    return term


def _measurement_report(sr: Dataset) -> hd.sr.MeasurementReport:
    content = _as_highdicom(sr).content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ValueError(f"SR {sr.get('SOPInstanceUID', '?')}: not a TID 1500 Measurement Report")
    return content


def _groups_by_source(
    sr: Dataset,
) -> list[tuple[str, hd.sr.MeasurementsAndQualitativeEvaluations]]:
    out = []
    for group in _measurement_report(sr).get_image_measurement_groups():
        for image in group.source_images:
            out.append((str(image.referenced_sop_instance_uid), group))
    return out


def _presence(
    group: hd.sr.MeasurementsAndQualitativeEvaluations, names: dict[tuple[str, str], str]
) -> dict[str, bool]:
    """``{label: present}`` of the group's SCT Present / Absent evaluations."""
    out: dict[str, bool] = {}
    for evaluation in group.get_qualitative_evaluations():
        value = cast(hd.sr.CodedConcept, evaluation.value)  # highdicom types it as a number
        if _same_code(value, codes.SCT.Present) or _same_code(value, codes.SCT.Absent):
            key = names.get(_code_key(evaluation.name), evaluation.name.meaning)
            out[key] = _same_code(value, codes.SCT.Present)
    return out


def _reported(
    group: hd.sr.MeasurementsAndQualitativeEvaluations, name: Code
) -> ReportedSlice | None:
    found = group.get_measurements(name=name)
    return _reported_slice(found[0]) if found else None


def _reported_slice(measurement: hd.sr.Measurement) -> ReportedSlice | None:
    images = measurement.referenced_images
    if not images:
        return None
    image = images[0]
    frames = image.referenced_frame_numbers
    return ReportedSlice(
        str(image.referenced_sop_instance_uid),
        int(frames[0]) if frames else None,
        float(measurement.value),
    )


def _as_highdicom(
    sr: Dataset,
) -> hd.sr.EnhancedSR | hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR:
    sop_class = str(sr.get("SOPClassUID", ""))
    reader = _SR_READERS.get(sop_class)
    if reader is None:
        raise ValueError(
            f"SR {sr.get('SOPInstanceUID', '?')}: SOP class {sop_class} is not an "
            "Enhanced, Comprehensive or Comprehensive 3D SR"
        )
    return cast(
        hd.sr.EnhancedSR | hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR,
        reader.from_dataset(sr),
    )


def _names_by_code(manifest: Manifest | None) -> dict[tuple[str, str], str]:
    if manifest is None:
        return {}
    return {
        (label.code.scheme, label.code.value): label.name
        for label in manifest.labels
        if label.code is not None
    }


def _code_key(code: Code | hd.sr.CodedConcept) -> tuple[str, str]:
    return (str(code.scheme_designator), str(code.value))


def _same_code(a: Code | hd.sr.CodedConcept, b: Code | hd.sr.CodedConcept) -> bool:
    return _code_key(a) == _code_key(b)
