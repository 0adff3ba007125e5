"""Synthetic CT of five body regions, enhanced or not, for the CT content gate.

:func:`make_region_case` draws one case of a region from a seed:

* ``chest``: a CTPA chest (:mod:`pacsnode.phantoms.ctpa`) without its emboli; unenhanced, every
  blood pool (pulmonary arteries, aorta, SVC, IVC, heart chambers) is drawn at 35-55 HU through
  :class:`PlainChestCase`, which only overrides the blood HU of the CTPA case;
* ``abdomen``: an abdomen (:mod:`pacsnode.phantoms.abdomen`) in portal venous phase or unenhanced;
* ``head``: skull (outer and inner table, diploe), scalp, brain (grey and white matter, CSF,
  lateral ventricles, falx), posterior fossa, skull base with sphenoid and mastoid air, orbits
  with globes and lenses, nasal cavity, maxillary sinuses, mandible and teeth, the upper
  cervical spine; carotid, basilar and cerebral arteries, dural venous and cavernous sinuses,
  cortical and jugular veins, choroid plexus and, in either phase, pineal and choroid
  calcifications;
* ``pelvis``: body wall, iliac wings, sacrum, acetabula, femoral heads, necks, trochanters and
  shafts, pubic and ischial rami, bladder, rectum, prostate or uterus, bowel loops in the false
  pelvis, iliac and femoral arteries and veins;
* ``lower_limb``: both legs from the upper thigh to the ankle: femur (cortex, fatty marrow,
  condyles), patella, tibia and fibula, muscle with fat septa, superficial femoral, popliteal
  and calf arteries and veins, great saphenous veins.

Head, pelvis and lower-limb cases are analytic descriptions in patient coordinates (LPS mm:
+x patient left, +y posterior, +z superior) rendered one axial plane at a time; ``contrast``
changes HU values only (arteries 150-450 HU, veins and sinuses 60-240 HU, enhancing organs,
dura and muscle a little), never the anatomy drawn for a seed, nor the image noise.
Calcifications and bone are there in both phases, so brightness alone does not say
"contrast". :func:`render_region` samples any region on any canonical grid
(``hu[k, j, i]``: i toward patient left, j posterior, k superior to inferior, as in
:mod:`pacsnode.volumes`); :func:`write_region_series` writes it through
:func:`pacsnode.phantoms.ctseries.write_ct_series` with whatever header the caller wants —
BodyPartExamined, ContrastBolusAgent (absent, empty or any text) and SeriesDescription may
all lie about the pixels.

Not modelled: real anatomical variability and texture, arms, the neck and shoulders between
head and chest, the table, beam hardening and streaks (dense bone and contrast), partial-volume
slice profiles, arterial or delayed phases (excreted contrast), metal, and the scanner's noise
texture (the noise is white Gaussian).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from pacsnode.phantoms.abdomen import AbdomenCase, PhaseDraw, make_abdomen_case, render_abdomen
from pacsnode.phantoms.ctpa import CtpaCase, make_ctpa_case, render_canonical_annotated
from pacsnode.phantoms.ctseries import HU_MAX, HU_MIN, check_patient_position, write_ct_series

Vec3 = tuple[float, float, float]

REGIONS: tuple[str, ...] = ("chest", "abdomen", "head", "pelvis", "lower_limb")
"""The anatomy the phantoms draw; the gate folds head, pelvis and lower limb into "other"."""
CONTRAST_PROBABILITY = 0.5

_AIR = -1000.0
_BLOOD_ROLES = frozenset({"pa", "systemic", "svc", "ivc"})


# ---------------------------------------------------------------- chest without contrast


@dataclass(frozen=True)
class PlainChestCase(CtpaCase):
    """A CTPA chest scanned without contrast: every blood pool at ``blood_hu``."""

    blood_hu: float = 45.0

    def role_hu(self, role: str) -> float:
        return self.blood_hu if role in _BLOOD_ROLES else super().role_hu(role)


def _chest_case(seed: int, contrast: bool) -> CtpaCase:
    case = replace(make_ctpa_case(seed), emboli=())
    if contrast:
        return case
    blood = float(np.random.default_rng([seed, 0xB100D]).uniform(35.0, 55.0))
    values = {f.name: getattr(case, f.name) for f in fields(case)}
    return PlainChestCase(**values, blood_hu=blood)


# ---------------------------------------------------------------- primitives


@dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned solid ellipsoid at ``hu``."""

    centre: Vec3
    semi: Vec3
    hu: float


@dataclass(frozen=True)
class Capsule:
    """A tapered capsule from ``p0`` (radius ``r0``) to ``p1`` (``r1``): vessel, bone shaft."""

    p0: Vec3
    p1: Vec3
    r0: float
    r1: float
    hu: float


Part = Ellipsoid | Capsule


class _Plane:
    """One axial plane: pixel-centre coordinates and the image painted on it."""

    def __init__(self, xs: np.ndarray, ys: np.ndarray, z: float, fill: float = _AIR) -> None:
        self.X = xs[None, :].astype(np.float32)
        self.Y = ys[:, None].astype(np.float32)
        self.z = float(z)
        self.img = np.full((ys.size, xs.size), fill, dtype=np.float32)

    def ellipse(self, cx: float, cy: float, a: float, b: float) -> np.ndarray:
        return ((self.X - cx) / a) ** 2 + ((self.Y - cy) / b) ** 2 < 1.0

    def superellipse(self, cx: float, cy: float, a: float, b: float, p: float) -> np.ndarray:
        return np.abs((self.X - cx) / a) ** p + np.abs((self.Y - cy) / b) ** p < 1.0

    def rotated(self, cx: float, cy: float, a: float, b: float, angle_deg: float) -> np.ndarray:
        """An ellipse whose semi-axis ``a`` points ``angle_deg`` from +x toward +y."""
        t = math.radians(angle_deg)
        u = (self.X - cx) * math.cos(t) + (self.Y - cy) * math.sin(t)
        v = -(self.X - cx) * math.sin(t) + (self.Y - cy) * math.cos(t)
        return (u / a) ** 2 + (v / b) ** 2 < 1.0

    def mask(self, part: Part, grow: float = 0.0) -> np.ndarray | None:
        if isinstance(part, Ellipsoid):
            (cx, cy, cz), (a, b, c) = part.centre, part.semi
            a, b, c = a + grow, b + grow, c + grow
            if a <= 0 or b <= 0 or abs(self.z - cz) >= c:
                return None
            f = math.sqrt(1.0 - ((self.z - cz) / c) ** 2)
            return self.ellipse(cx, cy, a * f, b * f)
        return self._capsule(part, grow)

    def _capsule(self, t: Capsule, grow: float) -> np.ndarray | None:
        rmax = max(t.r0, t.r1) + grow
        if not min(t.p0[2], t.p1[2]) - rmax <= self.z <= max(t.p0[2], t.p1[2]) + rmax:
            return None
        p0 = np.asarray(t.p0, dtype=np.float32)
        d = np.asarray(t.p1, dtype=np.float32) - p0
        dx, dy, dz = self.X - p0[0], self.Y - p0[1], np.float32(self.z - p0[2])
        length2 = float(d @ d)
        tt = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / max(length2, 1e-6), 0.0, 1.0)
        dist2 = (dx - tt * d[0]) ** 2 + (dy - tt * d[1]) ** 2 + (dz - tt * d[2]) ** 2
        radius = np.maximum(t.r0 + tt * (t.r1 - t.r0) + grow, 0.0)
        inside: np.ndarray = dist2 < radius * radius
        return inside if inside.any() else None

    def paint(self, part: Part, clip: np.ndarray | None = None) -> None:
        m = self.mask(part)
        if m is None:
            return
        if clip is not None:
            m = m & clip
        self.img[m] = part.hu

    def paint_all(self, parts: tuple[Part, ...], clip: np.ndarray | None = None) -> None:
        for part in parts:
            self.paint(part, clip)


