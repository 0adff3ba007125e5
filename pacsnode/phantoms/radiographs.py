"""Synthetic radiographs of many body parts and views, for the radiograph content gate.

Each *kind* (:data:`KINDS`) is a body part in one view: lower leg, knee, hand, wrist, foot,
cervical and lumbar spine, skull, abdomen (KUB), pelvis and lateral chest are drawn here from
projected primitives in millimetre coordinates (tapered hollow long bones with a cortex,
ellipsoids and rounded boxes, gas and lung lucencies, soft-tissue envelopes); the two
frontal chest kinds take their anatomy from :func:`pacsnode.phantoms.cxr.render` (all its
findings and variety) and add only what this module adds to every kind. Three kinds are
inputs the chest model must not read either: ``chest_rotated`` (a frontal chest displayed on
its side or upside down), ``chest_inverted`` (grey scale inverted, as a MONOCHROME1 image
labelled MONOCHROME2 displays) and ``blank`` (no anatomy: flat or graded exposure, noise, bar
patterns, a page of text).

What every kind gets, from the seed: patient size, detector size and orientation (matrix
1024–3000 px, non-square), position and rotation on the detector, mirroring (left or right
side), exposure and contrast, heel effect, detector noise, optional unsharp-mask
post-processing, collimation (unexposed borders, bright; or electronic shutters, black),
lead "L"/"R" markers and burned-in text ("AP", "LAT", "ERECT"...). :func:`make_radiograph_dataset`
encodes the image as a CR or DX instance (random bit depth, MONOCHROME1/2, window or none,
rescale) whose header can be set to anything, so a leg can be labelled CHEST PA.

Resolution independence: anatomy and acquisition are drawn from streams seeded by ``(seed,
kind)`` only, so the same seed rendered at 256 px and at 2048 px shows the same image
(the noise and the cxr phantom's own texture aside); training can render small.

The phantoms model silhouettes, densities and layout, not anatomy in detail: no trabecular
pattern beyond a mottled texture, no growth plates, fractures, implants, casts or positioning
aids, and bones are idealised tubes and ellipsoids.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian
from scipy.ndimage import affine_transform

from pacsnode.phantoms.cxr import (
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION,
    DX_FOR_PROCESSING,
    _blur,
    _smoothstep,
)
from pacsnode.phantoms.cxr import render as render_cxr
from pacsnode.uids import derive_uid

# ---------------------------------------------------------------- kinds


@dataclass(frozen=True)
class KindSpec:
    """One body part in one view: its gate class and its truthful header."""

    label: str
    """The class the radiograph gate reports (several kinds share one, e.g. hand and wrist)."""
    body_part: str
    """BodyPartExamined (PS3.16 Annex L defined terms)."""
    view: str
    """ViewPosition; "" where no defined term fits (extremity laterals, obliques)."""
    description: str


KIND_SPECS: dict[str, KindSpec] = {
    "frontal_chest_pa": KindSpec("frontal_chest", "CHEST", "PA", "Chest PA"),
    "frontal_chest_ap": KindSpec("frontal_chest", "CHEST", "AP", "Chest AP"),
    "lateral_chest": KindSpec("lateral_chest", "CHEST", "LL", "Chest lateral"),
    "lower_leg_ap": KindSpec("lower_leg", "LEG", "AP", "Tibia and fibula AP"),
    "lower_leg_lateral": KindSpec("lower_leg", "LEG", "", "Tibia and fibula lateral"),
    "knee_ap": KindSpec("knee", "KNEE", "AP", "Knee AP"),
    "knee_lateral": KindSpec("knee", "KNEE", "", "Knee lateral"),
    "hand_pa": KindSpec("hand", "HAND", "PA", "Hand PA"),
    "hand_oblique": KindSpec("hand", "HAND", "", "Hand oblique"),
    "wrist_pa": KindSpec("hand", "HAND", "PA", "Wrist PA"),
    "foot_ap": KindSpec("foot", "FOOT", "AP", "Foot dorsoplantar"),
    "foot_lateral": KindSpec("foot", "FOOT", "", "Foot lateral"),
    "cspine_ap": KindSpec("cervical_spine", "CSPINE", "AP", "Cervical spine AP"),
    "cspine_lateral": KindSpec("cervical_spine", "CSPINE", "LL", "Cervical spine lateral"),
    "lspine_ap": KindSpec("lumbar_spine", "LSPINE", "AP", "Lumbar spine AP"),
    "lspine_lateral": KindSpec("lumbar_spine", "LSPINE", "LL", "Lumbar spine lateral"),
    "skull_pa": KindSpec("skull", "SKULL", "PA", "Skull PA"),
    "skull_lateral": KindSpec("skull", "SKULL", "LL", "Skull lateral"),
    "abdomen_ap": KindSpec("abdomen", "ABDOMEN", "AP", "Abdomen AP supine (KUB)"),
    "pelvis_ap": KindSpec("pelvis", "PELVIS", "AP", "Pelvis AP"),
    "chest_rotated": KindSpec("chest_rotated", "CHEST", "PA", "Chest PA, displayed turned"),
    "chest_inverted": KindSpec("chest_inverted", "CHEST", "PA", "Chest PA, grey scale inverted"),
    "blank": KindSpec("blank", "CHEST", "PA", "Blank exposure, noise or test pattern"),
}

KINDS: tuple[str, ...] = tuple(KIND_SPECS)
"""Every kind :func:`make_radiograph_dataset` can draw."""

CLASSES: tuple[str, ...] = tuple(dict.fromkeys(spec.label for spec in KIND_SPECS.values()))
"""The gate's classes, ``frontal_chest`` first."""

CHEST_KINDS: tuple[str, ...] = ("frontal_chest_pa", "frontal_chest_ap")
"""The kinds that are frontal chest radiographs, displayed as the chest model expects."""

_CXR_BASED = (*CHEST_KINDS, "chest_rotated", "chest_inverted")

ANATOMIC_REGIONS: dict[str, Code] = {
    "CHEST": codes.SCT.Chest,
    "LEG": codes.SCT.LowerLeg,
    "KNEE": codes.SCT.Knee,
    "HAND": codes.SCT.Hand,
    "FOOT": codes.SCT.Foot,
    "CSPINE": codes.SCT.CervicalSpine,
    "LSPINE": codes.SCT.LumbarSpine,
    "SKULL": codes.SCT.Skull,
    "ABDOMEN": codes.SCT.Abdomen,
    "PELVIS": codes.SCT.Pelvis,
    "EXTREMITY": codes.SCT.Extremity,
}
"""Anatomic Region codes for the body parts the phantoms use (DX needs one)."""

VIEW_CODES: dict[str, Code] = {
    "AP": codes.SCT.AnteroPosterior,
    "PA": codes.SCT.PosteroAnterior,
    "LL": codes.SCT.LeftLateral,
    "RL": codes.SCT.RightLateral,
    "": codes.SCT.LateralProjection,
    "OBLIQUE": codes.SCT.FrontalOblique,
}
"""View Code (CID 4010) by ViewPosition; "" is an extremity lateral (no ViewPosition term)."""

# densities per mm of path (soft tissue 100 mm ~ 0.4, like the chest phantom's body)
SOFT = 0.004
BONE = 0.03
MARROW = 0.008
GAS = -0.004
LUNG = -0.0034


def _stream(seed: int, kind: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(kind.encode()), stream])


# ---------------------------------------------------------------- primitives

Point = tuple[float, float]


