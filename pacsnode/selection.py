"""Series selection: which CT series of a study a volume model runs on, and why not the others.

A CT study usually holds a scout, thick and thin reconstructions and lung and
soft-tissue kernels of the same acquisition. A volume model (its manifest has
``[accepts.ct]``) runs on one of them. Each series is first *qualified* against the
manifest (axial, not a localizer, slice thickness, the header scope of
:mod:`pacsnode.scope` — body part, descriptions, age —, contrast, enough slices);
among the qualifying series the rule is, in order:

0. only for a model whose criteria say ``prefer_contrast`` (the kidney model): a series
   whose header names a contrast agent, before one that is silent (a multiphase abdomen
   study has a non-contrast phase as thin as the portal-venous one);
1. the thinnest slices;
2. then the most slices;
3. then the soft-tissue kernel (soft tissue, then unknown, then lung, then bone);
4. then the lowest Series Number, then the Series Instance UID (only so the choice is stable).

The choice and every rejection reason are recorded as routing decisions, shown by
``pacsnode jobs --study``. Headers are read from one spooled instance per series.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pacsnode import scope
from pacsnode.manifest import CtCriteria

NOT_ELIGIBLE = "not eligible: "
"""How a refused series' recorded reason starts (the notice drops it)."""
NOT_SELECTED = "eligible but not selected: "
"""How an eligible sibling's reason starts (the worker may read it instead, for contrast)."""
KERNEL_RANK = {"soft-tissue": 0, "unknown": 1, "lung": 2, "bone": 3}

_LUNG_WORDS = ("LUNG", "PULMO", "CHEST")
_BONE_WORDS = ("BONE", "SHARP", "EDGE", "DETAIL")
_SOFT_WORDS = ("SOFT", "STANDARD", "STND", "SMOOTH", "MEDIASTIN", "BODY", "ABDOMEN")
_SIEMENS_KERNEL = re.compile(r"^([A-Z]{1,2})(\d{2})[A-Z]?\b")
_NO_CONTRAST = ("NONE", "NO", "NIL", "N/A", "NA", "WITHOUT", "NON CONTRAST", "NONCONTRAST", "-")


@dataclass(frozen=True)
class SeriesSummary:
    """What selection needs to know about one series, from one instance's header."""

    series_uid: str
    series_number: int | None
    description: str
    modality: str
    slices: int  # instances, or frames of a multi-frame instance
    slice_thickness: float | None
    localizer: bool
    plane: str  # "axial", "coronal", "sagittal", "oblique" or "unknown"
    body_part: str
    contrast_agent: str | None  # None: the header does not say
    kernel: str
    facts: scope.HeaderFacts | None = None  # what the model's header scope reads

    @property
    def kernel_family(self) -> str:
        return kernel_family(self.kernel, self.description)

    def describe(self) -> str:
        thickness = "?" if self.slice_thickness is None else f"{self.slice_thickness:g}"
        kernel = f"{self.kernel_family} kernel" + (f" {self.kernel}" if self.kernel else "")
        return f"{thickness} mm, {self.slices} slices, {kernel}"


@dataclass(frozen=True)
class Selection:
    chosen: SeriesSummary | None
    reasons: dict[str, str]  # series UID -> why it was or was not chosen


def kernel_family(kernel: str, description: str = "") -> str:
    """Soft tissue / lung / bone / unknown, from the kernel name or, failing that, the description.

    Words first (GE ``STANDARD``/``LUNG``/``BONE``, descriptions like "lung window"), then
    Siemens-style names (``B30f``, ``Br40d``, ``I26f``, ``Bl57d``): an ``l`` after the first
    letter or a sharpness of 60 or more is a lung kernel, below 60 soft tissue.
    """
    for text in (kernel.upper(), description.upper()):
        if any(w in text for w in _LUNG_WORDS):
            return "lung"
        if any(w in text for w in _BONE_WORDS):
            return "bone"
        if any(w in text for w in _SOFT_WORDS):
            return "soft-tissue"
        match = _SIEMENS_KERNEL.match(text.strip())
        if match:
            letters, sharpness = match.group(1), int(match.group(2))
            return "lung" if "L" in letters[1:] or sharpness >= 60 else "soft-tissue"
    return "unknown"