def _solid(pl: _Plane, part: Part, grow: float = 0.0) -> np.ndarray:
    m = pl.mask(part, grow)
    return m if m is not None else np.zeros(pl.img.shape, dtype=bool)


def _shell(pl: _Plane, part: Part, thickness: float) -> np.ndarray:
    """The outer ``thickness`` mm of ``part`` on this plane."""
    return _solid(pl, part) & ~_solid(pl, part, -thickness)


def _ramp(z: float, z0: float, z1: float, v0: float, v1: float) -> float:
    """Linear from ``v0`` at ``z0`` to ``v1`` at ``z1``, constant outside."""
    t = float(np.clip((z - z0) / (z1 - z0), 0.0, 1.0))
    return v0 + t * (v1 - v0)


class _Draw(PhaseDraw):
    """:class:`PhaseDraw` plus a coin: one uniform draw, whatever the phase."""

    def chance(self, p: float) -> bool:
        return float(self.rng.random()) < p


# ---------------------------------------------------------------- head


@dataclass(frozen=True)
class HeadCase:
    """A head in patient coordinates; ``centre`` is the centre of the cranial vault."""

    seed: int
    contrast: bool
    centre: Vec3
    semi: Vec3  # outer table of the vault (x, y, z)
    bone_mm: float
    scalp_mm: float
    csf_mm: float  # subarachnoid CSF under the inner table (atrophy widens it)
    grey_hu: float
    white_hu: float
    csf_hu: float
    cortex_hu: float
    diploe_hu: float
    scalp_hu: float
    dura_hu: float
    ventricles: tuple[Ellipsoid, ...]
    face: tuple[Part, ...]  # orbits, sinuses, mandible... painted inside the lower head
    vessels: tuple[Part, ...]
    calcifications: tuple[Part, ...]
    sinus_hu: float  # superior sagittal sinus
    noise_hu: float
    fov_mm: float

    @property
    def z_range(self) -> tuple[float, float]:
        """(top, bottom) patient z of a head CT: vertex to the second cervical vertebra."""
        c = self.semi[2]
        return self.centre[2] + c + self.scalp_mm, self.centre[2] - 1.35 * c


