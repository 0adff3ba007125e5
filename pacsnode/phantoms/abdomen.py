"""Synthetic abdominal CT series with KiTS19-style kidney / tumour / cyst ground truth.

An :class:`AbdomenCase` is an analytic description of one abdomen in **patient coordinates**
(LPS mm: +x patient left, +y posterior, +z superior), centred on ``case.centre`` (body axis
in x, y; the right kidney's centre in z):

* a body outline (a superellipse, boxier than an ellipse, slowly widening or narrowing
  along z) with subcutaneous fat, an abdominal wall of muscle and intra-abdominal fat;
* the lumbar spine (cortex brighter than marrow, discs, canal, pedicles and laminae,
  transverse and spinous processes), psoas and paraspinal muscles;
* the liver on the patient's right (-x, with hepatic veins), spleen on the left, stomach,
  pancreas, gallbladder (most cases), small-bowel loops and the ascending and descending
  colon (fluid, gas, oral contrast or stool);
* the aorta with its bifurcation into the common iliac arteries, the IVC and iliac veins,
  renal arteries and veins (the left renal vein crossing anterior to the aorta);
* two bean-shaped kidneys (rotated ellipsoids with a medial hilum notch holding sinus fat and
  the renal pelvis) in perirenal fat, posterior on either side of the spine, the left usually
  1-2 cm higher; a cortex and medulla with columns of Bertin that enhance with contrast; about
  1 case in 20 has had a nephrectomy;
* lesions: tumours (ellipsoids 1.5-6 cm, partly exophytic, heterogeneous 40-110 HU with
  contrast, sometimes a necrotic core) in one kidney or both, and cysts (round, 1-4 cm,
  0-20 HU, sharp edged). Each lesion overlaps its kidney, so kidney plus lesions is one
  connected region, and stays out of the hilum and away from the spine.

``contrast`` switches every enhancing structure between a portal venous phase and an
unenhanced scan (kidney ~30-40 HU). Geometry is drawn from the seed alone: the same seed with
another ``kind`` or ``contrast`` gives the same body, organs and kidneys (only the lesions or
the HU differ), and the same image noise.

:func:`render_abdomen` samples the case at voxel centres on any grid in the canonical
orientation of :mod:`pacsnode.volumes` (``hu[k, j, i]``: i toward patient left, j posterior,
k superior to inferior), with the ground truth point-sampled at the same centres: class
0 background, 1 kidney parenchyma, 2 tumour, 3 cyst, and a left-kidney mask. Segment masks
follow KiTS: a kidney segment includes its tumour and cyst voxels. :func:`write_abdomen_series`
writes it through :mod:`pacsnode.phantoms.ctseries` head or feet first, supine or prone, with
identical patient-space content.

Not modelled: real anatomical variability and texture, ribs, adrenal glands, ureters and the
bladder, the corticomedullary and excretory phases (urine is unenhanced), contrast timing and
mixing artefacts, renal vein tumour thrombus, perfusion defects, calcification, complex
(Bosniak II-IV) cysts, multiplicity beyond a few lesions, partial-volume blurring (every voxel
is a point sample, the slice thickness is a header value), beam hardening, streaks and the
scanner's noise texture (the noise is white Gaussian).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pacsnode.phantoms.ctseries import HU_MAX, HU_MIN, check_patient_position, write_ct_series

Vec3 = tuple[float, float, float]
Axes = tuple[Vec3, Vec3, Vec3]

KINDS: tuple[str, ...] = ("normal", "tumour", "cyst", "tumour_and_cyst")
SEGMENT_LABELS: tuple[str, ...] = ("left_kidney", "right_kidney", "kidney_tumour", "kidney_cyst")
"""The segment labels of ``models/ct-kidney/manifest.toml``, in order."""
CLASSES: tuple[str, ...] = ("background", "kidney", "tumour", "cyst")
"""Values 0..3 of :attr:`AbdomenRender.classes`."""
SIDES: tuple[str, ...] = ("left", "right")

SCAN_SLICES, SCAN_SPACING_MM = 100, 2.5
"""The default scan: the case's scan centre puts both kidneys and their lesions inside it."""
NEPHRECTOMY_PROBABILITY = 0.05
CONTRAST_PROBABILITY = 0.8
IDENTITY: Axes = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

_AIR = -1000.0
_MAX_KIDNEY_SPAN_MM = 228.0  # kidneys and lesions in z, so a 250 mm scan keeps a margin


class _FromCase(enum.Enum):
    FROM_CASE = "from-case"


FROM_CASE = _FromCase.FROM_CASE
"""Default of ``contrast_agent``: "Iohexol" for a contrast case, omitted for an unenhanced one."""


# ---------------------------------------------------------------- the case description


@dataclass(frozen=True)
class Ellipsoid:
    """A solid ellipsoid (organ, bowel lumen, gas): ``axes`` are unit rows in LPS."""

    name: str
    centre: Vec3
    semi: Vec3  # semi-axis lengths along axes[0], axes[1], axes[2]
    hu: float
    axes: Axes = IDENTITY

    def half_extent(self) -> Vec3:
        """Half size of the axis-aligned bounding box (x, y, z)."""
        return _half_extent(self.axes, self.semi)


@dataclass(frozen=True)
class Tube:
    """A tapered capsule from ``p0`` (radius ``r0``) to ``p1`` (``r1``): vessel, muscle, colon."""

    name: str
    p0: Vec3
    p1: Vec3
    r0: float
    r1: float
    hu: float


@dataclass(frozen=True)
class Kidney:
    """One kidney: a rotated ellipsoid without its medial hilum notch (a bean).

    ``axes`` are (u, v, w) unit rows in LPS: u along the long axis toward the upper pole,
    v lateral (away from the hilum), w the third axis (roughly antero-posterior). The notch
    is an ellipsoid of semi-axes ``notch_semi`` centred ``notch_depth`` x semi_v medially.
    """

    side: str
    centre: Vec3
    axes: Axes
    semi: Vec3
    cortex_mm: float
    notch_depth: float
    notch_semi: Vec3
    perirenal_fat_mm: float
    cortex_hu: float
    medulla_hu: float
    sinus_hu: float
    pelvis_hu: float
    pyramid_lobes: tuple[int, int]  # medullary pyramids fanning from the hilum: along u, along w
    pyramid_phase: tuple[float, float]

    @property
    def length_mm(self) -> float:
        return 2.0 * self.semi[0]

    @property
    def hilum(self) -> Vec3:
        """The notch centre (patient mm), where the renal vessels enter."""
        return _add(self.centre, self.axes[1], -self.notch_depth * self.semi[1])

    def half_extent(self, grow: float = 0.0) -> Vec3:
        return _half_extent(self.axes, tuple(s + grow for s in self.semi))

    def z_extent(self) -> tuple[float, float]:
        h = self.half_extent()[2]
        return self.centre[2] - h, self.centre[2] + h

    def volume_ml(self) -> float:
        """Volume of the whole ellipsoid (notch included), for orientation only."""
        return 4.0 / 3.0 * math.pi * self.semi[0] * self.semi[1] * self.semi[2] / 1000.0


