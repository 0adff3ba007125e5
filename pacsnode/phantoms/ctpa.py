"""Synthetic CT pulmonary angiography (CTPA) series with RSNA STR PE ground truth.

A :class:`CtpaCase` is an analytic description of one chest in **patient coordinates**
(LPS mm: +x patient left, +y posterior, +z superior): body outline with fat, muscle, ribs,
sternum and spine; two lungs with apices and diaphragm domes; mediastinum; heart chambers
whose in-plane RV:LV diameter ratio is above or below 1; aorta and arch vessels, SVC, IVC,
pulmonary veins; the pulmonary trunk, main, lobar and peripheral arteries opacified by
contrast; trachea, bronchi and oesophagus. Emboli are filling defects inside the arteries:
*acute* ones central in the lumen (sometimes occlusive), *chronic* ones eccentric and
wall-adherent, sometimes calcified.

Rendering samples that description on any grid (:func:`render_canonical`, the canonical
volume orientation of :mod:`pacsnode.volumes`), so the same case written head first or feet
first, supine or prone (:func:`write_ctpa_series`) holds identical patient-space content.

Exam labels follow RSNA STR PE: ``central_pe`` is an embolus in the pulmonary trunk,
``leftsided_pe`` / ``rightsided_pe`` one in the left / right main or lobar arteries;
indeterminate studies (poor opacification or motion) have no emboli; negative and
indeterminate studies have every PE-type label 0, including both RV:LV labels.
Slice truth (``pe_present_on_image``) is 1 where an embolus cuts the slice plane with at
least :data:`MIN_EMBOLUS_AREA_MM2` inside the lumen, measured on a fine grid independent of
the image resolution.

Not modelled: real anatomical variability, segmental/subsegmental emboli, lung disease,
beam hardening and streaks from dense contrast, partial-volume slice profiles (slice
thickness is a header value), respiratory stair-steps, and the scanner's noise texture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pacsnode.models.pe import EXAM_LABELS, IMAGE_LABEL
from pacsnode.phantoms.ctseries import CT_IMAGE_STORAGE as CT_IMAGE_STORAGE
from pacsnode.phantoms.ctseries import (
    HU_MAX,
    HU_MIN,
    PhantomStudy,
    check_patient_position,
    new_ct_file,
    set_patient_study,
    set_pixels,
    write_ct_series,
)
from pacsnode.phantoms.ctseries import PATIENT_POSITIONS as PATIENT_POSITIONS
from pacsnode.uids import derive_uid

Vec3 = tuple[float, float, float]

CTPA_IMAGE_LABEL = IMAGE_LABEL
CTPA_EXAM_LABELS = EXAM_LABELS
"""The nine RSNA STR PE exam labels, in the order of ``models/ct-pe/manifest.toml``."""

KINDS: tuple[str, ...] = ("negative", "indeterminate", "acute", "chronic", "acute_and_chronic")
KIND_PROBABILITIES = (0.35, 0.12, 0.33, 0.10, 0.10)
LOCATIONS: tuple[str, ...] = ("central", "left", "right")
SITES: tuple[str, ...] = ("trunk", "left_main", "right_main", "left_lobar", "right_lobar")
"""Where an embolus can sit; ``trunk`` counts as central, main and lobar as left or right."""

MIN_EMBOLUS_AREA_MM2 = 2.0
TRUTH_GRID_MM = 0.4

_FAT, _MUSCLE, _SOFT, _AIR, _BONE, _MARROW = -95.0, 50.0, 40.0, -1000.0, 700.0, 230.0


# ---------------------------------------------------------------- the case description


@dataclass(frozen=True)
class Tube:
    """A straight tapered capsule between two points (patient mm): vessel, airway, bone.

    ``role`` selects the HU at render time (``pa``, ``systemic``, ``svc``, ``ivc``,
    ``air``, ``soft``, ``bone``); ``site`` marks the pulmonary arteries emboli may sit in;
    ``lung_only`` tubes (peripheral branches) are painted only over aerated lung.
    """

    name: str
    p0: Vec3
    p1: Vec3
    r0: float
    r1: float
    role: str
    site: str | None = None
    lung_only: bool = False


@dataclass(frozen=True)
class Blob:
    """An axis-aligned ellipsoid (heart chambers, myocardium, fat, stomach)."""

    name: str
    centre: Vec3
    semi: Vec3
    role: str


@dataclass(frozen=True)
class Embolus:
    """A filling defect: an ellipsoid along ``axis`` clipped to the lumen of ``vessel``."""

    vessel: str
    site: str
    kind: str  # "acute" or "chronic"
    centre: Vec3
    axis: Vec3  # unit vector along the vessel
    half_length: float
    radius: float
    hu: float
    calcification: Vec3 | None = None
    calcification_radius: float = 0.0

    def z_extent(self) -> tuple[float, float]:
        """Lowest and highest z (mm) of the unclipped ellipsoid."""
        uz = self.axis[2]
        half = math.sqrt((self.half_length * uz) ** 2 + self.radius**2 * max(0.0, 1.0 - uz * uz))
        return self.centre[2] - half, self.centre[2] + half


@dataclass(frozen=True)
class CtpaCase:
    """One synthetic chest in patient coordinates, with its exam truth (label -> 0/1)."""

    seed: int
    kind: str
    truth: dict[str, int]
    centre: Vec3  # patient mm: body axis (x, y) and the pulmonary bifurcation level (z)
    scale: float
    cavity_semi: tuple[float, float]  # thoracic cavity (inside the ribs), x and y
    muscle_mm: float
    fat_mm: float
    neck_semi: tuple[float, float]
    apex_z: float  # local z (mm above the bifurcation) of the lung apices
    dome_top: tuple[float, float]  # local z of the right / left diaphragm domes
    mediastinum_half_width: float
    spine_y: float  # local y of the vertebral body centre
    vertebra_radius: float
    rib_phase: float
    tubes: tuple[Tube, ...]
    blobs: tuple[Blob, ...]
    emboli: tuple[Embolus, ...]
    rv_lv_ratio: float
    ventricle_z: tuple[float, float]  # patient z range where both ventricles are wide
    pa_hu: float
    systemic_hu: float
    svc_hu: float
    noise_hu: float
    motion_mm: float
    indeterminate_reason: str | None
    fov_mm: float
    scan_centre_z: float
    lung_hu: float = -850.0
    notes: tuple[str, ...] = field(default=())

    @property
    def positive(self) -> bool:
        return bool(self.emboli)

    def role_hu(self, role: str) -> float:
        return {
            "pa": self.pa_hu,
            "systemic": self.systemic_hu,
            "svc": self.svc_hu,
            "ivc": 95.0,
            "air": -990.0,
            "soft": _SOFT,
            "bone": 450.0,
            "fat": -90.0,
            "myocardium": 45.0,
            "stomach": -990.0,
        }[role]


def exam_truth(kind: str, emboli: Sequence[Embolus], rv_lv_ratio: float) -> dict[str, int]:
    """RSNA exam labels of a study; consistent by construction."""
    truth = dict.fromkeys(CTPA_EXAM_LABELS, 0)
    if kind == "negative":
        truth["negative_exam_for_pe"] = 1
        return truth
    if kind == "indeterminate":
        truth["indeterminate"] = 1
        return truth
    sites = {e.site for e in emboli}
    truth["chronic_pe"] = int(kind == "chronic")
    truth["acute_and_chronic_pe"] = int(kind == "acute_and_chronic")
    truth["central_pe"] = int("trunk" in sites)
    truth["leftsided_pe"] = int(bool(sites & {"left_main", "left_lobar"}))
    truth["rightsided_pe"] = int(bool(sites & {"right_main", "right_lobar"}))
    truth["rv_lv_ratio_gte_1"] = int(rv_lv_ratio >= 1.0)
    truth["rv_lv_ratio_lt_1"] = int(rv_lv_ratio < 1.0)
    return truth


def truth_violations(truth: dict[str, int], any_positive_image: bool) -> list[str]:
    """RSNA consistency rules on 0/1 truth (the model-side check lives in ``models.pe``)."""
    problems = []
    t = {k: truth[k] for k in CTPA_EXAM_LABELS}
    if any_positive_image:
        if t["rv_lv_ratio_gte_1"] + t["rv_lv_ratio_lt_1"] != 1:
            problems.append("positive exam needs exactly one RV:LV label")
        if t["central_pe"] + t["leftsided_pe"] + t["rightsided_pe"] < 1:
            problems.append("positive exam needs a location")
        if t["chronic_pe"] + t["acute_and_chronic_pe"] > 1:
            problems.append("chronic and acute_and_chronic both set")
        if t["negative_exam_for_pe"] or t["indeterminate"]:
            problems.append("positive exam marked negative or indeterminate")
    else:
        if t["negative_exam_for_pe"] + t["indeterminate"] != 1:
            problems.append("negative exam needs exactly one of negative/indeterminate")
        others = [k for k in CTPA_EXAM_LABELS[2:] if t[k]]
        if others:
            problems.append(f"negative exam has PE-type labels {others}")
    return problems


# ---------------------------------------------------------------- case generation


def _unit(v: np.ndarray) -> np.ndarray:
    return v / float(np.linalg.norm(v))


def _perpendicular(rng: np.random.Generator, u: np.ndarray) -> np.ndarray:
    while True:
        v = rng.standard_normal(3)
        v -= v.dot(u) * u
        n = float(np.linalg.norm(v))
        if n > 1e-3:
            return v / n


def make_ctpa_case(
    seed: int,
    *,
    kind: str | None = None,
    location: str | None = None,
    rv_lv: str | None = None,
    indeterminate_reason: str | None = None,
) -> CtpaCase:
    """A random chest for ``seed``; keywords force parts of it.

    ``kind``: one of :data:`KINDS` (``None``: drawn with :data:`KIND_PROBABILITIES`).
    ``location``: ``"central"`` (all emboli in the trunk), ``"left"`` / ``"right"`` (all in
    that side's lobar arteries), or ``None`` (each embolus anywhere). ``rv_lv``: ``"gte_1"``
    or ``"lt_1"``. ``indeterminate_reason``: ``"contrast"`` or ``"motion"``.
    """
    rng = np.random.default_rng([seed, 0xC7FA])
    if kind is None:
        kind = str(rng.choice(KINDS, p=KIND_PROBABILITIES))
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {KINDS}")
    if location is not None and location not in LOCATIONS:
        raise ValueError(f"location: {location!r} is not one of {LOCATIONS}")
    if location is not None and kind in ("negative", "indeterminate"):
        raise ValueError(f"location: {location!r} given for a {kind} study")
    if rv_lv not in (None, "gte_1", "lt_1"):
        raise ValueError(f"rv_lv: {rv_lv!r} is not 'gte_1' or 'lt_1'")
    if indeterminate_reason not in (None, "contrast", "motion"):
        raise ValueError(f"indeterminate_reason: {indeterminate_reason!r} is not contrast/motion")
    positive = kind not in ("negative", "indeterminate")

    s = float(rng.uniform(0.9, 1.1))
    cx, cy = float(rng.uniform(-15, 15)), float(rng.uniform(-20, 10))
    zref = float(rng.uniform(-260, -90))

    def p(x: float, y: float, z: float) -> Vec3:
        return (cx + s * x, cy + s * y, zref + s * z)

    tubes: list[Tube] = []

    def tube(
        name: str,
        a: Vec3,
        b: Vec3,
        r0: float,
        r1: float | None,
        role: str,
        site: str | None = None,
        lung_only: bool = False,
    ) -> None:
        tubes.append(
            Tube(name, p(*a), p(*b), s * r0, s * (r0 if r1 is None else r1), role, site, lung_only)
        )

    # --- heart: LV, RV beside it towards the right-anterior, atria
    gte = rng.random() < (0.45 if positive else 0.3) if rv_lv is None else rv_lv == "gte_1"
    ratio = float(rng.uniform(1.1, 1.5) if gte else rng.uniform(0.6, 0.9))
    zv = -62.0
    r_lv = float(rng.uniform(18, 23))
    r_rv = ratio * r_lv
    lv = np.array([35.0, -10.0])
    u_rv = _unit(np.array([-0.87, -0.5]))
    rv = lv + (r_lv + 7.0 + r_rv) * u_rv
    blobs: list[Blob] = []
    chambers = [
        ("lv", (lv[0], lv[1], zv), (r_lv, r_lv, 33.0), "systemic", 10.0),
        ("rv", (rv[0], rv[1], zv), (r_rv, r_rv, 30.0), "pa", 4.0),
        ("ra", (-50.0, -15.0, zv + 12), (22.0, 19.0, 24.0), "pa", 3.0),
        ("la", (0.0, 25.0, -35.0), (26.0, 15.0, 15.0), "systemic", 3.0),
    ]

    def blob(name: str, c: Sequence[float], semi: Sequence[float], role: str) -> None:
        blobs.append(Blob(name, p(c[0], c[1], c[2]), (s * semi[0], s * semi[1], s * semi[2]), role))

    for name, c, semi, _, wall in chambers:
        blob(f"{name}-fat", c, [v + wall + 5.0 for v in semi], "fat")
    for name, c, semi, _, wall in chambers:
        blob(f"{name}-wall", c, [v + wall for v in semi], "myocardium")
    for name, c, semi, role, _ in chambers:
        blob(name, c, semi, role)
    blob("stomach", (60.0, -10.0, -150.0), (30.0, 25.0, 18.0), "stomach")
    ventricle_z = (zref + s * (zv - 12.0), zref + s * (zv + 12.0))

    # --- airways and oesophagus (painted before vessels)
    tube("trachea", (0, 18, 220), (0, 22, 18), 9.5, None, "air")
    tube("right-main-bronchus", (0, 22, 18), (-40, 30, 2), 7.0, None, "air")
    tube("bronchus-intermedius", (-40, 30, 2), (-55, 35, -40), 5.5, None, "air")
    tube("left-main-bronchus", (0, 22, 18), (45, 32, -12), 6.5, None, "air")
    tube("oesophagus", (2, 38, 220), (2, 36, -160), 7.0, None, "soft")

    # --- systemic vessels
    r_ao = float(rng.uniform(13.5, 16.5))
    tube("aortic-root", (-15, -10, -45), (-28, -30, 25), r_ao, None, "systemic")
    tube("arch-1", (-28, -30, 25), (-8, -20, 44), r_ao, r_ao * 0.95, "systemic")
    tube("arch-2", (-8, -20, 44), (24, 32, 32), r_ao * 0.95, r_ao * 0.85, "systemic")
    tube("aorta-desc-1", (24, 32, 32), (25, 42, 5), r_ao * 0.85, r_ao * 0.8, "systemic")
    tube("aorta-desc-2", (25, 42, 5), (25, 42, -260), r_ao * 0.8, r_ao * 0.75, "systemic")
    tube("brachiocephalic", (-20, -24, 44), (-28, -15, 220), 6.5, None, "systemic")
    tube("left-carotid", (0, -15, 46), (6, -10, 220), 4.0, None, "systemic")
    tube("left-subclavian", (16, 8, 42), (32, 6, 220), 5.0, None, "systemic")
    tube("svc", (-50, -15, 110), (-50, -15, zv + 20), 10.0, None, "svc")
    tube("right-brachiocephalic-vein", (-50, -15, 110), (-55, -10, 220), 8.0, None, "svc")
    tube("left-brachiocephalic-vein", (45, -28, 118), (-50, -15, 105), 6.0, None, "svc")
    tube("ivc", (-35, 15, zv - 25), (-30, 20, -260), 12.0, None, "ivc")
    for side in (-1.0, 1.0):
        tube(
            f"pv-upper-{side:+.0f}",
            (side * 20, 28, -35),
            (side * 70, 22, -25),
            6.0,
            4.5,
            "systemic",
        )
        tube(
            f"pv-lower-{side:+.0f}",
            (side * 18, 28, -42),
            (side * 66, 25, -70),
            6.0,
            4.5,
            "systemic",
        )

    # --- pulmonary arteries: trunk, mains, lobar, then peripheral branches
    r_t = float(rng.uniform(12.5, 15.5)) * (1.08 if gte and positive else 1.0)
    r_m = float(rng.uniform(9.5, 11.5))
    r_l = float(rng.uniform(5.5, 7.0))
    rvot = (rv[0] + 0.4 * r_rv, rv[1], zv + 20)
    tube("rvot", rvot, (5, -45, -45), 13.0, r_t, "pa")
    tube("pa-trunk", (5, -45, -45), (14, 0, 0), r_t, r_t, "pa", "trunk")
    tube("rpa-1", (14, 0, 0), (-32, 14, -6), r_m, r_m * 0.95, "pa", "right_main")
    tube("rpa-2", (-32, 14, -6), (-62, 20, -12), r_m * 0.95, r_m * 0.85, "pa", "right_main")
    tube("lpa-1", (14, 0, 0), (38, 12, 8), r_m, r_m * 0.95, "pa", "left_main")
    tube("lpa-2", (38, 12, 8), (60, 22, 2), r_m * 0.95, r_m * 0.85, "pa", "left_main")
    lobar: list[tuple[str, Vec3, Vec3, float, str]] = [
        ("rul", (-28, 10, -4), (-60, -5, 40), r_l * 0.95, "right_lobar"),
        ("ril", (-62, 20, -12), (-75, 25, -50), r_l * 1.15, "right_lobar"),
        ("rml", (-68, 22, -32), (-86, -14, -56), max(r_l * 0.8, 5.0), "right_lobar"),
        ("lul", (45, 15, 8), (70, -5, 45), r_l * 0.95, "left_lobar"),
        ("lll", (60, 22, 2), (72, 30, -45), r_l * 1.15, "left_lobar"),
        ("lingula", (66, 26, -20), (88, -10, -45), max(r_l * 0.8, 5.0), "left_lobar"),
    ]
    for name, a, b, r, site in lobar:
        tube(name, a, b, r, r * 0.9, "pa", site)
    tube("rll-distal", (-75, 25, -50), (-80, 35, -100), r_l, r_l * 0.8, "pa")
    tube("lll-distal", (72, 30, -45), (80, 38, -100), r_l, r_l * 0.8, "pa")
    ends = [(b, r * 0.9) for _, _, b, r, _ in lobar]
    ends += [((-80.0, 35.0, -100.0), r_l * 0.8), ((80.0, 38.0, -100.0), r_l * 0.8)]
    for k, (end, r_end) in enumerate(ends):
        base = np.array(end, dtype=float)
        outward = _unit(np.array([math.copysign(1.0, base[0]), 0.0, 0.0]) + 0.3 * _unit(base))
        for j in range(3):
            d = _unit(outward + 0.8 * rng.standard_normal(3))
            length = float(rng.uniform(25, 45))
            tip = base + d * length
            r_seg = float(max(r_end * rng.uniform(0.5, 0.65), 2.2))
            tube(f"seg-{k}-{j}", tuple(base), tuple(tip), r_seg, r_seg * 0.8, "pa", None, True)
            for m in range(2):
                d2 = _unit(d + 0.9 * rng.standard_normal(3))
                tip2 = tip + d2 * float(rng.uniform(15, 30))
                tube(
                    f"sub-{k}-{j}-{m}", tuple(tip), tuple(tip2), r_seg * 0.7, 1.2, "pa", None, True
                )

    # --- emboli
    emboli: list[Embolus] = []
    if positive:
        by_site: dict[str, list[Tube]] = {}
        for t in tubes:
            if t.site:
                by_site.setdefault(t.site, []).append(t)
        types: list[str]
        if kind == "acute":
            types = ["acute"] * int(rng.integers(1, 4))
        elif kind == "chronic":
            types = ["chronic"] * int(rng.integers(1, 3))
        else:
            types = ["acute"] * int(rng.integers(1, 3)) + ["chronic"] * int(rng.integers(1, 3))
        for etype in types:
            if location == "central":
                site = "trunk"
            elif location == "left":
                site = "left_lobar"
            elif location == "right":
                site = "right_lobar"
            else:
                site = str(rng.choice(SITES, p=(0.2, 0.15, 0.15, 0.25, 0.25)))
            options = by_site[site]
            vessel = options[int(rng.integers(0, len(options)))]
            emboli.append(_make_embolus(rng, vessel, etype))

    # --- contrast, noise, motion
    reason = None
    motion = 0.0
    if kind == "indeterminate":
        reason = indeterminate_reason or ("contrast" if rng.random() < 0.65 else "motion")
    if reason == "contrast":
        pa_hu = float(rng.uniform(100, 150))
        systemic_hu = float(rng.uniform(80, 130))
        svc_hu = float(rng.uniform(150, 300))
    else:
        pa_hu = float(rng.uniform(250, 420))
        systemic_hu = float(rng.uniform(150, 280))
        svc_hu = float(rng.uniform(400, 900))
    if reason == "motion":
        motion = float(rng.uniform(6.0, 10.0))
    noise = float(rng.uniform(8, 25))

    cavity = (s * float(rng.uniform(122, 134)), s * float(rng.uniform(84, 96)))
    muscle = float(rng.uniform(8, 14))
    fat = float(rng.uniform(6, 25))
    neck = (s * float(rng.uniform(60, 72)), s * float(rng.uniform(55, 65)))
    half_x = cavity[0] + 8 * s + muscle + fat + abs(cx)
    half_y = cavity[1] + 8 * s + muscle + fat + abs(cy)
    fov = 2.0 * max(half_x, half_y) + float(rng.uniform(15, 50))
    dome_r = float(rng.uniform(-120, -104))
    dome_l = dome_r - float(rng.uniform(8, 18))
    case = CtpaCase(
        seed=seed,
        kind=kind,
        truth=exam_truth(kind, emboli, ratio),
        centre=(cx, cy, zref),
        scale=s,
        cavity_semi=cavity,
        muscle_mm=muscle,
        fat_mm=fat,
        neck_semi=neck,
        apex_z=s * float(rng.uniform(100, 120)),
        dome_top=(s * dome_r, s * dome_l),
        mediastinum_half_width=s * float(rng.uniform(24, 30)),
        spine_y=s * 62.0,
        vertebra_radius=s * float(rng.uniform(15.5, 18.5)),
        rib_phase=float(rng.uniform(0, 26)),
        tubes=tuple(tubes),
        blobs=tuple(blobs),
        emboli=tuple(emboli),
        rv_lv_ratio=ratio,
        ventricle_z=ventricle_z,
        pa_hu=pa_hu,
        systemic_hu=systemic_hu,
        svc_hu=svc_hu,
        noise_hu=noise,
        motion_mm=motion,
        indeterminate_reason=reason,
        fov_mm=round(fov, 1),
        scan_centre_z=zref + s * (-8.0) + float(rng.uniform(-6, 6)),
        lung_hu=float(rng.uniform(-875, -830)),
    )
    return case


def _make_embolus(rng: np.random.Generator, vessel: Tube, etype: str) -> Embolus:
    p0, p1 = np.array(vessel.p0), np.array(vessel.p1)
    length = float(np.linalg.norm(p1 - p0))
    u = (p1 - p0) / length
    t = float(rng.uniform(0.25, 0.7))
    axis_pt = p0 + t * (p1 - p0)
    r = vessel.r0 + t * (vessel.r1 - vessel.r0)
    n = _perpendicular(rng, u)
    calc: Vec3 | None = None
    calc_r = 0.0
    if etype == "acute":
        occlusive = rng.random() < 0.15
        rc = r * 1.1 if occlusive else max(r * float(rng.uniform(0.5, 0.78)), 3.0)
        half = min(float(rng.uniform(7, 18)), 0.4 * length)
        centre = axis_pt + n * r * float(rng.uniform(0.0, 0.12))
        hu = float(rng.uniform(30, 70))
    else:
        rc = max(r * float(rng.uniform(0.5, 0.72)), 3.0)
        half = min(float(rng.uniform(6, 15)), 0.4 * length)
        centre = axis_pt + n * (r - 0.3 * rc)
        hu = float(rng.uniform(45, 85))
        if rng.random() < 0.4:
            calc_r = float(rng.uniform(1.2, 2.2))
            c = axis_pt + n * (r - calc_r - 0.5) + u * float(rng.uniform(-0.5, 0.5)) * half
            calc = (float(c[0]), float(c[1]), float(c[2]))
    return Embolus(
        vessel=vessel.name,
        site=str(vessel.site),
        kind=etype,
        centre=(float(centre[0]), float(centre[1]), float(centre[2])),
        axis=(float(u[0]), float(u[1]), float(u[2])),
        half_length=max(half, 5.0),
        radius=float(rc),
        hu=hu,
        calcification=calc,
        calcification_radius=calc_r,
    )


# ---------------------------------------------------------------- rendering


def _span(coords: np.ndarray, lo: float, hi: float) -> slice:
    """Index range of ascending ``coords`` within [lo, hi]."""
    a = int(np.searchsorted(coords, lo, side="left"))
    b = int(np.searchsorted(coords, hi, side="right"))
    return slice(a, max(a, b))


def _tube_section(
    t: Tube, xs: np.ndarray, ys: np.ndarray, z: float, grow: float = 0.0
) -> tuple[slice, slice, np.ndarray] | None:
    """Pixels of ``t`` (radius + ``grow``) on the plane ``z``: (row span, col span, mask)."""
    rmax = max(t.r0, t.r1) + grow
    z0, z1 = t.p0[2], t.p1[2]
    if z < min(z0, z1) - rmax or z > max(z0, z1) + rmax:
        return None
    p0 = np.array(t.p0)
    d = np.array(t.p1) - p0
    if abs(d[2]) > 1e-6:
        ta = (z - rmax - z0) / d[2]
        tb = (z + rmax - z0) / d[2]
        lo, hi = max(0.0, min(ta, tb)), min(1.0, max(ta, tb))
    else:
        lo, hi = 0.0, 1.0
    xa, xb = p0[0] + lo * d[0], p0[0] + hi * d[0]
    ya, yb = p0[1] + lo * d[1], p0[1] + hi * d[1]
    sx = _span(xs, min(xa, xb) - rmax, max(xa, xb) + rmax)
    sy = _span(ys, min(ya, yb) - rmax, max(ya, yb) + rmax)
    if sx.start >= sx.stop or sy.start >= sy.stop:
        return None
    dx = xs[sx][None, :] - p0[0]
    dy = ys[sy][:, None] - p0[1]
    dz = z - p0[2]
    l2 = float(d.dot(d))
    tt = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / l2, 0.0, 1.0)
    dist2 = (dx - tt * d[0]) ** 2 + (dy - tt * d[1]) ** 2 + (dz - tt * d[2]) ** 2
    rad = t.r0 + tt * (t.r1 - t.r0) + grow
    mask = dist2 < rad * rad
    if not mask.any():
        return None
    return sy, sx, mask


def _blob_section(
    b: Blob, xs: np.ndarray, ys: np.ndarray, z: float
) -> tuple[slice, slice, np.ndarray] | None:
    cz = b.centre[2]
    a, bb, c = b.semi
    if abs(z - cz) >= c:
        return None
    f = math.sqrt(1.0 - ((z - cz) / c) ** 2)
    ax, ay = a * f, bb * f
    sx = _span(xs, b.centre[0] - ax, b.centre[0] + ax)
    sy = _span(ys, b.centre[1] - ay, b.centre[1] + ay)
    if sx.start >= sx.stop or sy.start >= sy.stop:
        return None
    u = ((xs[sx][None, :] - b.centre[0]) / ax) ** 2 + ((ys[sy][:, None] - b.centre[1]) / ay) ** 2
    return sy, sx, u < 1.0


def _embolus_mask(
    e: Embolus, vessel: Tube, xs: np.ndarray, ys: np.ndarray, z: float
) -> tuple[slice, slice, np.ndarray] | None:
    """Embolus pixels on plane ``z``: inside both its ellipsoid and the vessel lumen."""
    zlo, zhi = e.z_extent()
    if z < zlo or z > zhi:
        return None
    reach = max(e.half_length, e.radius)
    sx = _span(xs, e.centre[0] - reach, e.centre[0] + reach)
    sy = _span(ys, e.centre[1] - reach, e.centre[1] + reach)
    if sx.start >= sx.stop or sy.start >= sy.stop:
        return None
    dx = xs[sx][None, :] - e.centre[0]
    dy = ys[sy][:, None] - e.centre[1]
    dz = z - e.centre[2]
    along = dx * e.axis[0] + dy * e.axis[1] + dz * e.axis[2]
    perp2 = dx * dx + dy * dy + dz * dz - along * along
    inside = (along / e.half_length) ** 2 + perp2 / (e.radius * e.radius) < 1.0
    if not inside.any():
        return None
    lumen = _tube_section(vessel, xs[sx], ys[sy], z)
    if lumen is None:
        return None
    ly, lx, lmask = lumen
    full = np.zeros_like(inside)
    full[ly, lx] = lmask
    inside &= full
    if not inside.any():
        return None
    return sy, sx, inside


def emboli_mask(case: CtpaCase, xs: np.ndarray, ys: np.ndarray, z: float) -> np.ndarray:
    """Where emboli are on the plane ``z``: bool ``(len(ys), len(xs))`` on ascending
    patient-mm grids (training uses it for dense, where-is-it supervision)."""
    out = np.zeros((ys.size, xs.size), dtype=bool)
    vessels = {t.name: t for t in case.tubes}
    for e in case.emboli:
        sec = _embolus_mask(e, vessels[e.vessel], xs, ys, z)
        if sec is not None:
            sy, sx, mask = sec
            out[sy, sx] |= mask
    return out


def _paint(
    img: np.ndarray, sec: tuple[slice, slice, np.ndarray] | None, hu: float, lung_only: bool = False
) -> None:
    if sec is None:
        return
    sy, sx, mask = sec
    view = img[sy, sx]
    if lung_only:
        mask = mask & (view < -500.0)
    view[mask] = hu


def _render_slice(case: CtpaCase, xs: np.ndarray, ys: np.ndarray, z: float) -> np.ndarray:
    """Noise-free HU of the plane ``z`` on the grid ``ys`` (rows) × ``xs`` (columns)."""
    cx, cy, zref = case.centre
    s = case.scale
    zl = z - zref
    X = (xs - cx)[None, :].astype(np.float32)
    Y = (ys - cy)[:, None].astype(np.float32)
    ac, bc = case.cavity_semi
    rib_w = 8.0 * s
    # the neck: above the apices the body narrows towards neck_semi
    w = float(np.clip((zl - case.apex_z - 10.0) / 30.0, 0.0, 1.0))
    neck_a, neck_b = case.neck_semi
    ac_z = ac + w * (neck_a - ac)
    bc_z = bc + w * (neck_b - bc)
    a_m, b_m = ac_z + rib_w + case.muscle_mm, bc_z + rib_w + case.muscle_mm
    a_b, b_b = a_m + case.fat_mm, b_m + case.fat_mm
    img = np.full((ys.size, xs.size), _AIR, dtype=np.float32)
    X2, Y2 = X * X, Y * Y
    img[X2 / (a_b * a_b) + Y2 / (b_b * b_b) < 1.0] = _FAT
    img[X2 / (a_m * a_m) + Y2 / (b_m * b_m) < 1.0] = _MUSCLE
    rc = X2 / (ac_z * ac_z) + Y2 / (bc_z * bc_z)
    cavity = rc < 1.0
    thorax = zl < case.apex_z + 5.0
    img[cavity] = -80.0 if thorax else _SOFT

    # lungs: two ellipses shrinking towards the apices, lateral to the mediastinum,
    # above the diaphragm domes
    top = case.apex_z
    f = 1.0
    if zl > top - 60.0 * s:
        f = math.sqrt(max(0.0, 1.0 - ((zl - (top - 60.0 * s)) / (60.0 * s)) ** 2))
    dome_max = max(case.dome_top)
    lung = np.zeros_like(cavity)
    if f > 0.05 and zl > min(case.dome_top) - 60.0 * s:
        for side, sign in ((0, -1.0), (1, 1.0)):
            lx, ly = sign * 78.0 * s, 5.0 * s
            ax, ay = 72.0 * s * f, 100.0 * s * f
            inside = ((X - lx) / ax) ** 2 + ((Y - ly) / ay) ** 2 < 1.0
            inside &= (sign * X) > case.mediastinum_half_width
            if zl < dome_max + 5.0:
                q = ((X - sign * 60.0 * s) / (75.0 * s)) ** 2 + (Y / (95.0 * s)) ** 2
                inside &= zl > case.dome_top[side] - 55.0 * s * q
            lung |= inside
        lung &= cavity
        lung_hu = case.lung_hu + 40.0 * (Y / bc)
        img = np.where(lung, lung_hu, img).astype(np.float32)
    # abdomen below the domes (liver on the right, spleen/stomach side on the left)
    if zl < dome_max + 5.0:
        q_r = ((X + 60.0 * s) / (75.0 * s)) ** 2 + (Y / (95.0 * s)) ** 2
        q_l = ((X - 60.0 * s) / (75.0 * s)) ** 2 + (Y / (95.0 * s)) ** 2
        below = np.where(
            X < 0, zl <= case.dome_top[0] - 55.0 * s * q_r, zl <= case.dome_top[1] - 55.0 * s * q_l
        )
        below &= cavity & ~lung
        img[below & (X < 0)] = 62.0
        img[below & (X >= 0)] = 48.0

    # heart, airways, vessels
    for b in case.blobs:
        _paint(img, _blob_section(b, xs, ys, z), case.role_hu(b.role))
    vessels = {t.name: t for t in case.tubes}
    for t in case.tubes:
        _paint(img, _tube_section(t, xs, ys, z), case.role_hu(t.role), t.lung_only)
    for e in case.emboli:
        sec = _embolus_mask(e, vessels[e.vessel], xs, ys, z)
        _paint(img, sec, e.hu)
        if e.calcification is not None:
            calc = Blob("calc", e.calcification, (e.calcification_radius,) * 3, "bone")
            _paint(img, _blob_section(calc, xs, ys, z), 650.0)

    # bones: spine, ribs, sternum
    vy, vr = case.spine_y, case.vertebra_radius
    sy = _span(ys, cy + vy - vr - 40.0 * s, cy + vy + vr + 45.0 * s)
    sx = _span(xs, cx - vr - 30.0 * s, cx + vr + 30.0 * s)
    if sy.start < sy.stop and sx.start < sx.stop:
        Xs, Ys = X[:, sx], Y[sy, :]
        view = img[sy, sx]
        d2 = Xs**2 + (Ys - vy) ** 2
        view[d2 < (vr + 7.0 * s) ** 2] = _SOFT
        disc = ((zl + case.rib_phase) % (27.0 * s)) < 5.0 * s
        body = d2 < vr**2
        view[body] = 80.0 if disc else _BONE
        if not disc:
            view[d2 < (vr - 2.5) ** 2] = _MARROW
        canal_y = vy + vr + 9.0 * s
        c2 = Xs**2 + (Ys - canal_y) ** 2
        view[(c2 < (13.0 * s) ** 2) & (Ys > canal_y - 4.0 * s)] = _BONE
        view[c2 < (8.0 * s) ** 2] = 10.0
        spinous = (np.abs(Xs) < 4.0 * s) & (Ys > canal_y + 8.0 * s) & (Ys < canal_y + 30.0 * s)
        view[spinous] = _BONE
    if min(case.dome_top) - 40.0 * s < zl < case.apex_z + 5.0:
        ro = X2 / ((ac_z + rib_w) ** 2) + Y2 / ((bc_z + rib_w) ** 2)
        ring = (ro < 1.0) & ~cavity
        idx = np.nonzero(ring)
        if idx[0].size:
            xr, yr = X[0, idx[1]], Y[idx[0], 0]
            cos_phi = yr / np.sqrt(xr * xr + yr * yr + 1e-6)
            zz = zl + 40.0 * s * (1.0 - cos_phi) / 2.0 + case.rib_phase
            on = ((zz % (26.0 * s)) < 9.0 * s) & ~((np.abs(xr) < 22.0 * s) & (yr < 0))
            img[idx[0][on], idx[1][on]] = 450.0
        if -130.0 * s < zl < 80.0 * s:
            stern = Blob("sternum", (cx, cy - bc - 4.0 * s, z), (15.0 * s, 6.0 * s, 1.0), "bone")
            _paint(img, _blob_section(stern, xs, ys, z), 420.0)
    return img


def _embolus_area_mm2(e: Embolus, vessel: Tube, z: float) -> float:
    """Embolus area inside the lumen on plane ``z``, on a fine grid (resolution-independent)."""
    reach = max(e.half_length, e.radius) + 1.0
    xs = np.arange(e.centre[0] - reach, e.centre[0] + reach, TRUTH_GRID_MM)
    ys = np.arange(e.centre[1] - reach, e.centre[1] + reach, TRUTH_GRID_MM)
    sec = _embolus_mask(e, vessel, xs, ys, z)
    if sec is None:
        return 0.0
    return float(sec[2].sum()) * TRUTH_GRID_MM * TRUTH_GRID_MM


@dataclass(frozen=True)
class CanonicalRender:
    """A rendered volume with per-slice annotations (training uses the extras)."""

    hu: np.ndarray  # float32 (k, j, i) canonical
    slice_truth: np.ndarray  # uint8 (k,): pe_present_on_image
    z_mm: np.ndarray  # float64 (k,): patient z of each slice, descending
    x_mm: np.ndarray  # (i,) pixel-centre x, ascending
    y_mm: np.ndarray  # (j,) pixel-centre y, ascending
    embolus_slices: np.ndarray  # bool (k, n_emboli): embolus e visible on slice k
    ventricle_slices: np.ndarray  # bool (k,): both ventricles near their widest


def render_canonical_annotated(
    case: CtpaCase,
    *,
    rows: int,
    slices: int,
    slice_spacing_mm: float,
    fov_mm: float | None = None,
    z_centre_mm: float | None = None,
) -> CanonicalRender:
    """Render ``case`` in canonical orientation; see :func:`render_canonical`."""
    if rows < 16 or slices < 1 or slice_spacing_mm <= 0:
        raise ValueError(
            f"rows={rows}, slices={slices}, slice_spacing_mm={slice_spacing_mm}: "
            "need rows >= 16, slices >= 1, spacing > 0"
        )
    fov = float(fov_mm if fov_mm is not None else case.fov_mm)
    sp = fov / rows
    xs = (np.arange(rows) + 0.5) * sp - fov / 2.0
    ys = xs.copy()
    zc = case.scan_centre_z if z_centre_mm is None else float(z_centre_mm)
    z_top = zc + (slices - 1) * slice_spacing_mm / 2.0
    zs = z_top - np.arange(slices) * slice_spacing_mm
    vessels = {t.name: t for t in case.tubes}
    hu = np.empty((slices, rows, rows), dtype=np.float32)
    emb = np.zeros((slices, len(case.emboli)), dtype=bool)
    noise_rng = np.random.default_rng(
        [case.seed, rows, slices, int(round(slice_spacing_mm * 1000)), int(round(fov * 10))]
    )
    shift = int(round(case.motion_mm / sp))
    for k, z in enumerate(zs):
        img = _render_slice(case, xs, ys, float(z))
        if shift > 0:
            img = (
                0.5 * img + 0.25 * np.roll(img, shift, axis=0) + 0.25 * np.roll(img, -shift, axis=0)
            )
            img += 0.15 * (np.roll(img, shift // 2 + 1, axis=1) - img)
        img += noise_rng.standard_normal(img.shape, dtype=np.float32) * case.noise_hu
        np.clip(img, HU_MIN, HU_MAX, out=hu[k])
        for e_idx, e in enumerate(case.emboli):
            zlo, zhi = e.z_extent()
            if zlo <= z <= zhi:
                area = _embolus_area_mm2(e, vessels[e.vessel], float(z))
                emb[k, e_idx] = area >= MIN_EMBOLUS_AREA_MM2
    missing = [i for i in range(len(case.emboli)) if not emb[:, i].any()]
    if missing:
        e = case.emboli[missing[0]]
        lo, hi = e.z_extent()
        raise ValueError(
            f"case {case.seed}: slices cover z {zs[-1]:.1f}..{zs[0]:.1f} mm but the embolus in "
            f"{e.vessel} (z {lo:.1f}..{hi:.1f}) is not on any slice; use more slices or a "
            "larger spacing"
        )
    ventricles = (zs >= case.ventricle_z[0]) & (zs <= case.ventricle_z[1])
    return CanonicalRender(
        hu=hu,
        slice_truth=np.asarray(emb.any(axis=1), dtype=np.uint8),
        z_mm=zs,
        x_mm=xs,
        y_mm=ys,
        embolus_slices=emb,
        ventricle_slices=ventricles,
    )


def render_canonical(
    case: CtpaCase,
    *,
    rows: int,
    slices: int,
    slice_spacing_mm: float,
    fov_mm: float | None = None,
    z_centre_mm: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """HU volume ``(k, j, i)`` (i toward patient left, j posterior, k superior→inferior) and
    per-slice ``pe_present_on_image`` (uint8).

    ``rows`` × ``rows`` pixels over ``fov_mm`` (default: the case's FOV), centred on the
    scanner axis (x = y = 0); ``slices`` planes ``slice_spacing_mm`` apart centred on
    ``z_centre_mm`` (default: the case's scan centre). Raises ``ValueError`` when an
    embolus lies outside the covered range (the exam truth would be wrong).
    """
    r = render_canonical_annotated(
        case,
        rows=rows,
        slices=slices,
        slice_spacing_mm=slice_spacing_mm,
        fov_mm=fov_mm,
        z_centre_mm=z_centre_mm,
    )
    return r.hu, r.slice_truth


# ---------------------------------------------------------------- DICOM


@dataclass(frozen=True)
class CtpaSeries:
    """What :func:`write_ctpa_series` wrote, with the truth the tests compare against."""

    paths: tuple[Path, ...]  # in the order written (shuffled when asked)
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    truth: dict[str, int]  # exam labels
    slice_truth: dict[str, int]  # SOP Instance UID -> pe_present_on_image
    canonical_uids: tuple[str, ...]  # SOP Instance UIDs from superior to inferior
    case: CtpaCase


STUDY_DESCRIPTION = "CT pulmonary angiography (synthetic phantom)"
MODEL_NAME = "ctpa-phantom"


def write_ctpa_series(
    out_dir: Path,
    case: CtpaCase,
    *,
    patient_position: str = "HFS",
    shuffle: bool = True,
    rows: int = 256,
    slices: int = 120,
    slice_spacing_mm: float = 1.25,
    slice_thickness_mm: float | None = None,
    fov_mm: float | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 2,
    series_description: str = "CTPA",
    convolution_kernel: str = "B30f",
    contrast_agent: str | None = "Iohexol",
    body_part: str = "CHEST",
    patient_id: str | None = None,
    patient_name: str = "PHANTOM^CTPA",
    accession_number: str | None = None,
    study_date: str | None = None,
    frame_of_reference_uid: str | None = None,
) -> CtpaSeries:
    """Write ``case`` as an axial CT Image Storage series, one file per slice.

    Pixels are int16 with Rescale Intercept -1024 / Slope 1; ImagePositionPatient and
    ImageOrientationPatient follow ``patient_position`` (HFS/FFS/HFP/FFP), so the patient-
    space content is the same in every geometry. ``shuffle`` writes the files in a random
    (seeded) order under opaque names. ``contrast_agent=None`` omits the Contrast/Bolus
    module (a silent header); ``""`` writes an empty ContrastBolusAgent. Slice thickness
    (default: the spacing) is a header value only. Deterministic in ``case`` and arguments.
    """
    check_patient_position(patient_position)
    r = render_canonical_annotated(
        case, rows=rows, slices=slices, slice_spacing_mm=slice_spacing_mm, fov_mm=fov_mm
    )
    files = write_ct_series(
        out_dir,
        r.hu,
        r.x_mm,
        r.y_mm,
        r.z_mm,
        seed=case.seed,
        uid_root="phantom-ctpa",
        slice_spacing_mm=slice_spacing_mm,
        patient_position=patient_position,
        shuffle=shuffle,
        slice_thickness_mm=slice_thickness_mm,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        series_number=series_number,
        series_description=series_description,
        convolution_kernel=convolution_kernel,
        contrast_agent=contrast_agent,
        body_part=body_part,
        kvp="100",
        window=(100, 700),
        patient_id=patient_id,
        patient_name=patient_name,
        accession_number=accession_number,
        study_date=study_date,
        study_description=STUDY_DESCRIPTION,
        model_name=MODEL_NAME,
        id_prefix="CT",
    )
    uids = files.canonical_uids
    return CtpaSeries(
        paths=files.paths,
        study_uid=files.study_uid,
        series_uid=files.series_uid,
        frame_of_reference_uid=files.frame_of_reference_uid,
        truth=dict(case.truth),
        slice_truth={uids[k]: int(r.slice_truth[k]) for k in range(slices)},
        canonical_uids=uids,
        case=case,
    )


def write_scout(
    out_dir: Path,
    study_uid: str,
    *,
    case: CtpaCase | None = None,
    seed: int = 0,
    series_uid: str | None = None,
    series_number: int = 1,
    rows: int = 256,
    columns: int = 256,
    patient_id: str | None = None,
    patient_name: str = "PHANTOM^CTPA",
    accession_number: str | None = None,
    study_date: str | None = None,
    frame_of_reference_uid: str | None = None,
) -> Path:
    """Write one coronal localizer (ImageType ORIGINAL\\PRIMARY\\LOCALIZER) of the study.

    A mean-HU projection through the chest of ``case`` (default: the case of ``seed``),
    for series-selection tests that must skip scouts.
    """
    case = case or make_ctpa_case(seed)
    seed = case.seed
    extent = 500.0
    n_coarse = 80
    coarse = render_canonical_annotated(
        case,
        rows=64,
        slices=n_coarse,
        slice_spacing_mm=extent / n_coarse,
        fov_mm=extent,
        z_centre_mm=case.centre[2] - 40.0,
    )
    projection = coarse.hu.mean(axis=1)  # (k, i): superior to inferior, right to left
    # bilinear resize of the coarse projection to rows × columns
    kk = np.linspace(0, n_coarse - 1, rows)
    ii = np.linspace(0, projection.shape[1] - 1, columns)
    across = np.stack([np.interp(ii, np.arange(projection.shape[1]), row) for row in projection])
    img = np.stack([np.interp(kk, np.arange(n_coarse), col) for col in across.T], axis=1)
    series_uid = series_uid or derive_uid("phantom-ctpa-scout", study_uid, str(series_number))
    sop_uid = derive_uid("phantom-ctpa-scout-instance", series_uid)
    ds = new_ct_file(sop_uid)
    study = PhantomStudy(
        seed=seed,
        study_uid=study_uid,
        patient_id=patient_id,
        patient_name=patient_name,
        accession_number=accession_number,
        study_date=study_date,
        study_description=STUDY_DESCRIPTION,
        model_name=MODEL_NAME,
        id_prefix="CT",
    )
    set_patient_study(ds, study)
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "Topogram"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_of_reference_uid or derive_uid("phantom-ctpa-for", study_uid)
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.BurnedInAnnotation = "NO"
    ds.KVP = "120"
    ds.PatientOrientation = ""
    row_mm = extent / rows
    col_mm = extent / columns
    x0 = -extent / 2.0 + col_mm / 2.0
    z0 = float(coarse.z_mm[0]) + (extent / n_coarse - row_mm) / 2.0
    ds.ImagePositionPatient = [round(x0, 4), 0.0, round(z0, 4)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    ds.PixelSpacing = [round(row_mm, 6), round(col_mm, 6)]
    ds.SliceThickness = 0.6
    ds.WindowCenter = -300
    ds.WindowWidth = 1500
    set_pixels(ds, img.astype(np.float32), rescale_type=None)  # HU is wrong for a localizer
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"scout_{series_number}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
