"""Synthetic chest radiographs (CR/DX) with a ground-truth CheXNet label vector.

The renderer builds a projected "density" map in millimetre coordinates (body,
lungs, mediastinum and heart, diaphragm domes, spine, ribs, clavicles and
branching vessel markings), adds the requested findings, and maps it to a
[0, 1] image, bright = dense. :func:`render` is the fast path (no DICOM);
:func:`make_cxr_dataset` encodes the same image as a valid CR or DX instance
(any bit depth, signedness, photometric, window/rescale, transfer syntax) so
training and tests can go through the exact serving path.

The phantoms model geometry and contrast, not anatomy in detail: there are no
scapulae, breast shadows, lines/tubes, devices or real lung parenchyma.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from pacsnode.uids import derive_uid

CHEXNET_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
"""The 14 ChestX-ray14 labels in CheXNet output order."""

RENDERED_FINDINGS: tuple[str, ...] = (
    "Cardiomegaly",
    "Effusion",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Emphysema",
)
"""The labels the phantom can draw; the others are always 0 (no ground truth)."""

DEFAULT_PREVALENCE = 0.3

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_FOR_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
SUPPORTED_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless)


# ---------------------------------------------------------------- helpers


def _box_blur_axis(a: np.ndarray, radius: int, axis: int) -> np.ndarray:
    if radius < 1:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (radius + 1, radius)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float64)
    n = a.shape[axis]
    hi = np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis)
    lo = np.take(c, np.arange(0, n), axis=axis)
    return ((hi - lo) / (2 * radius + 1)).astype(np.float32)


def _blur(a: np.ndarray, sigma_px: float) -> np.ndarray:
    """Approximate Gaussian blur (three box passes); numpy only, so no SciPy at runtime."""
    if sigma_px < 0.5:
        return a
    radius = max(1, int(round((math.sqrt(4.0 * sigma_px**2 + 1.0) - 1.0) / 2.0)))
    out = a
    for _ in range(3):
        out = _box_blur_axis(out, radius, 0)
        out = _box_blur_axis(out, radius, 1)
    return out


def _smoothstep(x: np.ndarray) -> np.ndarray:
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _draw_segment(
    canvas: np.ndarray,
    p0: tuple[float, float],
    p1: tuple[float, float],
    radius_px: float,
    amp: float,
) -> None:
    """Add a cylinder-profile segment (vessel, pleural line) between pixel points (x, y)."""
    h, w = canvas.shape
    r = max(radius_px, 0.5)
    x0, y0 = p0
    x1, y1 = p1
    j0 = max(int(min(x0, x1) - r - 1), 0)
    j1 = min(int(max(x0, x1) + r + 2), w)
    i0 = max(int(min(y0, y1) - r - 1), 0)
    i1 = min(int(max(y0, y1) + r + 2), h)
    if j0 >= j1 or i0 >= i1:
        return
    yy, xx = np.mgrid[i0:i1, j0:j1].astype(np.float32)
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy
    if length2 < 1e-9:
        t = np.zeros_like(xx)
    else:
        t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / length2, 0.0, 1.0)
    d2 = (xx - (x0 + t * dx)) ** 2 + (yy - (y0 + t * dy)) ** 2
    canvas[i0:i1, j0:j1] += amp * np.sqrt(np.clip(1.0 - d2 / (r * r), 0.0, 1.0))


def _sphere(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Projected thickness of a sphere (0..1 at the centre)."""
    d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (r * r)
    return np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))


# ---------------------------------------------------------------- geometry


@dataclass
class _Grid:
    """Pixel grid in millimetres; x to the image right (patient left), y down."""

    xx: np.ndarray
    yy: np.ndarray
    spacing: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.xx.shape  # type: ignore[return-value]

    def px(self, mm: float) -> float:
        return mm / self.spacing