@dataclass(frozen=True)
class Lesion:
    """A tumour or cyst: a rotated ellipsoid that overlaps the kidney of ``side``.

    Tumour HU is ``hu`` plus ``texture_hu`` times the mean of sin(k . p + phase) over the
    ``texture`` terms (wave vector in rad/mm, phase), a core inside ``necrosis`` x the semi-
    axes at ``necrosis_hu``, clipped to ``hu_range``. Cysts are flat (``texture`` empty).
    """

    kind: str  # "tumour" or "cyst"
    side: str
    centre: Vec3
    axes: Axes
    semi: Vec3
    hu: float
    texture_hu: float = 0.0
    texture: tuple[tuple[float, float, float, float], ...] = ()
    necrosis: float = 0.0
    necrosis_hu: float = 0.0
    hu_range: tuple[float, float] = (HU_MIN, HU_MAX)

    @property
    def diameter_mm(self) -> float:
        return 2.0 * max(self.semi)

    def volume_ml(self) -> float:
        """Analytic volume of the ellipsoid."""
        return 4.0 / 3.0 * math.pi * self.semi[0] * self.semi[1] * self.semi[2] / 1000.0

    def half_extent(self) -> Vec3:
        return _half_extent(self.axes, self.semi)

    def z_extent(self) -> tuple[float, float]:
        h = self.half_extent()[2]
        return self.centre[2] - h, self.centre[2] + h


@dataclass(frozen=True)
class Spine:
    """Lumbar vertebrae along z at ``centre_y`` (patient mm) behind the body axis."""

    centre_y: float
    radius: float
    period_mm: float
    phase_mm: float
    marrow_hu: float
    cortex_hu: float
    disc_hu: float = 85.0


@dataclass(frozen=True)
class AbdomenCase:
    """One synthetic abdomen in patient coordinates, with its kidneys and lesions."""

    seed: int
    kind: str
    contrast: bool
    centre: Vec3  # body axis (x, y); z of the right kidney's centre
    scale: float
    cavity_semi: tuple[float, float]  # inside the abdominal wall muscle, x and y
    body_power: float  # superellipse exponent of the outline
    taper_per_100mm: float  # relative change of the outline per 100 mm of z
    muscle_mm: float
    fat_mm: float
    fat_hu: float
    muscle_hu: float
    visceral_hu: float
    spine: Spine
    organs: tuple[Ellipsoid, ...]  # painted in order, inside the abdominal cavity
    tubes: tuple[Tube, ...]  # muscles and colon, inside the body wall
    vessels: tuple[Tube, ...]  # painted after the spine, before the kidney parenchyma
    kidneys: tuple[Kidney, ...]  # one per kidney present
    lesions: tuple[Lesion, ...]
    nephrectomy: str | None  # side removed, or None
    noise_hu: float
    fov_mm: float
    scan_centre_z: float
    notes: tuple[str, ...] = field(default=())

    def kidney(self, side: str) -> Kidney | None:
        return next((k for k in self.kidneys if k.side == side), None)

    @property
    def tumours(self) -> tuple[Lesion, ...]:
        return tuple(les for les in self.lesions if les.kind == "tumour")

    @property
    def cysts(self) -> tuple[Lesion, ...]:
        return tuple(les for les in self.lesions if les.kind == "cyst")

    def kidney_z_extent(self) -> tuple[float, float]:
        """Lowest and highest z (mm) of the kidneys and their lesions."""
        return _z_union([k.z_extent() for k in self.kidneys] + [e.z_extent() for e in self.lesions])


# ---------------------------------------------------------------- small geometry


def _add(p: Sequence[float], d: Sequence[float], t: float) -> Vec3:
    return (p[0] + t * d[0], p[1] + t * d[1], p[2] + t * d[2])


def _vec(a: np.ndarray) -> Vec3:
    return (float(a[0]), float(a[1]), float(a[2]))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / float(np.linalg.norm(v))


def _grown(semi: Vec3, by: float) -> Vec3:
    return (semi[0] + by, semi[1] + by, semi[2] + by)


def _half_extent(axes: Axes, semi: Sequence[float]) -> Vec3:
    a = np.asarray(axes) * np.asarray(semi, dtype=float)[:, None]
    return _vec(np.sqrt((a * a).sum(axis=0)))


def _support(axes: Axes, semi: Sequence[float], n: np.ndarray) -> float:
    """Distance from an ellipsoid's centre to its tangent plane of outward normal ``n``."""
    return float(np.sqrt((((np.asarray(axes) @ n) * np.asarray(semi)) ** 2).sum()))


def _taper(taper: float, zl: float) -> float:
    return float(np.clip(1.0 + taper * zl / 100.0, 0.85, 1.15))


def _z_union(extents: Sequence[tuple[float, float]]) -> tuple[float, float]:
    return min(lo for lo, _ in extents), max(hi for _, hi in extents)


_DIRECTIONS = np.array(
    [
        (x, y, z)
        for x in (-1.0, 0.0, 1.0)
        for y in (-1.0, 0.0, 1.0)
        for z in (-1.0, 0.0, 1.0)
        if (x, y, z) != (0.0, 0.0, 0.0)
    ]
)
_DIRECTIONS /= np.linalg.norm(_DIRECTIONS, axis=1)[:, None]


def _surface_points(centre: Vec3, axes: Axes, semi: Sequence[float]) -> np.ndarray:
    """Points on an ellipsoid's surface: the 26 lattice directions in its own frame."""
    s = np.asarray(semi, dtype=float)
    local = _DIRECTIONS / np.sqrt(((_DIRECTIONS / s) ** 2).sum(axis=1))[:, None]
    return np.asarray(centre) + local @ np.asarray(axes)


def _random_axes(rng: np.random.Generator) -> Axes:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    return (_vec(q[:, 0]), _vec(q[:, 1]), _vec(q[:, 2]))


# ---------------------------------------------------------------- case generation


class PhaseDraw:
    """Uniform draws; HU draws take one number whatever ``contrast`` is, so a seed gives the
    same anatomy in both phases (the other CT phantoms draw with it too)."""

    def __init__(self, rng: np.random.Generator, contrast: bool) -> None:
        self.rng = rng
        self.contrast = contrast

    def u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def hu(self, enhanced: tuple[float, float], plain: tuple[float, float]) -> float:
        t = float(self.rng.random())
        lo, hi = enhanced if self.contrast else plain
        return lo + t * (hi - lo)


