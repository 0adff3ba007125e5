"""Structured Report writer: per-image classifier probabilities as a TID 1500 Measurement Report.

One SR document per (source series, model name, model version). It lives in the source
study, in a new series whose UIDs are derived from those three values (:func:`result_uids`),
so resending the same series replaces the earlier report at the PACS instead of adding a
second one.

Document layout (TID 1500 "Imaging Measurement Report")::

    Language; Observation Context (device observer = the model, run by pacsnode);
    Procedure Reported = SCT 399208008 "Plain chest X-ray" (overridable)
    Imaging Measurements
      Measurement Group (TID 1501), one per source image, in the order of ``sources``
        Tracking Identifier (text + derived UID), Algorithm Identification (TID 4019)
        per reported label, in manifest order:
          NUM   <label code> = probability, unit UCUM "1" (no units), with TID 4019
        per reported label, in manifest order:
          CODE  <label code> = SCT Present / SCT Absent (probability >= label threshold)
        Source of Measurement -> the image (SOP class + instance)

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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import cast

import highdicom as hd
from highdicom.enum import SpecificCharacterSetValues
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pacsnode import __version__
from pacsnode.errors import InvalidDatasetError
from pacsnode.manifest import LabelSpec, Manifest
from pacsnode.models.base import ImageResult
from pacsnode.uids import derive_uid

PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
"""Default "Procedure Reported" (CID 100 is extensible; it has no chest radiograph entry)."""

MANUFACTURER = "pacsnode"
DEMO_DISCLAIMER = "DEMO, synthetic-trained, not for clinical use"
"""Shown wherever a human reads the report when ``manifest.synthetic`` is true."""

UTF8 = "ISO_IR 192"
ENGLISH = hd.sr.CodedConcept(
    value="en-US", scheme_designator="RFC5646", meaning="English (United States)"
)
PROBABILITY_UNIT = codes.UCUM.NoUnits
"""UCUM ``1`` "no units" (CID 7181): a probability is a dimensionless number in [0, 1]."""

_LONG_STRING_MAX = 64

# Type 1/2 attributes highdicom reads from the first source without checking.
_REQUIRED_SOURCE_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
)

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


def result_uids(source_series_uid: str, manifest: Manifest) -> tuple[str, str]:
    """Return ``(SeriesInstanceUID, SOPInstanceUID)`` of the SR for this series and model.

    Derived from the source series and the model's name and version only, so a resend
    of the series replaces the earlier SR; a new model version gives a new series.
    """
    base = (source_series_uid, manifest.name, manifest.version, "sr")
    return derive_uid(*base, "series"), derive_uid(*base, "instance")


def series_description(manifest: Manifest) -> str:
    """SeriesDescription of the SR series; says plainly when the model is a synthetic demo."""
    if manifest.synthetic:
        text = f"AI {manifest.name} ({DEMO_DISCLAIMER})"
        return text if len(text) <= _LONG_STRING_MAX else f"AI ({DEMO_DISCLAIMER})"
    return f"AI {manifest.name} {manifest.version}"[:_LONG_STRING_MAX]


def build_measurement_report(
    sources: Sequence[Dataset],
    results: Sequence[ImageResult],
    manifest: Manifest,
    *,
    series_number: int = 7001,
    now: datetime | None = None,
    procedure_reported: Code = PLAIN_CHEST_XRAY,
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
        ``sources`` one to one or lack a reported label's probability.
    InvalidDatasetError
        When the first source lacks an attribute the SR must carry.
    """
    if len(sources) == 0:
        raise ValueError("sources: at least one image is needed to build a measurement report")
    first = sources[0]
    missing = [kw for kw in _REQUIRED_SOURCE_ATTRIBUTES if kw not in first]
    if missing:
        raise InvalidDatasetError(
            f"instance {first.get('SOPInstanceUID', '?')}: missing {', '.join(missing)}; "
            "cannot carry patient and study into the SR"
        )
    series_uid = str(first.SeriesInstanceUID)
    for ds in sources[1:]:
        if ds.get("SeriesInstanceUID") != series_uid:
            raise ValueError(
                f"sources: instance {ds.get('SOPInstanceUID', '?')} is in series "
                f"{ds.get('SeriesInstanceUID')}, not {series_uid}; one SR covers one series"
            )
    by_instance = _match_results(sources, results, manifest)

    now = datetime.now() if now is None else now
    algorithm = hd.sr.AlgorithmIdentification(
        name=manifest.name, version=manifest.version, manufacturer=MANUFACTURER
    )
    groups = [
        _measurement_group(ds, by_instance[str(ds.SOPInstanceUID)], manifest, algorithm, index)
        for index, ds in enumerate(sources, start=1)
    ]
    report = _container(
        codes.cid7021.ImagingMeasurementReport,
        template_id="1500",
        items=[
            *hd.sr.LanguageOfContentItemAndDescendants(ENGLISH),
            *_observation_context(manifest),
            hd.sr.CodeContentItem(
                name=codes.DCM.ProcedureReported,
                value=procedure_reported,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            ),
            _container(
                codes.DCM.ImagingMeasurements,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                items=groups,
            ),
        ],
    )
    sr_series_uid, sr_instance_uid = result_uids(series_uid, manifest)
    return hd.sr.EnhancedSR(
        evidence=list(sources),
        content=hd.sr.ContentSequence([report], is_root=True),
        series_instance_uid=sr_series_uid,
        series_number=series_number,
        sop_instance_uid=sr_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description(manifest),
        manufacturer_model_name=manifest.name[:_LONG_STRING_MAX],
        software_versions=f"pacsnode {__version__}; {manifest.name} {manifest.version}"[
            :_LONG_STRING_MAX
        ],
        content_date=now.date(),
        content_time=now.time(),
        series_date=now.date(),
        series_time=now.time(),
        specific_character_set=_character_set(first, _own_text(manifest)),
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


def read_findings(sr: Dataset, manifest: Manifest | None = None) -> dict[str, dict[str, bool]]:
    """Return ``{source SOPInstanceUID: {label: present}}`` from the qualitative evaluations.

    Keys as in :func:`read_measurement_report`; ``True`` for SCT Present, ``False`` for
    SCT Absent; other coded values are ignored.
    """
    names = _names_by_code(manifest)
    out: dict[str, dict[str, bool]] = {}
    for uid, group in _groups_by_source(sr):
        values = out.setdefault(uid, {})
        for evaluation in group.get_qualitative_evaluations():
            value = cast(hd.sr.CodedConcept, evaluation.value)  # highdicom types it as a number
            if _same_code(value, codes.SCT.Present) or _same_code(value, codes.SCT.Absent):
                key = names.get(_code_key(evaluation.name), evaluation.name.meaning)
                values[key] = _same_code(value, codes.SCT.Present)
    return out


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
            if p is None or not math.isfinite(p) or not 0.0 <= p <= 1.0:
                raise ValueError(
                    f"instance {uid}: model {manifest.name} gave probability {p!r} for "
                    f"reported label {label.name!r}; expected a number in [0, 1]"
                )
    return by_instance


def _observation_context(manifest: Manifest) -> hd.sr.ObservationContext:
    name = manifest.name
    if manifest.synthetic:
        name = f"{name} ({DEMO_DISCLAIMER})"
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derive_uid(manifest.name, manifest.version, "device-observer"),
        name=name,
        manufacturer_name=MANUFACTURER,
        model_name=f"{manifest.name} {manifest.version}",
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )


def _measurement_group(
    source: Dataset,
    result: ImageResult,
    manifest: Manifest,
    algorithm: hd.sr.AlgorithmIdentification,
    index: int,
) -> hd.sr.ContainerContentItem:
    """TID 1501 for one image, items in the order highdicom's template uses."""
    identifier = f"{manifest.name} findings, image {index}"
    if manifest.synthetic:
        identifier = f"{identifier} ({DEMO_DISCLAIMER})"
    tracking = hd.sr.TrackingIdentifier(
        uid=derive_uid(str(source.SOPInstanceUID), manifest.name, manifest.version, "sr", "group"),
        identifier=identifier,
    )
    measurements: list[Dataset] = []
    evaluations: list[Dataset] = []
    for label in manifest.reported_labels:
        code = _label_code(label)
        p = float(result.probabilities[label.name])
        measurements.extend(
            hd.sr.Measurement(name=code, value=p, unit=PROBABILITY_UNIT, algorithm_id=algorithm)
        )
        present = p >= label.threshold
        evaluations.extend(
            hd.sr.QualitativeEvaluation(
                name=code, value=codes.SCT.Present if present else codes.SCT.Absent
            )
        )
    return _container(
        codes.DCM.MeasurementGroup,
        template_id="1501",
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        items=[
            *tracking,
            *algorithm,
            *measurements,
            *evaluations,
            hd.sr.SourceImageForMeasurementGroup.from_source_image(source),
        ],
    )


def _container(
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


def _groups_by_source(
    sr: Dataset,
) -> list[tuple[str, hd.sr.MeasurementsAndQualitativeEvaluations]]:
    document = _as_highdicom(sr)
    content = document.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ValueError(f"SR {sr.get('SOPInstanceUID', '?')}: not a TID 1500 Measurement Report")
    out = []
    for group in content.get_image_measurement_groups():
        for image in group.source_images:
            out.append((str(image.referenced_sop_instance_uid), group))
    return out


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
