"""Reproducible training of the CT content gate on synthetic phantoms (CPU, one thread).

``python -m pacsnode.gates.train_ct --out models/gates/ct-region-contrast --seed 0``

Data: every step draws fresh phantoms (:mod:`pacsnode.phantoms.ctregions`: chest, abdomen,
head, pelvis, lower limb; enhanced or not, half each) from seeds ``seed·10⁶ + n``, each at a
random matrix (128-256 pixels), field of view (the body's, ×0.9-1.2; one in ten a tight
targeted one) and rendered at a few heights drawn evenly over the region's typical scan
range. Train/serve skew: the planes go through the serving
:func:`~pacsnode.gates.ct.resample_planes` and :func:`~pacsnode.gates.ct.window_channels`,
with augmentations in between (scale ±10 %, shifts, left-right flips, a patient table under
one plane in three, extra noise, HU gain and offset of a few percent / HU). Each plane
carries its volume's labels: region (head, pelvis and lower limb are "other") and contrast.

The held-out test (seed base ``seed + 1000``: other phantoms, geometries from the same ranges,
partial coverage included) goes through :meth:`CtGate.inspect` on whole volumes, and the real
CT slices of pydicom's test data go through ``read_slice_refs → plan_volume(min_slices=1) →
load_volume → inspect``. Both go into ``metrics.json`` and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pacsnode.gates.ct import (
    GATE_FILE,
    KIND,
    REGIONS,
    CtGate,
    CtGateNetwork,
    GateSpec,
    load_gate_spec,
    resample_planes,
    window_channels,
)
from pacsnode.manifest import WeightsSpec, sha256_file
from pacsnode.phantoms.ctregions import REGIONS as ANATOMIES
from pacsnode.phantoms.ctregions import RegionRender, make_region_case, render_region
from pacsnode.volumes import Volume, load_volume, plan_volume, read_slice_refs

NAME = "ct-region-contrast"
VERSION = "0.1.0-phantom"
GATE_REGION = {
    "chest": "chest",
    "abdomen": "abdomen",
    "head": "other",
    "pelvis": "other",
    "lower_limb": "other",
}
ANATOMY_P = (0.2, 0.2, 0.2, 0.2, 0.2)  # in the order of ANATOMIES
TEST_SEED_OFFSET = 1000
CASE_STRIDE = 1_000_000
ROWS = (128, 160, 192, 256)
CONTRAST_WEIGHT = 2.0
"""The contrast loss counts double: the region is learnt long before contrast in small vessels."""
REAL_SLICES = ("CT_small.dcm", "693_UNCR.dcm")
"""Real single CT slices in pydicom's test data (CT_small: pydicom; 693_*: pydicom-data)."""


def case_seed(base: int, index: int) -> int:
    return base * CASE_STRIDE + index


def random_fov(fov_mm: float, anatomy: str, rng: np.random.Generator) -> float:
    if anatomy == "head":
        return float(rng.uniform(200.0, 320.0))
    if rng.random() < 0.1:  # a targeted reconstruction that cuts the body
        return fov_mm * float(rng.uniform(0.55, 0.85))
    return fov_mm * float(rng.uniform(0.9, 1.2))


# ---------------------------------------------------------------- training data