def _kidney_axes(
    side_sign: float, tilt_coronal: float, tilt_sagittal: float, hilum_deg: float
) -> Axes:
    """(u, v, w): upper pole medial and posterior; hilum facing antero-medially."""
    u = _unit(
        np.array(
            [
                -side_sign * math.tan(math.radians(tilt_coronal)),
                math.tan(math.radians(tilt_sagittal)),
                1.0,
            ]
        )
    )
    g = math.radians(hilum_deg)
    h = np.array([-side_sign * math.cos(g), -math.sin(g), 0.0])  # toward the hilum
    v = _unit(-(h - h.dot(u) * u))
    w = np.cross(u, v)
    return (_vec(u), _vec(v), _vec(w))


def make_abdomen_case(
    seed: int, kind: str | None = None, *, contrast: bool | None = None
) -> AbdomenCase:
    """A random abdomen for ``seed``; deterministic in its arguments.

    ``kind``: one of :data:`KINDS` (``None``: drawn from the seed, about 25 % each);
    ``contrast``: portal venous (True) or unenhanced (False); ``None``: drawn, contrast with
    probability :data:`CONTRAST_PROBABILITY`. Neither changes the anatomy drawn for ``seed``.
    """
    rng = np.random.default_rng([seed, 0xAB0D])
    drawn_kind = KINDS[int(rng.integers(0, len(KINDS)))]
    drawn_contrast = bool(rng.random() < CONTRAST_PROBABILITY)
    kind = drawn_kind if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {KINDS}")
    contrast = drawn_contrast if contrast is None else bool(contrast)
    d = PhaseDraw(rng, contrast)

    s = d.u(0.9, 1.1)
    cx, cy = d.u(-12.0, 12.0), d.u(-15.0, 10.0)
    zref = d.u(-460.0, -260.0)
    a_in, b_in = s * d.u(118.0, 138.0), s * d.u(82.0, 98.0)
    power = d.u(2.3, 3.0)
    taper = d.u(-0.06, 0.06)
    muscle = d.u(8.0, 15.0)
    fat = d.u(8.0, 25.0) if rng.random() < 0.7 else d.u(25.0, 45.0)
    fat_hu = d.u(-115.0, -90.0)
    muscle_hu = d.u(45.0, 60.0)
    visceral_hu = fat_hu + d.u(10.0, 30.0)

    rv = s * d.u(17.0, 22.0)
    yv = b_in + muscle - rv - 45.0 * s
    spine = Spine(
        centre_y=cy + yv,
        radius=rv,
        period_mm=s * d.u(32.0, 38.0),
        phase_mm=d.u(0.0, 40.0),
        marrow_hu=d.u(250.0, 450.0),
        cortex_hu=d.u(650.0, 950.0),
    )

    def p(x: float, y: float, z: float) -> Vec3:
        return (cx + x, cy + y, zref + z)

    # --- kidneys (z relative to the right kidney's centre)
    nephrectomy = None
    if rng.random() < NEPHRECTOMY_PROBABILITY:
        nephrectomy = SIDES[int(rng.integers(0, 2))]
    left_rise = d.u(-5.0, 25.0) * s
    kidneys: list[Kidney] = []
    for side in SIDES:
        sign = 1.0 if side == "left" else -1.0
        semi = (s * d.u(45.0, 65.0), s * d.u(24.0, 30.0), s * d.u(18.0, 24.0))
        axes = _kidney_axes(sign, d.u(5.0, 20.0), d.u(5.0, 20.0), d.u(20.0, 45.0))
        ext = _half_extent(axes, semi)
        x = sign * (rv + s * d.u(12.0, 25.0) + ext[0])
        y = yv + s * d.u(-5.0, 12.0)
        z = left_rise if side == "left" else 0.0
        kid = Kidney(
            side=side,
            centre=p(x, y, z),
            axes=axes,
            semi=semi,
            cortex_mm=min(s * d.u(5.0, 8.0), min(semi) - 6.0),
            notch_depth=d.u(0.85, 0.95),
            notch_semi=(
                semi[0] * d.u(0.32, 0.42),
                semi[1] * d.u(0.45, 0.6),
                semi[2] * d.u(0.45, 0.6),
            ),
            perirenal_fat_mm=d.u(4.0, 12.0) + 0.15 * fat,
            cortex_hu=d.hu((150.0, 200.0), (32.0, 40.0)),
            medulla_hu=d.hu((125.0, 165.0), (30.0, 36.0)),  # nephrographic phase
            sinus_hu=fat_hu + d.u(10.0, 30.0),
            pelvis_hu=d.u(0.0, 15.0),
            pyramid_lobes=(int(rng.integers(6, 10)), int(rng.integers(3, 5))),
            pyramid_phase=(d.u(0.0, 2.0 * math.pi), d.u(0.0, 2.0 * math.pi)),
        )
        if side != nephrectomy:
            kidneys.append(kid)

    # --- the body grows until the kidneys (with their fat) fit inside the cavity
    def cavity_q(points: np.ndarray, a: float, b: float, margin: float) -> float:
        f = np.clip(1.0 + taper * (points[:, 2] - zref) / 100.0, 0.85, 1.15)
        qx = np.abs(points[:, 0] - cx) / (a * f - margin)
        qy = np.abs(points[:, 1] - cy) / (b * f - margin)
        return float((qx**power + qy**power).max())

    if kidneys:
        pts = np.concatenate(
            [
                _surface_points(k.centre, k.axes, [v + k.perirenal_fat_mm for v in k.semi])
                for k in kidneys
            ]
        )
        while cavity_q(pts, a_in, b_in, 3.0) >= 1.0:
            a_in, b_in = a_in * 1.03, b_in * 1.03

    # --- organs in the cavity (painted in this order)
    organs: list[Ellipsoid] = []
    tubes: list[Tube] = []
    zl = left_rise
    oral = rng.random() < 0.25
    for n in range(int(rng.integers(14, 27))):
        c = p(d.u(-0.75, 0.75) * a_in, d.u(-0.85, 0.05) * b_in, s * d.u(-130.0, 40.0))
        semi_b = (s * d.u(12.0, 26.0), s * d.u(10.0, 22.0), s * d.u(12.0, 30.0))
        organs.append(Ellipsoid(f"bowel-{n}", c, semi_b, d.hu((40.0, 70.0), (30.0, 42.0))))
        r = rng.random()
        content = (
            d.u(150.0, 300.0) if oral else (d.u(-980.0, -900.0) if r < 0.3 else d.u(0.0, 25.0))
        )
        organs.append(Ellipsoid(f"bowel-{n}-lumen", c, _grown(semi_b, -3.0), content))
    stomach = p(0.35 * a_in, -0.45 * b_in, s * 85.0)
    st_semi = (0.28 * a_in, 0.3 * b_in, s * d.u(40.0, 55.0))
    organs.append(Ellipsoid("stomach", stomach, st_semi, d.hu((40.0, 60.0), (35.0, 45.0))))
    organs.append(Ellipsoid("stomach-lumen", stomach, _grown(st_semi, -4.0), d.u(5.0, 25.0)))
    organs.append(
        Ellipsoid(
            "stomach-gas",
            _add(stomach, (0.0, -1.0, 0.0), 0.55 * st_semi[1]),
            (st_semi[0] * 0.6, st_semi[1] * 0.35, st_semi[2] * 0.5),
            d.u(-990.0, -940.0),
        )
    )
    liver_hu = d.hu((100.0, 120.0), (50.0, 60.0))
    right_lobe = Ellipsoid(
        "liver-right",
        p(-0.5 * a_in, -0.2 * b_in, s * d.u(55.0, 85.0)),
        (0.52 * a_in, 0.72 * b_in, s * d.u(80.0, 100.0)),
        liver_hu,
    )
    organs.append(right_lobe)
    organs.append(
        Ellipsoid(
            "liver-left",
            p(0.02 * a_in, -0.5 * b_in, s * d.u(85.0, 105.0)),
            (0.45 * a_in, 0.35 * b_in, s * d.u(45.0, 60.0)),
            liver_hu,
        )
    )
    if rng.random() < 0.7:
        organs.append(
            Ellipsoid(
                "gallbladder",
                p(-0.33 * a_in, -0.6 * b_in, s * d.u(5.0, 25.0)),
                (s * d.u(12.0, 18.0), s * d.u(12.0, 18.0), s * d.u(25.0, 40.0)),
                d.u(0.0, 15.0),
            )
        )
    organs.append(
        Ellipsoid(
            "spleen",
            p(0.7 * a_in, 0.35 * b_in, zl + s * d.u(50.0, 70.0)),
            (0.2 * a_in, 0.33 * b_in, s * d.u(45.0, 60.0)),
            d.hu((105.0, 130.0), (42.0, 50.0)),
        )
    )
    # hepatic veins: from the postero-medial dome into the right lobe (both ends inside it)
    rc, lc, rr = np.array(right_lobe.centre), np.array(right_lobe.semi), d.u(4.0, 6.0)
    confluence = _vec(rc + lc * np.array([0.6, 0.3, 0.5]))
    vein_hu = d.hu((140.0, 190.0), (35.0, 45.0))
    for n in range(3):
        tip = _vec(rc + 0.55 * _unit(rng.standard_normal(3)) * lc)
        tubes.append(Tube(f"hepatic-vein-{n}", confluence, tip, rr, rr * 0.6, vein_hu))

    # --- muscles and colon (inside the body wall)
    for side in SIDES:
        sign = 1.0 if side == "left" else -1.0
        tubes.append(
            Tube(
                f"psoas-{side}",
                p(sign * (rv + 6.0), yv + 2.0, s * 70.0),
                p(sign * (rv + 30.0 * s), yv - 10.0, s * -220.0),
                5.0,
                s * d.u(18.0, 24.0),
                muscle_hu + d.u(-3.0, 3.0),
            )
        )
        erector = p(sign * s * d.u(28.0, 34.0), yv + rv + 28.0 * s, 0.0)
        r_e = s * d.u(20.0, 26.0)
        tubes.append(
            Tube(
                f"erector-{side}",
                _add(erector, (0, 0, 1), 400.0),
                _add(erector, (0, 0, 1), -400.0),
                r_e,
                r_e,
                muscle_hu,
            )
        )
    colon_wall = d.hu((40.0, 60.0), (30.0, 40.0))
    for side, x, y_ in (("right", -0.72, -0.2), ("left", 0.78, -0.05)):
        r_c = s * d.u(16.0, 24.0)
        a0 = p(x * a_in, y_ * b_in, s * d.u(-30.0, -10.0) + (zl if side == "left" else 0.0))
        a1 = p(x * a_in * 0.95, y_ * b_in - 10.0, s * -160.0)
        tubes.append(Tube(f"colon-{side}", a0, a1, r_c, r_c, colon_wall))
        content = d.u(-990.0, -900.0) if rng.random() < 0.5 else d.u(-150.0, -30.0)
        tubes.append(Tube(f"colon-{side}-lumen", a0, a1, r_c - 3.0, r_c - 3.0, content))
    tubes.append(
        Tube(
            "pancreas",
            p(-0.12 * a_in, -0.3 * b_in, s * d.u(0.0, 20.0)),
            p(0.45 * a_in, 0.05 * b_in, zl + s * d.u(20.0, 40.0)),
            s * d.u(11.0, 15.0),
            s * d.u(7.0, 10.0),
            d.hu((80.0, 110.0), (35.0, 45.0)),
        )
    )

    # --- great vessels and renal vessels
    r_ao = s * d.u(9.0, 12.5)
    ao_x, ao_y = s * d.u(5.0, 15.0), yv - rv - r_ao - d.u(2.0, 6.0)
    z_bif = s * d.u(-150.0, -110.0)
    aorta_hu = d.hu((150.0, 250.0), (35.0, 45.0))
    ivc_hu = d.hu((100.0, 150.0), (35.0, 45.0))
    renal_vein_hu = d.hu((130.0, 180.0), (35.0, 45.0))
    r_ivc = s * d.u(10.0, 13.0)
    ivc_x, ivc_y = ao_x - r_ao - r_ivc - d.u(3.0, 10.0), yv - rv - r_ivc - d.u(4.0, 10.0)
    bif = p(ao_x, ao_y, z_bif)
    vessels = [
        Tube("aorta", p(ao_x - 3.0, ao_y, 400.0), bif, r_ao, r_ao * 0.9, aorta_hu),
        Tube("ivc", p(ivc_x, ivc_y, 400.0), p(ivc_x, ivc_y, z_bif - 15.0), r_ivc, r_ivc, ivc_hu),
    ]
    for side in SIDES:
        sign = 1.0 if side == "left" else -1.0
        end = p(sign * s * d.u(35.0, 50.0), ao_y + 20.0, z_bif - 200.0)
        vessels.append(Tube(f"iliac-artery-{side}", bif, end, 0.62 * r_ao, 0.55 * r_ao, aorta_hu))
        vend = _add(end, (0.0, 1.0, 0.0), 12.0)
        vessels.append(
            Tube(
                f"iliac-vein-{side}",
                p(ivc_x, ivc_y, z_bif - 15.0),
                vend,
                0.65 * r_ivc,
                0.6 * r_ivc,
                ivc_hu,
            )
        )
    for k in kidneys:
        h = k.hilum
        r_a, r_v = s * d.u(2.5, 3.5), s * d.u(4.0, 6.0)
        vessels.append(
            Tube(
                f"renal-artery-{k.side}", (cx + ao_x, cy + ao_y, h[2] + 5.0), h, r_a, r_a, aorta_hu
            )
        )
        if k.side == "left":
            front = (cx + ao_x, cy + ao_y - r_ao - r_v - 2.0, h[2] - 2.0)
            vessels.append(Tube("renal-vein-left", h, front, r_v, r_v, renal_vein_hu))
            vessels.append(
                Tube(
                    "renal-vein-left-2",
                    front,
                    (cx + ivc_x, cy + ivc_y, h[2] - 6.0),
                    r_v,
                    r_v,
                    renal_vein_hu,
                )
            )
        else:
            vessels.append(
                Tube(
                    "renal-vein-right",
                    h,
                    (cx + ivc_x, cy + ivc_y, h[2] - 4.0),
                    r_v,
                    r_v,
                    renal_vein_hu,
                )
            )

    noise = d.u(10.0, 20.0)

    # --- lesions: their own stream, so the anatomy above does not depend on the kind
    lesions = _make_lesions(
        np.random.default_rng([seed, 0xAB0D, 1]),
        kind,
        contrast,
        kidneys,
        inside=lambda pts: cavity_q(pts, a_in, b_in, 4.0) < 1.0,
        medial_limit=rv + 3.0,
        body_x=cx,
    )

    lo, hi = _z_union([k.z_extent() for k in kidneys] + [e.z_extent() for e in lesions])
    slack = max(0.0, ((SCAN_SLICES - 1) * SCAN_SPACING_MM - (hi - lo)) / 2.0 - 8.0)
    scan_centre = (lo + hi) / 2.0 + d.u(-1.0, 1.0) * min(slack, 20.0)
    half_scan = (SCAN_SLICES - 1) * SCAN_SPACING_MM / 2.0
    f_max = max(_taper(taper, scan_centre - zref + t) for t in (-half_scan, half_scan))
    half_x = (a_in + muscle + fat) * f_max + abs(cx)
    half_y = (b_in + muscle + fat) * f_max + abs(cy)
    fov = 2.0 * max(half_x, half_y) + d.u(15.0, 45.0)
    notes = (f"nephrectomy {nephrectomy}",) if nephrectomy else ()
    return AbdomenCase(
        seed=seed,
        kind=kind,
        contrast=contrast,
        centre=(cx, cy, zref),
        scale=s,
        cavity_semi=(a_in, b_in),
        body_power=power,
        taper_per_100mm=taper,
        muscle_mm=muscle,
        fat_mm=fat,
        fat_hu=fat_hu,
        muscle_hu=muscle_hu,
        visceral_hu=visceral_hu,
        spine=spine,
        organs=tuple(organs),
        tubes=tuple(tubes),
        vessels=tuple(vessels),
        kidneys=tuple(kidneys),
        lesions=lesions,
        nephrectomy=nephrectomy,
        noise_hu=noise,
        fov_mm=round(fov, 1),
        scan_centre_z=scan_centre,
        notes=notes,
    )