def _lung_masks(
    g: _Grid,
    cx: float,
    apex_y: float,
    base_y: tuple[float, float],
    half_width: float,
    dome_height: float,
    medial: tuple[float, float],
    heart: tuple[float, float, float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Hard masks of the right (image left) and left (image right) lungs."""
    masks = []
    hx, hy, ha, hb = heart
    heart_mask = ((g.xx - hx) / ha) ** 2 + ((g.yy - hy) / hb) ** 2 < 1.0
    for side, sign in ((0, -1.0), (1, 1.0)):
        height = base_y[side] - apex_y
        t = np.clip((g.yy - apex_y) / height, 0.0, 1.5)
        lateral = half_width * (0.45 + 0.55 * np.sqrt(np.clip(t * 1.15, 0.0, 1.0)))
        dx = sign * (g.xx - cx)  # distance from midline towards this lung's side
        med = medial[side] * (1.0 + 0.6 * np.clip(1.0 - t * 3.0, 0.0, 1.0))
        inside_x = (dx > med) & (dx < lateral)
        # apex dome: the lung top rises towards its middle
        mid = 0.5 * (med + lateral)
        half = np.maximum(0.5 * (lateral - med), 1.0)
        apex = apex_y + 18.0 * ((dx - mid) / half) ** 2
        # diaphragm dome: highest near the lung's middle, deep costophrenic recess laterally
        u = (dx - (med + 0.45 * (lateral - med))) / (0.62 * (lateral - med) + 1e-3)
        dome = base_y[side] - dome_height * np.clip(1.0 - u * u, -0.6, 1.0)
        m = inside_x & (g.yy > apex) & (g.yy < dome) & ~heart_mask
        masks.append(m)
    return masks[0], masks[1]


def _vessel_tree(
    rng: np.random.Generator,
    canvas: np.ndarray,
    g: _Grid,
    hilum: tuple[float, float],
    outward: float,
    scale: float,
    amp: float,
    depth: int,
) -> None:
    """Branching lung markings from a hilum; ``outward`` is -1 (image left) or +1."""
    stack: list[tuple[float, float, float, float, float, int]] = []
    for base_angle in (-80.0, -45.0, -10.0, 25.0, 60.0, 95.0):
        ang = math.radians(base_angle + rng.uniform(-12, 12))
        stack.append((hilum[0], hilum[1], ang, 45.0 * scale, 2.0, 0))
    while stack:
        x, y, ang, length, radius, d = stack.pop()
        ex = x + outward * math.cos(ang) * length
        ey = y + math.sin(ang) * length
        _draw_segment(
            canvas,
            (g.px(x), g.px(y)),
            (g.px(ex), g.px(ey)),
            g.px(radius),
            amp * (0.5 + 0.5 * radius / 2.0),
        )
        if d < depth:
            for turn in (-1.0, 1.0):
                new_ang = ang + turn * math.radians(rng.uniform(12, 40))
                stack.append(
                    (ex, ey, new_ang, length * rng.uniform(0.62, 0.8), radius * 0.72, d + 1)
                )


# ---------------------------------------------------------------- findings


def _random_findings(rng: np.random.Generator, prevalence: float) -> dict[str, bool]:
    found = {name: bool(rng.random() < prevalence) for name in RENDERED_FINDINGS}
    return found


def render(
    rng_or_seed: np.random.Generator | int,
    findings: Mapping[str, bool] | Sequence[str] | None = None,
    shape: tuple[int, int] = (512, 512),
    pixel_spacing_mm: float | None = None,
    *,
    prevalence: float = DEFAULT_PREVALENCE,
) -> tuple[np.ndarray, dict[str, int]]:
    """Render one chest radiograph.

    ``findings`` is a mapping or a list of names from :data:`RENDERED_FINDINGS`
    (``None``: each present independently with probability ``prevalence``).
    Returns a float32 image in [0, 1] (bright = dense) and the labels, 0/1 over
    all 14 :data:`CHEXNET_LABELS`.
    """
    return _render(rng_or_seed, findings, shape, pixel_spacing_mm, prevalence, None)


def render_with_regions(
    rng_or_seed: np.random.Generator | int,
    findings: Mapping[str, bool] | Sequence[str] | None = None,
    shape: tuple[int, int] = (512, 512),
    pixel_spacing_mm: float | None = None,
    *,
    prevalence: float = DEFAULT_PREVALENCE,
) -> tuple[np.ndarray, dict[str, int], dict[str, np.ndarray]]:
    """:func:`render`, plus where each present finding is: ground truth for localisation.

    The image and labels are exactly those of :func:`render` with the same arguments (the
    regions draw no random numbers). Regions are boolean masks on the image grid, keyed by
    finding name, for every present finding: Cardiomegaly the heart, Effusion the fluid,
    Pneumothorax the air zone, Consolidation the filled lobe, Pneumonia the affected zones,
    Nodule and Mass their discs, Emphysema both lungs (it is diffuse).
    """
    regions: dict[str, np.ndarray] = {}
    image, labels = _render(rng_or_seed, findings, shape, pixel_spacing_mm, prevalence, regions)
    return image, labels, regions


def _render(
    rng_or_seed: np.random.Generator | int,
    findings: Mapping[str, bool] | Sequence[str] | None,
    shape: tuple[int, int],
    pixel_spacing_mm: float | None,
    prevalence: float,
    regions: dict[str, np.ndarray] | None,
) -> tuple[np.ndarray, dict[str, int]]:
    """The renderer; fills ``regions`` (when given) with the masks of the present findings."""

    def mark(name: str, mask: np.ndarray) -> None:
        if regions is not None:
            regions[name] = regions[name] | mask if name in regions else mask.copy()

    rng = (
        rng_or_seed
        if isinstance(rng_or_seed, np.random.Generator)
        else np.random.default_rng(rng_or_seed)
    )
    if findings is None:
        present = _random_findings(rng, prevalence)
    else:
        names = [k for k, v in findings.items() if v] if isinstance(findings, Mapping) else findings
        unknown = set(names) - set(RENDERED_FINDINGS)
        if unknown:
            raise ValueError(
                f"findings: cannot render {sorted(unknown)}; known: {list(RENDERED_FINDINGS)}"
            )
        present = {name: name in names for name in RENDERED_FINDINGS}

    rows, cols = shape
    if pixel_spacing_mm is None:
        pixel_spacing_mm = 420.0 / max(rows, cols)
    sp = float(pixel_spacing_mm)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    xx = (xx + 0.5) * sp
    yy = (yy + 0.5) * sp
    g = _Grid(xx, yy, sp)
    fov_w, fov_h = cols * sp, rows * sp

    emph = present["Emphysema"]
    # --- global geometry (mm)
    cx = fov_w / 2 + rng.uniform(-0.04, 0.04) * fov_w
    thorax_w = rng.uniform(0.64, 0.76) * min(fov_w, fov_h * 1.05)
    half_w = thorax_w / 2
    apex_y = fov_h * rng.uniform(0.09, 0.16)
    lung_h = thorax_w * rng.uniform(0.78, 0.9)
    dome_h = thorax_w * rng.uniform(0.07, 0.1)
    if emph:
        lung_h *= rng.uniform(1.1, 1.2)
        dome_h *= rng.uniform(0.2, 0.4)
        half_w *= rng.uniform(1.03, 1.07)
    base_r = apex_y + lung_h - rng.uniform(8, 20)  # right dome higher
    base_l = apex_y + lung_h
    medial = (thorax_w * rng.uniform(0.05, 0.075), thorax_w * rng.uniform(0.06, 0.085))

    # heart: ellipse on the lower mediastinum, shifted towards patient left (image right)
    ctr = rng.uniform(0.57, 0.68) if present["Cardiomegaly"] else rng.uniform(0.38, 0.48)
    heart_w = ctr * 2 * half_w
    heart_a = heart_w / 2
    heart_b = heart_a * rng.uniform(0.72, 0.85)
    heart_x = cx + heart_w * rng.uniform(0.12, 0.2)
    heart_y = min(base_r, base_l) - dome_h * 0.3 - heart_b * 0.6
    heart = (heart_x, heart_y, heart_a, heart_b)

    lung_r, lung_l = _lung_masks(g, cx, apex_y, (base_r, base_l), half_w, dome_h, medial, heart)
    lungs = lung_r | lung_l
    if emph:
        mark("Emphysema", lungs)

    # --- body: soft tissue thickness, narrower at the neck
    body_half = half_w + thorax_w * rng.uniform(0.06, 0.12)
    neck_half = thorax_w * rng.uniform(0.16, 0.2)
    shoulder_y = apex_y - thorax_w * 0.02
    bw = np.where(
        yy < shoulder_y,
        neck_half + (body_half - neck_half) * _smoothstep((yy - (shoulder_y - 60)) / 60.0),
        body_half,
    )
    bx = np.clip(1.0 - ((xx - cx) / bw) ** 2, 0.0, 1.0)
    density = 1.5 * np.sqrt(bx) * (bx > 0)

    # lung air: thickest medially-centrally, thinner at the edges
    air_depth = 0.95 * rng.uniform(0.85, 1.1) * (1.25 if emph else 1.0)
    lung_soft = _blur(lungs.astype(np.float32), g.px(2.5))
    lung_profile = np.clip(0.55 + 0.45 * np.sqrt(np.clip(bx, 0, 1)), 0, 1)
    density = density - air_depth * lung_soft * lung_profile

    # heart and mediastinum slightly denser than abdomen
    heart_mask = (((xx - heart_x) / heart_a) ** 2 + ((yy - heart_y) / heart_b) ** 2) < 1.0
    density += 0.12 * _blur(heart_mask.astype(np.float32), g.px(2.0))
    if present["Cardiomegaly"]:
        mark("Cardiomegaly", heart_mask)

    # gastric bubble under the left dome
    if rng.random() < 0.6:
        gx = cx + half_w * rng.uniform(0.35, 0.6)
        gy = base_l + rng.uniform(15, 30)
        density -= 0.35 * _sphere(xx, yy, gx, gy, rng.uniform(12, 25))

    # spine with vertebral bodies
    spine_w = thorax_w * rng.uniform(0.1, 0.13)
    spine = np.clip(1.0 - ((xx - cx) / (spine_w / 2)) ** 2, 0, 1)
    vert_period = rng.uniform(22, 28)
    vert = 0.75 + 0.25 * np.cos(2 * math.pi * (yy - apex_y) / vert_period) ** 2
    density += 0.45 * np.sqrt(spine) * vert

    # ribs: posterior arcs from the spine laterally and down, faint anterior arcs
    bone = np.zeros(g.shape, dtype=np.float32)
    n_ribs = 10
    rib_gap = lung_h / (n_ribs - 0.5) * (1.1 if emph else 1.0)
    rib_t = rng.uniform(8, 12)
    for k in range(n_ribs):
        y0 = apex_y - 12 + k * rib_gap * 0.9
        for sign in (-1.0, 1.0):
            # posterior rib: rises briefly from the spine, then arcs down laterally
            lo_y = max(int((y0 - 30) / sp), 0)
            hi_y = min(int((y0 + 0.0026 * half_w**2 + 30) / sp), rows)
            if lo_y >= hi_y:
                continue
            bx_, by_ = xx[lo_y:hi_y], yy[lo_y:hi_y]
            dx = sign * (bx_ - cx)
            curve = y0 - 0.12 * dx + 0.0024 * dx * dx
            dist = np.abs(by_ - curve)
            on = (dx > spine_w * 0.35) & (dx < half_w * 1.02)
            prof = np.sqrt(np.clip(1.0 - (dist / (rib_t / 2)) ** 2, 0, 1))
            cortex = np.exp(-(((dist - rib_t / 2) / 1.2) ** 2))
            bone[lo_y:hi_y] += on * (0.1 * prof + 0.06 * cortex)
            # anterior rib: from the lateral wall running medially and down
            ay = y0 + rib_gap * 1.2 + 0.3 * (half_w - dx)
            adist = np.abs(by_ - ay)
            aon = (dx > half_w * 0.3) & (dx < half_w * 1.0)
            bone[lo_y:hi_y] += (
                aon * 0.04 * np.sqrt(np.clip(1.0 - (adist / (rib_t * 0.6)) ** 2, 0, 1))
            )
    # clavicles
    for sign in (-1.0, 1.0):
        dx = sign * (xx - cx)
        cy = apex_y + rng.uniform(5, 20) - 0.12 * dx
        dist = np.abs(yy - cy)
        on = (dx > thorax_w * 0.05) & (dx < half_w * 1.05)
        bone += on * 0.3 * np.sqrt(np.clip(1.0 - (dist / 7.0) ** 2, 0, 1))
    density += bone

    # lung markings
    vessels = np.zeros(g.shape, dtype=np.float32)
    v_amp = rng.uniform(0.08, 0.13) * (0.35 if emph else 1.0)
    depth = 4 if emph else 5
    hilum_y = apex_y + lung_h * rng.uniform(0.4, 0.48)
    scale = thorax_w / 300.0
    for sign, med in ((-1.0, medial[0]), (1.0, medial[1])):
        hx = cx + sign * (med + thorax_w * 0.04)
        _vessel_tree(rng, vessels, g, (hx, hilum_y), sign, scale, v_amp, depth)

    # parenchymal texture so that small opacities are not trivially separable
    texture = _blur(rng.standard_normal(g.shape).astype(np.float32), g.px(3.0))
    texture *= 0.035 / (float(texture.std()) + 1e-6)

    lung_keep = lung_soft.copy()
    finding_density = np.zeros(g.shape, dtype=np.float32)

    # --- Pneumothorax: lung collapsed towards the lower hilum, lucent rim without markings
    if present["Pneumothorax"]:
        sides = [0, 1] if rng.random() < 0.15 else [int(rng.integers(0, 2))]
        for side in sides:
            lung = lung_r if side == 0 else lung_l
            sign = -1.0 if side == 0 else 1.0
            ax = cx + sign * (medial[side] + 5.0)
            ay = (base_r if side == 0 else base_l) - dome_h
            f = rng.uniform(0.55, 0.8)
            sx = (xx - ax) / f + ax
            sy = (yy - ay) / f + ay
            # sample the lung mask at scaled coordinates (nearest neighbour)
            jj = np.clip((sx / sp).astype(np.int64), 0, cols - 1)
            ii = np.clip((sy / sp).astype(np.int64), 0, rows - 1)
            collapsed = lung[ii, jj] & lung
            zone = lung & ~collapsed
            mark("Pneumothorax", zone)
            zone_soft = _blur(zone.astype(np.float32), g.px(1.0))
            lung_keep -= zone_soft * lung_soft
            finding_density -= 0.22 * zone_soft
            edge = _blur(collapsed.astype(np.float32), g.px(0.6))
            line = np.clip(1.0 - np.abs(edge - 0.5) * 2.0, 0, 1) * lung
            finding_density += (
                0.25
                * line
                * (zone_soft > 0).astype(np.float32)
                * _blur(zone.astype(np.float32), g.px(4.0)).clip(0, 0.5)
                * 2.0
            )
    # --- Effusion: fluid at the base with a meniscus rising laterally
    if present["Effusion"]:
        sides = [0, 1] if rng.random() < 0.35 else [int(rng.integers(0, 2))]
        for side in sides:
            lung = lung_r if side == 0 else lung_l
            sign = -1.0 if side == 0 else 1.0
            base = base_r if side == 0 else base_l
            level = base - dome_h - rng.uniform(15, 70)
            dx = sign * (xx - cx)
            lat = np.clip((dx - medial[side]) / (half_w - medial[side]), 0, 1.2)
            meniscus = level - rng.uniform(20, 45) * lat**2
            fluid = _smoothstep((yy - meniscus) / 18.0) * _blur(lung.astype(np.float32), g.px(2))
            mark("Effusion", fluid >= 0.5)
            finding_density += air_depth * 1.0 * fluid * lung_profile
            lung_keep = lung_keep * (1.0 - fluid)

    lung_keep = np.clip(lung_keep, 0.0, 1.0)
    density += (vessels + texture) * lung_keep

    # --- Consolidation: dense homogeneous lobar opacity with a sharp fissural border
    if present["Consolidation"]:
        side = int(rng.integers(0, 2))
        lung = lung_r if side == 0 else lung_l
        sign = -1.0 if side == 0 else 1.0
        dx = sign * (xx - cx)
        fiss_y = apex_y + lung_h * rng.uniform(0.35, 0.5) + 0.1 * (dx - half_w / 2)
        if rng.random() < 0.5:
            lobe = lung & (yy < fiss_y)  # upper lobe, sharp lower border at the fissure
            soft_edge = _smoothstep((fiss_y - yy) / 2.0)
        else:
            lobe = lung & (yy > fiss_y + 10)
            soft_edge = _smoothstep((yy - fiss_y - 10) / 2.0)
        fill = _blur(lobe.astype(np.float32), g.px(4.0)) * soft_edge * lung
        mark("Consolidation", fill >= 0.5)
        grain = 1.0 + 0.1 * _blur(rng.standard_normal(g.shape).astype(np.float32), g.px(4))
        finding_density += air_depth * rng.uniform(0.65, 0.85) * fill * grain * lung_profile

    # --- Pneumonia: patchy ill-defined multifocal air-space opacities
    if present["Pneumonia"]:
        field = _blur(rng.standard_normal(g.shape).astype(np.float32), g.px(7.0))
        field /= float(field.std()) + 1e-6
        patchy = _smoothstep((field + 0.2) / 1.4)
        region = np.zeros(g.shape, dtype=np.float32)
        lung_idx = np.argwhere(lungs)
        for _ in range(int(rng.integers(2, 5))):
            i, j = lung_idx[int(rng.integers(0, len(lung_idx)))]
            r = rng.uniform(35, 60)
            region += _sphere(xx, yy, float(xx[i, j]), float(yy[i, j]), r)
        region = np.clip(region, 0, 1)
        finding_density += air_depth * 0.85 * patchy * region * lung_soft
        mark("Pneumonia", (region > 0) & lungs)

    # --- Nodules and masses: round opacities inside the lungs
    lung_idx_all = np.argwhere(lungs)

    def _random_lung_point(margin_mm: float) -> tuple[float, float]:
        for _ in range(50):
            i, j = lung_idx_all[int(rng.integers(0, len(lung_idx_all)))]
            m = int(g.px(margin_mm))
            if (
                lungs[max(i - m, 0), j]
                and lungs[min(i + m, rows - 1), j]
                and lungs[i, max(j - m, 0)]
                and lungs[i, min(j + m, cols - 1)]
            ):
                return float(xx[i, j]), float(yy[i, j])
        i, j = lung_idx_all[int(rng.integers(0, len(lung_idx_all)))]
        return float(xx[i, j]), float(yy[i, j])

    if present["Nodule"]:
        for _ in range(int(rng.integers(1, 4))):
            r = rng.uniform(8, 25) / 2
            nx, ny = _random_lung_point(r)
            amplitude = rng.uniform(0.35, 0.55)
            nodule = _sphere(xx, yy, nx, ny, r)
            mark("Nodule", nodule > 0)
            finding_density += amplitude * nodule
    if present["Mass"]:
        r = rng.uniform(35, 70) / 2
        mx, my = _random_lung_point(r * 0.6)
        mass = _sphere(xx, yy, mx, my, r)
        for _ in range(int(rng.integers(2, 5))):
            a = rng.uniform(0, 2 * math.pi)
            lobe_r = r * rng.uniform(0.4, 0.6)
            mass = np.maximum(
                mass,
                _sphere(xx, yy, mx + math.cos(a) * r * 0.7, my + math.sin(a) * r * 0.7, lobe_r),
            )
        mark("Mass", mass > 0)
        finding_density += rng.uniform(0.6, 0.8) * mass

    density += finding_density

    # --- projection to an image: exposure, gamma, noise, heel effect
    mu = rng.uniform(0.8, 1.15)
    img = 1.0 - np.exp(-mu * np.clip(density, 0.0, None))
    img /= max(float(img.max()), 1e-6)
    img = img ** rng.uniform(0.8, 1.25)
    heel = 1.0 + rng.uniform(-0.05, 0.05) * (yy / fov_h - 0.5)
    img = img * heel
    noise_sigma = rng.uniform(0.006, 0.02) * (0.4 / sp)
    img = img + noise_sigma * rng.standard_normal(g.shape).astype(np.float32)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)

    labels = {name: 0 for name in CHEXNET_LABELS}
    for name, on in present.items():
        labels[name] = int(on)
    return img, labels


# ---------------------------------------------------------------- DICOM encoding


def make_cxr_dataset(
    seed: int,
    *,
    findings: Mapping[str, bool] | Sequence[str] | None = None,
    prevalence: float = DEFAULT_PREVALENCE,
    modality: str = "DX",
    view: str = "PA",
    photometric: str = "MONOCHROME2",
    rows: int = 1024,
    cols: int = 1024,
    pixel_spacing_mm: float | None = None,
    bits_stored: int = 12,
    pixel_representation: int = 0,
    window: bool = True,
    rescale: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    patient_name: str = "PHANTOM^CXR",
    patient_id: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    specific_character_set: str | None = None,
    mirror: bool = False,
) -> tuple[FileDataset, dict[str, int]]:
    """Render a phantom and encode it as a CR or DX instance with its labels.

    DX with ``window`` is "For Presentation"; DX without it is "For Processing"
    (the IOD requires a window or VOI LUT for presentation). ``rescale`` adds a
    non-identity Rescale Slope/Intercept (CR only; DX requires 1/0). ``mirror`` stores
    the columns the other way round (patient's right on the viewer's right, Patient
    Orientation ``R\\F``), as a detector read out from the other side would; the
    pixels are otherwise those of the unmirrored phantom.
    """
    modality = modality.upper()
    view = view.upper()
    if modality not in ("CR", "DX"):
        raise ValueError(f"modality: {modality!r} is not 'CR' or 'DX'")
    if view not in ("PA", "AP"):
        raise ValueError(f"view: {view!r} is not 'PA' or 'AP'")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric: {photometric!r} is not MONOCHROME1/MONOCHROME2")
    if bits_stored not in (8, 10, 12, 16):
        raise ValueError(f"bits_stored: {bits_stored} is not 8, 10, 12 or 16")
    if pixel_representation not in (0, 1):
        raise ValueError(f"pixel_representation: {pixel_representation} is not 0 or 1")
    tsyntax = UID(transfer_syntax)
    if tsyntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax: {tsyntax} not one of {SUPPORTED_TRANSFER_SYNTAXES}")
    if modality == "DX" and (rescale or pixel_representation == 1):
        raise ValueError("DX requires unsigned pixels with Rescale Slope 1 and Intercept 0")

    rng = np.random.default_rng(seed)
    image, labels = render(rng, findings, (rows, cols), pixel_spacing_mm, prevalence=prevalence)
    if mirror:
        image = image[:, ::-1]
    spacing = pixel_spacing_mm if pixel_spacing_mm is not None else 420.0 / max(rows, cols)

    # stored values: use most of the range, with a random offset/gain
    top = 2**bits_stored - 1
    gain = rng.uniform(0.75, 0.95) * top
    offset = rng.uniform(0.0, 0.04) * top
    values = np.round(offset + image * gain).astype(np.int64)  # monotonic with density
    if photometric == "MONOCHROME1":
        values = top - values
    slope, intercept = 1.0, 0.0
    if rescale:
        slope = float(rng.choice([0.5, 1.0, 2.0]))
        intercept = float(rng.choice([-1024.0, -100.0, 0.0, 500.0]))
    if pixel_representation == 1:
        values = values - 2 ** (bits_stored - 1)
        intercept_shift = float(2 ** (bits_stored - 1))
    else:
        intercept_shift = 0.0
    bits_allocated = 8 if bits_stored == 8 else 16
    dtype = {
        (8, 0): np.uint8,
        (8, 1): np.int8,
        (16, 0): np.uint16,
        (16, 1): np.int16,
    }[(bits_allocated, pixel_representation)]
    pixels = values.astype(dtype)

    sop_class = {
        "CR": CR_IMAGE_STORAGE,
        "DX": DX_FOR_PRESENTATION if window else DX_FOR_PROCESSING,
    }[modality]
    study_uid = study_uid or derive_uid("phantom-cxr-study", str(seed))
    series_uid = series_uid or derive_uid("phantom-cxr-series", str(seed), modality)
    sop_uid = derive_uid(
        "phantom-cxr-instance", str(seed), modality, view, photometric, *(["mirror"] * mirror)
    )
    patient_id = patient_id or f"PH{seed:08d}"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)

    if specific_character_set:
        ds.SpecificCharacterSet = specific_character_set
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    date = f"2024{1 + seed % 12:02d}{1 + seed % 28:02d}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "101500"
    ds.AccessionNumber = f"A{seed % 10**9:09d}"
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{seed % 10**6}"
    ds.StudyDescription = "Chest X-ray (synthetic phantom)"
    ds.SeriesDescription = f"Chest {view} (synthetic phantom)"
    ds.Modality = modality
    ds.Manufacturer = "pacsnode phantom"
    ds.InstitutionName = "pacsnode"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ["F", "M", "O"][seed % 3]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    # displayed conventionally for both views: patient's right on the viewer's left
    ds.PatientOrientation = ["R" if mirror else "L", "F"]
    if modality == "DX":
        ds.ImageLaterality = "U"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = pixel_representation
    ds.PixelSpacing = [round(spacing, 6), round(spacing, 6)]
    ds.ImagerPixelSpacing = [round(spacing, 6), round(spacing, 6)]
    ds.PixelData = pixels.tobytes()

    if modality == "DX" or rescale or pixel_representation == 1:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept + intercept_shift * slope
        ds.RescaleType = "US"
    if window:
        modality_vals = pixels.astype(np.float64) * float(ds.get("RescaleSlope", 1.0)) + float(
            ds.get("RescaleIntercept", 0.0)
        )
        lo, hi = np.percentile(modality_vals, (0.5, 99.5))
        ds.WindowCenter = round(float((lo + hi) / 2), 2)
        ds.WindowWidth = round(max(float(hi - lo), 2.0), 2)
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
        ds.DistanceSourceToDetector = 1800.0 if view == "PA" else 1000.0
        ds.PatientPosition = ""
        ds.EstimatedRadiographicMagnificationFactor = 1.0
        anatomy = Dataset()
        anatomy.CodeValue = "51185008"
        anatomy.CodingSchemeDesignator = "SCT"
        anatomy.CodeMeaning = "Chest"
        ds.AnatomicRegionSequence = DicomSequence([anatomy])
        view_code = Dataset()
        code = codes.SCT.PosteroAnterior if view == "PA" else codes.SCT.AnteroPosterior
        view_code.CodeValue = code.value  # CID 4010: 272479007 PA, 399348003 AP
        view_code.CodingSchemeDesignator = "SCT"
        view_code.CodeMeaning = code.meaning
        view_code.ViewModifierCodeSequence = DicomSequence([])
        ds.ViewCodeSequence = DicomSequence([view_code])
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PatientPosition = ""

    if tsyntax != ExplicitVRLittleEndian:
        ds.compress(tsyntax)
    return ds, labels


def finding_regions(
    seed: int,
    *,
    findings: Mapping[str, bool] | Sequence[str] | None = None,
    prevalence: float = DEFAULT_PREVALENCE,
    rows: int = 1024,
    cols: int = 1024,
    pixel_spacing_mm: float | None = None,
    mirror: bool = False,
) -> dict[str, np.ndarray]:
    """The finding masks (:func:`render_with_regions`) of :func:`make_cxr_dataset` called
    with the same arguments, on its stored pixel grid (mirrored too when ``mirror``)."""
    rng = np.random.default_rng(seed)
    _, _, regions = render_with_regions(
        rng, findings, (rows, cols), pixel_spacing_mm, prevalence=prevalence
    )
    return {name: mask[:, ::-1] if mirror else mask for name, mask in regions.items()}


def write_phantom_set(
    out_dir: Path, seed: int, n: int, **kw: object
) -> list[tuple[Path, dict[str, int]]]:
    """Write ``n`` phantoms (seeds ``seed``..``seed+n-1``) to ``out_dir`` as ``.dcm`` files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for k in range(n):
        ds, labels = make_cxr_dataset(seed + k, **kw)  # type: ignore[arg-type]
        path = out_dir / f"cxr_{seed + k:08d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append((path, labels))
    return written