def augment(canvas: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Flips, a table under some planes, noise and a small HU gain/offset (HU canvases)."""
    out = canvas.clone()
    size = out.shape[-1]
    for m in range(out.shape[0]):
        plane = out[m]
        if rng.random() < 0.5:
            plane = plane.flip(dims=[1])
        if rng.random() < 0.33:  # a patient table a little behind the body
            rows = torch.nonzero((plane > -400.0).any(dim=1))
            if len(rows):
                top = int(rows.max()) + int(rng.integers(1, 12))
                thick = int(rng.integers(2, 6))
                cols = torch.arange(size, dtype=torch.float32) - size / 2.0
                r0 = top - float(rng.uniform(0.0, 0.004)) * cols**2
                r = torch.arange(size, dtype=torch.float32)[:, None]
                table = (r >= r0[None, :]) & (r < r0[None, :] + thick)
                plane = torch.where(table, float(rng.uniform(-300.0, 150.0)), plane)
        gain = float(rng.uniform(0.97, 1.03))
        offset = float(rng.uniform(-8.0, 8.0))
        body = plane > -900.0
        plane = torch.where(body, plane * gain + offset, plane)
        sigma = float(rng.uniform(0.0, 12.0))
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**31)))
        plane = plane + sigma * torch.randn(plane.shape, generator=gen)
        out[m] = plane
    return out


def training_batch(
    base: int, step: int, cases: int, per_case: int, spec: GateSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cases`` fresh phantoms × ``per_case`` planes: input, region index, contrast."""
    rng = np.random.default_rng([base, step, 0x6A7E])
    xs, regions, contrasts = [], [], []
    for n in range(cases):
        anatomy = str(rng.choice(ANATOMIES, p=ANATOMY_P))
        contrast = bool(rng.random() < 0.5)
        case = make_region_case(anatomy, case_seed(base, step * cases + n), contrast=contrast)
        span = case.z_top - case.z_bottom
        lo, hi = case.z_bottom - 0.04 * span, case.z_top + 0.04 * span
        spacing = (hi - lo) / per_case
        centre = lo + (hi - lo) / 2.0 + float(rng.uniform(-0.5, 0.5)) * spacing
        rows = int(rng.choice(ROWS))
        fov = random_fov(case.fov_mm, anatomy, rng)
        r = render_region(
            case,
            rows=rows,
            slices=per_case,
            slice_spacing_mm=spacing,
            fov_mm=fov,
            z_centre_mm=centre,
        )
        offsets = rng.integers(-8, 9, size=(per_case, 2))
        canvas = resample_planes(
            r.hu,
            (r.spacing[1], r.spacing[2]),
            spec.input,
            zoom=float(rng.uniform(0.9, 1.1)),
            offsets=offsets,
        )
        xs.append(window_channels(augment(canvas, rng), spec.input))
        regions += [REGIONS.index(GATE_REGION[anatomy])] * per_case
        contrasts += [float(contrast)] * per_case
    return (
        torch.cat(xs),
        torch.tensor(regions, dtype=torch.int64),
        torch.tensor(contrasts, dtype=torch.float32),
    )


def default_spec(sha256: str = "0" * 64) -> GateSpec:
    return GateSpec(
        name=NAME,
        version=VERSION,
        kind=KIND,
        description=(
            "Body region (chest / abdomen / other) and intravenous contrast of a CT volume from "
            "its pixels; 2D MONAI ResNet on 12 planes; trained only on synthetic phantoms by "
            "pacsnode.gates.train_ct; NOT FOR CLINICAL USE"
        ),
        synthetic=True,
        regions=list(REGIONS),
        weights=WeightsSpec(file="weights.safetensors", sha256=sha256),
    )


def train(args: argparse.Namespace, spec: GateSpec, log: list[str]) -> CtGateNetwork:
    torch.manual_seed(args.seed)
    net = CtGateNetwork(spec)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start = time.monotonic()
    data_s = 0.0
    running = None
    for step in range(args.steps):
        t0 = time.monotonic()
        x, region, contrast = training_batch(args.seed, step, args.cases, args.per_case, spec)
        data_s += time.monotonic() - t0
        _, region_logits, contrast_logit = net(x)
        loss = F.cross_entropy(region_logits, region, label_smoothing=0.05)
        loss = loss + CONTRAST_WEIGHT * F.binary_cross_entropy_with_logits(contrast_logit, contrast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if step % 50 == 0 or step == args.steps - 1:
            line = (
                f"step {step:5d}  loss {running:.4f}  lr {sched.get_last_lr()[0]:.5f}  "
                f"{time.monotonic() - start:6.1f} s (data {data_s:5.1f} s)"
            )
            print(line, flush=True)
            log.append(line)
    net.eval()
    return net


# ---------------------------------------------------------------- evaluation


def volume_of(r: RegionRender, series_uid: str = "phantom") -> Volume:
    """A :class:`Volume` of a canonical render (what the loader would build from its files)."""
    affine = np.eye(4)
    affine[0, 0], affine[1, 1] = r.spacing[2], r.spacing[1]
    affine[2, 2] = -r.spacing[0]
    affine[:3, 3] = (r.x_mm[0], r.y_mm[0], r.z_mm[0])
    return Volume(array=r.hu, affine=affine, spacing=r.spacing, slices=(), series_uid=series_uid)


@dataclass(frozen=True)
class HeldOut:
    anatomy: str
    contrast: bool
    seed: int
    volume: Volume
    coverage: float  # fraction of the region's typical scan range covered


def held_out_volume(
    anatomy: str, contrast: bool, seed: int, *, max_slices: int = 120, rows: Sequence[int] = ROWS
) -> HeldOut:
    """One held-out phantom as a whole volume: random matrix, FOV, spacing and coverage."""
    rng = np.random.default_rng([seed, 0x7E57])
    case = make_region_case(anatomy, seed, contrast=contrast)
    span = case.z_top - case.z_bottom
    frac = 1.0 if rng.random() < 0.4 else float(rng.uniform(0.35, 1.0))
    length = max(40.0, frac * span)
    top = case.z_top - float(rng.uniform(0.0, max(0.0, span - length)))
    spacing = float(rng.choice((1.25, 2.0, 2.5, 3.0, 5.0)))
    slices = int(length // spacing) + 1
    if slices > max_slices:
        slices = max_slices
        spacing = length / (slices - 1)
    r = render_region(
        case,
        rows=int(rng.choice(rows)),
        slices=slices,
        slice_spacing_mm=spacing,
        fov_mm=random_fov(case.fov_mm, anatomy, rng),
        z_centre_mm=top - (slices - 1) * spacing / 2.0,
    )
    return HeldOut(anatomy, contrast, seed, volume_of(r, f"held-out-{seed}"), length / span)


def held_out_set(
    base: int, per_anatomy: dict[str, int], *, max_slices: int = 120, rows: Sequence[int] = ROWS
) -> list[HeldOut]:
    """``per_anatomy[a]`` enhanced and as many unenhanced phantoms of each anatomy."""
    out = []
    for a_idx, anatomy in enumerate(ANATOMIES):
        for n in range(per_anatomy[anatomy]):
            for contrast in (True, False):
                seed = case_seed(base, a_idx * 10_000 + 2 * n + int(contrast))
                out.append(
                    held_out_volume(anatomy, contrast, seed, max_slices=max_slices, rows=rows)
                )
    return out


def evaluate(gate: CtGate, cases: Sequence[HeldOut]) -> dict:
    """Held-out accuracy: region per gate region and anatomy, contrast per region, confusion."""
    rows = []
    for c in cases:
        got = gate.inspect(c.volume)
        rows.append((c, got))
    confusion = {t: dict.fromkeys(REGIONS, 0) for t in REGIONS}
    by_anatomy = {a: dict.fromkeys(REGIONS, 0) for a in ANATOMIES}
    region_ok: dict[str, list[bool]] = {k: [] for k in (*REGIONS, *ANATOMIES)}
    contrast_ok: dict[str, list[bool]] = {k: [] for k in (*REGIONS, *ANATOMIES)}
    phase_ok: dict[str, dict[str, list[bool]]] = {
        r: {"enhanced": [], "unenhanced": []} for r in REGIONS
    }
    for c, got in rows:
        truth = GATE_REGION[c.anatomy]
        confusion[truth][got.region] += 1
        by_anatomy[c.anatomy][got.region] += 1
        ok_c = (got.enhanced >= 0.5) == c.contrast
        for key in (truth, c.anatomy):
            region_ok[key].append(got.region == truth)
            contrast_ok[key].append(ok_c)
        phase_ok[truth]["enhanced" if c.contrast else "unenhanced"].append(ok_c)

    def acc(v: list[bool]) -> float:
        return float(np.mean(v)) if v else float("nan")

    return {
        "cases": len(rows),
        "region_accuracy": {k: acc(region_ok[k]) for k in REGIONS},
        "region_accuracy_by_anatomy": {k: acc(region_ok[k]) for k in ANATOMIES},
        "contrast_accuracy": {k: acc(contrast_ok[k]) for k in REGIONS},
        "contrast_accuracy_by_anatomy": {k: acc(contrast_ok[k]) for k in ANATOMIES},
        "contrast_accuracy_by_phase": {
            r: {p: acc(v) for p, v in phases.items()} for r, phases in phase_ok.items()
        },
        "region_accuracy_overall": acc([got.region == GATE_REGION[c.anatomy] for c, got in rows]),
        "contrast_accuracy_overall": acc([(got.enhanced >= 0.5) == c.contrast for c, got in rows]),
        "confusion": confusion,
        "confusion_by_anatomy": by_anatomy,
        "cases_per_region": {r: sum(confusion[r].values()) for r in REGIONS},
        "worst_cases": [
            {
                "anatomy": c.anatomy,
                "contrast": c.contrast,
                "seed": c.seed,
                "slices": int(c.volume.array.shape[0]),
                "coverage": round(c.coverage, 2),
                "region_scores": {k: round(v, 3) for k, v in got.region_scores.items()},
                "enhanced": round(got.enhanced, 3),
            }
            for c, got in rows
            if got.region != GATE_REGION[c.anatomy] or (got.enhanced >= 0.5) != c.contrast
        ][:20],
    }


def real_slices(gate: CtGate) -> list[dict]:
    """What the gate says on the real single CT slices of pydicom's test data."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError:  # pragma: no cover - pydicom always has pydicom.data
        return []
    out = []
    for name in REAL_SLICES:
        try:
            path = get_testdata_file(name)
        except (ValueError, OSError):
            path = None
        if path is None:
            out.append({"file": name, "measured": False, "why": "not installed (pydicom-data)"})
            continue
        refs = read_slice_refs([Path(path)])
        volume = load_volume(plan_volume(refs, f"pydicom-{name}", min_slices=1))
        got = gate.inspect(volume)
        out.append(
            {
                "file": name,
                "measured": True,
                "shape": list(volume.array.shape),
                "pixel_spacing_mm": [round(volume.spacing[1], 4), round(volume.spacing[2], 4)],
                "region": got.region,
                "region_scores": {k: round(v, 3) for k, v in got.region_scores.items()},
                "enhanced": round(got.enhanced, 3),
            }
        )
    return out


def inference_time(gate: CtGate, repeats: int = 5) -> dict:
    """Median wall time of :meth:`CtGate.inspect` on a 300 × 512² chest phantom volume."""
    case = make_region_case("chest", 7, contrast=True)
    r = render_region(case, rows=512, slices=300, slice_spacing_mm=1.0, fov_mm=400.0)
    volume = volume_of(r, "timing")
    gate.inspect(volume)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gate.inspect(volume)
        times.append(time.perf_counter() - t0)
    return {
        "shape": list(volume.array.shape),
        "median_s": round(float(np.median(times)), 4),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- outputs


def write_gate_toml(out: Path, spec: GateSpec) -> None:
    i = spec.input
    windows = ", ".join(f"[{float(c)}, {float(w)}]" for c, w in i.windows)
    text = f"""# CT content gate: body region and intravenous contrast from the pixels (pacsnode.gates.ct)
name = "{spec.name}"
version = "{spec.version}"
kind = "{spec.kind}"
description = "{spec.description}"
synthetic = true
regions = [{", ".join(f'"{r}"' for r in spec.regions)}]   # region head outputs, in order

[input]
slices = {i.slices}                       # axial planes read, evenly along k (all when fewer)
size = {i.size}                        # canvas pixels, centred on the body
mm_per_pixel = {float(i.mm_per_pixel)}               # every plane resampled to this, so anatomy keeps its size
windows = [{windows}]   # (centre, width) HU, one channel each
body_threshold_hu = {float(i.body_threshold_hu)}

[network]                          # MONAI 2D ResNet, basic blocks
block_inplanes = {list(spec.network.block_inplanes)}
layers = {list(spec.network.layers)}
pooling = "{spec.network.pooling}"                # global average and max pooling, concatenated

[weights]
file = "{spec.weights.file}"
sha256 = "{spec.weights.sha256}"
"""
    (out / GATE_FILE).write_text(text, encoding="utf-8")
    if load_gate_spec(out) != spec:
        raise RuntimeError(f"{out / GATE_FILE}: does not read back as written")


def _pct(v: float) -> str:
    return "—" if v != v else f"{100.0 * v:.1f} %"


def write_model_card(out: Path, metrics: dict) -> None:
    h = metrics["held_out"]
    t = metrics["training"]
    regions_rows = "\n".join(
        f"| {r} | {h['cases_per_region'][r]} | {_pct(h['region_accuracy'][r])} | "
        f"{_pct(h['contrast_accuracy'][r])} | "
        f"{_pct(h['contrast_accuracy_by_phase'][r]['enhanced'])} | "
        f"{_pct(h['contrast_accuracy_by_phase'][r]['unenhanced'])} |"
        for r in REGIONS
    )
    anatomy_rows = "\n".join(
        f"| {a} | {GATE_REGION[a]} | {_pct(h['region_accuracy_by_anatomy'][a])} | "
        f"{_pct(h['contrast_accuracy_by_anatomy'][a])} | "
        + " | ".join(str(h["confusion_by_anatomy"][a][r]) for r in REGIONS)
        + " |"
        for a in ANATOMIES
    )
    confusion_rows = "\n".join(
        f"| {r} | " + " | ".join(str(h["confusion"][r][p]) for p in REGIONS) + " |" for r in REGIONS
    )
    real_rows = []
    for s in metrics["real_slices"]:
        if not s["measured"]:
            real_rows.append(f"| `{s['file']}` | not measured: {s['why']} | | |")
            continue
        sc = s["region_scores"]
        real_rows.append(
            f"| `{s['file']}` ({s['shape'][1]}×{s['shape'][2]}, "
            f"{s['pixel_spacing_mm'][0]:g} mm) | {s['region']} | "
            + ", ".join(f"{k} {v:.2f}" for k, v in sc.items())
            + f" | {s['enhanced']:.2f} |"
        )
    timing = metrics["inference_time"]
    anatomy_mix = ", ".join(
        f"{a.replace('_', ' ')} {100 * p:.0f} %" for a, p in zip(ANATOMIES, ANATOMY_P, strict=True)
    )
    cpu = f", {t['cpu_s']:.0f} s of CPU" if "cpu_s" in t else ""
    text = f"""# {NAME} {VERSION} — model card

> **NOT FOR CLINICAL USE.** These weights were trained only on synthetic CT phantoms
> (`pacsnode.phantoms.ctregions`, which draws on `pacsnode.phantoms.ctpa` and
> `pacsnode.phantoms.abdomen`), by `pacsnode.gates.train_ct`. They have never seen a real CT
> in training. The gate exists so that series selection and the CT models need not trust
> BodyPartExamined and ContrastBolusAgent; on real scans its answers are untested beyond
> the two real slices below.

## What it is
- Input: a CT volume as assembled by `pacsnode.volumes` (canonical orientation, HU). The
  header is never read. {metrics["spec"]["input"]["slices"]} axial planes evenly along k (all of
  them when there are fewer, down to one), each resampled (antialiased) to
  {metrics["spec"]["input"]["mm_per_pixel"]:g} mm per pixel whatever its pixel spacing and
  pasted on a {metrics["spec"]["input"]["size"]}² canvas of air centred on the body, in three
  windows (lung −600/1500, soft tissue 40/400, bone 500/2000) scaled to [0, 1].
- Network: MONAI 2D `ResNet` (basic blocks, one per stage, {metrics["spec"]["network"]["block_inplanes"]}
  channels, {metrics["parameters"]:,} parameters) with a region head (chest / abdomen / other)
  and a contrast head (one logit) on the {metrics["feature_dim"]}-dimensional embedding (global
  average and max pooling, concatenated); probabilities averaged over the planes. `features`
  is that embedding averaged over the same planes.
- Weights: `weights.safetensors` (fp32), sha256 in `gate.toml`; the loader refuses any other file.

## What it was trained on (synthetic only)
```
{t["command"]}
```
- {t["steps"]} steps of {t["cases_per_step"]} fresh phantoms × {t["planes_per_case"]} planes
  ({t["phantoms"]:,} phantoms, {t["planes"]:,} planes), case seeds `{t["seed"]}·10⁶ + n`.
  Anatomy drawn {anatomy_mix};
  head, pelvis and lower limb are "other"; contrast half the time:
  - chest: CTPA phantoms without emboli (pulmonary arteries 100–420 HU, aorta 80–280 HU,
    poor-opacification and motion cases included); unenhanced, every blood pool 35–55 HU;
  - abdomen: the kidney model's phantoms in portal venous phase or unenhanced (oral contrast
    in a quarter of both);
  - head: skull, brain, ventricles, skull base, orbits, sinuses, mandible, upper cervical spine;
    enhanced arteries 150–400 HU, dural sinuses 130–240 HU, choroid plexus; pineal and choroid
    calcifications in either phase;
  - pelvis: iliac wings, sacrum, acetabula, femoral heads and necks, rami, bladder, rectum,
    bowel, iliac and femoral vessels; lower limb: thighs, knees and calves with femur, patella,
    tibia, fibula, fat septa and the leg arteries (180–450 HU enhanced) and veins.
- Geometry: matrix 128–256, field of view the body's ×0.9–1.2 (one in ten a tight targeted
  field that cuts the body; heads 200–320 mm), planes anywhere over the region's typical scan
  range. Augmentation: scale ±10 %, shifts of ±8 canvas pixels, left-right flips, a table
  under one plane in three, extra noise (σ ≤ 12 HU), HU gain ±3 % and offset ±8 HU.
  AdamW, lr {t["lr"]:g}, cosine decay; cross-entropy (label smoothing 0.05) + 2 × binary
  cross-entropy; one label per volume for all its planes.
- Time: {t["train_s"]:.0f} s training, {t["total_s"]:.0f} s ({t["total_s"] / 60:.1f} min) wall for
  the whole script{cpu}, {t["device"]}, {t["threads"]} torch thread(s), torch {t["torch"]}
  (sharing two cores with other trainings).

## Held-out results (measured, {h["cases"]} phantom volumes, seed base {metrics["held_out_seed_base"]})
Whole volumes through `CtGate.inspect`: other phantoms than training, random matrix
(128–256), field of view, slice spacing (1.25–5 mm) and coverage (40 % of them the full
typical range, the others 35–100 % of it, so partial scans are included); contrast called
at `enhanced ≥ 0.5`.

| Region | Volumes | Region accuracy | Contrast accuracy | Enhanced called enhanced | Unenhanced called unenhanced |
|---|---|---|---|---|---|
{regions_rows}

Overall: region {_pct(h["region_accuracy_overall"])}, contrast {_pct(h["contrast_accuracy_overall"])}.

By anatomy (predicted region counts in the last three columns):

| Anatomy | Region | Region accuracy | Contrast accuracy | → chest | → abdomen | → other |
|---|---|---|---|---|---|---|
{anatomy_rows}

Confusion (rows: truth, columns: predicted):

| | chest | abdomen | other |
|---|---|---|---|
{confusion_rows}

## Real CT slices (pydicom test data; one slice each, read through `pacsnode.volumes`)
Not ground truth the gate was measured against — what it says on the only real CT at hand.
`CT_small.dcm` is an 85 mm crop around a thoracic vertebra with an enhanced aorta (its header
names Isovue); `693_UNCR.dcm` is an unenhanced head ("5/5mm Plain").

| File | Region | Region scores | Enhanced |
|---|---|---|---|
{chr(10).join(real_rows)}

## Speed
`CtGate.inspect` on a {timing["shape"][0]}×{timing["shape"][1]}×{timing["shape"][2]} volume:
{timing["median_s"] * 1000:.0f} ms median on the CPU with {timing["threads"]} torch thread(s)
(it reads {metrics["spec"]["input"]["slices"]} planes whatever the volume's size).

## Limits
- Phantoms are simple analytic shapes with white noise; real anatomy and texture, arms,
  streaks, metal, and arterial or delayed phases were not in training (the table is only a
  crude band added under some planes).
- No neck, shoulder, heart-only, extremity other than the legs, or whole-body scans; a
  chest-abdomen-pelvis scan gets averaged scores over its planes.
- "Enhanced" means intravenous contrast in the vessels; oral contrast and calcifications are
  in both phases of the training data and should not count.

## Published figures, for comparison only
MI2RLNet (Korean J Radiol 2021) reports accuracy 0.99 for enhanced / non-enhanced chest CT
classification (a ResNet-50 on real CT). This gate's held-out figures are on synthetic
phantoms and are not comparable: they show the phantoms are easy to tell apart, not how the
gate does on a real department's studies. A site validates (or replaces) it on its own.
"""
    (out / "MODEL_CARD.md").write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--cases", type=int, default=8, help="phantoms per step")
    parser.add_argument("--per-case", type=int, default=4, help="planes per phantom")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--test-per-anatomy", type=int, default=20)
    parser.add_argument("--evaluate-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    metrics_path = args.out / "metrics.json"
    if args.evaluate_only:
        previous = json.loads(metrics_path.read_text(encoding="utf-8"))
        training = previous["training"]
    else:
        spec = default_spec()
        net = train(args, spec, log)
        train_s = time.monotonic() - start
        weights = args.out / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
        weights.chmod(0o644)
        spec = default_spec(sha256_file(weights))
        write_gate_toml(args.out, spec)
        command = "python -m pacsnode.gates.train_ct " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
        )
        training = {
            "command": command,
            "seed": args.seed,
            "steps": args.steps,
            "cases_per_step": args.cases,
            "planes_per_case": args.per_case,
            "phantoms": args.steps * args.cases,
            "planes": args.steps * args.cases * args.per_case,
            "lr": args.lr,
            "train_s": round(train_s, 1),
            "threads": args.threads,
            "device": "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "log": log,
        }
    gate = CtGate.load(args.out, torch.device("cpu"))
    base = args.seed + TEST_SEED_OFFSET
    per = {a: args.test_per_anatomy for a in ANATOMIES}
    for a in ("head", "pelvis", "lower_limb"):
        per[a] = max(1, (args.test_per_anatomy * 2) // 3)
    t0 = time.monotonic()
    held = evaluate(gate, held_out_set(base, per))
    print(f"held-out: {held['cases']} volumes in {time.monotonic() - t0:.1f} s", flush=True)
    print(json.dumps({k: held[k] for k in ("region_accuracy", "contrast_accuracy")}, indent=1))
    metrics = {
        "name": NAME,
        "version": VERSION,
        "synthetic": True,
        "spec": json.loads(gate.spec.model_dump_json()),
        "parameters": sum(p.numel() for p in gate.network.parameters()),
        "feature_dim": gate.network.region.in_features,
        "training": training,
        "held_out_seed_base": base,
        "held_out": held,
        "real_slices": real_slices(gate),
        "inference_time": inference_time(gate),
    }
    if not args.evaluate_only:
        training["total_s"] = round(time.monotonic() - start, 1)
        training["cpu_s"] = round(time.process_time(), 1)
    print(json.dumps(metrics["real_slices"], indent=1))
    print(json.dumps(metrics["inference_time"]))
    metrics_path.write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    write_model_card(args.out, metrics)
    print(f"wrote {args.out} in {time.monotonic() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