def _make_lesions(
    rng: np.random.Generator,
    kind: str,
    contrast: bool,
    kidneys: Sequence[Kidney],
    *,
    inside: Callable[[np.ndarray], bool],
    medial_limit: float,
    body_x: float,
) -> tuple[Lesion, ...]:
    """Tumours then cysts on the kidneys present, as ``kind`` asks; ``inside`` tells whether
    points (n, 3) lie inside the abdominal cavity."""
    if not kidneys or kind == "normal":
        return ()
    lesions: list[Lesion] = []
    if kind in ("tumour", "tumour_and_cyst"):
        hosts = list(kidneys)
        if len(hosts) == 2 and rng.random() >= 0.12:
            hosts = [hosts[int(rng.integers(0, 2))]]
        for k in hosts:
            for _ in range(2 if rng.random() < 0.1 else 1):
                lesions.append(
                    _place(
                        rng, "tumour", contrast, k, kidneys, lesions, inside, medial_limit, body_x
                    )
                )
    if kind in ("cyst", "tumour_and_cyst"):
        for _ in range(int(rng.integers(1, 4))):
            k = kidneys[int(rng.integers(0, len(kidneys)))]
            lesions.append(
                _place(rng, "cyst", contrast, k, kidneys, lesions, inside, medial_limit, body_x)
            )
    return tuple(lesions)