def make_head_case(seed: int, contrast: bool) -> HeadCase:
    rng = np.random.default_rng([seed, 0x4EAD])
    d = _Draw(rng, contrast)
    s = d.u(0.92, 1.08)
    cx, cy, cz = d.u(-8, 8), d.u(-10, 10), d.u(-60, 60)
    a, b, c = s * d.u(68, 76), s * d.u(86, 98), s * d.u(70, 80)

    def p(x: float, y: float, z: float) -> Vec3:
        return (cx + x, cy + y, cz + z)

    atrophy = d.u(0.0, 1.0)
    grey = d.hu((37.0, 45.0), (32.0, 40.0))
    vent: list[Ellipsoid] = []
    vw = s * (5.0 + 6.0 * atrophy) * d.u(0.8, 1.2)
    for sign in (-1.0, 1.0):
        vent.append(
            Ellipsoid(
                p(sign * (vw + 2.0), -0.05 * b, 0.12 * c),
                (vw, s * d.u(30, 38), s * d.u(11, 16)),
                d.u(2.0, 10.0),
            )
        )
    vent.append(Ellipsoid(p(0.0, 0.05 * b, -0.08 * c), (2.0 + atrophy * 2.0, 12.0, 10.0), 5.0))
    vent.append(Ellipsoid(p(0.0, 0.45 * b, -0.55 * c), (6.0, 4.0, 7.0), 5.0))

    bone = d.u(700.0, 1100.0)
    face: list[Part] = []
    for sign in (-1.0, 1.0):  # petrous ridges, then the clivus
        face.append(
            Capsule(
                p(sign * (a - 18 * s), 0.15 * b, -0.6 * c),
                p(sign * 12 * s, -0.02 * b, -0.5 * c),
                6 * s,
                4 * s,
                bone,
            )
        )
    face.append(Capsule(p(0, -0.15 * b, -0.5 * c), p(0, 0.05 * b, -0.85 * c), 8 * s, 8 * s, bone))
    # orbits: fat cone, globe, lens; ethmoid air between them; bony walls first
    zo = -0.42 * c
    for sign in (-1.0, 1.0):
        ox, oy = sign * s * d.u(29, 34), -b + s * d.u(20, 25)
        face.append(Ellipsoid(p(ox, oy + 8.0, zo), (s * 19, s * 26, s * 17), bone))
        face.append(Ellipsoid(p(ox, oy + 10.0, zo), (s * 16, s * 24, s * 15), -80.0))
        face.append(Ellipsoid(p(ox, oy, zo), (s * 11.5,) * 3, d.u(5.0, 20.0)))
        face.append(Ellipsoid(p(ox, oy - 8.0 * s, zo), (s * 4.5, s * 2.0, s * 4.5), d.u(80, 110)))
        # maxillary sinus with a bony wall
        mx, my, mz = sign * s * 24, -b + s * 38, -0.78 * c
        face.append(Ellipsoid(p(mx, my, mz), (s * 17, s * 19, s * 18), bone))
        face.append(Ellipsoid(p(mx, my, mz), (s * 14, s * 16, s * 15), d.u(-990, -960)))
        # mastoid air cells behind the ear
        face.append(Ellipsoid(p(sign * (a - 14 * s), 0.12 * b, -0.62 * c), (10, 12, 12), -700.0))
    face.append(Ellipsoid(p(0.0, -b + s * 35, -0.35 * c), (s * 11, s * 18, s * 12), -750.0))
    face.append(Capsule(p(0, -b + 18 * s, -0.45 * c), p(0, -b + 55 * s, -0.95 * c), 8, 8, -990.0))
    face.append(Ellipsoid(p(0.0, -0.2 * b, -0.52 * c), (s * 13, s * 12, s * 11), -980.0))
    # mandible (a U of bone) with teeth, tongue inside; pharynx; upper cervical spine
    my0 = -b + s * 45
    face.append(Ellipsoid(p(0.0, my0, -1.15 * c), (s * 48, s * 42, s * 22), bone))
    face.append(Ellipsoid(p(0.0, my0 + 4, -1.15 * c), (s * 40, s * 36, s * 24), 55.0))
    face.append(Ellipsoid(p(0.0, my0 - 2, -1.02 * c), (s * 36, s * 34, s * 5), 2200.0))
    face.append(Ellipsoid(p(0.0, my0 + 3, -1.02 * c), (s * 29, s * 27, s * 6), 55.0))
    face.append(Capsule(p(0, 0.0, -0.72 * c), p(0, 0.02 * b, -1.6 * c), 7 * s, 7 * s, -990.0))
    spine_y = 0.25 * b
    face.append(Capsule(p(0, spine_y, -0.9 * c), p(0, spine_y, -1.6 * c), 11 * s, 11 * s, bone))
    face.append(Capsule(p(0, spine_y, -0.9 * c), p(0, spine_y, -1.6 * c), 8 * s, 8 * s, 300.0))
    face.append(
        Capsule(p(0, spine_y + 20, -0.9 * c), p(0, spine_y + 20, -1.6 * c), 8 * s, 8 * s, 10.0)
    )

    art = d.hu((150.0, 400.0), (38.0, 50.0))
    vein = d.hu((130.0, 240.0), (40.0, 60.0))
    vessels: list[Part] = []
    zw = -0.4 * c
    for sign in (-1.0, 1.0):
        ica = p(sign * 16 * s, -0.12 * b, zw)
        vessels.append(Capsule(p(sign * 24 * s, 0.0, -1.6 * c), ica, 3.0, 2.6, art))
        vessels.append(Capsule(ica, p(sign * (a - 22 * s), -0.1 * b, -0.3 * c), 1.9, 1.3, art))
        vessels.append(Capsule(ica, p(sign * 4, -0.3 * b, zw + 3), 1.4, 1.2, art))
        vessels.append(Capsule(ica, p(sign * 6, 0.02 * b, zw - 2), 1.2, 1.2, art))
        vessels.append(
            Capsule(
                p(sign * 30 * s, 0.1 * b, -1.6 * c),
                p(sign * 30 * s, 0.12 * b, -0.8 * c),
                6.0,
                6.0,
                vein,
            )
        )
        # transverse and sigmoid sinuses along the posterior inner table
        torc = p(0.0, b - 10 * s, -0.28 * c)
        bend = p(sign * (a - 16 * s), 0.5 * b, -0.42 * c)
        vessels.append(Capsule(torc, bend, 4.0, 4.5, vein))
        vessels.append(Capsule(bend, p(sign * 30 * s, 0.12 * b, -0.8 * c), 4.5, 5.0, vein))
    vessels.append(Capsule(p(0, -0.3 * b, zw + 3), p(0, -0.55 * b, 0.25 * c), 1.3, 1.0, art))
    vessels.append(Capsule(p(0, -0.02 * b, -0.85 * c), p(0, -0.05 * b, zw - 2), 1.8, 1.6, art))
    vessels.append(Capsule(p(0, 0.3 * b, 0.1 * c), p(0, b - 10 * s, -0.28 * c), 2.8, 3.2, vein))
    for sign in (-1.0, 1.0):  # choroid plexus in the atria of the lateral ventricles
        vessels.append(
            Ellipsoid(
                p(sign * (vw + 3.0), 0.22 * b, 0.1 * c), (3.0, 6.0, 4.0), d.hu((70, 120), (30, 40))
            )
        )
    for sign in (-1.0, 1.0):  # cavernous sinuses beside the sella
        vessels.append(
            Ellipsoid(p(sign * 15 * s, -0.2 * b, -0.5 * c), (6 * s, 10 * s, 7 * s), vein)
        )
    inner = np.array([a, b, c]) - s * 6.5 - 4.0
    for _ in range(int(rng.integers(5, 10))):  # cortical veins on the brain's surface
        theta, elev = d.u(0.0, 2.0 * math.pi), d.u(-0.1, 1.2)
        ends = []
        for dt in (0.0, d.u(0.2, 0.4)):
            u = np.array(
                [
                    math.cos(elev) * math.cos(theta + dt),
                    math.cos(elev) * math.sin(theta + dt),
                    math.sin(elev),
                ]
            )
            q = u / np.linalg.norm(u / inner)
            ends.append(p(float(q[0]), float(q[1]), float(q[2])))
        vessels.append(Capsule(ends[0], ends[1], 1.8, 1.4, vein))

    calc: list[Part] = []
    if d.chance(0.5):
        calc.append(Ellipsoid(p(0.0, 0.18 * b, -0.02 * c), (d.u(1.5, 3.5),) * 3, d.u(150, 450)))
    if d.chance(0.5):
        for sign in (-1.0, 1.0):
            calc.append(
                Ellipsoid(
                    p(sign * (vw + 3.0), 0.22 * b, 0.1 * c), (d.u(1.5, 3.0),) * 3, d.u(120, 350)
                )
            )
    return HeadCase(
        seed=seed,
        contrast=contrast,
        centre=(cx, cy, cz),
        semi=(a, b, c),
        bone_mm=s * d.u(5.0, 8.0),
        scalp_mm=d.u(4.0, 7.0),
        csf_mm=1.0 + 3.0 * atrophy,
        grey_hu=grey,
        white_hu=grey - d.u(6.0, 10.0),
        csf_hu=d.u(2.0, 10.0),
        cortex_hu=d.u(1100.0, 1600.0),
        diploe_hu=d.u(450.0, 750.0),
        scalp_hu=d.hu((45.0, 70.0), (30.0, 45.0)),
        dura_hu=d.hu((70.0, 110.0), (45.0, 65.0)),
        ventricles=tuple(vent),
        face=tuple(face),
        vessels=tuple(vessels),
        calcifications=tuple(calc),
        sinus_hu=vein,
        noise_hu=d.u(4.0, 14.0),
        fov_mm=d.u(220.0, 300.0),
    )


