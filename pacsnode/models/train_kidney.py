"""Reproducible training of the CT kidney cascade on synthetic abdominal phantoms (no DICOM).

``python -m pacsnode.models.train_kidney --out models/ct-kidney --seed 0``

Train/serve skew: every phantom, rendered by :func:`pacsnode.phantoms.abdomen.render_abdomen`
at a random matrix, field of view, slice spacing (1.5–5 mm) and scan centre, goes through the
serving preprocessing of :mod:`pacsnode.models.kidney`: :func:`coarse_input` for stage 1, and
for stage 2 a box around each kidney, widened like :func:`source_box` widens a stage-1
region (with a random extra margin, so the net also sees boxes that are a little off), through
:func:`fine_input`. Targets are resampled onto the same grids (nearest class after trilinear
resampling of the one-hot labels, the interpolation the serving path uses for probabilities).

Stage 1 (coarse net) learns kidney foreground on whole coarse volumes; stage 2 (fine net)
learns background / kidney / tumour / cyst on 64³ patches of the boxes, half of them centred
on a lesion voxel. Both use MONAI's Dice + cross-entropy loss.

The held-out test (seed base ``seed + 1000``, other spacings drawn from the same ranges) goes
through the serving :meth:`KidneySegmenter.segment` on the source grid and reports Dice per
segment and per class, left/right swaps, and volume errors.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from safetensors.torch import load_file, save_file

from pacsnode.manifest import InputSpec, load_manifest, sha256_file
from pacsnode.models.kidney import (
    FINE_CLASSES,
    MARGIN_MM,
    PATCH,
    SEGMENT_LABELS,
    KidneyNetwork,
    KidneySegmenter,
    coarse_input,
    fine_input,
    pad_to_multiple,
    resample,
)
from pacsnode.models.train_pe import set_manifest_value
from pacsnode.phantoms.abdomen import AbdomenRender, make_abdomen_case, render_abdomen
from pacsnode.volumes import Volume

TEST_SEED_OFFSET = 1000
CASE_STRIDE = 1_000_000
SPACINGS = (1.5, 2.0, 2.5, 3.0, 5.0)
SPACING_P = (0.15, 0.2, 0.3, 0.2, 0.15)
ROWS = (160, 192, 224, 256)
SCAN_MM = (220.0, 300.0)
FOV_MM = (340.0, 440.0)
MIN_DICE_VOXELS = 1
BatchFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def case_seed(base: int, index: int) -> int:
    return base * CASE_STRIDE + index


def random_render(seed: int, rng: np.random.Generator) -> AbdomenRender:
    """One phantom at a random acquisition geometry."""
    case = make_abdomen_case(seed)
    spacing = float(rng.choice(SPACINGS, p=SPACING_P))
    slices = int(math.ceil(rng.uniform(*SCAN_MM) / spacing))
    return render_abdomen(
        case,
        rows=int(rng.choice(ROWS)),
        slices=slices,
        slice_spacing_mm=spacing,
        fov_mm=float(rng.uniform(*FOV_MM)),
        z_centre_mm=case.scan_centre_z + float(rng.uniform(-15.0, 15.0)),
    )


def onehot_resample(classes: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Class map onto ``shape`` the way serving resamples probabilities: trilinear, argmax."""
    onehot = F.one_hot(torch.from_numpy(classes.astype(np.int64)), len(FINE_CLASSES))
    onehot = onehot.permute(3, 0, 1, 2).float()
    return resample(onehot, shape).argmax(dim=0).to(torch.uint8)