def _place(
    rng: np.random.Generator,
    kind: str,
    contrast: bool,
    kidney: Kidney,
    kidneys: Sequence[Kidney],
    placed: Sequence[Lesion],
    inside: Callable[[np.ndarray], bool],
    medial_limit: float,
    body_x: float,
) -> Lesion:
    """One lesion overlapping ``kidney``: away from the hilum and spine, inside the cavity,
    clear of tumours (cysts), with kidneys and lesions fitting in the default scan."""
    sign = 1.0 if kidney.side == "left" else -1.0
    ks = np.asarray(kidney.semi)
    kaxes = np.asarray(kidney.axes)
    if kind == "tumour":
        diameter = math.exp(rng.uniform(math.log(15.0), math.log(60.0)))
    else:
        diameter = math.exp(rng.uniform(math.log(10.0), math.log(40.0)))
    spread = 0.15 if kind == "tumour" else 0.06
    lo_d, hi_d = (15.0, 60.0) if kind == "tumour" else (10.0, 40.0)
    for attempt in range(400):
        if attempt and attempt % 40 == 0:
            diameter = max(lo_d, diameter * 0.85)
        semi = tuple(
            float(
                np.clip(
                    diameter / 2.0 * rng.uniform(1.0 - spread, 1.0 + spread), lo_d / 2, hi_d / 2
                )
            )
            for _ in range(3)
        )
        axes = _random_axes(rng)
        direction = _unit(rng.standard_normal(3))
        if direction[1] < -0.35:  # the medial (hilum) side
            continue
        local = direction / math.sqrt(float(((direction / ks) ** 2).sum()))
        normal = _unit(local / ks**2) @ kaxes
        surface = np.asarray(kidney.centre) + local @ kaxes
        depth = rng.uniform(-0.2, 0.85) if kind == "tumour" else rng.uniform(-0.45, 0.6)
        centre = surface - normal * _support(axes, semi, normal) * depth
        lesion_c = _vec(centre)
        candidate = _lesion(rng, kind, contrast, kidney.side, lesion_c, axes, semi)
        ext = candidate.half_extent()
        if sign * (centre[0] - body_x) - ext[0] < medial_limit:
            continue
        if not inside(_surface_points(lesion_c, axes, semi)):
            continue
        lo, hi = _z_union(
            [k.z_extent() for k in kidneys] + [e.z_extent() for e in (*placed, candidate)]
        )
        if hi - lo > _MAX_KIDNEY_SPAN_MM:
            continue
        if kind == "cyst" and any(
            float(np.linalg.norm(centre - np.asarray(t.centre))) < max(semi) + max(t.semi) + 2.0
            for t in placed
            if t.kind == "tumour"
        ):
            continue
        return candidate
    raise ValueError(f"could not place a {kind} on the {kidney.side} kidney after 400 tries")