def _head_slice(case: HeadCase, xs: np.ndarray, ys: np.ndarray, z: float) -> np.ndarray:
    pl = _Plane(xs, ys, z)
    cx, cy, cz = case.centre
    a, b, c = case.semi
    zl = z - cz
    t = case.bone_mm
    lower = zl < -0.3 * c
    # the outline: the vault's ellipsoid, below it the face and the back of the head narrowing
    fa = _ramp(zl, -0.3 * c, -1.4 * c, 0.954, 0.69)
    fb = _ramp(zl, -0.3 * c, -1.4 * c, 0.954, 0.78)

    def outline(grow: float) -> np.ndarray:
        if lower:
            return pl.ellipse(cx, cy, a * fa + grow, b * fb + grow)
        m = pl.mask(Ellipsoid(case.centre, (a, b, c), 0.0), grow)
        return m if m is not None else np.zeros(pl.img.shape, dtype=bool)

    yrel = (pl.Y - cy) / b
    floor = np.interp(
        yrel, [-1.0, -0.3, -0.25, 0.15, 0.2, 1.0], [-0.28, -0.3, -0.55, -0.6, -0.95, -0.95]
    )

    def cranial(grow: float, floor_grow: float | None = None) -> np.ndarray:
        """Inside the inner table grown by ``grow`` mm, above the cranial floor lowered by
        ``floor_grow`` (default ``grow``) mm."""
        m = pl.mask(Ellipsoid(case.centre, (a - t, b - t, c - t), 0.0), grow)
        if m is None:
            return np.zeros(pl.img.shape, dtype=bool)
        drop = grow if floor_grow is None else floor_grow
        return m & (np.float32(zl) > (floor * c - drop))

    outer = outline(0.0)
    if not outer.any() and not outline(case.scalp_mm).any():
        return pl.img
    pl.img[outline(case.scalp_mm)] = -80.0
    pl.img[outline(case.scalp_mm - 1.5)] = case.scalp_hu
    vault_inner = Ellipsoid(case.centre, (a - t, b - t, c - t), 0.0)
    if lower:
        interior = outer
        pl.img[outer] = 45.0
    else:
        interior = _solid(pl, vault_inner)
        pl.img[outer] = case.cortex_hu
        pl.img[outline(-1.6)] = case.diploe_hu
        pl.img[_solid(pl, vault_inner, 1.6) & ~interior] = case.cortex_hu
        pl.img[interior] = 45.0
    pl.paint_all(case.face, interior)
    base = cranial(t, 2.5) & interior  # the skull base around the fossae, a thin floor
    pl.img[base] = case.diploe_hu
    pl.img[base & ~cranial(t - 1.5, 1.0)] = case.cortex_hu
    inside = cranial(0.0)
    if inside.any():
        pl.img[inside] = case.csf_hu
        brain = cranial(-case.csf_mm)
        pl.img[brain] = case.grey_hu
        white = pl.mask(Ellipsoid(case.centre, (0.62 * a, 0.7 * b, 0.6 * c), 0.0))
        if white is not None:
            pl.img[white & brain] = case.white_hu
        if zl > -0.2 * c:
            pl.img[inside & (np.abs(pl.X - cx) < 1.2)] = case.dura_hu
        pl.paint_all(case.ventricles, inside)
        # superior sagittal sinus: against the inner table in the midline
        sss = inside & ~_solid(pl, vault_inner, -9.0) & (np.abs(pl.X - cx) < 5.0) & (yrel > -0.75)
        pl.img[sss] = case.sinus_hu
    pl.paint_all(case.vessels, outer)
    pl.paint_all(case.calcifications, outer)
    return pl.img


# ---------------------------------------------------------------- pelvis


@dataclass(frozen=True)
class PelvisCase:
    """A pelvis in patient coordinates; ``centre`` z is the level of the femoral heads."""

    seed: int
    contrast: bool
    centre: Vec3
    scale: float
    body_semi: tuple[float, float]
    body_power: float
    fat_mm: float
    fat_hu: float
    muscle_hu: float
    bone: tuple[float, float]  # cortex, marrow HU
    head_x: float  # femoral head centres at centre x +/- head_x
    head_y: float
    head_r: float
    organs: tuple[Part, ...]  # in the pelvic cavity
    bones: tuple[Part, ...]  # marrow parts; cortex is a 2 mm rim drawn by growing them
    vessels: tuple[Part, ...]
    noise_hu: float
    fov_mm: float

    @property
    def z_range(self) -> tuple[float, float]:
        """(top, bottom) patient z: iliac crests to below the lesser trochanters."""
        return self.centre[2] + 160.0 * self.scale, self.centre[2] - 110.0 * self.scale