def kidney_boxes(
    r: AbdomenRender, rng: np.random.Generator, jitter_mm: float
) -> list[tuple[slice, ...]]:
    """A source-voxel box around each kidney, widened like a stage-1 region (plus jitter)."""
    boxes = []
    for side in (r.left, ~r.left):
        pts = np.argwhere(side & (r.classes > 0))
        if len(pts) == 0:
            continue
        box = []
        for axis, (n, sp) in enumerate(zip(r.classes.shape, r.spacing, strict=True)):
            lo_mm = MARGIN_MM + float(rng.uniform(-0.5, 1.0)) * jitter_mm
            hi_mm = MARGIN_MM + float(rng.uniform(-0.5, 1.0)) * jitter_mm
            lo = max(0, int(pts[:, axis].min()) - math.ceil(lo_mm / sp))
            hi = min(n, int(pts[:, axis].max()) + 1 + math.ceil(hi_mm / sp))
            box.append(slice(lo, hi))
        boxes.append(tuple(box))
    return boxes


@dataclass
class Sample:
    """One training phantom on the two serving grids."""

    coarse_x: torch.Tensor  # (1, k, j, i) windowed, padded to a multiple of 8
    coarse_y: torch.Tensor  # (1, k, j, i) 0/1 kidney foreground, same padding
    fine_x: list[torch.Tensor]  # per kidney box (1, k, j, i), padded to at least PATCH
    fine_y: list[torch.Tensor]  # per kidney box (1, k, j, i) class index