def _lesion(
    rng: np.random.Generator,
    kind: str,
    contrast: bool,
    side: str,
    centre: Vec3,
    axes: Axes,
    semi: Vec3 | tuple[float, ...],
) -> Lesion:
    semi3 = (float(semi[0]), float(semi[1]), float(semi[2]))
    if kind == "cyst":
        return Lesion(
            "cyst",
            side,
            centre,
            axes,
            semi3,
            hu=float(rng.uniform(0.0, 20.0)),
            hu_range=(0.0, 20.0),
        )
    terms = []
    for _ in range(3):
        k = _unit(rng.standard_normal(3)) * (2.0 * math.pi / float(rng.uniform(10.0, 25.0)))
        terms.append(
            (float(k[0]), float(k[1]), float(k[2]), float(rng.uniform(0.0, 2.0 * math.pi)))
        )
    necrotic = max(semi3) > 17.5 and rng.random() < 0.35
    if contrast:
        base, amp, hu_range, necrosis_hu = (
            rng.uniform(55.0, 95.0),
            rng.uniform(8.0, 20.0),
            (40.0, 110.0),
            rng.uniform(40.0, 50.0),
        )
    else:
        base, amp, hu_range, necrosis_hu = (
            rng.uniform(28.0, 45.0),
            rng.uniform(3.0, 8.0),
            (20.0, 50.0),
            rng.uniform(20.0, 25.0),
        )
    return Lesion(
        "tumour",
        side,
        centre,
        axes,
        semi3,
        hu=float(base),
        texture_hu=float(amp),
        texture=tuple(terms),
        necrosis=float(rng.uniform(0.3, 0.55)) if necrotic else 0.0,
        necrosis_hu=float(necrosis_hu),
        hu_range=hu_range,
    )


# ---------------------------------------------------------------- rendering


def _span(coords: np.ndarray, lo: float, hi: float) -> slice:
    """Index range of ascending ``coords`` within [lo, hi]."""
    a = int(np.searchsorted(coords, lo, side="left"))
    b = int(np.searchsorted(coords, hi, side="right"))
    return slice(a, max(a, b))


Box = tuple[slice, slice, slice]