def make_pelvis_case(seed: int, contrast: bool) -> PelvisCase:
    rng = np.random.default_rng([seed, 0x9E1F])
    d = _Draw(rng, contrast)
    s = d.u(0.9, 1.12)
    cx, cy, cz = d.u(-10, 10), d.u(-10, 10), d.u(-700, -500)
    fat = d.u(10.0, 45.0)
    body = (s * d.u(150, 180) + fat, s * d.u(100, 125) + fat)

    def p(x: float, y: float, z: float) -> Vec3:
        return (cx + x, cy + y, cz + z)

    hx, hy, hr = s * d.u(85, 98), s * d.u(-5, 10), s * d.u(22, 26)
    marrow = d.u(180.0, 320.0)
    bones: list[Part] = []
    for sign in (-1.0, 1.0):
        h = p(sign * hx, hy, 0.0)
        bones.append(Ellipsoid(h, (hr, hr, hr), marrow))
        neck_end = p(sign * (hx + 24 * s), hy + 6, -38 * s)
        bones.append(Capsule(h, neck_end, 14 * s, 15 * s, marrow))
        bones.append(
            Ellipsoid(p(sign * (hx + 32 * s), hy + 10, -18 * s), (15 * s, 19 * s, 22 * s), marrow)
        )
        bones.append(Capsule(neck_end, p(sign * (hx + 6 * s), hy, -400.0), 15 * s, 14 * s, marrow))
        bones.append(
            Ellipsoid(p(sign * (hx + 14 * s), hy + 18, -60 * s), (9 * s, 9 * s, 12 * s), marrow)
        )
        # superior pubic ramus to the symphysis, ischium down to the tuberosity
        bones.append(
            Capsule(
                p(sign * (hx - 18 * s), hy - 18 * s, -2.0),
                p(sign * 7, -body[1] + fat + 30 * s, -22 * s),
                10 * s,
                9 * s,
                marrow,
            )
        )
        bones.append(
            Capsule(
                p(sign * (hx - 12 * s), hy + 26 * s, -8.0),
                p(sign * (hx - 38 * s), hy + 34 * s, -62 * s),
                13 * s,
                12 * s,
                marrow,
            )
        )
        bones.append(
            Capsule(
                p(sign * 7, -body[1] + fat + 30 * s, -22 * s),
                p(sign * (hx - 38 * s), hy + 34 * s, -62 * s),
                7 * s,
                9 * s,
                marrow,
            )
        )
    vessels: list[Part] = []
    art = d.hu((150.0, 380.0), (38.0, 50.0))
    vein = d.hu((90.0, 170.0), (38.0, 50.0))
    for sign in (-1.0, 1.0):
        top_a = p(sign * 35 * s, -10 * s, 170 * s)
        groin_a = p(sign * (hx - 8 * s), hy - hr - 20 * s, -5.0)
        vessels.append(Capsule(top_a, groin_a, 5.0, 4.5, art))
        vessels.append(
            Capsule(groin_a, p(sign * (hx - 2 * s), hy - hr - 10 * s, -130 * s), 4.5, 4.0, art)
        )
        vessels.append(Capsule(top_a, p(sign * 48 * s, 40 * s, 60 * s), 3.2, 2.5, art))
        top_v = p(sign * 30 * s, 5 * s, 170 * s)
        groin_v = p(sign * (hx - 20 * s), hy - hr - 14 * s, -5.0)
        vessels.append(Capsule(top_v, groin_v, 7.0, 6.5, vein))
        vessels.append(
            Capsule(groin_v, p(sign * (hx - 14 * s), hy - hr - 4 * s, -130 * s), 6.5, 6.0, vein)
        )
    organs: list[Part] = []
    bowel_wall = d.hu((40.0, 70.0), (30.0, 42.0))
    oral = d.chance(0.25)
    for _ in range(int(rng.integers(6, 14))):
        c = p(d.u(-0.55, 0.55) * body[0], d.u(-0.6, 0.1) * body[1], s * d.u(50, 160))
        semi = (s * d.u(12, 24), s * d.u(10, 20), s * d.u(12, 28))
        organs.append(Ellipsoid(c, semi, bowel_wall))
        content = d.u(150, 300) if oral else (d.u(-980, -900) if d.chance(0.3) else d.u(0, 25))
        organs.append(Ellipsoid(c, (semi[0] - 3, semi[1] - 3, semi[2] - 3), content))
    bl_c = p(0.0, -body[1] + fat + s * d.u(45, 60), s * d.u(-10, 25))
    bl_semi = (s * d.u(35, 60), s * d.u(28, 42), s * d.u(28, 48))
    organs.append(
        Ellipsoid(bl_c, (bl_semi[0] + 3, bl_semi[1] + 3, bl_semi[2] + 3), d.hu((60, 90), (35, 42)))
    )
    organs.append(Ellipsoid(bl_c, bl_semi, d.u(0.0, 14.0)))
    organs.append(
        Ellipsoid(
            p(0.0, bl_c[1] - cy + bl_semi[1] + 18 * s, -25 * s),
            (20 * s, 17 * s, 22 * s),
            d.hu((60, 90), (35, 45)),
        )
    )
    rect = (p(0.0, 45 * s, -70 * s), p(0.0, 50 * s, 60 * s))
    r_r = s * d.u(13, 19)
    organs.append(Capsule(*rect, r_r, r_r, bowel_wall))
    organs.append(
        Capsule(*rect, r_r - 3, r_r - 3, d.u(-990, -900) if d.chance(0.5) else d.u(-120, 20))
    )
    return PelvisCase(
        seed=seed,
        contrast=contrast,
        centre=(cx, cy, cz),
        scale=s,
        body_semi=body,
        body_power=d.u(2.1, 2.7),
        fat_mm=fat,
        fat_hu=d.u(-115.0, -85.0),
        muscle_hu=d.hu((55.0, 70.0), (42.0, 58.0)),
        bone=(d.u(650.0, 1000.0), marrow),
        head_x=hx,
        head_y=hy,
        head_r=hr,
        organs=tuple(organs),
        bones=tuple(bones),
        vessels=tuple(vessels),
        noise_hu=d.u(8.0, 25.0),
        fov_mm=2.0 * max(body) + d.u(20.0, 60.0),
    )