@dataclass(frozen=True)
class _Tube:
    """A tapered cylinder from ``p0`` to ``p1`` with rounded ends, solid or with a cortex.

    ``radii`` (and ``walls``, cortical thickness) are knots at the fractions ``ts`` of the
    axis; ``depth`` scales the path length along the beam (an elliptical cross-section).
    """

    p0: Point
    p1: Point
    ts: tuple[float, ...]
    radii: tuple[float, ...]
    amp: float
    walls: tuple[float, ...] | None = None
    marrow: float = MARROW
    depth: float = 1.0
    bone: bool = False

    def bounds(self) -> tuple[float, float, float, float]:
        r = max(self.radii)
        return (
            min(self.p0[0], self.p1[0]) - r,
            max(self.p0[0], self.p1[0]) + r,
            min(self.p0[1], self.p1[1]) - r,
            max(self.p0[1], self.p1[1]) + r,
        )

    def profile(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        du, dv = self.p1[0] - self.p0[0], self.p1[1] - self.p0[1]
        length2 = max(du * du + dv * dv, 1e-9)
        t = np.clip(((u - self.p0[0]) * du + (v - self.p0[1]) * dv) / length2, 0.0, 1.0)
        d2 = (u - self.p0[0] - t * du) ** 2 + (v - self.p0[1] - t * dv) ** 2
        r = np.interp(t, self.ts, self.radii)
        outer = 2.0 * np.sqrt(np.clip(r * r - d2, 0.0, None))
        if self.walls is None:
            return (self.amp * self.depth) * outer
        ri = np.clip(r - np.interp(t, self.ts, self.walls), 0.0, None)
        inner = 2.0 * np.sqrt(np.clip(ri * ri - d2, 0.0, None))
        return self.depth * (self.amp * (outer - inner) + self.marrow * inner)


@dataclass(frozen=True)
class _Blob:
    """An ellipsoid (``power`` 2) or rounded box (``power`` > 2), optionally a shell.

    ``depth`` is the semi-axis along the beam in mm (default: the smaller in-plane one);
    ``shell`` makes it hollow with walls of that thickness filled with ``inner``;
    ``cut`` = (y0, height) keeps only ``y < y0 - height·(1 - x²/a²)`` in the blob's frame:
    a base pushed up by a dome, as the diaphragm pushes a lung.
    """

    c: Point
    a: float
    b: float
    amp: float
    angle: float = 0.0
    power: float = 2.0
    depth: float | None = None
    shell: float | None = None
    inner: float = MARROW
    cut: tuple[float, float] | None = None
    bone: bool = False

    def bounds(self) -> tuple[float, float, float, float]:
        r = max(self.a, self.b) * (1.42 if self.power > 2 else 1.0)
        return (self.c[0] - r, self.c[0] + r, self.c[1] - r, self.c[1] + r)

    def _thickness(
        self, x: np.ndarray, y: np.ndarray, a: float, b: float, depth: float
    ) -> np.ndarray:
        q = np.abs(x / a) ** self.power + np.abs(y / b) ** self.power
        return 2.0 * depth * np.sqrt(np.clip(1.0 - q, 0.0, None))

    def profile(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        ca, sa = math.cos(math.radians(self.angle)), math.sin(math.radians(self.angle))
        x = (u - self.c[0]) * ca + (v - self.c[1]) * sa
        y = -(u - self.c[0]) * sa + (v - self.c[1]) * ca
        depth = self.depth if self.depth is not None else min(self.a, self.b)
        outer = self._thickness(x, y, self.a, self.b, depth)
        if self.shell is None:
            out = self.amp * outer
        else:
            s = self.shell
            inner = self._thickness(
                x, y, max(self.a - s, 0.5), max(self.b - s, 0.5), max(depth - s, 0.5)
            )
            out = self.amp * (outer - inner) + self.inner * inner
        if self.cut is not None:
            y0, height = self.cut
            base = y0 - height * np.clip(1.0 - (x / self.a) ** 2, -0.5, 1.0)
            out = out * _smoothstep((base - y) / 6.0)
        return out


@dataclass(frozen=True)
class _Ring:
    """A bony ring or arc (pelvic brim, iliac crest, obturator foramen) of tube radius ``r``.

    The arc runs over the angles ``arc`` (degrees, 0 = +x of the ellipse frame, 90 = +y).
    """

    c: Point
    a: float
    b: float
    r: float
    angle: float = 0.0
    arc: tuple[float, float] = (0.0, 360.0)
    amp: float = BONE
    bone: bool = True

    def bounds(self) -> tuple[float, float, float, float]:
        m = max(self.a, self.b) + self.r
        return (self.c[0] - m, self.c[0] + m, self.c[1] - m, self.c[1] + m)

    def profile(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        ca, sa = math.cos(math.radians(self.angle)), math.sin(math.radians(self.angle))
        x = (u - self.c[0]) * ca + (v - self.c[1]) * sa
        y = -(u - self.c[0]) * sa + (v - self.c[1]) * ca
        rho = np.sqrt((x / self.a) ** 2 + (y / self.b) ** 2)
        d = (rho - 1.0) * np.sqrt((self.a**2 + self.b**2) / 2.0)
        chord = 2.0 * np.sqrt(np.clip(self.r * self.r - d * d, 0.0, None))
        theta = np.degrees(np.arctan2(y / self.b, x / self.a)) % 360.0
        lo, hi = self.arc[0] % 360.0, self.arc[1] % 360.0
        if self.arc[1] - self.arc[0] < 360.0:
            on = (theta >= lo) & (theta <= hi) if lo <= hi else (theta >= lo) | (theta <= hi)
            chord = chord * on
        return self.amp * chord


_Prim = _Tube | _Blob | _Ring


def _bone(
    p0: Point,
    p1: Point,
    r0: float,
    r_shaft: float,
    r1: float,
    wall: float,
    flare: float = 0.15,
) -> _Tube:
    """A long bone: flared, thin-walled ends and a thick-walled shaft."""
    f = flare
    return _Tube(
        p0,
        p1,
        ts=(0.0, f * 0.4, f, 0.5, 1.0 - f, 1.0 - f * 0.4, 1.0),
        radii=(r0 * 0.85, r0, r_shaft * 1.12, r_shaft, r_shaft * 1.12, r1, r1 * 0.85),
        amp=BONE,
        walls=(1.0, 1.2, wall * 0.7, wall, wall * 0.7, 1.2, 1.0),
        bone=True,
    )


def _small_bone(p0: Point, p1: Point, r: float) -> _Tube:
    """A short tubular bone (metacarpal, phalanx) with knobbly ends."""
    return _Tube(
        p0,
        p1,
        ts=(0.0, 0.15, 0.5, 0.85, 1.0),
        radii=(r * 1.25, r * 1.05, r * 0.85, r * 1.05, r * 1.2),
        amp=BONE,
        walls=(0.6, 0.8, min(1.4, r * 0.4), 0.8, 0.6),
        bone=True,
    )


def _ossicle(c: Point, a: float, b: float, angle: float = 0.0, power: float = 2.0) -> _Blob:
    """A carpal, tarsal or epiphysis: cancellous bone with a thin cortex."""
    return _Blob(
        c, a, b, BONE, angle=angle, power=power, shell=min(1.2, 0.3 * min(a, b)), bone=True
    )


def _soft(
    p0: Point, p1: Point, ts: tuple[float, ...], radii: tuple[float, ...], depth: float = 1.0
) -> _Tube:
    return _Tube(p0, p1, ts, radii, SOFT, depth=depth)


def _at(p: Point, length: float, angle_deg: float) -> Point:
    """The point ``length`` mm from ``p`` in direction ``angle_deg`` (0 = up, +: clockwise)."""
    a = math.radians(angle_deg)
    return (p[0] + length * math.sin(a), p[1] - length * math.cos(a))


# ---------------------------------------------------------------- plans


@dataclass
class _Plan:
    """Everything about one radiograph except its pixel grid."""

    fov: tuple[float, float]  # detector area, width × height in mm
    center: Point  # anatomy point at the image centre
    angle: float  # anatomy rotation on the detector, degrees
    prims: list[_Prim]
    mu: float
    field_uv: tuple[float, float, float, float] | None  # collimated field in anatomy mm
    squash: float = 1.0  # in-plane foreshortening along u (obliques)
    texts: list[str] = field(default_factory=list)


def _detector(rng: np.random.Generator, options: list[tuple[float, float]]) -> tuple[float, float]:
    w, h = options[int(rng.integers(len(options)))]
    return (w, h) if rng.random() < 0.8 else (h, w)


def _field(
    rng: np.random.Generator, center: Point, half_w: float, half_h: float
) -> tuple[float, float, float, float] | None:
    if rng.random() < 0.2:
        return None
    jw, jh = rng.uniform(0.85, 1.2, size=2)
    cu, cv = center[0] + rng.uniform(-10, 10), center[1] + rng.uniform(-10, 10)
    return (cu - half_w * jw, cu + half_w * jw, cv - half_h * jh, cv + half_h * jh)


def _lower_leg(rng: np.random.Generator, lateral: bool) -> _Plan:
    s = rng.uniform(0.8, 1.15)
    length = 360.0 * s
    prims: list[_Prim] = []
    flex = rng.uniform(0, 15) if lateral else rng.uniform(-3, 3)
    knee = (0.0, -28.0 * s)
    femur_top = _at(knee, 300 * s, flex)
    if not lateral:
        prims += [
            _soft(
                (0, -380 * s),
                (8 * s, length + 80 * s),
                (0, 0.3, 0.45, 0.85, 1.0),
                (72 * s, 52 * s, 60 * s, 34 * s, 38 * s),
            ),
            _bone(femur_top, (0, -48 * s), 14 * s, 13 * s, 34 * s, 4.5 * s),
            _ossicle((-18 * s, -26 * s), 18 * s, 20 * s),
            _ossicle((18 * s, -26 * s), 17 * s, 20 * s),
            _Blob((2 * s, -44 * s), 21 * s, 25 * s, BONE * 0.5, depth=9 * s, shell=1.0, bone=True),
            _bone((0, 16 * s), (6 * s, length - 12 * s), 37 * s, 11.5 * s, 23 * s, 5 * s),
            _Tube(
                (-16 * s, length - 12 * s),
                (-15 * s, length + 12 * s),
                (0, 1),
                (9 * s, 6 * s),
                BONE,
                walls=(1.2, 1.0),
                bone=True,
            ),
            _bone(
                (31 * s, 20 * s),
                (27 * s, length + 14 * s),
                11 * s,
                6 * s,
                10 * s,
                2.5 * s,
                flare=0.08,
            ),
            _ossicle((6 * s, length + 32 * s), 25 * s, 16 * s, power=2.6),
            _ossicle((10 * s, length + 58 * s), 22 * s, 18 * s),
        ]
    else:
        prims += [
            _soft(
                (12 * s, -380 * s),
                (6 * s, length + 80 * s),
                (0, 0.3, 0.45, 0.6, 0.85, 1.0),
                (75 * s, 55 * s, 62 * s, 58 * s, 33 * s, 36 * s),
            ),
            _soft(
                (20 * s, length + 45 * s),
                (-200 * s, length + 80 * s),
                (0, 1),
                (42 * s, 26 * s),
                depth=1.4,
            ),
            _bone(femur_top, (0, -50 * s), 14 * s, 13 * s, 28 * s, 4.5 * s),
            _ossicle((6 * s, -30 * s), 29 * s, 27 * s),
            _Blob((-38 * s, -46 * s), 10 * s, 24 * s, BONE, depth=20 * s, shell=1.2, bone=True),
            _bone((2 * s, 16 * s), (-2 * s, length - 12 * s), 28 * s, 12 * s, 20 * s, 5 * s),
            _ossicle((-22 * s, 38 * s), 9 * s, 17 * s),
            _bone(
                (14 * s, 22 * s),
                (8 * s, length + 10 * s),
                10 * s,
                6 * s,
                9 * s,
                2.5 * s,
                flare=0.08,
            ),
            _ossicle((0, length + 30 * s), 26 * s, 17 * s, power=2.4),
            _ossicle((26 * s, length + 52 * s), 38 * s, 20 * s, angle=12),
            _ossicle((-30 * s, length + 55 * s), 14 * s, 16 * s),
        ]
    diag = rng.random() < 0.25
    angle = rng.uniform(12, 32) * rng.choice([-1, 1]) if diag else rng.uniform(-6, 6)
    fov = _detector(rng, [(350, 430), (430, 430), (300, 400), (240, 300)])
    fov = (min(fov), max(fov)) if not diag else fov
    center = (rng.uniform(-15, 15), length / 2 + rng.uniform(-70, 70) * s)
    field_uv = _field(rng, center, rng.uniform(80, 130) * s, rng.uniform(200, 260) * s)
    return _Plan(fov, center, angle, prims, rng.uniform(1.3, 2.2), field_uv)


def _knee(rng: np.random.Generator, lateral: bool) -> _Plan:
    s = rng.uniform(0.8, 1.15)
    prims: list[_Prim] = []
    if not lateral:
        prims += [
            _soft(
                (0, -300 * s),
                (6 * s, 300 * s),
                (0, 0.45, 0.55, 0.7, 1.0),
                (75 * s, 58 * s, 56 * s, 60 * s, 50 * s),
            ),
            _bone((-4 * s, -320 * s), (0, -44 * s), 14 * s, 13 * s, 35 * s, 4.5 * s),
            _ossicle((-19 * s, -24 * s), 19 * s, 21 * s),
            _ossicle((19 * s, -24 * s), 17 * s, 21 * s),
            _Blob((3 * s, -42 * s), 21 * s, 25 * s, BONE * 0.5, depth=9 * s, shell=1.0, bone=True),
            _bone((0, 16 * s), (5 * s, 330 * s), 38 * s, 12 * s, 20 * s, 5 * s),
            _bone((32 * s, 22 * s), (29 * s, 330 * s), 11 * s, 6 * s, 6 * s, 2.5 * s, flare=0.08),
        ]
    else:
        flex = rng.uniform(10, 45)
        top = _at((0, -40 * s), 300 * s, flex)
        prims += [
            _soft(
                (0, -40 * s),
                _at((0, -40 * s), 320 * s, flex),
                (0, 0.2, 1.0),
                (58 * s, 62 * s, 78 * s),
            ),
            _soft((6 * s, -20 * s), (4 * s, 300 * s), (0, 0.45, 1.0), (58 * s, 60 * s, 48 * s)),
            _bone(top, (0, -40 * s), 14 * s, 13 * s, 26 * s, 4.5 * s),
            _ossicle((7 * s, -26 * s), 28 * s, 26 * s),
            _Blob(
                _at((0, -40 * s), 40 * s, flex - 60),
                10 * s,
                23 * s,
                BONE,
                depth=20 * s,
                shell=1.2,
                angle=flex * 0.7,
                bone=True,
            ),
            _bone((2 * s, 16 * s), (-3 * s, 330 * s), 28 * s, 12 * s, 18 * s, 5 * s),
            _ossicle((-22 * s, 40 * s), 9 * s, 17 * s),
            _bone((15 * s, 24 * s), (10 * s, 330 * s), 10 * s, 6 * s, 6 * s, 2.5 * s, flare=0.08),
        ]
    fov = _detector(rng, [(180, 240), (240, 300), (240, 240), (350, 430)])
    center = (rng.uniform(-12, 12), rng.uniform(-30, 20) * s)
    field_uv = _field(rng, center, rng.uniform(70, 110) * s, rng.uniform(90, 150) * s)
    return _Plan(fov, center, rng.uniform(-10, 10), prims, rng.uniform(1.2, 2.0), field_uv)


def _hand_prims(rng: np.random.Generator, s: float) -> list[_Prim]:
    """Hand PA in its own frame: wrist at the bottom, fingers up, thumb to the left."""
    prims: list[_Prim] = [
        _soft((-2 * s, 20 * s), (-2 * s, 260 * s), (0, 1), (32 * s, 30 * s), depth=0.7),
        _Blob((0, -20 * s), 44 * s, 48 * s, SOFT, depth=14 * s),
        _bone((-14 * s, 260 * s), (-13 * s, 52 * s), 9 * s, 9 * s, 17 * s, 3 * s),
        _bone((17 * s, 260 * s), (15 * s, 54 * s), 7 * s, 7 * s, 8 * s, 2.5 * s, flare=0.08),
    ]
    for u, v, a, b in (
        (-17, 30, 8, 6),
        (-4, 31, 7, 6),
        (8, 30, 6, 6),
        (16, 26, 4, 4),
        (-22, 12, 7, 6),
        (-11, 11, 5, 6),
        (1, 12, 7, 8),
        (13, 12, 7, 7),
    ):
        prims.append(_ossicle((u * s, v * s), a * s, b * s, angle=float(rng.uniform(-30, 30))))
    spread = rng.uniform(0.0, 1.0)
    lengths = ((66, 42, 24, 17), (63, 46, 28, 18), (58, 42, 26, 18), (53, 34, 19, 16))
    for k, (mc, p1, p2, p3) in enumerate(lengths):
        base = ((-11 + 8.5 * k) * s, 0.0)
        ang = (-6 + 4.5 * k) + spread * (-9 + 7 * k) + rng.uniform(-3, 3)
        end = _at(base, mc * s, ang)
        prims.append(_small_bone(base, end, 4.0 * s))
        tip = _at(end, (p1 + p2 + p3 + 8) * s, ang + rng.uniform(-4, 4))
        prims.append(_soft(end, tip, (0, 1), (10 * s, 8 * s), depth=0.9))
        start = _at(end, 3 * s, ang)
        for n, seg in enumerate((p1, p2, p3)):
            stop = _at(start, seg * s, ang)
            prims.append(_small_bone(start, stop, (3.6 - 0.5 * n) * s))
            start = _at(stop, 2.5 * s, ang)
    thumb_ang = -38 - 20 * spread + rng.uniform(-5, 5)
    base = (-24 * s, 4 * s)
    end = _at(base, 44 * s, thumb_ang)
    prims += [
        _soft(
            _at(base, 10 * s, thumb_ang), _at(end, 60 * s, thumb_ang + 8), (0, 1), (16 * s, 10 * s)
        ),
        _small_bone(base, end, 4.6 * s),
    ]
    start = _at(end, 3 * s, thumb_ang + 5)
    stop = _at(start, 30 * s, thumb_ang + 8)
    prims += [_small_bone(start, stop, 4.2 * s)]
    start = _at(stop, 2.5 * s, thumb_ang + 10)
    prims += [_small_bone(start, _at(start, 22 * s, thumb_ang + 10), 3.6 * s)]
    return prims


def _hand(rng: np.random.Generator, view: str) -> _Plan:
    s = rng.uniform(0.8, 1.15)
    prims = _hand_prims(rng, s)
    squash = rng.uniform(0.55, 0.8) if view == "oblique" else 1.0
    if view == "wrist":
        fov = _detector(rng, [(180, 240), (240, 300), (180, 180)])
        center = (rng.uniform(-8, 8) * s, rng.uniform(10, 50) * s)
        field_uv = _field(rng, center, rng.uniform(45, 70) * s, rng.uniform(55, 90) * s)
    else:
        fov = _detector(rng, [(180, 240), (240, 300), (240, 240)])
        center = (rng.uniform(-15, 5) * s, rng.uniform(-70, -30) * s)
        field_uv = _field(rng, center, rng.uniform(70, 95) * s, rng.uniform(100, 130) * s)
    angle = rng.uniform(-20, 20) if rng.random() < 0.8 else rng.choice([-90.0, 90.0])
    return _Plan(fov, center, angle, prims, rng.uniform(2.2, 3.8), field_uv, squash=squash)


def _foot(rng: np.random.Generator, lateral: bool) -> _Plan:
    s = rng.uniform(0.8, 1.15)
    prims: list[_Prim] = []
    if not lateral:
        prims += [
            _Blob((2 * s, 30 * s), 50 * s, 125 * s, SOFT, depth=28 * s, power=2.4),
            _ossicle((-4 * s, 100 * s), 19 * s, 23 * s),
            _Blob((6 * s, 140 * s), 26 * s, 34 * s, BONE * 0.6, shell=1.2, bone=True),
            _ossicle((-14 * s, 66 * s), 17 * s, 9 * s, angle=-10),
            _ossicle((18 * s, 70 * s), 13 * s, 16 * s, angle=10),
        ]
        prims += [_ossicle((u * s, 44 * s), 6.5 * s, 11 * s) for u in (-19, -7, 4)]
        mts = (
            (-17, -8, 60, 6.0),
            (-6, -3, 74, 4.2),
            (3, 2, 70, 4.0),
            (11, 8, 66, 3.8),
            (19, 14, 60, 4.0),
        )
        for k, (u, ang0, length, r) in enumerate(mts):
            base = (u * s, 30 * s)
            ang = ang0 + rng.uniform(-3, 3)
            end = _at(base, length * s, ang)
            prims.append(_small_bone(base, end, r * s))
            segs = (30, 24) if k == 0 else (22, 12, 9)
            tip = _at(end, (sum(segs) + 8) * s, ang)
            prims.append(_soft(end, tip, (0, 1), ((13 if k == 0 else 9) * s, 7 * s), depth=1.0))
            start = _at(end, 3 * s, ang)
            for seg in segs:
                stop = _at(start, seg * s, ang)
                prims.append(_small_bone(start, stop, (r * 0.8 if k == 0 else 3.0) * s))
                start = _at(stop, 2.5 * s, ang)
        prims += [_ossicle(((u - 17) * s, -30 * s), 4 * s, 5 * s) for u in (-4, 4)]
        fov = _detector(rng, [(240, 300), (180, 240), (350, 430)])
        center = (rng.uniform(-10, 10), rng.uniform(10, 50) * s)
        field_uv = _field(rng, center, rng.uniform(60, 85) * s, rng.uniform(120, 150) * s)
        angle = rng.uniform(-15, 15)
    else:
        prims += [
            _Blob((-20 * s, 12 * s), 125 * s, 42 * s, SOFT, depth=38 * s, angle=4, power=2.4),
            _soft((26 * s, -10 * s), (28 * s, -300 * s), (0, 1), (38 * s, 44 * s)),
            _ossicle((62 * s, 22 * s), 40 * s, 22 * s, angle=-12),
            _ossicle((25 * s, -6 * s), 27 * s, 17 * s, power=2.5),
            _bone((27 * s, -300 * s), (25 * s, -36 * s), 12 * s, 12 * s, 22 * s, 5 * s),
            _bone((40 * s, -300 * s), (37 * s, -18 * s), 7 * s, 6 * s, 9 * s, 2.5 * s, flare=0.08),
            _ossicle((-8 * s, 0), 9 * s, 14 * s),
            _ossicle((-26 * s, 4 * s), 12 * s, 13 * s),
            _ossicle((0, 20 * s), 15 * s, 11 * s),
        ]
        for k in range(5):
            base = (-36 * s, (6 + 3 * k) * s)
            end = (-108 * s, (30 + 2 * k) * s)
            prims.append(_small_bone(base, end, 4.5 * s))
            prims.append(
                _small_bone((-113 * s, (32 + 2 * k) * s), (-150 * s, (36 + k) * s), 3.0 * s)
            )
        fov = _detector(rng, [(300, 240), (240, 180), (430, 350)])
        center = (rng.uniform(-60, -10) * s, rng.uniform(-40, 0) * s)
        field_uv = _field(rng, center, rng.uniform(120, 150) * s, rng.uniform(70, 110) * s)
        angle = rng.uniform(-12, 12)
    return _Plan(fov, center, angle, prims, rng.uniform(1.6, 2.8), field_uv)


def _cspine(rng: np.random.Generator, lateral: bool) -> _Plan:
    s = rng.uniform(0.85, 1.15)
    prims: list[_Prim] = []
    if lateral:
        lordosis = rng.uniform(3, 12) * s
        prims += [
            _soft(
                (0, -150 * s), (5 * s, 230 * s), (0, 0.4, 1.0), (62 * s, 52 * s, 60 * s), depth=1.1
            ),
            _Blob((-5 * s, -120 * s), 100 * s, 75 * s, SOFT, depth=70 * s),
            _Blob((15 * s, 190 * s), 110 * s, 55 * s, SOFT, depth=90 * s),
            _ossicle((25 * s, 185 * s), 24 * s, 24 * s),
            _Blob(
                (5 * s, -150 * s),
                96 * s,
                80 * s,
                BONE * 0.5,
                power=2.1,
                shell=7 * s,
                depth=72 * s,
                inner=SOFT,
                bone=True,
            ),
            _ossicle((18 * s, -48 * s), 11 * s, 13 * s),
            _Tube(
                (-30 * s, -85 * s),
                (-26 * s, -38 * s),
                (0, 1),
                (8 * s, 9 * s),
                BONE,
                walls=(2.0, 2.0),
                depth=1.2,
                bone=True,
            ),
            _Tube(
                (-27 * s, -36 * s),
                (-92 * s, -30 * s),
                (0, 1),
                (10 * s, 9 * s),
                BONE,
                walls=(2.5, 2.5),
                depth=1.5,
                bone=True,
            ),
            _Tube(
                (-36 * s, -80 * s),
                (-30 * s, 140 * s),
                (0, 0.3, 1),
                (9 * s, 8 * s, 9 * s),
                GAS,
                depth=1.8,
            ),
            _Tube(
                (-38 * s, 18 * s),
                (-26 * s, 16 * s),
                (0, 1),
                (2.5 * s, 2.5 * s),
                BONE,
                depth=3.0,
                bone=True,
            ),
        ]
        prims += [
            _ossicle((-10 * s, -45 * s), 4 * s, 5 * s),
            _Blob((24 * s, -45 * s), 9 * s, 4 * s, BONE, shell=1.0, depth=12 * s, bone=True),
            _ossicle((0, -36 * s), 5 * s, 9 * s),
        ]
        for k in range(6):
            v = (-14 + k * 19) * s
            u = -lordosis * math.sin(math.pi * k / 5)
            tilt = -8 + 3 * k
            prims += [
                _ossicle((u, v), 8 * s, 7 * s + (3 * s if k == 0 else 0), angle=tilt, power=3.5),
                _ossicle((u + 18 * s, v - 2 * s), 7 * s, 8 * s, angle=30),
                _Tube(
                    (u + 22 * s, v),
                    (u + (38 + 8 * (k == 5)) * s, v + 9 * s),
                    (0, 1),
                    (3.5 * s, 3 * s),
                    BONE,
                    walls=(1.0, 1.0),
                    depth=1.5,
                    bone=True,
                ),
            ]
        center = (rng.uniform(-15, 15), rng.uniform(20, 60) * s)
        field_uv = _field(rng, center, rng.uniform(70, 100) * s, rng.uniform(110, 140) * s)
    else:
        prims += [
            _soft((0, -100 * s), (0, 260 * s), (0, 0.5, 1.0), (58 * s, 55 * s, 62 * s), depth=0.9),
            _Blob((-130 * s, 190 * s), 80 * s, 50 * s, SOFT, depth=60 * s),
            _Blob((130 * s, 190 * s), 80 * s, 50 * s, SOFT, depth=60 * s),
            _Tube((0, -20 * s), (0, 230 * s), (0, 1), (8 * s, 9 * s), GAS, depth=1.0),
        ]
        for theta in np.linspace(0.1, math.pi - 0.1, 9):
            p0 = (46 * s * math.cos(theta), (-50 + 28 * math.sin(theta)) * s)
            t2 = theta + math.pi / 9
            p1 = (46 * s * math.cos(t2), (-50 + 28 * math.sin(t2)) * s)
            if t2 < math.pi:
                prims.append(
                    _Tube(p0, p1, (0, 1), (7 * s, 7 * s), BONE, walls=(2.0, 2.0), bone=True)
                )
        for k in range(7):
            v = (-8 + k * 19) * s
            prims += [
                _ossicle((0, v), 12 * s, 7 * s, power=3.5),
                _ossicle((-16 * s, v), 5 * s, 8 * s),
                _ossicle((16 * s, v), 5 * s, 8 * s),
                _ossicle((rng.uniform(-1, 1) * s, v + 6 * s), 3 * s, 4 * s),
            ]
        for sign in (-1.0, 1.0):
            prims += [
                _Tube(
                    (sign * 14 * s, 150 * s),
                    (sign * 150 * s, 128 * s),
                    (0, 1),
                    (7 * s, 7 * s),
                    BONE,
                    walls=(2.5, 2.5),
                    bone=True,
                ),
                _Tube(
                    (sign * 20 * s, 135 * s),
                    (sign * 70 * s, 118 * s),
                    (0, 1),
                    (5 * s, 5 * s),
                    BONE,
                    walls=(1.5, 1.5),
                    bone=True,
                ),
                _Tube(
                    (sign * 70 * s, 118 * s),
                    (sign * 80 * s, 170 * s),
                    (0, 1),
                    (5 * s, 5 * s),
                    BONE,
                    walls=(1.5, 1.5),
                    bone=True,
                ),
            ]
        center = (rng.uniform(-10, 10), rng.uniform(40, 80) * s)
        field_uv = _field(rng, center, rng.uniform(60, 90) * s, rng.uniform(100, 130) * s)
    fov = _detector(rng, [(180, 240), (240, 300), (240, 240)])
    fov = (min(fov), max(fov))
    return _Plan(fov, center, rng.uniform(-7, 7), prims, rng.uniform(1.0, 1.6), field_uv)


def _lumbar_ap_prims(rng: np.random.Generator, s: float, v0: float) -> list[_Prim]:
    """T12–L5 AP: bodies, pedicles, transverse and spinous processes, lowest ribs."""
    prims: list[_Prim] = []
    for k in range(-1, 5):
        v = v0 + k * 37 * s
        w = (21 + 1.5 * k) * s
        prims += [
            _Blob((0, v), w, 14 * s, BONE, power=3.2, depth=17 * s, shell=2.0, bone=True),
            _Blob((0, v + 8 * s), 5 * s, 10 * s, BONE * 0.6, depth=14 * s, bone=True),
        ]
        for sign in (-1.0, 1.0):
            reach = (38 + (10 if k == 2 else 4 * (k > 0)) - (14 if k == -1 else 0)) * s
            prims += [
                _Blob(
                    (sign * 15 * s, v - 5 * s),
                    5 * s,
                    7 * s,
                    BONE,
                    shell=2.0,
                    depth=8 * s,
                    inner=MARROW * 0.5,
                    bone=True,
                ),
                _Tube(
                    (sign * 18 * s, v - 2 * s),
                    (sign * reach, v - 4 * s),
                    (0, 1),
                    (4.5 * s, 3.5 * s),
                    BONE,
                    walls=(1.2, 1.2),
                    bone=True,
                ),
            ]
    for sign in (-1.0, 1.0):
        for k, lift in enumerate((0.0, 38.0)):
            a = (sign * 24 * s, v0 - (lift + 40) * s)
            b = (sign * (110 - 30 * k) * s, v0 - (lift - 10 + 20 * k) * s)
            prims.append(_Tube(a, b, (0, 1), (6 * s, 5 * s), BONE, walls=(1.5, 1.5), bone=True))
        prims.append(
            _Blob(
                (sign * 38 * s, v0 + 100 * s),
                24 * s,
                110 * s,
                SOFT * 0.4,
                angle=sign * -12,
                depth=40 * s,
            )
        )
    del rng
    return prims


def _pelvis_prims(s: float, v0: float) -> list[_Prim]:
    """Pelvis AP with the femoral heads at height ``v0``."""
    prims: list[_Prim] = [
        _Ring((0, v0 - 30 * s), 68 * s, 55 * s, 3.0 * s, arc=(200.0, 340.0)),
        _Ring((0, v0 - 10 * s), 62 * s, 50 * s, 3.0 * s, arc=(20.0, 160.0)),
        _Tube(
            (0, v0 - 115 * s),
            (0, v0 + 5 * s),
            (0, 1),
            (48 * s, 15 * s),
            BONE * 0.5,
            walls=(2.0, 2.0),
            depth=0.4,
            bone=True,
        ),
    ]
    for sign in (-1.0, 1.0):
        prims += [
            _Blob(
                (sign * 85 * s, v0 - 85 * s),
                74 * s,
                56 * s,
                BONE * 0.4,
                angle=sign * 22,
                depth=5 * s,
                bone=True,
            ),
            _Ring(
                (sign * 85 * s, v0 - 85 * s),
                72 * s,
                54 * s,
                3.5 * s,
                angle=sign * 22,
                arc=(150.0, 350.0) if sign > 0 else (190.0, 30.0),
            ),
            _Blob((sign * 93 * s, v0 - 24 * s), 32 * s, 12 * s, BONE, depth=7 * s, bone=True),
            _ossicle((sign * 95 * s, v0), 24 * s, 24 * s),
            _Tube(
                (sign * 95 * s, v0),
                (sign * 128 * s, v0 + 32 * s),
                (0, 1),
                (16 * s, 17 * s),
                BONE,
                walls=(2.0, 3.0),
                bone=True,
            ),
            _ossicle((sign * 140 * s, v0 + 30 * s), 18 * s, 22 * s),
            _ossicle((sign * 112 * s, v0 + 64 * s), 8 * s, 9 * s),
            _bone(
                (sign * 130 * s, v0 + 45 * s),
                (sign * 118 * s, v0 + 330 * s),
                18 * s,
                15 * s,
                15 * s,
                5.5 * s,
            ),
            _Ring((sign * 48 * s, v0 + 45 * s), 26 * s, 21 * s, 5.0 * s),
        ]
        for k in range(4):
            prims.append(
                _Blob(
                    (sign * 14 * s, v0 - (95 - 24 * k) * s), 4 * s, 4 * s, -BONE * 0.25, depth=6 * s
                )
            )
    return prims


def _bowel_gas(rng: np.random.Generator, s: float, v_top: float, v_bottom: float) -> list[_Prim]:
    """Colon frame and scattered small-bowel gas."""
    prims: list[_Prim] = []
    path = [(-115, v_bottom - 40), (-110, v_top + 40), (115, v_top + 30), (118, v_bottom - 30)]
    for (u0, va), (u1, vb) in zip(path[:-1], path[1:], strict=True):
        for t in np.linspace(0, 1, 7)[:-1]:
            if rng.random() < 0.45:
                continue
            c = ((u0 + (u1 - u0) * t) * s, va + (vb - va) * t)
            r = rng.uniform(10, 22) * s
            prims.append(
                _Blob(
                    c,
                    r * rng.uniform(0.8, 1.4),
                    r,
                    GAS * rng.uniform(0.6, 1.0),
                    angle=float(rng.uniform(0, 180)),
                    depth=r,
                )
            )
    for _ in range(int(rng.integers(3, 14))):
        c = (rng.uniform(-80, 80) * s, rng.uniform(v_top + 40, v_bottom - 20))
        r = rng.uniform(5, 14) * s
        prims.append(
            _Blob(c, r * rng.uniform(1.0, 2.5), r, GAS, angle=float(rng.uniform(0, 180)), depth=r)
        )
    return prims


def _lspine(rng: np.random.Generator, lateral: bool) -> _Plan:
    s = rng.uniform(0.85, 1.15)
    prims: list[_Prim] = []
    if not lateral:
        prims += [
            _soft((0, -300 * s), (0, 450 * s), (0, 1), (155 * s, 165 * s), depth=0.72),
            *_lumbar_ap_prims(rng, s, 0.0),
            *_pelvis_prims(s, 270 * s),
            *_bowel_gas(rng, s, -20 * s, 250 * s),
        ]
        center = (rng.uniform(-15, 15), rng.uniform(70, 130) * s)
    else:
        lordosis = rng.uniform(8, 22) * s
        prims += [
            _soft((0, -300 * s), (0, 450 * s), (0, 1), (115 * s, 125 * s), depth=1.35),
            _Blob(
                (40 * s, 240 * s),
                95 * s,
                62 * s,
                BONE * 0.6,
                shell=2.5 * s,
                depth=12 * s,
                inner=MARROW * 0.5,
                angle=-10,
                bone=True,
            ),
            _Tube(
                (12 * s, 205 * s),
                (60 * s, 300 * s),
                (0, 1),
                (40 * s, 14 * s),
                BONE,
                walls=(2.5, 2.0),
                depth=1.0,
                bone=True,
            ),
            _ossicle((30 * s, 290 * s), 24 * s, 24 * s),
        ]
        for k in range(-1, 5):
            v = k * 38 * s
            u = -lordosis * math.sin(math.pi * (k + 1.5) / 6.5)
            tilt = -6 + 4 * k
            prims += [
                _Blob(
                    (u, v),
                    19 * s,
                    14 * s,
                    BONE,
                    angle=tilt,
                    power=3.5,
                    depth=22 * s,
                    shell=2.0,
                    bone=True,
                ),
                _ossicle((u + 28 * s, v - 5 * s), 9 * s, 7 * s, angle=tilt),
                _Blob(
                    (u + 55 * s, v + 3 * s),
                    14 * s,
                    8 * s,
                    BONE,
                    angle=tilt + 10,
                    power=3.0,
                    depth=5 * s,
                    shell=1.5,
                    bone=True,
                ),
            ]
        prims += _bowel_gas(rng, s * 0.5, -20 * s, 240 * s)
        prims = [
            _Blob((p.c[0] - 60 * s, p.c[1]), p.a, p.b, p.amp, angle=p.angle, depth=p.depth)
            if isinstance(p, _Blob) and p.amp < 0
            else p
            for p in prims
        ]
        center = (rng.uniform(-10, 30), rng.uniform(70, 130) * s)
    fov = _detector(rng, [(350, 430), (300, 400), (240, 300)])
    fov = (min(fov), max(fov))
    field_uv = _field(rng, center, rng.uniform(75, 130) * s, rng.uniform(150, 200) * s)
    return _Plan(fov, center, rng.uniform(-6, 6), prims, rng.uniform(0.7, 1.1), field_uv)


def _skull(rng: np.random.Generator, lateral: bool) -> _Plan:
    s = rng.uniform(0.85, 1.1)
    prims: list[_Prim] = []
    if not lateral:
        prims += [
            _Blob((0, 0), 80 * s, 100 * s, SOFT, depth=90 * s),
            _Blob(
                (0, -15 * s),
                73 * s,
                86 * s,
                BONE * 0.5,
                power=2.2,
                shell=7 * s,
                depth=88 * s,
                inner=SOFT,
                bone=True,
            ),
            _Blob((0, 60 * s), 55 * s, 45 * s, SOFT, depth=45 * s),
            _Blob((0, -28 * s), 14 * s, 9 * s, GAS, depth=10 * s),
            _Blob((0, 62 * s), 12 * s, 22 * s, GAS, depth=30 * s),
            _Tube((0, 42 * s), (0, 82 * s), (0, 1), (1.5 * s, 1.5 * s), BONE, depth=10, bone=True),
        ]
        for sign in (-1.0, 1.0):
            prims += [
                _Blob(
                    (sign * 32 * s, 22 * s),
                    18 * s,
                    17 * s,
                    BONE,
                    shell=3.0,
                    depth=20 * s,
                    inner=-SOFT * 0.6,
                    bone=True,
                ),
                _Tube(
                    (sign * 12 * s, 34 * s),
                    (sign * 66 * s, 22 * s),
                    (0, 1),
                    (7 * s, 5 * s),
                    BONE,
                    walls=(3.0, 3.0),
                    depth=2.0,
                    bone=True,
                ),
                _Blob((sign * 28 * s, 66 * s), 16 * s, 18 * s, GAS, depth=18 * s),
                _Tube(
                    (sign * 56 * s, 40 * s),
                    (sign * 52 * s, 118 * s),
                    (0, 1),
                    (8 * s, 9 * s),
                    BONE,
                    walls=(2.5, 2.5),
                    bone=True,
                ),
            ]
        arc = np.linspace(0.2, math.pi - 0.2, 8)
        for t0, t1 in zip(arc[:-1], arc[1:], strict=True):
            p0 = (52 * s * math.cos(t0), (95 + 30 * math.sin(t0)) * s)
            p1 = (52 * s * math.cos(t1), (95 + 30 * math.sin(t1)) * s)
            prims.append(_Tube(p0, p1, (0, 1), (9 * s, 9 * s), BONE, walls=(2.5, 2.5), bone=True))
        prims += [_ossicle((u * s, 92 * s), 4 * s, 7 * s) for u in range(-30, 31, 6)]
        fov = _detector(rng, [(240, 300), (240, 240), (300, 240)])
        center = (rng.uniform(-10, 10), rng.uniform(0, 30) * s)
        field_uv = _field(rng, center, rng.uniform(85, 110) * s, rng.uniform(110, 135) * s)
    else:
        prims += [
            _Blob((0, 10 * s), 105 * s, 95 * s, SOFT, depth=75 * s),
            _Blob(
                (10 * s, -15 * s),
                96 * s,
                80 * s,
                BONE * 0.5,
                power=2.1,
                shell=7 * s,
                depth=72 * s,
                inner=SOFT,
                bone=True,
            ),
            _Blob((-62 * s, 55 * s), 38 * s, 45 * s, SOFT, depth=55 * s),
            _Blob(
                (-70 * s, 15 * s),
                18 * s,
                17 * s,
                BONE,
                shell=2.5,
                depth=12 * s,
                inner=-SOFT * 0.4,
                bone=True,
            ),
            _Blob((-64 * s, 45 * s), 20 * s, 18 * s, GAS * 1.5, depth=30 * s),
            _Blob((-86 * s, -20 * s), 8 * s, 12 * s, GAS, depth=15 * s),
            _Blob(
                (-4 * s, 12 * s),
                7 * s,
                6 * s,
                BONE,
                shell=2.0,
                inner=0.0,
                depth=10 * s,
                cut=(2 * s, 0.0),
                bone=True,
            ),
            _Blob((26 * s, 32 * s), 24 * s, 15 * s, BONE * 0.4, depth=20 * s, angle=-20, bone=True),
            _Tube(
                (-88 * s, 104 * s),
                (-25 * s, 100 * s),
                (0, 1),
                (10 * s, 9 * s),
                BONE,
                walls=(3.0, 3.0),
                depth=1.3,
                bone=True,
            ),
            _Tube(
                (-25 * s, 100 * s),
                (-14 * s, 42 * s),
                (0, 1),
                (9 * s, 7 * s),
                BONE,
                walls=(2.5, 2.5),
                depth=1.3,
                bone=True,
            ),
            _soft((20 * s, 60 * s), (25 * s, 250 * s), (0, 1), (50 * s, 55 * s), depth=1.1),
        ]
        prims += [_ossicle((u * s, 76 * s), 4 * s, 7 * s) for u in range(-88, -40, 7)]
        prims += [_ossicle((u * s, 92 * s), 4 * s, 7 * s) for u in range(-86, -42, 7)]
        prims += [_ossicle((28 * s, (115 + 19 * k) * s), 8 * s, 7 * s, power=3.5) for k in range(3)]
        fov = _detector(rng, [(300, 240), (240, 240), (240, 300)])
        center = (rng.uniform(-15, 10), rng.uniform(0, 25) * s)
        field_uv = _field(rng, center, rng.uniform(110, 130) * s, rng.uniform(90, 115) * s)
    return _Plan(fov, center, rng.uniform(-8, 8), prims, rng.uniform(0.9, 1.3), field_uv)


def _abdomen(rng: np.random.Generator) -> _Plan:
    s = rng.uniform(0.85, 1.2)
    prims: list[_Prim] = [
        _soft((0, -350 * s), (0, 500 * s), (0, 0.5, 1), (160 * s, 175 * s, 185 * s), depth=0.68),
        _Blob((-85 * s, -40 * s), 95 * s, 75 * s, SOFT * 0.3, depth=80 * s),
        _Blob((-55 * s, 20 * s), 28 * s, 55 * s, SOFT * 0.15, angle=15, depth=30 * s),
        _Blob((55 * s, 10 * s), 28 * s, 55 * s, SOFT * 0.15, angle=-15, depth=30 * s),
        *_lumbar_ap_prims(rng, s, -20 * s),
        *_pelvis_prims(s, 260 * s),
        *_bowel_gas(rng, s, -60 * s, 240 * s),
    ]
    if rng.random() < 0.7:
        prims.append(_Blob((75 * s, -75 * s), 40 * s, 28 * s, GAS, depth=30 * s, cut=(5 * s, 0)))
    fov = _detector(rng, [(350, 430), (430, 430), (430, 350)])
    center = (rng.uniform(-15, 15), rng.uniform(80, 130) * s)
    field_uv = _field(rng, center, rng.uniform(170, 210) * s, rng.uniform(190, 230) * s)
    return _Plan(fov, center, rng.uniform(-5, 5), prims, rng.uniform(0.7, 1.05), field_uv)


def _pelvis(rng: np.random.Generator) -> _Plan:
    s = rng.uniform(0.85, 1.2)
    prims: list[_Prim] = [
        _soft((0, -300 * s), (0, 110 * s), (0, 1), (170 * s, 190 * s), depth=0.7),
        _soft((-100 * s, 110 * s), (-80 * s, 450 * s), (0, 1), (78 * s, 70 * s), depth=0.9),
        _soft((100 * s, 110 * s), (80 * s, 450 * s), (0, 1), (78 * s, 70 * s), depth=0.9),
        *_pelvis_prims(s, 0.0),
        *_lumbar_ap_prims(rng, s, -270 * s)[-12:],
        *_bowel_gas(rng, s * 0.8, -220 * s, -60 * s),
    ]
    fov = _detector(rng, [(430, 350), (430, 430), (350, 430)])
    center = (rng.uniform(-15, 15), rng.uniform(-50, 10) * s)
    field_uv = _field(rng, center, rng.uniform(180, 215) * s, rng.uniform(130, 180) * s)
    return _Plan(fov, center, rng.uniform(-5, 5), prims, rng.uniform(0.7, 1.05), field_uv)


def _lateral_chest(rng: np.random.Generator) -> _Plan:
    s = rng.uniform(0.85, 1.15)
    kyph = rng.uniform(5, 20) * s
    arm = rng.uniform(-10, 25)
    prims: list[_Prim] = [
        _soft(
            (0, -260 * s),
            (0, 420 * s),
            (0, 0.15, 0.3, 1),
            (60 * s, 115 * s, 118 * s, 125 * s),
            depth=1.35,
        ),
        _soft(
            (-20 * s, -190 * s),
            _at((-20 * s, -190 * s), 260 * s, -20 + arm),
            (0, 1),
            (50 * s, 42 * s),
            depth=0.8,
        ),
        _bone(
            (-20 * s, -170 * s),
            _at((-20 * s, -170 * s), 240 * s, -20 + arm),
            24 * s,
            12 * s,
            16 * s,
            4.5 * s,
        ),
        _bone(
            (-10 * s, -165 * s),
            _at((-10 * s, -165 * s), 240 * s, -26 + arm),
            24 * s,
            12 * s,
            16 * s,
            4.5 * s,
        ),
        _Blob(
            (8 * s, -10 * s), 96 * s, 132 * s, LUNG, depth=55 * s, angle=-4, cut=(118 * s, 38 * s)
        ),
        _Blob(
            (14 * s, -4 * s), 94 * s, 132 * s, LUNG, depth=55 * s, angle=-6, cut=(120 * s, 34 * s)
        ),
        _Blob((-40 * s, 62 * s), 64 * s, 52 * s, -LUNG * 1.1, angle=-30, depth=50 * s),
        _Blob((18 * s, -30 * s), 26 * s, 30 * s, -LUNG * 0.6, depth=30 * s),
        _Tube((-22 * s, -240 * s), (8 * s, -40 * s), (0, 1), (9 * s, 8 * s), GAS, depth=1.2),
        _Tube(
            (-108 * s, -115 * s),
            (-104 * s, 70 * s),
            (0, 0.15, 1),
            (9 * s, 6 * s, 6 * s),
            BONE,
            walls=(1.5, 1.5, 1.5),
            depth=1.2,
            bone=True,
        ),
        _Blob((60 * s, -60 * s), 40 * s, 80 * s, BONE * 0.4, depth=6 * s, angle=10, bone=True),
    ]
    if rng.random() < 0.6:
        prims.append(_Blob((-55 * s, 150 * s), 30 * s, 18 * s, GAS, depth=25 * s, cut=(4 * s, 0)))
    for k in range(12):
        v = (-150 + k * 25) * s
        u = 78 * s - kyph * math.sin(math.pi * k / 11)
        prims += [
            _Blob((u, v), 15 * s, 10 * s, BONE, power=3.5, depth=14 * s, shell=1.8, bone=True),
            _ossicle((u + 25 * s, v - 3 * s), 7 * s, 6 * s),
        ]
        for off in (0.0, 8.0):
            prims.append(
                _Tube(
                    (u + 30 * s, v + off * s),
                    (-70 * s, v + (70 + off) * s),
                    (0, 1),
                    (4 * s, 3.5 * s),
                    BONE * 0.35,
                    walls=(1.2, 1.2),
                    bone=True,
                )
            )
    fov = _detector(rng, [(350, 430), (430, 430)])
    fov = (min(fov), max(fov))
    center = (rng.uniform(-20, 20), rng.uniform(-30, 20) * s)
    field_uv = _field(rng, center, rng.uniform(150, 190) * s, rng.uniform(180, 215) * s)
    return _Plan(fov, center, rng.uniform(-5, 5), prims, rng.uniform(0.75, 1.1), field_uv)


_BUILDERS: dict[str, Callable[[np.random.Generator], _Plan]] = {
    "lateral_chest": _lateral_chest,
    "lower_leg_ap": lambda rng: _lower_leg(rng, lateral=False),
    "lower_leg_lateral": lambda rng: _lower_leg(rng, lateral=True),
    "knee_ap": lambda rng: _knee(rng, lateral=False),
    "knee_lateral": lambda rng: _knee(rng, lateral=True),
    "hand_pa": lambda rng: _hand(rng, "pa"),
    "hand_oblique": lambda rng: _hand(rng, "oblique"),
    "wrist_pa": lambda rng: _hand(rng, "wrist"),
    "foot_ap": lambda rng: _foot(rng, lateral=False),
    "foot_lateral": lambda rng: _foot(rng, lateral=True),
    "cspine_ap": lambda rng: _cspine(rng, lateral=False),
    "cspine_lateral": lambda rng: _cspine(rng, lateral=True),
    "lspine_ap": lambda rng: _lspine(rng, lateral=False),
    "lspine_lateral": lambda rng: _lspine(rng, lateral=True),
    "skull_pa": lambda rng: _skull(rng, lateral=False),
    "skull_lateral": lambda rng: _skull(rng, lateral=True),
    "abdomen_ap": _abdomen,
    "pelvis_ap": _pelvis,
}

_TEXTS: dict[str, list[str]] = {
    "frontal_chest_pa": ["PA", "ERECT"],
    "frontal_chest_ap": ["AP", "PORTABLE", "SUPINE", "ERECT"],
    "lateral_chest": ["LAT", "ERECT"],
    "abdomen_ap": ["AP", "SUPINE"],
    "chest_rotated": ["PA", "ERECT"],
    "chest_inverted": ["PA", "ERECT"],
    "blank": ["AP", "TEST"],
}


# ---------------------------------------------------------------- rasterising


class _Raster:
    """Pixel grid of the detector and its map to anatomy millimetres.

    A pixel's position relative to the image centre, mirrored when ``flip``, is rotated by
    ``-angle`` and divided by ``squash`` along u to give anatomy coordinates around ``center``.
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        spacing: float,
        center: Point,
        angle: float,
        flip: bool,
        squash: float,
    ) -> None:
        self.rows, self.cols, self.spacing = rows, cols, spacing
        self.center, self.flip, self.squash = center, flip, squash
        self.cos, self.sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        self.density = np.zeros((rows, cols), dtype=np.float32)
        self.bone = np.zeros((rows, cols), dtype=np.float32)

    def to_pixel(self, u: float, v: float) -> tuple[float, float]:
        du, dv = (u - self.center[0]) * self.squash, v - self.center[1]
        x = self.cos * du - self.sin * dv
        y = self.sin * du + self.cos * dv
        if self.flip:
            x = -x
        return (y + self.rows * self.spacing / 2) / self.spacing - 0.5, (
            x + self.cols * self.spacing / 2
        ) / self.spacing - 0.5

    def uv(self, i0: int, i1: int, j0: int, j1: int) -> tuple[np.ndarray, np.ndarray]:
        sp = self.spacing
        x = ((np.arange(j0, j1, dtype=np.float32) + 0.5) * sp - self.cols * sp / 2)[None, :]
        y = ((np.arange(i0, i1, dtype=np.float32) + 0.5) * sp - self.rows * sp / 2)[:, None]
        if self.flip:
            x = -x
        du = (self.cos * x + self.sin * y) / self.squash
        dv = -self.sin * x + self.cos * y
        return du + self.center[0], dv + self.center[1]

    def box(self, bounds: tuple[float, float, float, float]) -> tuple[int, int, int, int] | None:
        u0, u1, v0, v1 = bounds
        corners = [self.to_pixel(u, v) for u in (u0, u1) for v in (v0, v1)]
        i0 = max(int(math.floor(min(c[0] for c in corners))) - 1, 0)
        i1 = min(int(math.ceil(max(c[0] for c in corners))) + 2, self.rows)
        j0 = max(int(math.floor(min(c[1] for c in corners))) - 1, 0)
        j1 = min(int(math.ceil(max(c[1] for c in corners))) + 2, self.cols)
        if i0 >= i1 or j0 >= j1:
            return None
        return i0, i1, j0, j1

    def draw(self, prim: _Prim) -> None:
        box = self.box(prim.bounds())
        if box is None:
            return
        i0, i1, j0, j1 = box
        u, v = self.uv(i0, i1, j0, j1)
        value = prim.profile(u, v).astype(np.float32)
        self.density[i0:i1, j0:j1] += value
        if prim.bone:
            self.bone[i0:i1, j0:j1] += value

    def mask(self, bounds: tuple[float, float, float, float], edge_mm: float) -> np.ndarray:
        """Soft rectangle in anatomy coordinates (the collimated field)."""
        u, v = self.uv(0, self.rows, 0, self.cols)
        u0, u1, v0, v1 = bounds
        e = max(edge_mm, 1e-3)
        inside_u = _smoothstep((u - u0) / e) * _smoothstep((u1 - u) / e)
        inside_v = _smoothstep((v - v0) / e) * _smoothstep((v1 - v) / e)
        return (inside_u * inside_v).astype(np.float32)


# ---------------------------------------------------------------- text and markers

_GLYPHS: dict[str, tuple[str, ...]] = {
    "A": (" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "B": ("#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "),
    "C": (" ####", "#    ", "#    ", "#    ", "#    ", "#    ", " ####"),
    "E": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"),
    "I": ("#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "#####"),
    "L": ("#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"),
    "N": ("#   #", "##  #", "# # #", "#  ##", "#   #", "#   #", "#   #"),
    "O": (" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "),
    "P": ("#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "),
    "R": ("#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"),
    "S": (" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "),
    "T": ("#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "),
    "U": ("#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "),
}


def _text_bitmap(text: str, scale: int) -> np.ndarray:
    cols = []
    for ch in text:
        glyph = np.array([[c == "#" for c in row] for row in _GLYPHS[ch]], dtype=bool)
        cols += [glyph, np.zeros((7, 1), dtype=bool)]
    bitmap = np.concatenate(cols[:-1], axis=1)
    return np.kron(bitmap, np.ones((scale, scale), dtype=bool))


def _burn(
    img: np.ndarray, text: str, top: float, left: float, height_px: float, value: float
) -> None:
    """Burn ``text`` in at fractional position (top, left) of the image, clipped to it."""
    scale = max(1, int(round(height_px / 7)))
    bitmap = _text_bitmap(text, scale)
    h, w = bitmap.shape
    i0 = int(top * max(img.shape[0] - h, 0))
    j0 = int(left * max(img.shape[1] - w, 0))
    region = img[i0 : i0 + h, j0 : j0 + w]
    region[bitmap[: region.shape[0], : region.shape[1]]] = value


# ---------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Radiograph:
    """One rendered radiograph: display image (float32 in [0, 1], bright = dense) and truth."""

    kind: str
    image: np.ndarray
    pixel_spacing_mm: float
    laterality: str
    """"L" or "R" for paired body parts, "" otherwise."""
    orientation: tuple[str, str] = ("L", "F")
    """Patient Orientation (rows, columns), approximate: rotation on the detector is ignored."""

    @property
    def spec(self) -> KindSpec:
        return KIND_SPECS[self.kind]


_PAIRED = ("lower_leg", "knee", "hand", "foot")


def _shape(fov: tuple[float, float], size: int) -> tuple[int, int, float]:
    spacing = max(fov) / size
    return max(8, int(round(fov[1] / spacing))), max(8, int(round(fov[0] / spacing))), spacing


def _expose(r: _Raster, plan: _Plan, rng: np.random.Generator) -> np.ndarray:
    texture = _blur(
        np.random.default_rng(rng.integers(2**32))
        .standard_normal(r.density.shape)
        .astype(np.float32),
        0.9 / r.spacing,
    )
    texture /= float(texture.std()) + 1e-6
    density = r.density + 0.05 * texture * r.bone
    img = 1.0 - np.exp(-plan.mu * np.clip(density, 0.0, None))
    return img.astype(np.float32)


def _finish(
    img: np.ndarray,
    spacing: float,
    rng: np.random.Generator,
    noise_rng: np.random.Generator,
    field: np.ndarray | None,
    texts: list[str],
) -> np.ndarray:
    """Contrast, heel effect, noise, post-processing, collimation and burned-in text."""
    rows, cols = img.shape
    inside = img if field is None else img[field > 0.5]
    top = float(np.percentile(inside, 99.8)) if inside.size else 1.0
    img = np.clip(img / max(top, 1e-6), 0.0, 1.0) ** rng.uniform(0.75, 1.35)
    heel_dir = rng.choice([0, 1])
    ramp = np.linspace(-0.5, 0.5, rows if heel_dir == 0 else cols, dtype=np.float32)
    heel = 1.0 + rng.uniform(-0.08, 0.08) * (ramp[:, None] if heel_dir == 0 else ramp[None, :])
    img = img * heel
    sigma = min(rng.uniform(0.004, 0.02) * (0.4 / spacing), 0.06)
    img = img + sigma * noise_rng.standard_normal(img.shape).astype(np.float32)
    unsharp, radius_mm = rng.uniform(0, 1.5), rng.uniform(8, 30)
    if rng.random() < 0.5:
        img = img + unsharp * (img - _blur(img, radius_mm / spacing))
    img = np.clip(img, 0.0, 1.0)
    if field is not None:
        black = rng.random() < 0.25
        level = 0.0 if black else rng.uniform(0.85, 1.0)
        img = img * field + level * (1.0 - field)
    n_texts = int(rng.integers(0, len(texts) + 1))
    for text in texts[:n_texts]:
        height = rng.uniform(7, 18) / spacing
        value = 1.0 if rng.random() < 0.8 else 0.0
        _burn(
            img,
            text,
            float(rng.choice([rng.uniform(0, 0.12), rng.uniform(0.88, 1)])),
            float(rng.uniform(0, 1)),
            height,
            value,
        )
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _render_chest(kind: str, seed: int, size: int) -> tuple[np.ndarray, float, list[str]]:
    """A frontal chest from :mod:`pacsnode.phantoms.cxr`, placed, tilted and collimated."""
    rng = _stream(seed, kind, 0)
    portable = kind == "frontal_chest_ap"
    fov = _detector(rng, [(430, 430), (350, 430)])
    prevalence = float(rng.choice([0.0, 0.15, 0.3, 0.5]))
    angle = rng.uniform(-8, 8) if portable else rng.uniform(-3, 3)
    zoom = rng.uniform(0.85, 1.12)
    shift = rng.uniform(-0.05, 0.05, size=2)
    flip = rng.random() < 0.1
    rows, cols, spacing = _shape(fov, size)
    image, _ = render_cxr(_stream(seed, kind, 4), None, (rows, cols), prevalence=prevalence)
    if flip:
        image = image[:, ::-1]
    if abs(angle) > 0.1 or abs(zoom - 1) > 1e-3:
        a = math.radians(angle)
        m = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / zoom
        centre = np.array([rows / 2, cols / 2])
        offset = centre - m @ centre + shift * np.array([rows, cols])
        image = affine_transform(image, m, offset=offset, order=1, mode="nearest")
    texts = list(_TEXTS[kind])
    texts.insert(0, "R" if flip else "L")
    return np.asarray(image, dtype=np.float32), spacing, texts


def _render_blank(
    rng: np.random.Generator, noise: np.random.Generator, size: int
) -> tuple[np.ndarray, float]:
    """No anatomy: a flat or graded exposure, smooth noise, bar patterns or a page of text."""
    rows, cols, spacing = _shape(_detector(rng, [(430, 430), (350, 430), (240, 300)]), size)
    yy = np.linspace(0.0, 1.0, rows, dtype=np.float32)[:, None]
    xx = np.linspace(0.0, 1.0, cols, dtype=np.float32)[None, :]
    mode = int(rng.integers(0, 5))
    level = rng.uniform(0.0, 1.0)
    img: np.ndarray
    if mode == 0:
        img = np.full((rows, cols), level, dtype=np.float32)
    elif mode == 1:
        a, b = rng.uniform(-1, 1, size=2)
        img = level + 0.5 * (a * (xx - 0.5) + b * (yy - 0.5)) * np.ones((rows, cols), np.float32)
    elif mode == 2:
        field = _blur(
            noise.standard_normal((rows, cols)).astype(np.float32), rng.uniform(2, 40) / spacing
        )
        img = 0.5 + 0.2 * field / (float(field.std()) + 1e-6)
    elif mode == 3:
        period = rng.uniform(4, 40)
        bars = np.sin(2 * math.pi * (xx * cols * spacing) / period) > 0
        steps = np.floor(yy * rng.integers(3, 12)) / 10.0
        img = np.where(bars, level, 1.0 - level) * 0.6 + steps * 0.4 * np.ones_like(xx)
    else:
        page = float(rng.random() < 0.5)
        img = np.full((rows, cols), page, dtype=np.float32)
        letters = list(_GLYPHS)
        n_lines = int(rng.integers(5, 25))
        height = rng.uniform(3, 8) / spacing
        for k in range(n_lines):
            text = "".join(str(rng.choice(letters)) for _ in range(int(rng.integers(4, 20))))
            _burn(img, text, (k + 0.5) / n_lines, float(rng.uniform(0, 0.5)), height, 1.0 - page)
    img = img + rng.uniform(0.0, 0.03) * noise.standard_normal((rows, cols)).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32), spacing


def render_radiograph(kind: str, seed: int, *, size: int | None = None) -> Radiograph:
    """Render ``kind`` (one of :data:`KINDS`) from ``seed``; ``size`` is the long side in px.

    ``size`` None draws it (1024–3000) from the seed. The anatomy and acquisition do not
    depend on ``size``: only the pixel grid, the noise realisation and (frontal chest) the cxr
    phantom's own texture do.
    """
    if kind not in KIND_SPECS:
        raise ValueError(f"kind: {kind!r} is not one of {list(KINDS)}")
    if size is None:
        size = int(_stream(seed, kind, 3).integers(1024, 3001))
    if size < 16:
        raise ValueError(f"size: {size} px is too small (at least 16)")
    effects = _stream(seed, kind, 1)
    noise = _stream(seed, kind, 2)
    spec = KIND_SPECS[kind]
    if kind == "blank":
        image, spacing = _render_blank(_stream(seed, kind, 0), noise, size)
        return Radiograph(kind, image, spacing, "")
    if kind in _CXR_BASED:
        image, spacing, texts = _render_chest(kind, seed, size)
        if kind == "chest_rotated":
            turn = int(effects.integers(0, 4))  # 0: upside down, else 1-3 quarter turns
            image = np.ascontiguousarray(image[::-1] if turn == 0 else np.rot90(image, turn))
        rows, cols = image.shape
        field = None
        if effects.random() < 0.6:
            m = effects.uniform(0.0, 0.12, size=4)
            yy = (np.arange(rows, dtype=np.float32) + 0.5) / rows
            xx = (np.arange(cols, dtype=np.float32) + 0.5) / cols
            edge = 1.5 / (spacing * max(rows, cols))
            field = (_smoothstep((yy - m[0]) / edge) * _smoothstep((1 - m[1] - yy) / edge))[
                :, None
            ] * (_smoothstep((xx - m[2]) / edge) * _smoothstep((1 - m[3] - xx) / edge))[None, :]
        image = _finish(image, spacing, effects, noise, field, texts)
        if kind == "chest_inverted":
            image = 1.0 - image  # as a MONOCHROME1 image labelled MONOCHROME2 displays
        return Radiograph(kind, image, spacing, "", ("R" if texts[0] == "R" else "L", "F"))
    plan = _BUILDERS[kind](_stream(seed, kind, 0))
    flip = bool(effects.random() < 0.5)
    laterality = ("L" if flip else "R") if spec.label in _PAIRED else ""
    rows, cols, spacing = _shape(plan.fov, size)
    r = _Raster(rows, cols, spacing, plan.center, plan.angle, flip, plan.squash)
    for prim in plan.prims:
        r.draw(prim)
    image = _expose(r, plan, effects)
    field = None if plan.field_uv is None else r.mask(plan.field_uv, 1.5)
    texts = [laterality or ("L" if flip else "R"), *_TEXTS.get(kind, [])]
    if spec.view in ("LL", "RL") or spec.view == "":
        texts.append("LAT")
    image = _finish(image, spacing, effects, noise, field, texts)
    across = ("R" if flip else "L") if spec.view in ("AP", "PA") else ("P" if flip else "A")
    orientation = (across, "H" if spec.label == "hand" else "F")
    return Radiograph(kind, image, spacing, laterality, orientation)


# ---------------------------------------------------------------- DICOM encoding


def encode_radiograph(
    radiograph: Radiograph,
    seed: int,
    *,
    modality: str = "CR",
    body_part: str | None = None,
    view_position: str | None = None,
    description: str | None = None,
    photometric: str | None = None,
) -> FileDataset:
    """Encode ``radiograph`` as a CR or DX instance; the header says what it is told.

    ``body_part``, ``view_position`` and ``description`` default to the truth of the kind;
    pass anything to make a lying header. Bit depth (10–16), photometric (MONOCHROME1/2
    unless given), window (usually present, of varied width) and, for CR, rescale are drawn
    from ``seed``. DX carries the Anatomic Region and View Code of its (stated) header.
    """
    modality = modality.upper()
    if modality not in ("CR", "DX"):
        raise ValueError(f"modality: {modality!r} is not 'CR' or 'DX'")
    spec = radiograph.spec
    kind = radiograph.kind
    rng = _stream(seed, kind, 5)
    body_part = spec.body_part if body_part is None else body_part
    view_position = spec.view if view_position is None else view_position
    description = f"{spec.description} (synthetic phantom)" if description is None else description
    if photometric is None:
        photometric = "MONOCHROME1" if rng.random() < 0.5 else "MONOCHROME2"
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric: {photometric!r} is not MONOCHROME1/MONOCHROME2")
    bits_stored = int(rng.choice([10, 12, 14, 15, 16]))
    window = bool(rng.random() < 0.8)
    rescale = modality == "CR" and bool(rng.random() < 0.3)

    top = 2**bits_stored - 1
    gain = rng.uniform(0.7, 0.95) * top
    offset = rng.uniform(0.0, 0.05) * top
    values = np.round(offset + radiograph.image * gain).astype(np.int64)
    if photometric == "MONOCHROME1":
        values = top - values
    pixels = values.astype(np.uint16)
    slope, intercept = 1.0, 0.0
    if rescale:
        slope = float(rng.choice([0.5, 1.0, 2.0]))
        intercept = float(rng.choice([-1024.0, 0.0, 500.0]))

    window_center = window_width = 0.0
    if window:
        modality_vals = pixels.astype(np.float64) * slope + intercept
        lo, hi = np.percentile(modality_vals, (rng.uniform(0, 3), rng.uniform(97, 100)))
        width = max(float(hi - lo), 2.0) * rng.uniform(0.9, 1.6)
        window_center = float((lo + hi) / 2) + rng.uniform(-0.1, 0.1) * width
        window_width = width

    sop_class = {
        "CR": CR_IMAGE_STORAGE,
        "DX": DX_FOR_PRESENTATION if window else DX_FOR_PROCESSING,
    }[modality]
    tag = (kind, str(seed), modality, body_part, view_position, photometric)
    sop_uid = derive_uid("phantom-radiograph-instance", *tag)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)

    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = derive_uid("phantom-radiograph-study", kind, str(seed))
    ds.SeriesInstanceUID = derive_uid("phantom-radiograph-series", *tag)
    date = f"2024{1 + seed % 12:02d}{1 + seed % 28:02d}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "111500"
    ds.AccessionNumber = f"R{seed % 10**9:09d}"
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{seed % 10**6}"
    ds.StudyDescription = description
    ds.SeriesDescription = description
    ds.Modality = modality
    ds.Manufacturer = "pacsnode phantom"
    ds.InstitutionName = "pacsnode"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientName = "PHANTOM^RADIOGRAPH"
    ds.PatientID = f"PR{seed % 10**8:08d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ["F", "M", "O"][seed % 3]
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    ds.PatientOrientation = list(radiograph.orientation)
    if radiograph.laterality and modality == "CR":
        ds.Laterality = radiograph.laterality  # DX carries Image Laterality instead
    ds.BurnedInAnnotation = "YES"
    ds.LossyImageCompression = "00"

    spacing = round(radiograph.pixel_spacing_mm, 6)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelData = pixels.tobytes()
    if modality == "DX" or rescale:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.RescaleType = "US"
    if window:
        ds.WindowCenter = round(window_center, 2)
        ds.WindowWidth = round(window_width, 2)
        ds.VOILUTFunction = "LINEAR"

    if modality == "DX":
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
        ds.PresentationIntentType = "FOR PRESENTATION" if window else "FOR PROCESSING"
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME1" else 1
        ds.DetectorType = "SCINTILLATOR"
        ds.AcquisitionContextSequence = DicomSequence([])
        ds.PositionerType = "NONE"
        ds.DistanceSourceToDetector = 1000.0
        ds.PatientPosition = ""
        ds.EstimatedRadiographicMagnificationFactor = 1.0
        ds.ImageLaterality = radiograph.laterality or "U"
        region = ANATOMIC_REGIONS.get(body_part.upper())
        if region is not None:
            ds.AnatomicRegionSequence = DicomSequence([_code_item(region)])
        view_key = "OBLIQUE" if kind == "hand_oblique" and not view_position else view_position
        view_code = VIEW_CODES.get(view_key.upper(), VIEW_CODES[spec.view])
        view_item = _code_item(view_code)
        view_item.ViewModifierCodeSequence = DicomSequence([])
        ds.ViewCodeSequence = DicomSequence([view_item])
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PatientPosition = ""
    return ds


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def make_radiograph_dataset(
    kind: str,
    seed: int,
    *,
    body_part: str | None = None,
    view_position: str | None = None,
    modality: str = "CR",
    size: int | None = None,
    description: str | None = None,
    photometric: str | None = None,
) -> FileDataset:
    """Render ``kind`` from ``seed`` (:func:`render_radiograph`) and encode it
    (:func:`encode_radiograph`); header fields left None tell the truth."""
    radiograph = render_radiograph(kind, seed, size=size)
    return encode_radiograph(
        radiograph,
        seed,
        modality=modality,
        body_part=body_part,
        view_position=view_position,
        description=description,
        photometric=photometric,
    )