class _Grid:
    """Voxel centres: ``xs``, ``ys`` ascending, ``zs`` descending (canonical k)."""

    def __init__(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> None:
        self.xs, self.ys, self.zs = xs, ys, zs
        self._neg_z = -zs

    def box(self, centre: Sequence[float], half: Sequence[float]) -> Box | None:
        sk = _span(self._neg_z, -(centre[2] + half[2]), -(centre[2] - half[2]))
        sj = _span(self.ys, centre[1] - half[1], centre[1] + half[1])
        si = _span(self.xs, centre[0] - half[0], centre[0] + half[0])
        if sk.start >= sk.stop or sj.start >= sj.stop or si.start >= si.stop:
            return None
        return sk, sj, si

    def offsets(
        self, box: Box, origin: Sequence[float]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (dz, dy, dx) float32 offsets of the box's voxels from ``origin``."""
        sk, sj, si = box
        dz = (self.zs[sk] - origin[2]).astype(np.float32)[:, None, None]
        dy = (self.ys[sj] - origin[1]).astype(np.float32)[None, :, None]
        dx = (self.xs[si] - origin[0]).astype(np.float32)[None, None, :]
        return dz, dy, dx


def _local(offsets: tuple[np.ndarray, np.ndarray, np.ndarray], axes: Axes) -> list[np.ndarray]:
    dz, dy, dx = offsets
    return [a[0] * dx + a[1] * dy + a[2] * dz for a in axes]


def _ellipsoid_q(
    grid: _Grid, box: Box, centre: Vec3, axes: Axes, semi: Sequence[float]
) -> np.ndarray:
    """Normalised radius squared (< 1 inside) over ``box``."""
    offs = grid.offsets(box, centre)
    if axes == IDENTITY:
        dz, dy, dx = offs
        return (dx / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dz / semi[2]) ** 2
    u, v, w = _local(offs, axes)
    return (u / semi[0]) ** 2 + (v / semi[1]) ** 2 + (w / semi[2]) ** 2


def _tube_mask(grid: _Grid, t: Tube) -> tuple[Box, np.ndarray] | None:
    r = max(t.r0, t.r1)
    lo = np.minimum(t.p0, t.p1) - r
    hi = np.maximum(t.p0, t.p1) + r
    box = grid.box(_vec((lo + hi) / 2.0), _vec((hi - lo) / 2.0))
    if box is None:
        return None
    dz, dy, dx = grid.offsets(box, t.p0)
    d = np.subtract(t.p1, t.p0)
    l2 = float(d.dot(d))
    dot = dx * d[0] + dy * d[1] + dz * d[2]
    tt = np.clip(dot / l2, 0.0, 1.0)
    dist2 = dx * dx + dy * dy + dz * dz - 2.0 * tt * dot + tt * tt * l2
    rad = t.r0 + tt * (t.r1 - t.r0)
    return box, dist2 < rad * rad


def _paint(
    img: np.ndarray, box: Box, mask: np.ndarray, hu: float | np.ndarray, clip: np.ndarray | None
) -> None:
    if clip is not None:
        mask = mask & clip[box]
    view = img[box]
    if isinstance(hu, np.ndarray):
        view[mask] = hu[mask]
    else:
        view[mask] = hu


def _paint_ellipsoid(img: np.ndarray, grid: _Grid, e: Ellipsoid, clip: np.ndarray | None) -> None:
    box = grid.box(e.centre, e.half_extent())
    if box is not None:
        _paint(img, box, _ellipsoid_q(grid, box, e.centre, e.axes, e.semi) < 1.0, e.hu, clip)


def _paint_tube(img: np.ndarray, grid: _Grid, t: Tube, clip: np.ndarray | None) -> None:
    sec = _tube_mask(grid, t)
    if sec is not None:
        _paint(img, sec[0], sec[1], t.hu, clip)


def _body(case: AbdomenCase, grid: _Grid, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paint fat, wall muscle and cavity; return the cavity and inside-the-fat masks."""
    cx, cy, zref = case.centre
    p = case.body_power
    f = np.clip(1.0 + case.taper_per_100mm * (grid.zs - zref) / 100.0, 0.85, 1.15)
    ax = (np.abs(grid.xs - cx) ** p).astype(np.float32)[None, None, :]
    ay = (np.abs(grid.ys - cy) ** p).astype(np.float32)[None, :, None]
    a_c, b_c = case.cavity_semi

    def inside(grow: float) -> np.ndarray:
        a = ((f * (a_c + grow)) ** p).astype(np.float32)[:, None, None]
        b = ((f * (b_c + grow)) ** p).astype(np.float32)[:, None, None]
        return ax / a + ay / b < 1.0

    img[inside(case.muscle_mm + case.fat_mm)] = case.fat_hu
    wall = inside(case.muscle_mm)
    img[wall] = case.muscle_hu
    cavity = inside(0.0)
    img[cavity] = case.visceral_hu
    return cavity, wall


def _spine(case: AbdomenCase, grid: _Grid, img: np.ndarray) -> None:
    sp = case.spine
    cx, zref = case.centre[0], case.centre[2]
    s = case.scale
    rv, vy = sp.radius, sp.centre_y
    canal_y = vy + rv + 10.0 * s
    sj = _span(grid.ys, vy - rv - 1.0, canal_y + 42.0 * s)
    si = _span(grid.xs, cx - rv - 45.0 * s, cx + rv + 45.0 * s)
    if sj.start >= sj.stop or si.start >= si.stop:
        return
    X = (grid.xs[si] - cx)[None, :]
    Y = grid.ys[sj][:, None]
    d2 = X * X + (Y - vy) ** 2
    body = d2 < rv * rv
    marrow = d2 < (rv - 2.5) ** 2
    c2 = X * X + (Y - canal_y) ** 2
    arch = (c2 < (14.0 * s) ** 2) & (Y - canal_y > -6.0 * s)
    canal = c2 < (8.0 * s) ** 2
    spinous = (np.abs(X) < 4.0 * s) & (np.abs(Y - canal_y - 24.0 * s) < 16.0 * s)
    transverse = (np.abs(X) < rv + 22.0 * s) & (np.abs(Y - canal_y + 6.0 * s) < 3.5 * s)
    post_hu = 0.85 * sp.cortex_hu
    for k, z in enumerate(grid.zs):
        t = ((z - zref + sp.phase_mm) % sp.period_mm) / sp.period_mm
        view = img[k, sj, si]
        if t < 0.18:
            view[body] = sp.disc_hu
        else:
            view[body] = sp.cortex_hu
            view[marrow] = sp.marrow_hu
        if 0.35 < t < 0.55:
            view[transverse] = post_hu
        if 0.25 < t < 0.9:
            view[arch] = post_hu
        if 0.4 < t < 0.95:
            view[spinous] = post_hu
        view[canal] = 10.0


@dataclass(frozen=True)
class _KidneyFields:
    box: Box
    u: np.ndarray
    v: np.ndarray
    w: np.ndarray
    hull: np.ndarray
    notch: np.ndarray


def _kidney_fields(grid: _Grid, k: Kidney) -> _KidneyFields | None:
    box = grid.box(k.centre, k.half_extent())
    if box is None:
        return None
    u, v, w = _local(grid.offsets(box, k.centre), k.axes)
    su, sv, sw = k.semi
    hull = (u / su) ** 2 + (v / sv) ** 2 + (w / sw) ** 2 < 1.0
    nu, nv, nw = k.notch_semi
    notch = (u / nu) ** 2 + ((v + k.notch_depth * sv) / nv) ** 2 + (w / nw) ** 2 < 1.0
    return _KidneyFields(box, u, v, w, hull, notch)


def _kidney_sinus(img: np.ndarray, k: Kidney, f: _KidneyFields) -> None:
    """Sinus fat and the renal pelvis in the notch (before the renal vessels)."""
    view = img[f.box]
    view[f.hull & f.notch] = k.sinus_hu
    nu, nv, nw = k.notch_semi
    pelvis = (f.u / (0.5 * nu)) ** 2 + ((f.v + 0.8 * k.notch_depth * k.semi[1]) / (0.45 * nv)) ** 2
    pelvis += (f.w / (0.45 * nw)) ** 2
    view[(pelvis < 1.0) & f.hull] = k.pelvis_hu


def _kidney_parenchyma(
    img: np.ndarray, classes: np.ndarray, left: np.ndarray, k: Kidney, f: _KidneyFields
) -> None:
    kidney = f.hull & ~f.notch
    t = k.cortex_mm
    su, sv, sw = k.semi
    nu, nv, nw = k.notch_semi
    inner = (f.u / (su - t)) ** 2 + (f.v / (sv - t)) ** 2 + (f.w / (sw - t)) ** 2 < 1.0
    sinus_rim = (f.u / (nu + t)) ** 2 + ((f.v + k.notch_depth * sv) / (nv + t)) ** 2
    sinus_rim += (f.w / (nw + t)) ** 2
    # pyramids: sectors of a fan around the hilum, columns of Bertin between them
    out = f.v + k.notch_depth * sv
    n_u, n_w = k.pyramid_lobes
    pyramids = np.cos(n_u * np.arctan2(f.u, out) + k.pyramid_phase[0]) > -0.4
    pyramids &= np.cos(n_w * np.arctan2(f.w, out) + k.pyramid_phase[1]) > -0.5
    medulla = kidney & inner & (sinus_rim >= 1.0) & pyramids
    view = img[f.box]
    view[kidney] = k.cortex_hu
    view[medulla] = k.medulla_hu
    classes[f.box][kidney] = 1
    left[f.box][kidney] = k.side == "left"


def _paint_lesion(
    img: np.ndarray, classes: np.ndarray, left: np.ndarray, grid: _Grid, e: Lesion
) -> None:
    box = grid.box(e.centre, e.half_extent())
    if box is None:
        return
    q = _ellipsoid_q(grid, box, e.centre, e.axes, e.semi)
    inside = q < 1.0
    if not inside.any():
        return
    hu: float | np.ndarray = e.hu
    if e.texture:
        dz, dy, dx = grid.offsets(box, e.centre)
        tex = np.zeros(q.shape, dtype=np.float32)
        for kx, ky, kz, phase in e.texture:
            tex += np.sin(kx * dx + ky * dy + kz * dz + phase)
        values = e.hu + (e.texture_hu / len(e.texture)) * tex
        if e.necrosis > 0.0:
            values[q < e.necrosis**2] = e.necrosis_hu
        hu = np.clip(values, e.hu_range[0], e.hu_range[1])
    _paint(img, box, inside, hu, None)
    classes[box][inside] = 2 if e.kind == "tumour" else 3
    left[box][inside] = e.side == "left"


@dataclass(frozen=True)
class AbdomenRender:
    """A rendered abdomen with its voxel-wise ground truth, all in canonical ``(k, j, i)``."""

    hu: np.ndarray  # float32, clipped to [HU_MIN, HU_MAX]
    classes: np.ndarray  # uint8: 0 background, 1 kidney parenchyma, 2 tumour, 3 cyst
    left: np.ndarray  # bool: the patient's left kidney, its lesions included
    x_mm: np.ndarray  # (i,) voxel-centre x, ascending (toward patient left)
    y_mm: np.ndarray  # (j,) voxel-centre y, ascending (toward posterior)
    z_mm: np.ndarray  # (k,) slice z, descending (superior first)
    spacing: tuple[float, float, float]  # (k, j, i) mm

    @property
    def voxel_ml(self) -> float:
        return self.spacing[0] * self.spacing[1] * self.spacing[2] / 1000.0

    def masks(self) -> dict[str, np.ndarray]:
        """:data:`SEGMENT_LABELS` -> bool masks; a kidney segment includes its lesions."""
        foreground = self.classes > 0
        return {
            "left_kidney": foreground & self.left,
            "right_kidney": foreground & ~self.left,
            "kidney_tumour": self.classes == 2,
            "kidney_cyst": self.classes == 3,
        }

    def volumes_ml(self) -> dict[str, float]:
        """Voxel count times voxel volume of each segment."""
        return {name: float(m.sum()) * self.voxel_ml for name, m in self.masks().items()}


def render_abdomen(
    case: AbdomenCase,
    *,
    rows: int,
    slices: int,
    slice_spacing_mm: float,
    fov_mm: float | None = None,
    z_centre_mm: float | None = None,
) -> AbdomenRender:
    """Render ``case`` on a canonical grid with its ground truth.

    ``rows`` x ``rows`` pixels over ``fov_mm`` (default: the case's FOV) centred on the
    scanner axis (x = y = 0); ``slices`` planes ``slice_spacing_mm`` apart from the top down,
    centred on ``z_centre_mm`` (default: the case's scan centre, which holds both kidneys in
    a 100 x 2.5 mm scan). HU and truth are sampled at the same voxel centres; the noise is
    seeded by the case and the grid.
    """
    if rows < 16 or slices < 1 or not slice_spacing_mm > 0:
        raise ValueError(
            f"rows={rows}, slices={slices}, slice_spacing_mm={slice_spacing_mm}: "
            "need rows >= 16, slices >= 1, spacing > 0"
        )
    fov = float(fov_mm if fov_mm is not None else case.fov_mm)
    if not fov > 0:
        raise ValueError(f"fov_mm: {fov} is not positive")
    sp = fov / rows
    xs = (np.arange(rows) + 0.5) * sp - fov / 2.0
    ys = xs.copy()
    zc = case.scan_centre_z if z_centre_mm is None else float(z_centre_mm)
    zs = zc + (slices - 1) * slice_spacing_mm / 2.0 - np.arange(slices) * slice_spacing_mm
    grid = _Grid(xs, ys, zs)
    shape = (slices, rows, rows)
    img = np.full(shape, _AIR, dtype=np.float32)
    classes = np.zeros(shape, dtype=np.uint8)
    left = np.zeros(shape, dtype=bool)

    cavity, wall = _body(case, grid, img)
    for e in case.organs:
        _paint_ellipsoid(img, grid, e, cavity)
    for k in case.kidneys:
        semi = _grown(k.semi, k.perirenal_fat_mm)
        fat = Ellipsoid("perirenal-fat", k.centre, semi, case.fat_hu, k.axes)
        _paint_ellipsoid(img, grid, fat, cavity)
    for t in case.tubes:
        _paint_tube(
            img, grid, t, cavity if t.name.startswith(("colon", "pancreas", "hepatic")) else wall
        )
    _spine(case, grid, img)
    fields = [(k, _kidney_fields(grid, k)) for k in case.kidneys]
    for k, f in fields:
        if f is not None:
            _kidney_sinus(img, k, f)
    for t in case.vessels:
        _paint_tube(img, grid, t, None)
    for k, f in fields:
        if f is not None:
            _kidney_parenchyma(img, classes, left, k, f)
    for lesion in sorted(case.lesions, key=lambda les: les.kind != "cyst"):  # tumours last
        _paint_lesion(img, classes, left, grid, lesion)

    noise_rng = np.random.default_rng(
        [case.seed, rows, slices, int(round(slice_spacing_mm * 1000)), int(round(fov * 10)), 0xAB]
    )
    noise = noise_rng.standard_normal(shape, dtype=np.float32)
    noise *= np.float32(case.noise_hu)
    img += noise
    np.clip(img, HU_MIN, HU_MAX, out=img)
    return AbdomenRender(
        hu=img,
        classes=classes,
        left=left,
        x_mm=xs,
        y_mm=ys,
        z_mm=zs,
        spacing=(float(slice_spacing_mm), float(sp), float(sp)),
    )


# ---------------------------------------------------------------- DICOM


@dataclass(frozen=True)
class AbdomenSeries:
    """What :func:`write_abdomen_series` wrote, with the render the tests compare against."""

    paths: tuple[Path, ...]  # in the order written (shuffled when asked)
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    canonical_uids: tuple[str, ...]  # SOP Instance UIDs from superior to inferior
    render: AbdomenRender
    case: AbdomenCase


def write_abdomen_series(
    out_dir: Path,
    case: AbdomenCase,
    *,
    patient_position: str = "HFS",
    shuffle: bool = True,
    rows: int = 256,
    slices: int = SCAN_SLICES,
    slice_spacing_mm: float = SCAN_SPACING_MM,
    slice_thickness_mm: float | None = None,
    fov_mm: float | None = None,
    z_centre_mm: float | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 2,
    series_description: str = "CT abdomen portal venous",
    convolution_kernel: str = "B30f",
    contrast_agent: str | None | _FromCase = FROM_CASE,
    body_part: str = "ABDOMEN",
    patient_id: str | None = None,
    patient_name: str = "PHANTOM^ABDOMEN",
    accession_number: str | None = None,
    study_date: str | None = None,
    frame_of_reference_uid: str | None = None,
) -> AbdomenSeries:
    """Render ``case`` (:func:`render_abdomen`) and write it as an axial CT series.

    Geometry as in :func:`pacsnode.phantoms.ctseries.write_ct_series`: ``patient_position``
    HFS/FFS/HFP/FFP all hold the same patient-space content; ``shuffle`` writes files in a
    seeded random order under opaque names. ``contrast_agent`` defaults to "Iohexol" for a
    contrast case and to no Contrast/Bolus module for an unenhanced one (then a
    ``series_description`` naming the phase is the caller's business). Deterministic in
    ``case`` and the arguments.
    """
    check_patient_position(patient_position)
    if isinstance(contrast_agent, _FromCase):
        contrast_agent = "Iohexol" if case.contrast else None
    r = render_abdomen(
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
        uid_root="phantom-abdomen",
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
        kvp="120",
        window=(40, 400),
        patient_id=patient_id,
        patient_name=patient_name,
        accession_number=accession_number,
        study_date=study_date,
        study_description="CT abdomen (synthetic phantom)",
        model_name="abdomen-phantom",
        id_prefix="AB",
    )
    return AbdomenSeries(
        paths=files.paths,
        study_uid=files.study_uid,
        series_uid=files.series_uid,
        frame_of_reference_uid=files.frame_of_reference_uid,
        canonical_uids=files.canonical_uids,
        render=r,
        case=case,
    )