def _pelvis_slice(case: PelvisCase, xs: np.ndarray, ys: np.ndarray, z: float) -> np.ndarray:
    pl = _Plane(xs, ys, z)
    cx, cy, cz = case.centre
    s = case.scale
    zl = z - cz
    a, b = case.body_semi
    taper = _ramp(zl, -110 * s, 160 * s, 0.88, 1.0)
    body = pl.superellipse(cx, cy, a * taper, b * taper, case.body_power)
    pl.img[body] = case.fat_hu
    f = case.fat_mm
    wall = pl.superellipse(cx, cy, a * taper - f, b * taper - f, case.body_power)
    pl.img[wall] = case.muscle_hu
    if zl < 100 * s:  # fat planes around the gluteal muscles
        for sign in (-1.0, 1.0):
            gx, gy = cx + sign * 0.5 * a, cy + 0.55 * b
            ga, gb = 0.42 * a, 0.38 * b
            plane = pl.ellipse(gx, gy, ga, gb) & ~pl.ellipse(gx, gy, ga - 3.0, gb - 3.0)
            pl.img[plane & wall] = case.fat_hu
    # the pelvic cavity: wide between the iliac wings, narrow in the true pelvis
    ca = _ramp(zl, 20 * s, 90 * s, 58 * s, 105 * s)
    cb = _ramp(zl, 20 * s, 90 * s, 52 * s, 78 * s)
    cavity = pl.ellipse(cx, cy - 10 * s, ca, cb) & wall
    if zl > -60 * s:
        pl.img[cavity] = case.fat_hu + 15.0
        pl.paint_all(case.organs, cavity)
    cortex, marrow = case.bone
    # iliac wings: thick curved plates from the acetabulum up to the crest, joined to the sacrum
    if 15 * s < zl < 158 * s:
        tw = (zl - 15 * s) / (143 * s)
        half_len = s * (22 + 45 * math.sin(math.pi * min(1.0, tw * 1.2) / 2))
        thick = s * _ramp(zl, 15 * s, 158 * s, 22.0, 7.0)
        for sign in (-1.0, 1.0):
            wx = cx + sign * s * (case.head_x / s - 8 + 20 * tw)
            wy = cy + s * (10 + 10 * tw)
            ang = 90 - sign * (30 + 25 * tw)
            plate = pl.rotated(wx, wy, half_len, thick, ang) & wall
            pl.img[plate] = cortex
            pl.img[pl.rotated(wx, wy, half_len - 2.5, max(thick - 2.5, 1.0), ang) & wall] = marrow
    # sacrum and coccyx: wide and anterior at S1, narrow and posterior lower down
    if -15 * s < zl < 140 * s:
        sa = s * _ramp(zl, -15 * s, 140 * s, 12, 52)
        sb = s * _ramp(zl, -15 * s, 140 * s, 9, 22)
        sy = cy + s * _ramp(zl, -15 * s, 140 * s, 78, 55)
        sac = pl.ellipse(cx, sy, sa, sb)
        pl.img[sac] = cortex
        pl.img[pl.ellipse(cx, sy, max(sa - 2.5, 1.0), max(sb - 2.5, 1.0))] = marrow
        if zl > 30 * s:
            pl.img[pl.ellipse(cx, sy + 0.2 * sb, 0.3 * sa, 0.3 * sb)] = 10.0
    # acetabulum: a shell of bone over the femoral head, open laterally below the equator
    for sign in (-1.0, 1.0):
        h = (cx + sign * case.head_x, cy + case.head_y, cz)
        r = case.head_r
        if -0.5 * r < zl < r + 10 * s:
            cup = _shell(pl, Ellipsoid(h, (r + 10 * s,) * 3, 0.0), 10 * s - 2.0)
            if zl < 0.4 * r:
                cup &= sign * (pl.X - h[0]) < 0.5 * r
            pl.img[cup & body] = marrow
            pl.img[cup & body & ~_shell(pl, Ellipsoid(h, (r + 8 * s,) * 3, 0.0), 10 * s - 6.0)] = (
                cortex
            )
    for part in case.bones:
        m = pl.mask(part, 2.0)
        if m is not None:
            pl.img[m & body] = cortex
    for part in case.bones:
        pl.paint(part, body)
    for sign in (-1.0, 1.0):  # the femoral head's cortex and the joint space around it
        head = Ellipsoid((cx + sign * case.head_x, cy + case.head_y, cz), (case.head_r,) * 3, 0.0)
        pl.img[_shell(pl, head, 2.0)] = cortex
        space = pl.mask(head, 2.0)
        if space is not None:
            pl.img[space & ~_solid(pl, head)] = 30.0
    pl.paint_all(case.vessels, wall)
    return pl.img


# ---------------------------------------------------------------- lower limbs


@dataclass(frozen=True)
class LegsCase:
    """Both legs in patient coordinates; ``centre`` z is the knee joint line."""

    seed: int
    contrast: bool
    centre: Vec3
    scale: float
    leg_x: tuple[
        float, float, float
    ]  # distance of each leg's axis from the midline: thigh, knee, ankle
    radius: tuple[float, float, float, float]  # outline radius: upper thigh, knee, calf, ankle
    flatten: float  # outline b / a
    fat_frac: float
    fat_hu: float
    muscle_hu: float
    cortex_hu: float
    marrow_hu: float
    trabecular_hu: float
    artery_hu: float
    vein_hu: float
    septa: int
    septa_phase: float
    noise_hu: float
    fov_mm: float

    @property
    def z_range(self) -> tuple[float, float]:
        """(top, bottom) patient z: upper thighs to the ankles."""
        return self.centre[2] + 400.0 * self.scale, self.centre[2] - 380.0 * self.scale


def make_legs_case(seed: int, contrast: bool) -> LegsCase:
    rng = np.random.default_rng([seed, 0x1E65])
    d = _Draw(rng, contrast)
    s = d.u(0.9, 1.1)
    fat_frac = d.u(0.06, 0.3)
    thigh = s * d.u(70, 92) * (1 + fat_frac)
    radius = (thigh, s * d.u(48, 58), s * d.u(50, 64), s * d.u(30, 38))
    sep = d.u(8.0, 35.0)
    return LegsCase(
        seed=seed,
        contrast=contrast,
        centre=(d.u(-10, 10), d.u(-10, 10), d.u(-1300, -1000)),
        scale=s,
        leg_x=(thigh + sep * 0.5, radius[1] + d.u(15.0, 40.0), radius[3] + d.u(30.0, 70.0)),
        radius=radius,
        flatten=d.u(0.85, 1.02),
        fat_frac=fat_frac,
        fat_hu=d.u(-115.0, -85.0),
        muscle_hu=d.hu((55.0, 70.0), (42.0, 58.0)),
        cortex_hu=d.u(1200.0, 1700.0),
        marrow_hu=d.u(-70.0, 30.0),
        trabecular_hu=d.u(180.0, 300.0),
        artery_hu=d.hu((180.0, 450.0), (38.0, 50.0)),
        vein_hu=d.hu((60.0, 160.0), (38.0, 50.0)),
        septa=int(rng.integers(3, 6)),
        septa_phase=d.u(0.0, 2.0 * math.pi),
        noise_hu=d.u(8.0, 25.0),
        fov_mm=d.u(380.0, 500.0),
    )


