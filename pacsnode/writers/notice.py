"""The "not analysed" notice: tells the radiologist that a model did not read a study, and why.

A study that a model would normally take (its modality matched) but that a gate kept from
it — header scope, content, out of distribution — gets, with ``[outputs] not_analysed``,
two small objects in the source study, so that silence is never mistaken for "nothing
found":

* an Enhanced SR (TID 1500 "Imaging Measurement Report") with no measurements, whose
  Qualitative Evaluations hold the sentence a radiologist reads
  ("Not analysed by AI model cxr-chexnet 0.1.0: body part EXTREMITY is outside this
  model's scope"); Procedure Reported is the generic SCT 363679005 "Imaging", because the
  study is, by definition, not the procedure the model reports on;
* a one-image Secondary Capture with the same words burned in, for viewers that cannot
  show SR text.

UIDs derive from the source series and the model (kinds ``notice`` and ``notice-sc``), so a
rerun replaces the notice at the PACS. Built by highdicom constructors only.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from pacsnode.manifest import Manifest
from pacsnode.writers.heatmap import burn_in, patient_orientation
from pacsnode.writers.sr import (
    DEMO_DISCLAIMER,
    LONG_STRING_MAX,
    check_sources,
    container,
    document_character_set,
    document_provenance,
    report_document,
    result_uids,
)

IMAGING = Code("363679005", "SCT", "Imaging")
"""Procedure Reported of a notice: the study is not the procedure the model reports on."""
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
SR_SERIES_NUMBER = 7090
SC_SERIES_NUMBER = 7091
SC_ROWS, SC_COLUMNS = 192, 1536
TEXT_MAX = 1024  # UT would hold more; a notice is a sentence


def notice_series_description(manifest: Manifest) -> str:
    """ "AI <model> not analysed": the model's name matters more here than the demo
    disclaimer of the result series (a notice holds no finding)."""
    text = f"AI {manifest.name} not analysed"
    if manifest.synthetic and len(text) + 7 <= LONG_STRING_MAX:
        text += " (demo)"
    return text[:LONG_STRING_MAX]


def notice_text(manifest: Manifest, reason: str) -> str:
    """The sentence of the notice, the same in the SR and on the image."""
    text = f"Not analysed by AI model {manifest.name} {manifest.version}: {reason}"
    return text if len(text) <= TEXT_MAX else text[: TEXT_MAX - 1] + "…"


def build_notice_report(
    sources: Sequence[Dataset], manifest: Manifest, reason: str, *, now: datetime | None = None
) -> hd.sr.EnhancedSR:
    """The "not analysed" SR of the series ``sources`` (headers suffice) for ``manifest``."""
    check_sources(sources, "SR")
    text = notice_text(manifest, reason)
    evaluations = container(
        QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        items=[
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=text,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ],
    )
    return report_document(
        sources,
        [evaluations],
        manifest,
        procedure_reported=IMAGING,
        series_number=SR_SERIES_NUMBER,
        now=now,
        kind="notice",
        description=notice_series_description(manifest),
        texts=[text],
    )


class NoticeImage(hd.sc.SCImage):
    """highdicom's ``SCImage`` plus what it has no parameter for: Burned In Annotation YES
    (the notice is in the pixels), Lossy Image Compression 00, and an empty Laterality (the
    notice names no body part, and dciodvfy then wants the Type 2C attribute present)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.Laterality = ""
        self.BurnedInAnnotation = "YES"
        self.LossyImageCompression = "00"


def build_notice_image(
    source: Dataset, manifest: Manifest, reason: str, *, now: datetime | None = None
) -> NoticeImage:
    """The one-line Secondary Capture of the notice, in the source's study."""
    now = datetime.now() if now is None else now
    rgb = np.zeros((SC_ROWS, SC_COLUMNS, 3), dtype=np.uint8)
    lines = [f"AI NOT ANALYSED - {manifest.name} {manifest.version}", reason]
    if manifest.synthetic:
        lines.append(DEMO_DISCLAIMER)
    burn_in(rgb, top=_wrap(lines), bottom=[])
    grey = np.ascontiguousarray(rgb.max(axis=2))
    series_uid, sop_uid = result_uids(str(source.SeriesInstanceUID), manifest, "notice-sc")
    description = notice_series_description(manifest)
    return NoticeImage.from_ref_dataset(
        source,
        grey,
        photometric_interpretation=hd.PhotometricInterpretationValues.MONOCHROME2,
        bits_allocated=8,
        # highdicom needs a coordinate system; the source's orientation, so the viewer
        # shows the notice beside its images without a second convention
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=patient_orientation(source),
        series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        **document_provenance(manifest, now),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=description,
        specific_character_set=document_character_set(source, manifest, [description, *lines]),
    )


def read_notice(sr: Dataset) -> str | None:
    """The sentence of a notice SR, None when ``sr`` is not one."""
    for item in sr.get("ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeValue != QUALITATIVE_EVALUATIONS.value:
            continue
        for child in item.get("ContentSequence", []):
            if child.get("ValueType") == "TEXT":
                return str(child.TextValue)
    return None


def _wrap(lines: Sequence[str], width: int = 110) -> list[str]:
    """Lines of at most ``width`` characters, broken at spaces, so the font stays readable."""
    out: list[str] = []
    for line in lines:
        words, current = line.split(), ""
        for word in words:
            if current and len(current) + 1 + len(word) > width:
                out.append(current)
                current = word
            else:
                current = f"{current} {word}".strip()
        out.append(current)
    return out
