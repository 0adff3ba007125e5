"""Header scope: does the header say this image or series is one the model was made for?

Every manifest declares, in ``[accepts.scope]``, the anatomy and patients its model reads
(:class:`pacsnode.manifest.ScopeSpec`; view positions are ``accepts.view_positions``). This module reads the few header attributes that
say so (:class:`HeaderFacts`) and answers with a :class:`Refusal` in words a radiologist
reads, or None. It is the first of the node's gates and the cheapest; headers from many
sites are wrong, so the content gates (:mod:`pacsnode.gates`) look at the pixels after it.

Body parts are compared after normalisation (upper case, accents and punctuation dropped)
and through :data:`BODY_PART_SYNONYMS`, so ``THORAX``, ``LUNG`` or ``Brustkorb`` count as
``CHEST``. Keywords are whole words (or phrases) of the descriptions: anatomy words are
looked for in Study and Series Description, Protocol Name and Requested Procedure
Description; view words only in what describes the image itself (Series Description,
Protocol Name, View Code), so a study "CHEST PA AND LATERAL" does not refuse its PA image.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date

from pydicom.dataset import Dataset

from pacsnode.manifest import Accepts

BODY_PART_SYNONYMS: dict[str, frozenset[str]] = {
    "CHEST": frozenset(
        {
            "CHEST",
            "THORAX",
            "THORACIC CAVITY",
            "LUNG",
            "LUNGS",
            "CHEST PA",
            "CHEST AP",
            "PA CHEST",
            "AP CHEST",
            "PORT CHEST",
            "PORTABLE CHEST",
            "CHEST PORTABLE",
            "CXR",
            "TORAX",
            "TORACE",
            "THORAKS",
            "BRUST",
            "BRUSTKORB",
            "POITRINE",
            "PECHO",
        }
    ),
    "ABDOMEN": frozenset({"ABDOMEN", "ABD", "ABDOMINAL", "BAUCH", "ABDOMEN CT"}),
    "ABDOMENPELVIS": frozenset({"ABDOMENPELVIS", "ABDOMEN PELVIS", "ABD PELVIS", "ABDPELVIS"}),
    "CHESTABDOMEN": frozenset({"CHESTABDOMEN", "CHEST ABDOMEN", "THORAX ABDOMEN"}),
    "CHESTABDPELVIS": frozenset(
        {"CHESTABDPELVIS", "CHEST ABDOMEN PELVIS", "CHEST ABD PELVIS", "CHEST TO PELVIS", "CAP"}
    ),
    "KIDNEY": frozenset({"KIDNEY", "KIDNEYS", "RENAL"}),
    "HEART": frozenset({"HEART", "CARDIAC"}),
}
"""Canonical DICOM Body Part Examined terms (PS3.16 CID 4031) and what sites write instead."""

_SYNONYM_OF = {syn: canon for canon, syns in BODY_PART_SYNONYMS.items() for syn in syns}
_AGE_RE = re.compile(r"^(\d{1,3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


@dataclass(frozen=True)
class Refusal:
    """Why the header puts an input outside a model's scope.

    ``kind`` is a short fixed word for the metrics (``body_part``, ``description``,
    ``view``, ``age``); ``reason`` the sentence recorded and shown to the radiologist.
    """

    kind: str
    reason: str


@dataclass(frozen=True)
class HeaderFacts:
    """What the scope check reads from one header; strings already normalised."""

    body_part: str  # normalised BodyPartExamined, "" when absent
    anatomy_texts: tuple[tuple[str, str], ...]  # (attribute name, normalised text)
    view_texts: tuple[tuple[str, str], ...]
    view_position: str
    age_years: float | None
    age_text: str = ""  # Patient Age as written (e.g. "000Y"), "" when the age came from dates


def normalise(text: object) -> str:
    """Upper case, accents removed, every run of non-alphanumerics one space."""
    folded = unicodedata.normalize("NFKD", str(text or ""))
    ascii_only = folded.encode("ascii", "ignore").decode("ascii").upper()
    return " ".join(re.split(r"[^A-Z0-9]+", ascii_only)).strip()


def canonical_body_part(value: object) -> str:
    """The CID 4031 term a site's Body Part Examined stands for (itself if unknown)."""
    text = normalise(value)
    return _SYNONYM_OF.get(text, _SYNONYM_OF.get(text.replace(" ", ""), text.replace(" ", "")))