def _legs_slice(case: LegsCase, xs: np.ndarray, ys: np.ndarray, z: float) -> np.ndarray:
    pl = _Plane(xs, ys, z)
    cx, cy, cz = case.centre
    s = case.scale
    zl = z - cz
    r_thigh, r_knee, r_calf, r_ankle = case.radius
    r = float(np.interp(zl, [-380 * s, -120 * s, 0.0, 400 * s], [r_ankle, r_calf, r_knee, r_thigh]))
    lx = float(
        np.interp(zl, [-380 * s, 0.0, 400 * s], [case.leg_x[2], case.leg_x[1], case.leg_x[0]])
    )
    fat_mm = max(3.0, case.fat_frac * r)
    for sign in (-1.0, 1.0):
        x0, y0 = cx + sign * lx, cy
        a, b = r, r * case.flatten
        leg = pl.ellipse(x0, y0, a, b)
        pl.img[leg] = case.fat_hu
        inner = pl.ellipse(x0, y0, a - fat_mm, b - fat_mm)
        pl.img[inner] = case.muscle_hu
        # intermuscular fat septa: thin radial bands
        ang = np.arctan2(pl.Y - y0, (pl.X - x0) * sign)
        rad = np.hypot(pl.X - x0, pl.Y - y0)
        band = np.abs(np.sin(case.septa * ang / 2 + case.septa_phase)) < 0.06
        pl.img[inner & band & (rad > 0.35 * r)] = case.fat_hu
        if zl > 0.0:
            knee = zl < 70 * s
            if knee:  # femoral condyles and the patella
                ca = s * _ramp(zl, 10 * s, 70 * s, 40, 20)
                cb = s * _ramp(zl, 10 * s, 70 * s, 26, 16)
                fx, fy = x0, y0 - 2 * s
                cond = pl.ellipse(fx, fy, ca, cb)
                pl.img[cond] = case.cortex_hu
                pl.img[pl.ellipse(fx, fy, ca - 2, cb - 2)] = case.trabecular_hu
                if zl < 35 * s:
                    pl.img[pl.ellipse(fx, fy + cb * 0.9, 9 * s, 12 * s)] = case.muscle_hu
                if 12 * s < zl < 62 * s:
                    py = y0 - b + 14 * s
                    pl.img[pl.ellipse(x0, py, 20 * s, 9 * s)] = case.cortex_hu
                    pl.img[pl.ellipse(x0, py, 18 * s, 7 * s)] = case.trabecular_hu
            else:
                fx, fy = x0 + sign * 0.05 * r, y0 + 0.02 * r
                ro = s * 14.0
                pl.img[pl.ellipse(fx, fy, ro, ro)] = case.cortex_hu
                pl.img[pl.ellipse(fx, fy, ro - 5 * s, ro - 5 * s)] = case.marrow_hu
            t = float(np.clip(zl / (300 * s), 0.0, 1.0))  # adductor canal: medial, then posterior
            vx = x0 - sign * (0.32 * r * t + 0.05 * r)
            vy = y0 + (-0.25 * r) * t + (0.7 * r_knee) * (1 - t)
            pl.img[pl.ellipse(vx, vy, 4.0, 4.0)] = case.artery_hu
            pl.img[pl.ellipse(vx + sign * 2, vy + 8, 5.5, 5.0)] = case.vein_hu
        else:
            plateau = zl > -40 * s
            tx, ty = x0 - sign * 0.08 * r, y0 - 0.2 * r
            if plateau:
                ta, tb = s * 38, s * 24
                pl.img[pl.ellipse(x0, y0, ta, tb)] = case.cortex_hu
                pl.img[pl.ellipse(x0, y0, ta - 2, tb - 2)] = case.trabecular_hu
            else:
                ro = s * _ramp(zl, -380 * s, -60 * s, 10, 16)
                pl.img[pl.ellipse(tx, ty, ro, ro * 0.85)] = case.cortex_hu
                pl.img[pl.ellipse(tx, ty, ro - 4 * s, ro * 0.85 - 4 * s)] = case.marrow_hu
            if zl < -15 * s:
                fx2, fy2 = x0 + sign * 0.45 * r, y0 + 0.15 * r
                fr = s * (9.0 if zl > -50 * s else 6.5)
                pl.img[pl.ellipse(fx2, fy2, fr, fr)] = case.cortex_hu
                pl.img[pl.ellipse(fx2, fy2, fr - 2.5, fr - 2.5)] = case.trabecular_hu
            if zl > -60 * s:  # popliteal vessels behind the knee
                pl.img[pl.ellipse(x0, y0 + 0.7 * r_knee, 3.5, 3.5)] = case.artery_hu
                pl.img[pl.ellipse(x0 + 7, y0 + 0.68 * r_knee, 4.5, 4.0)] = case.vein_hu
            else:  # anterior tibial, posterior tibial and peroneal arteries with paired veins
                for vx, vy in (
                    (x0 + sign * 0.1 * r, y0 - 0.05 * r),
                    (x0 - sign * 0.2 * r, y0 + 0.3 * r),
                    (x0 + sign * 0.25 * r, y0 + 0.3 * r),
                ):
                    pl.img[pl.ellipse(vx, vy, 2.0, 2.0)] = case.artery_hu
                    pl.img[pl.ellipse(vx + 4, vy, 2.5, 2.5)] = case.vein_hu
                    pl.img[pl.ellipse(vx - 4, vy, 2.5, 2.5)] = case.vein_hu
        gx, gy = x0 - sign * 0.95 * (r - fat_mm / 2), y0 - 0.1 * r  # great saphenous vein
        pl.img[pl.ellipse(gx, gy, 2.5, 2.5) & leg] = case.vein_hu
    return pl.img


# ---------------------------------------------------------------- one interface for all


AnatomyCase = CtpaCase | AbdomenCase | HeadCase | PelvisCase | LegsCase


@dataclass(frozen=True)
class RegionCase:
    """One phantom of ``region``: its anatomy, phase and the z range a scan of it covers."""

    region: str
    seed: int
    contrast: bool
    anatomy: AnatomyCase
    z_top: float  # patient z (mm) of the first slice of a typical scan of the region
    z_bottom: float
    fov_mm: float

    @property
    def z_centre(self) -> float:
        return (self.z_top + self.z_bottom) / 2.0


@dataclass(frozen=True)
class RegionRender:
    """A rendered region volume in canonical orientation."""

    hu: np.ndarray  # float32 (k, j, i)
    x_mm: np.ndarray  # (i,) ascending
    y_mm: np.ndarray  # (j,) ascending
    z_mm: np.ndarray  # (k,) descending
    spacing: tuple[float, float, float]  # (k, j, i) mm


def make_region_case(region: str, seed: int, *, contrast: bool | None = None) -> RegionCase:
    """A random phantom of ``region`` (one of :data:`REGIONS`) for ``seed``.

    ``contrast``: intravenous contrast given (True) or not (False); ``None`` draws it from the
    seed with :data:`CONTRAST_PROBABILITY`. The anatomy depends on the seed alone.
    """
    if region not in REGIONS:
        raise ValueError(f"region: {region!r} is not one of {REGIONS}")
    if contrast is None:
        contrast = bool(
            np.random.default_rng([seed, REGIONS.index(region), 0xC0]).random()
            < CONTRAST_PROBABILITY
        )
    anatomy: AnatomyCase
    if region == "chest":
        chest = _chest_case(seed, contrast)
        zref = chest.centre[2]
        top = zref + chest.apex_z + 25.0
        bottom = zref + min(chest.dome_top) - 45.0
        return RegionCase(region, seed, contrast, chest, top, bottom, chest.fov_mm)
    if region == "abdomen":
        try:
            abd = make_abdomen_case(seed, contrast=contrast)
        except ValueError:  # a lesion that does not fit its kidney: the same body without
            abd = make_abdomen_case(seed, "normal", contrast=contrast)
        liver = next(o for o in abd.organs if o.name == "liver-right")
        top = liver.centre[2] + 0.85 * liver.semi[2]
        bottom = abd.centre[2] - 175.0 * abd.scale
        return RegionCase(region, seed, contrast, abd, top, bottom, abd.fov_mm)
    if region == "head":
        anatomy = make_head_case(seed, contrast)
    elif region == "pelvis":
        anatomy = make_pelvis_case(seed, contrast)
    else:
        anatomy = make_legs_case(seed, contrast)
    top, bottom = anatomy.z_range
    return RegionCase(region, seed, contrast, anatomy, top, bottom, anatomy.fov_mm)