def summarize(ds: Dataset, slices: int) -> SeriesSummary:
    """Summary of a series from one instance's header (single- or multi-frame)."""
    image_type = [str(v).upper() for v in _as_list(ds.get("ImageType"))]
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    orientation = _floats(ds.get("ImageOrientationPatient"))
    thickness = _float(ds.get("SliceThickness"))
    kernel = " ".join(str(v) for v in _as_list(ds.get("ConvolutionKernel")))
    if shared is not None:
        plane = _first(shared, "PlaneOrientationSequence")
        if orientation is None and plane is not None:
            orientation = _floats(plane.get("ImageOrientationPatient"))
        measures = _first(shared, "PixelMeasuresSequence")
        if thickness is None and measures is not None:
            thickness = _float(measures.get("SliceThickness"))
        recon = _first(shared, "CTReconstructionSequence")
        if not kernel and recon is not None:
            kernel = " ".join(str(v) for v in _as_list(recon.get("ConvolutionKernel")))
    frame = _first(ds, "PerFrameFunctionalGroupsSequence")
    if orientation is None and frame is not None:  # Enhanced CT may give geometry per frame
        plane = _first(frame, "PlaneOrientationSequence")
        orientation = _floats(plane.get("ImageOrientationPatient")) if plane is not None else None
    frames = int(ds.get("NumberOfFrames") or 1)
    agent = ds.get("ContrastBolusAgent")
    if agent is None:
        contrast = _first(ds, "ContrastBolusAgentSequence")
        agent = contrast.get("CodeMeaning") if contrast is not None else None
    series_number = ds.get("SeriesNumber")
    return SeriesSummary(
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        series_number=int(series_number) if series_number not in (None, "") else None,
        description=str(ds.get("SeriesDescription", "")),
        modality=str(ds.get("Modality", "")),
        slices=slices * frames if frames > 1 else slices,
        slice_thickness=thickness,
        localizer="LOCALIZER" in image_type,
        plane=_plane(orientation),
        body_part=str(ds.get("BodyPartExamined", "")).strip().upper(),
        contrast_agent=None if agent is None else str(agent).strip(),
        kernel=kernel.strip(),
        facts=scope.facts(ds),
    )


def read_summary(path: Path, slices: int) -> SeriesSummary:
    """:func:`summarize` from a spooled file's header; unreadable gives an 'unknown' summary."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
        return SeriesSummary(
            series_uid="",
            series_number=None,
            description=f"unreadable header: {exc}",
            modality="",
            slices=slices,
            slice_thickness=None,
            localizer=False,
            plane="unknown",
            body_part="",
            contrast_agent=None,
            kernel="",
        )
    return summarize(ds, slices)


ScopeCheck = Callable[[SeriesSummary], str | None]
"""The model's header scope (:func:`pacsnode.scope.check`) as a reason or None."""


def qualify(
    summary: SeriesSummary, criteria: CtCriteria, in_scope: ScopeCheck | None = None
) -> str | None:
    """None when the series may be chosen, else why not (a phrase a person can read)."""
    if summary.description.startswith("unreadable header"):
        return summary.description
    if summary.localizer:
        return "localizer (scout) image, not a volume"
    if summary.plane != "axial":
        return f"{summary.plane} slices; the model needs axial slices"
    if summary.slice_thickness is None:
        return "no slice thickness in the header"
    if summary.slice_thickness > criteria.max_slice_thickness_mm + 1e-6:
        return (
            f"slice thickness {summary.slice_thickness:g} mm is above the "
            f"{criteria.max_slice_thickness_mm:g} mm limit"
        )
    refusal = in_scope(summary) if in_scope is not None else None
    if refusal is not None:
        return refusal
    if criteria.require_contrast and says_no_contrast(summary.contrast_agent):
        return f"header says no contrast (Contrast/Bolus Agent {summary.contrast_agent!r})"
    if summary.slices < criteria.min_slices:
        return f"{summary.slices} slices; the model needs at least {criteria.min_slices}"
    return None