def pad_at_least(t: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad ``(c, k, j, i)`` symmetrically to at least ``size`` (as sliding windows do)."""
    pads: list[int] = []
    for n, s in zip(reversed(t.shape[1:]), reversed(size), strict=True):
        extra = max(0, s - n)
        pads += [extra // 2, extra - extra // 2]
    return F.pad(t, pads) if any(pads) else t


def prepare(seed: int, rng: np.random.Generator, spec: InputSpec) -> Sample:
    r = random_render(seed, rng)
    fg = (r.classes > 0).astype(np.float32)
    cx = coarse_input(r.hu, r.spacing, spec)
    cy = (resample(torch.from_numpy(fg)[None], tuple(cx.shape[1:])) > 0.5).to(torch.uint8)
    fine_x, fine_y = [], []
    for box in kidney_boxes(r, rng, jitter_mm=12.0):
        fx = fine_input(r.hu[box], r.spacing, spec)
        fy = onehot_resample(r.classes[box], tuple(fx.shape[1:]))[None]
        fine_x.append(pad_at_least(fx, PATCH))
        fine_y.append(pad_at_least(fy, PATCH))
    return Sample(
        coarse_x=pad_to_multiple(cx, 8),
        coarse_y=pad_to_multiple(cy, 8),
        fine_x=fine_x,
        fine_y=fine_y,
    )


def random_patch(
    s: Sample, box: int, rng: np.random.Generator, lesion: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A :data:`PATCH` crop of one kidney box, centred on a lesion voxel when asked and any."""
    x, y = s.fine_x[box], s.fine_y[box]
    shape = y.shape[1:]
    centre = None
    if lesion:
        pts = torch.nonzero(y[0] >= 2)
        if len(pts):
            centre = pts[int(rng.integers(len(pts)))].tolist()
    starts = []
    for axis, (n, p) in enumerate(zip(shape, PATCH, strict=True)):
        if centre is None:
            starts.append(int(rng.integers(0, n - p + 1)))
        else:
            c = centre[axis] - p // 2 + int(rng.integers(-p // 4, p // 4 + 1))
            starts.append(int(np.clip(c, 0, n - p)))
    sl = (slice(None), *(slice(a, a + p) for a, p in zip(starts, PATCH, strict=True)))
    return x[sl], y[sl]


def augment(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrast and brightness jitter, and random flips of every axis: neither net tells
    left from right (sides are decided afterwards in patient coordinates), so flips only
    add anatomy the phantoms did not draw."""
    scale = 1.0 + 0.1 * (torch.rand(1, generator=gen).item() - 0.5)
    shift = 0.04 * (torch.rand(1, generator=gen).item() - 0.5)
    x = (x * scale + shift).clamp_(0.0, 1.0)
    dims = [d for d in (1, 2, 3) if torch.rand(1, generator=gen).item() < 0.5]
    return (x.flip(dims), y.flip(dims)) if dims else (x, y)


# ---------------------------------------------------------------- evaluation


def render_volume(r: AbdomenRender, series_uid: str) -> Volume:
    """The render as a served volume: canonical array and its exact LPS affine."""
    sk, sj, si = r.spacing
    affine = np.eye(4)
    affine[0, 0], affine[1, 1], affine[2, 2] = si, sj, -sk
    affine[:3, 3] = (r.x_mm[0], r.y_mm[0], r.z_mm[0])
    return Volume(array=r.hu, affine=affine, spacing=r.spacing, slices=(), series_uid=series_uid)


def dice(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Dice of two masks; None when both are empty (the case says nothing about the class)."""
    total = int(pred.sum()) + int(truth.sum())
    if total < MIN_DICE_VOXELS:
        return None
    return 2.0 * float((pred & truth).sum()) / total


def evaluate(segmenter: KidneySegmenter, n: int, base: int) -> dict:
    """Held-out phantoms through the serving path."""
    per: dict[str, list[float]] = {
        name: [] for name in (*SEGMENT_LABELS, "kidney", "tumour", "cyst")
    }
    agg = {name: [0, 0] for name in per}  # intersection, sum
    swaps = 0
    volume_errors: dict[str, list[float]] = {name: [] for name in SEGMENT_LABELS}
    by_phase: dict[str, dict[str, list[float]]] = {
        phase: {"kidney": [], "tumour": [], "cyst": []} for phase in ("contrast", "plain")
    }
    seconds = []
    for idx in range(n):
        rng = np.random.default_rng([base, idx, 17])
        phase = "contrast" if make_abdomen_case(case_seed(base, idx)).contrast else "plain"
        r = random_render(case_seed(base, idx), rng)
        t0 = time.perf_counter()
        result = segmenter.segment(render_volume(r, f"heldout-{idx}"))
        seconds.append(time.perf_counter() - t0)
        truth = r.masks()
        pred = dict(result.masks)
        truth["kidney"] = truth["left_kidney"] | truth["right_kidney"]
        pred["kidney"] = pred["left_kidney"] | pred["right_kidney"]
        truth["tumour"], pred["tumour"] = truth["kidney_tumour"], pred["kidney_tumour"]
        truth["cyst"], pred["cyst"] = truth["kidney_cyst"], pred["kidney_cyst"]
        for name in per:
            d = dice(pred[name], truth[name])
            if d is not None and truth[name].any():
                per[name].append(d)
                if name in by_phase[phase]:
                    by_phase[phase][name].append(d)
            agg[name][0] += int((pred[name] & truth[name]).sum())
            agg[name][1] += int(pred[name].sum()) + int(truth[name].sum())
        if (pred["left_kidney"] & truth["right_kidney"]).sum() > (
            pred["left_kidney"] & truth["left_kidney"]
        ).sum():
            swaps += 1
        voxel_ml = float(np.prod(r.spacing)) / 1000.0
        for name in SEGMENT_LABELS:
            true_ml = float(truth[name].sum()) * voxel_ml
            if true_ml > 0:
                pred_ml = float(pred[name].sum()) * voxel_ml
                volume_errors[name].append((pred_ml - true_ml) / true_ml)
    return {
        "n": n,
        "seed_base": base,
        "dice_mean_per_case": {k: float(np.mean(v)) if v else None for k, v in per.items()},
        "dice_min_per_case": {k: float(np.min(v)) if v else None for k, v in per.items()},
        "cases_with_class": {k: len(v) for k, v in per.items()},
        "dice_mean_per_case_by_phase": {
            phase: {k: (float(np.mean(v)) if v else None) for k, v in classes.items()}
            for phase, classes in by_phase.items()
        },
        "cases_by_phase": {
            phase: {k: len(v) for k, v in classes.items()} for phase, classes in by_phase.items()
        },
        "dice_aggregate": {k: (2.0 * a / s if s else None) for k, (a, s) in agg.items()},
        "left_right_swaps": swaps,
        "volume_relative_error_median": {
            k: float(np.median(np.abs(v))) if v else None for k, v in volume_errors.items()
        },
        "segment_seconds_median": float(np.median(seconds)),
    }


# ---------------------------------------------------------------- main


def write_model_card(out: Path, metrics: dict, version: str) -> None:
    """The model card, regenerated from this run's metrics."""
    h = metrics["heldout"]
    dm, da, nc = h["dice_mean_per_case"], h["dice_aggregate"], h["cases_with_class"]
    dmin = h["dice_min_per_case"]

    def f(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f}"

    rows = "\n".join(
        f"| {name} | {f(dm[name])} | {f(dmin[name])} | {f(da[name])} | {nc[name]} |"
        for name in (*SEGMENT_LABELS, "kidney", "tumour", "cyst")
    )
    vol = h["volume_relative_error_median"]
    bp, cp = h["dice_mean_per_case_by_phase"], h["cases_by_phase"]
    phase_rows = "\n".join(
        f"| {phase} | "
        + " | ".join(f"{f(bp[phase][c])} ({cp[phase][c]})" for c in ("kidney", "tumour", "cyst"))
        + " |"
        for phase in ("contrast", "plain")
    )
    a = metrics["args"]
    evaluated = (
        f"Evaluated by `{metrics['evaluated_by']}`.\n" if metrics.get("evaluated_by") else ""
    )
    text = f"""# ct-kidney {version} — model card

> **NOT FOR CLINICAL USE.** These weights were trained only on synthetic abdominal CT
> phantoms rendered by `pacsnode.phantoms.abdomen`, by `pacsnode.models.train_kidney`. They
> have never seen a real CT; their outlines and volumes say nothing about real patients. They
> exist so that the node can be built, tested and demonstrated end to end without patient
> data.

## What it is
- A two-stage cascade in the KiTS19 layout (`pacsnode.models.kidney`): stage 1, a MONAI 3D
  `UNet` (channels 8–64, three stride-2 levels, instance norm) on the whole volume at
  ≈ 4 mm, finds the kidney regions; stage 2, a second 3D `UNet` (channels 16–128) on each
  region (widened by {MARGIN_MM:.0f} mm) at ≈ 2 mm with sliding-window inference on
  {PATCH[0]}³ patches, gives background / kidney / tumour / cyst. Probabilities are
  resampled back onto the source voxels and arg-maxed there, so the masks lie exactly on the
  source slices. Left and right are decided in patient coordinates (LPS x of each kidney
  component against the body's centroid), whatever the acquisition.
- Input: abdomen window WL 100 / WW 600 scaled to [0, 1]; any slice spacing.
- Segments (SNOMED CT): left kidney 18639004, right kidney 9846003, kidney tumour
  (neoplasm 108369006, site kidney 64033007), kidney cyst (cyst 367643001). A kidney segment
  includes its tumour and cysts (KiTS convention).
- Weights: `weights.safetensors` (fp32, {metrics["weights_mib"]:.2f} MiB), sha256 in
  `manifest.toml`; the loader refuses any other file.

## How it was trained
```
{metrics["command"]}
```
- {a["n_train"]} training phantoms (case seeds `{a["seed"]}·10⁶ + i`), each rendered at a
  random {"/".join(str(r) for r in ROWS)}-pixel matrix, {FOV_MM[0]:.0f}–{FOV_MM[1]:.0f} mm
  field of view, {", ".join(str(s) for s in SPACINGS)} mm slice spacing and
  {SCAN_MM[0]:.0f}–{SCAN_MM[1]:.0f} mm scan range, through the serving preprocessing.
- Stage 1: {a["coarse_steps"]} steps on whole coarse volumes; stage 2: {a["fine_steps"]}
  steps of {a["batch"]} patches of {PATCH[0]}³ ({a["lesion_fraction"]:.0%} centred on a lesion); Adam, lr
  {a["lr"]}, cosine decay, Dice + cross-entropy (class weights {a["class_weights"]}, Dice
  over the batch); brightness/contrast jitter and random flips of every axis (neither net
  tells left from right: sides are decided in patient coordinates afterwards).
- Time: {metrics["seconds"]:.0f} s ({metrics["seconds"] / 60:.1f} min) wall for the whole
  script, {metrics["device"]}, {metrics["torch_threads"]} torch threads, torch
  {metrics["torch"]}. Full numbers in `metrics.json`.

## Held-out results (measured, {h["n"]} phantoms, seed base {h["seed_base"]})
{evaluated}
Through the serving path (`KidneySegmenter.segment`) on the source grid. "Per case" averages
the Dice of the cases that have the class; "aggregate" pools all voxels of all cases (false
positives in cases without the class count there).

| Segment | Dice per case (mean) | Dice per case (min) | Dice aggregate | Cases |
|---|---|---|---|---|
{rows}

By phase (Dice per case, mean; cases in brackets):

| Phase | kidney | tumour | cyst |
|---|---|---|---|
{phase_rows}

Unenhanced phantoms draw the tumour at 28–45 HU against parenchyma at 30–40 HU: isodense,
as many renal cell carcinomas are without contrast, so the tumour outline is not in the
image and the model cannot find it; the node prefers a contrast series when a study has one
(`prefer_contrast` in `manifest.toml`), and an SR of an unenhanced series saying "no tumour"
means only that none was visible.

- Targets (issue 5): kidney ≥ 0.90 ({"met" if (dm["kidney"] or 0) >= 0.9 else "NOT met"}),
  tumour ≥ 0.75 ({"met" if (dm["tumour"] or 0) >= 0.75 else "NOT met"} over all phantoms;
  {"met" if (bp["contrast"]["tumour"] or 0) >= 0.75 else "NOT met"} on contrast-enhanced ones).
- Left/right swaps: {h["left_right_swaps"]} of {h["n"]}.
- Median absolute volume error: left kidney {f(vol["left_kidney"])}, right kidney
  {f(vol["right_kidney"])}, tumour {f(vol["kidney_tumour"])}, cyst {f(vol["kidney_cyst"])}
  (fractions of the true volume).
- Segmentation time (median, {metrics["device"]}): {h["segment_seconds_median"]:.2f} s per
  phantom volume.

For scale only: on real CT (KiTS19) the winner reached kidney Dice 0.974 and tumour 0.851;
phantoms are far easier and these numbers are not comparable.

## What the phantoms model, and what they do not
See the docstring of `pacsnode/phantoms/abdomen.py`: body outline, fat, muscle, liver,
spleen, spine, aorta and IVC, two bean-shaped kidneys with enhancing cortex and medulla at
varying positions and sizes, solid tumours of varying size and density, simple cysts, some
single-kidney cases, contrast and non-contrast. Not modelled: real anatomy and its
variability, renal pelvis and ureter, complex cysts, infiltrative tumours, stones, streak
artefacts, partial-volume slice profiles.

## Using other weights
Replace `weights.safetensors` with a state dict of `pacsnode.models.kidney.KidneyNetwork`,
update `[weights] sha256` (the loader refuses mismatches), this card and the manifest's
`synthetic` flag after a validation on real data of your own.
"""
    (out / "MODEL_CARD.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=192)
    parser.add_argument("--n-test", type=int, default=48)
    parser.add_argument("--coarse-steps", type=int, default=500)
    parser.add_argument("--fine-steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lesion-fraction", type=float, default=0.6)
    parser.add_argument(
        "--class-weights",
        default="1,1,2,2",
        help="loss weight of background, kidney, tumour, cyst",
    )
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from the weights.safetensors in this folder (continued training)",
    )
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="re-run the held-out evaluation of the weights in --out and rewrite the card",
    )
    parser.add_argument("--version", default="0.1.0-phantom")
    args = parser.parse_args(argv)
    command = "python -m pacsnode.models.train_kidney " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    started = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng([args.seed, 5])
    manifest = load_manifest(args.out)
    spec = manifest.input
    if args.evaluate_only:
        metrics = json.loads((args.out / "metrics.json").read_text(encoding="utf-8"))
        segmenter = KidneySegmenter.load(args.out, device)
        metrics["heldout"] = evaluate(segmenter, args.n_test, args.seed + TEST_SEED_OFFSET)
        metrics["evaluated_by"] = command
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", "utf-8")
        write_model_card(args.out, metrics, metrics["args"]["version"])
        print(json.dumps(metrics["heldout"]["dice_mean_per_case_by_phase"]))
        return 0

    def log(msg: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {msg}", flush=True)

    samples = [
        prepare(case_seed(args.seed, i), np.random.default_rng([args.seed, i, 11]), spec)
        for i in range(args.n_train)
    ]
    boxes = [(s_i, b) for s_i, s in enumerate(samples) for b in range(len(s.fine_x))]
    lesion_boxes = [(s_i, b) for s_i, b in boxes if bool((samples[s_i].fine_y[b] >= 2).any())]
    log(
        f"prepared {len(samples)} phantoms: {len(boxes)} kidney boxes, {len(lesion_boxes)} with a lesion"
    )

    network = KidneyNetwork()
    init = None
    if args.init is not None:
        init_weights = args.init / "weights.safetensors"
        network.load_state_dict(load_file(str(init_weights)), strict=True)
        init = {"weights": str(init_weights), "sha256": sha256_file(init_weights)}
        previous = args.init / "metrics.json"
        if previous.is_file():
            init["metrics"] = json.loads(previous.read_text(encoding="utf-8"))
        log(f"starting from {init_weights} ({init['sha256'][:12]})")
    class_weights = torch.tensor([float(w) for w in args.class_weights.split(",")])
    coarse_loss = DiceCELoss(to_onehot_y=True, softmax=True)
    # Dice over the whole batch: a class absent from one patch does not make its loss noisy
    fine_loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, weight=class_weights)

    def train(
        net: torch.nn.Module, steps: int, batch_fn: BatchFn, loss_fn: DiceCELoss, what: str
    ) -> None:
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=args.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        running = 0.0
        for step in range(steps):
            x, y = batch_fn(step)
            loss = loss_fn(net(x.to(device)), y.to(device).long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = float(loss.detach())
            running = 0.98 * running + 0.02 * value if step else value
            if step % 100 == 0 or step == steps - 1:
                log(f"{what} step {step}: loss {running:.4f}")
        net.eval()

    def coarse_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = samples[int(rng.integers(len(samples)))]
        x, y = augment(s.coarse_x, s.coarse_y, gen)
        return x[None], y[None]

    def fine_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for _ in range(args.batch):
            lesion = bool(lesion_boxes) and rng.random() < args.lesion_fraction
            pool = lesion_boxes if lesion else boxes
            s_i, b = pool[int(rng.integers(len(pool)))]
            x, y = augment(*random_patch(samples[s_i], b, rng, lesion), gen)
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.stack(ys)

    train(network.coarse, args.coarse_steps, coarse_batch, coarse_loss, "coarse")
    train(network.fine, args.fine_steps, fine_batch, fine_loss, "fine")

    weights = args.out / "weights.safetensors"
    state = {k: v.contiguous() for k, v in network.state_dict().items()}
    save_file(state, str(weights))
    set_manifest_value(args.out / "manifest.toml", "weights", "sha256", f'"{sha256_file(weights)}"')
    segmenter = KidneySegmenter.load(args.out, device)
    log("evaluating held-out phantoms")
    heldout = evaluate(segmenter, args.n_test, args.seed + TEST_SEED_OFFSET)
    metrics = {
        "command": command,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "heldout": heldout,
        "init": init,
        "seconds": time.time() - started,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "weights_mib": weights.stat().st_size / 2**20,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    write_model_card(args.out, metrics, args.version)
    log(json.dumps(heldout["dice_mean_per_case"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