def facts(ds: Dataset) -> HeaderFacts:
    """The header facts of one instance (a radiograph, or one slice of a series)."""
    view_code = ds.get("ViewCodeSequence")
    view_meaning = str(view_code[0].get("CodeMeaning", "")) if view_code else ""
    anatomy = (
        ("Study Description", ds.get("StudyDescription")),
        ("Series Description", ds.get("SeriesDescription")),
        ("Protocol Name", ds.get("ProtocolName")),
        ("Requested Procedure Description", ds.get("RequestedProcedureDescription")),
    )
    view = (
        ("Series Description", ds.get("SeriesDescription")),
        ("Protocol Name", ds.get("ProtocolName")),
        ("View Code", view_meaning),
    )
    return HeaderFacts(
        body_part=normalise(ds.get("BodyPartExamined")),
        anatomy_texts=tuple((name, normalise(v)) for name, v in anatomy if normalise(v)),
        view_texts=tuple((name, normalise(v)) for name, v in view if normalise(v)),
        view_position=normalise(ds.get("ViewPosition")),
        age_years=patient_age_years(ds),
        age_text=str(ds.get("PatientAge", "") or "").strip(),
    )


def patient_age_years(ds: Dataset) -> float | None:
    """Patient Age (``045Y``, ``006M``...) or else birth date against the study date."""
    match = _AGE_RE.match(str(ds.get("PatientAge", "") or "").strip().upper())
    if match:
        return int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2)]
    born = _date(ds.get("PatientBirthDate"))
    seen = next(
        (
            d
            for d in (_date(ds.get(k)) for k in ("StudyDate", "AcquisitionDate", "ContentDate"))
            if d is not None
        ),
        None,
    )
    if born is None or seen is None or seen < born:
        return None
    return (seen - born).days / 365.25


def check(header: HeaderFacts, accepts: Accepts, model: str) -> Refusal | None:
    """None when the header admits the input to ``model``, else the first reason it does not.

    Order: body part, anatomy words, view words, view position, age. A reason quotes the
    matched word, never the free-text field it stands in (sites put anything there). A field
    that names
    both a refused and a confirming word (``"CHEST AND HAND"``) does not refuse; with
    ``missing_body_part = "confirm"`` an empty body part needs a confirming word.
    """
    spec = accepts.scope
    accepted = {canonical_body_part(b) for b in spec.body_parts}
    if header.body_part:
        part = canonical_body_part(header.body_part)
        if accepted and part not in accepted:
            return Refusal(
                "body_part",
                f"body part {header.body_part} is outside this model's scope "
                f"({model} reads {', '.join(sorted(spec.body_parts))})",
            )
    elif spec.missing_body_part == "refuse":
        return Refusal("body_part", f"no body part in the header; {model} needs one")
    elif spec.missing_body_part == "confirm" and not any(
        _has_word(text, spec.confirm_words) for _, text in header.anatomy_texts
    ):
        return Refusal(
            "body_part",
            f"no body part in the header and no description names "
            f"{' / '.join(spec.confirm_words) or 'the anatomy'} that {model} reads",
        )
    for name, text in header.anatomy_texts:
        word = _has_word(text, spec.refuse_population_words)
        if word:
            return Refusal("description", f"{name} names {word}; {model} reads adults only")
        word = _has_word(text, spec.refuse_words)
        if word and not _has_word(text, spec.confirm_words):
            return Refusal("description", f"{name} names {word}, outside this model's scope")
    for name, text in header.view_texts:
        word = _has_word(text, spec.refuse_view_words)
        if word:
            return Refusal("view", f"{name} names a {word} view; {model} reads frontal views only")
    if accepts.view_positions and header.view_position not in accepts.view_positions:
        shown = header.view_position or "(none)"
        return Refusal("view", f"view position {shown} is not one {model} reads")
    age, floor = header.age_years, spec.min_age_years
    if floor is not None and age is not None and age < floor:
        written = f" (Patient Age {header.age_text})" if header.age_text else ""
        return Refusal(
            "age",
            f"patient age {_years(age)}{written} is below this model's floor of {floor:g} "
            "years (adult-only)",
        )
    return None


def _has_word(text: str, words: Iterable[str]) -> str | None:
    """The longest of ``words`` (a word or phrase) that occurs whole in normalised ``text``."""
    padded = f" {text} "
    for word in sorted(words, key=len, reverse=True):
        if f" {normalise(word)} " in padded:
            return normalise(word)
    return None


def _years(age: float) -> str:
    if age >= 2 or age == 0:
        return f"{int(age)} years"
    months = age * 12
    return f"{int(months)} months" if months >= 1 else f"{int(age * 365.25)} days"


def _date(value: object) -> date | None:
    text = str(value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None