def says_no_contrast(agent: str | None) -> bool:
    """True only when the header states that no contrast was given; silence is not a no."""
    if agent is None:
        return False
    text = agent.strip().upper()
    return text in _NO_CONTRAST or text.startswith(("NO ", "NON "))


def choose(
    summaries: Sequence[SeriesSummary], criteria: CtCriteria, in_scope: ScopeCheck | None = None
) -> Selection:
    """Apply :func:`qualify` to each series and the documented rule to those that pass."""
    reasons: dict[str, str] = {}
    qualifying = []
    for summary in summaries:
        reason = qualify(summary, criteria, in_scope)
        if reason is None:
            qualifying.append(summary)
        else:
            reasons[summary.series_uid] = f"{NOT_ELIGIBLE}{reason}"
    if not qualifying:
        return Selection(None, reasons)
    ranked = sorted(qualifying, key=lambda summary: _rank(summary, criteria))
    chosen = ranked[0]
    reasons[chosen.series_uid] = f"selected: {chosen.describe()}" + (
        f" (best of {len(ranked)} eligible series)" if len(ranked) > 1 else ""
    )
    for other in ranked[1:]:
        reasons[other.series_uid] = (
            f"{NOT_SELECTED}series {chosen.series_uid} has "
            f"{_why_better(chosen, other, criteria)} ({other.describe()})"
        )
    return Selection(chosen, reasons)


def says_contrast(agent: str | None) -> bool:
    """True when the header names a contrast agent."""
    return bool(agent and agent.strip()) and not says_no_contrast(agent)


def _rank(s: SeriesSummary, criteria: CtCriteria) -> tuple[int, float, int, int, int, str]:
    return (
        0 if not criteria.prefer_contrast or says_contrast(s.contrast_agent) else 1,
        s.slice_thickness if s.slice_thickness is not None else math.inf,
        -s.slices,
        KERNEL_RANK[s.kernel_family],
        s.series_number if s.series_number is not None else 1 << 30,
        s.series_uid,
    )


def _why_better(chosen: SeriesSummary, other: SeriesSummary, criteria: CtCriteria) -> str:
    a, b = _rank(chosen, criteria), _rank(other, criteria)
    if a[0] != b[0]:
        return f"contrast in its header ({chosen.contrast_agent})"
    if a[1] != b[1]:
        return f"thinner slices ({chosen.slice_thickness:g} mm)"
    if a[2] != b[2]:
        return f"more slices ({chosen.slices})"
    if a[3] != b[3]:
        return f"a preferred kernel ({chosen.kernel_family})"
    return "a lower series number"


def _plane(orientation: list[float] | None) -> str:
    if orientation is None or len(orientation) != 6:
        return "unknown"
    r, c = orientation[:3], orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    if norm < 1e-6:
        return "unknown"
    axis = max(range(3), key=lambda i: abs(n[i]))
    if abs(n[axis]) / norm < math.cos(math.radians(30)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _as_list(value: object) -> list[object]:
    if value is None:
        return []
    if isinstance(value, str | bytes):
        return [value]
    try:
        return list(value)  # type: ignore[call-overload]
    except TypeError:
        return [value]


def _first(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _floats(value: object) -> list[float] | None:
    items = _as_list(value)
    try:
        return [float(str(v)) for v in items] if items else None
    except ValueError:
        return None


def _float(value: object) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(str(value))
    except ValueError:
        return None