_SliceFn = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def render_region(
    case: RegionCase,
    *,
    rows: int,
    slices: int,
    slice_spacing_mm: float,
    fov_mm: float | None = None,
    z_centre_mm: float | None = None,
) -> RegionRender:
    """Render ``case`` on a canonical grid.

    ``rows`` × ``rows`` pixels over ``fov_mm`` (default: the case's) centred on the scanner
    axis (x = y = 0); ``slices`` planes ``slice_spacing_mm`` apart from the top down, centred
    on ``z_centre_mm`` (default: the middle of the case's typical scan). Chest and abdomen
    go through their own phantom's renderer; the noise is seeded by the case and the grid.
    """
    if rows < 16 or slices < 1 or not slice_spacing_mm > 0:
        raise ValueError(
            f"rows={rows}, slices={slices}, slice_spacing_mm={slice_spacing_mm}: "
            "need rows >= 16, slices >= 1, spacing > 0"
        )
    fov = float(fov_mm if fov_mm is not None else case.fov_mm)
    if not fov > 0:
        raise ValueError(f"fov_mm: {fov} is not positive")
    zc = case.z_centre if z_centre_mm is None else float(z_centre_mm)
    sp = fov / rows
    spacing = (float(slice_spacing_mm), sp, sp)
    a = case.anatomy
    if isinstance(a, CtpaCase):
        r = render_canonical_annotated(
            a,
            rows=rows,
            slices=slices,
            slice_spacing_mm=slice_spacing_mm,
            fov_mm=fov,
            z_centre_mm=zc,
        )
        return RegionRender(r.hu, r.x_mm, r.y_mm, r.z_mm, spacing)
    if isinstance(a, AbdomenCase):
        ra = render_abdomen(
            a,
            rows=rows,
            slices=slices,
            slice_spacing_mm=slice_spacing_mm,
            fov_mm=fov,
            z_centre_mm=zc,
        )
        return RegionRender(ra.hu, ra.x_mm, ra.y_mm, ra.z_mm, spacing)
    xs = (np.arange(rows) + 0.5) * sp - fov / 2.0
    ys = xs.copy()
    zs = zc + (slices - 1) * slice_spacing_mm / 2.0 - np.arange(slices) * slice_spacing_mm
    hu = np.empty((slices, rows, rows), dtype=np.float32)
    noise_rng = np.random.default_rng(
        [
            a.seed,
            REGIONS.index(case.region),
            rows,
            slices,
            int(round(slice_spacing_mm * 1000)),
            int(round(fov * 10)),
        ]
    )
    one: _SliceFn
    if isinstance(a, HeadCase):
        one = lambda x, y, z: _head_slice(a, x, y, z)  # noqa: E731
    elif isinstance(a, PelvisCase):
        one = lambda x, y, z: _pelvis_slice(a, x, y, z)  # noqa: E731
    else:
        one = lambda x, y, z: _legs_slice(a, x, y, z)  # noqa: E731
    for k, z in enumerate(zs):
        img = one(xs, ys, float(z))
        img += noise_rng.standard_normal(img.shape, dtype=np.float32) * np.float32(a.noise_hu)
        np.clip(img, HU_MIN, HU_MAX, out=hu[k])
    return RegionRender(hu, xs, ys, zs, spacing)


# ---------------------------------------------------------------- DICOM


@dataclass(frozen=True)
class RegionSeries:
    """What :func:`write_region_series` wrote, with the render the tests compare against."""

    paths: tuple[Path, ...]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    canonical_uids: tuple[str, ...]  # superior first
    render: RegionRender
    case: RegionCase


def write_region_series(
    out_dir: Path,
    case: RegionCase,
    *,
    rows: int = 128,
    slices: int = 40,
    slice_spacing_mm: float | None = None,
    fov_mm: float | None = None,
    z_centre_mm: float | None = None,
    patient_position: str = "HFS",
    shuffle: bool = True,
    body_part: str = "",
    contrast_agent: str | None = None,
    series_description: str = "CT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 2,
    patient_id: str | None = None,
    patient_name: str = "PHANTOM^REGION",
) -> RegionSeries:
    """Render ``case`` and write it as an axial CT Image Storage series, one file per slice.

    The header says what the caller asks, whatever the pixels show: ``body_part`` is
    BodyPartExamined, ``contrast_agent`` the ContrastBolusAgent (``None``: no Contrast/Bolus
    module; ``""``: empty; any text, e.g. "NONE" on a contrast series or "Iohexol" on a plain
    one). ``slice_spacing_mm`` defaults to spreading ``slices`` over the case's typical scan.
    Geometry as in :func:`pacsnode.phantoms.ctseries.write_ct_series`. Deterministic.
    """
    check_patient_position(patient_position)
    if slice_spacing_mm is None:
        slice_spacing_mm = (case.z_top - case.z_bottom) / max(slices - 1, 1)
    r = render_region(
        case,
        rows=rows,
        slices=slices,
        slice_spacing_mm=slice_spacing_mm,
        fov_mm=fov_mm,
        z_centre_mm=z_centre_mm,
    )
    files = write_ct_series(
        out_dir,
        r.hu,
        r.x_mm,
        r.y_mm,
        r.z_mm,
        seed=case.seed,
        uid_root=f"phantom-region-{case.region}-{int(case.contrast)}",
        slice_spacing_mm=slice_spacing_mm,
        patient_position=patient_position,
        shuffle=shuffle,
        study_uid=study_uid,
        series_uid=series_uid,
        series_number=series_number,
        series_description=series_description,
        contrast_agent=contrast_agent,
        body_part=body_part,
        patient_id=patient_id,
        patient_name=patient_name,
        study_description=f"CT {case.region.replace('_', ' ')} (synthetic phantom)",
        model_name="region-phantom",
        id_prefix="RG",
    )
    return RegionSeries(
        paths=files.paths,
        study_uid=files.study_uid,
        series_uid=files.series_uid,
        frame_of_reference_uid=files.frame_of_reference_uid,
        canonical_uids=files.canonical_uids,
        render=r,
        case=case,
    )
