"""Reproducible training of the CT PE model on synthetic CTPA phantoms (no DICOM involved).

``python -m pacsnode.models.train_pe --out models/ct-pe --seed 0``

Train/serve skew: every phantom goes through :func:`pacsnode.models.pe.preprocess_volume`
(window, central 280 mm at a fixed scale, z-resampling to 2.5 mm) exactly as a served volume
does, from HU volumes rendered by :func:`pacsnode.phantoms.ctpa.render_canonical_annotated`
at random matrix sizes, slice spacings (1.25–3 mm), fields of view and scan ranges.

Stage 1 trains the EfficientNet-B0 slice encoder: first (1a) on 64-pixel crops — half around
an embolus, some on the ventricles (RV ≥ LV), the rest elsewhere — with labels from the
embolus pixels and the encoder's where map (which 16-pixel cells hold one; crops are a third
of the cost of a plane, and the map teaches *where* to look); then (1b) on whole planes, half
with an embolus and most others at the same heights, with auxiliary per-slice targets
(embolus site and age, heart level, RV ≥ LV, indeterminate study) so that the embedding
carries what the exam head needs. Stage 2 freezes the encoder, embeds every plane of every
training exam once, and trains the GRU exam head with the RSNA-weighted exam loss plus the
per-slice loss.

The held-out test (seed base ``seed + 1000``) goes through the serving
:meth:`PEClassifier.predict_array`, including the consistency step, and reports the RSNA
weighted log loss and per-label AUROC.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import re
import shlex
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

from pacsnode.errors import ManifestError
from pacsnode.manifest import MANIFEST_FILE, InputSpec, load_manifest, sha256_file
from pacsnode.models.pe import (
    CROP_MM,
    EXAM_LABELS,
    IMAGE_LABEL,
    RSNA_EXAM_WEIGHTS,
    RSNA_IMAGE_WEIGHT,
    SLICE_TARGETS,
    Z_STEP_MM,
    PEClassifier,
    PENetwork,
    build_network,
    consistency_violations,
    network_input,
    preprocess_volume,
    slice_features,
)
from pacsnode.phantoms.ctpa import (
    CanonicalRender,
    CtpaCase,
    emboli_mask,
    make_ctpa_case,
    render_canonical_annotated,
)

TEST_SEED_OFFSET = 1000
HEAD_SEED_OFFSET = 3000
CASE_STRIDE = 1_000_000
SPACINGS = (1.25, 2.0, 2.5, 3.0)
SPACING_P = (0.25, 0.2, 0.35, 0.2)
TRAIN_ROWS = (160, 192, 256)
SITE_TARGET = {
    "trunk": "central",
    "left_main": "left",
    "left_lobar": "left",
    "right_main": "right",
    "right_lobar": "right",
}
TARGET_WEIGHT = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0])
DENSE_CELL_PX = 16
"""Pixels per where-map cell (stride 16)."""
CROP_PX = 64
MIN_CROP_PIXELS = 3
ARTERY_LEVELS = (-80.0, 60.0)
"""Plane heights (mm from the pulmonary bifurcation, unscaled) where emboli can lie; hard
negatives come from here so the encoder cannot learn "this is the artery level"."""
HARD_NEGATIVE_FRACTION = 0.75


def case_seed(base: int, index: int) -> int:
    return base * CASE_STRIDE + index


@dataclass
class Exam:
    """One phantom prepared for training: planes, per-plane targets, exam truth."""

    case: CtpaCase
    planes: torch.Tensor  # (m, s, s) float16 in [0, 1]
    targets: np.ndarray  # (m, T) float32 in [0, 1]
    mask: np.ndarray  # (m, T) float32: 1 where the target is defined
    exam: np.ndarray  # (9,) float32
    masks: dict[int, np.ndarray]  # plane -> (s, s) uint8 embolus pixels: 1 acute, 2 chronic
    heart_px: tuple[float, float]  # (row, column) of the ventricles' midpoint on the network grid
    artery_level: np.ndarray  # (m,) bool: plane at the levels emboli can occupy


def random_render(
    seed: int, rng: np.random.Generator, rows_choices: tuple[int, ...]
) -> tuple[CtpaCase, CanonicalRender, tuple[float, float, float]]:
    """A random case rendered with random geometry; retries the default range if the
    jittered one misses an embolus."""
    case = make_ctpa_case(seed)
    spacing = float(rng.choice(SPACINGS, p=SPACING_P))
    rows = int(rng.choice(rows_choices))
    slices = int(round(float(rng.uniform(150, 230)) / spacing))
    fov = case.fov_mm * float(rng.uniform(0.95, 1.15))
    z_centre = case.scan_centre_z + float(rng.uniform(-12, 12))
    try:
        r = render_canonical_annotated(
            case,
            rows=rows,
            slices=slices,
            slice_spacing_mm=spacing,
            fov_mm=fov,
            z_centre_mm=z_centre,
        )
    except ValueError:
        r = render_canonical_annotated(
            case, rows=rows, slices=slices, slice_spacing_mm=spacing, fov_mm=fov
        )
    sp = fov / rows
    return case, r, (spacing, sp, sp)


def source_targets(case: CtpaCase, r: CanonicalRender) -> tuple[np.ndarray, np.ndarray]:
    """Per-source-slice auxiliary targets (k, T) and their mask."""
    emb = r.embolus_slices
    k = emb.shape[0]
    t = np.zeros((k, len(SLICE_TARGETS)), dtype=np.float32)
    col = {name: i for i, name in enumerate(SLICE_TARGETS)}
    t[:, col["pe_present_on_image"]] = r.slice_truth
    for e_idx, e in enumerate(case.emboli):
        on = emb[:, e_idx]
        t[on, col[SITE_TARGET[e.site]]] = 1.0
        t[on, col[e.kind]] = 1.0
    t[:, col["indeterminate"]] = case.truth["indeterminate"]
    vent = r.ventricle_slices.astype(np.float32)
    t[:, col["ventricles"]] = vent
    t[:, col["rv_gte_lv"]] = float(case.rv_lv_ratio >= 1.0)
    mask = np.ones_like(t)
    mask[:, col["rv_gte_lv"]] = vent
    return t, mask


def embolus_masks(case: CtpaCase, plane_z: np.ndarray, size: int) -> dict[int, np.ndarray]:
    """Embolus pixels of each plane on the network's grid (the central :data:`CROP_MM`),
    bit 1 acute, bit 2 chronic; planes without emboli are left out."""
    grid = (np.arange(size) + 0.5) * CROP_MM / size - CROP_MM / 2.0
    by_kind = [
        (bit, dataclasses.replace(case, emboli=tuple(e for e in case.emboli if e.kind == kind)))
        for bit, kind in ((1, "acute"), (2, "chronic"))
    ]
    out: dict[int, np.ndarray] = {}
    for m, z in enumerate(plane_z):
        mask = np.zeros((size, size), dtype=np.uint8)
        for bit, sub in by_kind:
            if sub.emboli:
                mask[emboli_mask(sub, grid, grid, float(z))] |= bit
        if mask.any():
            out[m] = mask
    return out


def cells(mask: np.ndarray, cell: int = DENSE_CELL_PX) -> np.ndarray:
    """Which ``cell``-pixel squares of a mask hold an embolus (the where map's target)."""
    h, w = mask.shape[-2] // cell, mask.shape[-1] // cell
    return np.asarray((mask > 0).reshape(*mask.shape[:-2], h, cell, w, cell).any(axis=(-3, -1)))


def heart_pixel(case: CtpaCase, size: int) -> tuple[float, float]:
    """Network-grid (row, column) of the midpoint between the RV and LV centres."""
    rv = next(b for b in case.blobs if b.name == "rv").centre
    lv = next(b for b in case.blobs if b.name == "lv").centre
    scale = CROP_MM / size
    x, y = (rv[0] + lv[0]) / 2.0, (rv[1] + lv[1]) / 2.0
    return (y + CROP_MM / 2.0) / scale - 0.5, (x + CROP_MM / 2.0) / scale - 0.5


def prepare_exam(seed: int, rng: np.random.Generator, spec: InputSpec) -> Exam:
    case, r, spacing = random_render(seed, rng, TRAIN_ROWS)
    planes, src, dst = preprocess_volume(r.hu, spacing, spec)
    t_src, m_src = source_targets(case, r)
    targets = np.stack([np.interp(dst, src, t_src[:, j]) for j in range(t_src.shape[1])], axis=1)
    mask = np.stack([np.interp(dst, src, m_src[:, j]) for j in range(m_src.shape[1])], 1) > 0.5
    plane_z = r.z_mm[0] - dst
    level = (plane_z - case.centre[2]) / case.scale
    return Exam(
        case=case,
        planes=planes.to(torch.float16),
        targets=targets.astype(np.float32),
        mask=mask.astype(np.float32),
        exam=np.array([case.truth[name] for name in EXAM_LABELS], dtype=np.float32),
        masks=embolus_masks(case, plane_z, spec.size),
        heart_px=heart_pixel(case, spec.size),
        artery_level=(level > ARTERY_LEVELS[0]) & (level < ARTERY_LEVELS[1]),
    )


def embed_exam(
    net: PENetwork, planes: torch.Tensor, spec: InputSpec, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-encoder embeddings and slice features of every plane."""
    embs, logits = [], []
    with torch.inference_mode():
        for start in range(0, planes.shape[0], batch):
            index = torch.arange(start, min(planes.shape[0], start + batch))
            e, o, w = net.encoder(network_input(planes, index, spec))
            embs.append(e)
            logits.append(slice_features(o, w))
    return torch.cat(embs).clone(), torch.cat(logits).clone()


def shift_augment(x: torch.Tensor, gen: torch.Generator, max_px: int) -> torch.Tensor:
    """Random in-plane translation (per batch), no flips: laterality is a label. The dense
    targets are 16-pixel cells, so shifts of a few pixels leave them valid."""
    if max_px <= 0:
        return x
    dy, dx = (int(v) for v in torch.randint(-max_px, max_px + 1, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


# ---------------------------------------------------------------- metrics


def _bce(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-7, 1 - 1e-7)
    return -(y * np.log(q) + (1 - y) * np.log(1 - q))


def rsna_weighted_log_loss(
    exam_y: np.ndarray, exam_p: np.ndarray, image_y: list[np.ndarray], image_p: list[np.ndarray]
) -> float:
    """Σ w·BCE / Σ w over exams; image weight 0.07361963 × fraction of positive images."""
    w = np.array([RSNA_EXAM_WEIGHTS[name] for name in EXAM_LABELS])
    num = float((_bce(exam_y, exam_p) * w).sum())
    den = float(w.sum() * len(exam_y))
    for y, p in zip(image_y, image_p, strict=True):
        q = float(y.mean()) if y.size else 0.0
        num += float((RSNA_IMAGE_WEIGHT * q * _bce(y, p)).sum())
        den += RSNA_IMAGE_WEIGHT * q * y.size
    return num / den


def _auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    if y.min() == y.max():
        return None
    return float(roc_auc_score(y, p))


# ---------------------------------------------------------------- outputs


def set_manifest_value(manifest_path: Path, table: str, key: str, value: str) -> None:
    """Replace ``key = ...`` inside ``[table]`` keeping the rest of the file as written."""
    lines = manifest_path.read_text(encoding="utf-8").splitlines(keepends=True)
    current = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):
            current = stripped.split("#")[0].strip()
        elif current == f"[{table}]" and re.match(rf"{key}\s*=", stripped):
            comment = line[line.index("#") :].rstrip("\n") if "#" in line else ""
            text = f"{key} = {value}"
            if comment:
                text = f"{text:<33}{comment}"
            lines[i] = text + "\n"
            break
    else:
        raise ManifestError(f"{manifest_path}: no {key} in a [{table}] table")
    new_text = "".join(lines)
    tomllib.loads(new_text)
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(new_text, encoding="utf-8")
    tmp.replace(manifest_path)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def write_model_card(out: Path, metrics: dict, version: str) -> None:
    """The model card, regenerated from this run's metrics."""
    auroc = metrics["heldout_auroc"]
    acc = metrics["heldout_accuracy_at_0.5"]
    pos = metrics["test_positives"]
    rows = [
        f"| {name} | {_fmt(auroc[name])} | {acc[name]:.3f} | {pos[name]} |"
        for name in [IMAGE_LABEL, *EXAM_LABELS]
    ]
    weak = [name for name in [IMAGE_LABEL, *EXAM_LABELS] if (auroc[name] or 0.0) < 0.9]
    weak_text = (
        "Labels below AUROC 0.90 on the held-out phantoms: "
        + ", ".join(f"`{n}` ({_fmt(auroc[n])})" for n in weak)
        + ". Treat them as weak even on phantoms."
        if weak
        else "Every label reached AUROC ≥ 0.90 on the held-out phantoms."
    )
    a = metrics["args"]
    text = f"""# ct-pe {version} — model card

> **NOT FOR CLINICAL USE.** These weights were trained only on synthetic CT pulmonary
> angiography phantoms rendered by `pacsnode.phantoms.ctpa`, by
> `pacsnode.models.train_pe`. They have never seen a real CT, and their outputs say nothing
> about real patients. They exist so that the node can be built, tested and demonstrated
> end to end without patient data.

## What it is
- Layout of the RSNA STR PE winners: a 2D slice encoder (MONAI
  `EfficientNetBN("efficientnet-b0", spatial_dims=2, in_channels=3)`, 128-d embedding and
  {len(SLICE_TARGETS)} per-slice logits; batch-norm momentum 0.1, no stochastic depth, global
  max pooling; plus an 8×8 "where" map on the stride-16 features whose maxima left and right
  of the midline tell the exam head on which side an embolus was seen) over three
  neighbouring planes, and a bidirectional GRU exam head (hidden 64) giving refined
  per-slice `pe_present_on_image` and the nine exam labels.
- Input: `pacsnode.models.pe.preprocess_volume` — PE window WL 100 / WW 700; the central
  {CROP_MM:.0f} mm square of each slice (around the reconstruction centre) resampled to
  {metrics["input_size"]}×{metrics["input_size"]} (antialiased, {CROP_MM / metrics["input_size"]:.2f} mm per
  pixel whatever the field of view; a smaller field is padded with air); planes resampled
  along z to {Z_STEP_MM} mm; channels = the plane and its neighbours at ±{Z_STEP_MM} mm;
  mean/std 0.5. Per-slice outputs are interpolated back to every source slice. The same
  function is used in training. Anything outside the central {CROP_MM:.0f} mm (the lateral
  lung periphery of a large patient, an off-centre reconstruction) is not seen.
- Every output is made consistent with the RSNA label rules by
  `pacsnode.models.pe.enforce_consistency` (smallest nudges to 0.5 ± 0.001); thresholds are
  0.5 because those rules are defined at 0.5.
- Accepts: CT Image Storage / Enhanced CT, one chest series per study (see
  `manifest.toml`).
- Weights: `weights.safetensors` (fp32, {metrics["weights_mib"]:.1f} MiB), sha256 in
  `manifest.toml`; the loader refuses any other file.
- Codes: `pe_present_on_image` is SNOMED CT 59282003 "Pulmonary embolism"; the exam labels
  have no standard codes and use the local scheme `99PACSNODE` (`pe-negative`,
  `pe-indeterminate`, `pe-chronic`, `pe-acute-and-chronic`, `pe-central`, `pe-left`,
  `pe-right`, `rv-lv-gte-1`, `rv-lv-lt-1`), declared in every SR that uses them.

## How it was trained
```
{metrics["command"]}
```
- Training exams: seed {a["seed"]}, case seeds `{a["seed"]}·10⁶ + i` for i < {a["n_train"]}
  (stage 1 and 2) and `({a["seed"]}+{HEAD_SEED_OFFSET})·10⁶ + i` for i < {a["n_head_extra"]}
  (stage 2 only, so the head also sees embeddings of exams the encoder never trained on).
  Each phantom is rendered at a random {"/".join(str(r) for r in TRAIN_ROWS)}-pixel matrix,
  {", ".join(str(s) for s in SPACINGS)} mm slice spacing, 150–230 mm scan range and field of
  view, and goes through the serving preprocessing.
- Stage 1a: {a["crop_steps"]} steps of {a["crop_batch"]} crops of {CROP_PX}×{CROP_PX} pixels
  (half around an embolus, an eighth on the ventricles, an eighth elsewhere on planes with an
  embolus, a quarter on artery-level planes without), AdamW lr {a["lr"]} one-cycle; targets
  from the embolus pixels (embolus present, acute, chronic), RV ≥ LV on the ventricle crops,
  and the where map (16-pixel cells on stride-16 features). Crops cost a third of a full
  plane, so the encoder sees three times as many examples in the same time.
- Stage 1b: {a["full_steps"]} steps of {a["batch_size"]} whole planes (half with an embolus,
  most of the others at artery level), lr {a["full_lr"]}, random shifts of a few pixels (no
  flips: laterality is a label), BCE on all {len(SLICE_TARGETS)} per-slice targets plus the
  where map.
- Stage 2: encoder frozen, every plane embedded once; GRU head {a["head_epochs"]} epochs with
  the RSNA exam weights plus the per-slice loss.
- Time: {metrics["seconds"]:.0f} s ({metrics["seconds"] / 60:.1f} min) wall for the whole
  script, {metrics["device"]}, {metrics["torch_threads"]} torch threads, torch
  {metrics["torch"]}. Full numbers in `metrics.json`.

## Held-out results (measured, {metrics["n_test"]} phantoms, seed base {metrics["test_seed_base"]})
Through the serving path (`PEClassifier.predict_array`, consistency enforced), test
phantoms at 256×256, 1.25–3 mm spacing.

- RSNA weighted log loss: **{metrics["rsna_weighted_log_loss"]:.4f}** (lower is better;
  the RSNA 2020 winners reached ≈ 0.15 on real CT — not comparable, these are phantoms).
- Consistency violations after enforcement: {metrics["consistency_violations"]}.

| Label | AUROC | Accuracy at 0.5 | Positives |
|---|---|---|---|
{chr(10).join(rows)}

`pe_present_on_image` counts slices ({metrics["n_test_slices"]} in all); the other rows count
exams. {weak_text}
These numbers measure how well the network separates *our phantoms*; they are not comparable
with results on the RSNA STR PE data.

## What the phantoms model, and what they do not
Modelled: body outline, subcutaneous fat, chest-wall muscle, ribs, sternum, vertebrae with
discs and spinal canal, lungs (≈ −850 HU, gravity gradient) with apices and diaphragm domes,
liver and upper abdomen, mediastinal fat, trachea and bronchi, oesophagus, heart chambers
(RV:LV in-plane diameter ratio 0.6–0.9 or 1.1–1.5) with myocardium and pericardial fat,
aorta with arch vessels, SVC and brachiocephalic veins (dense contrast), IVC, pulmonary veins,
the pulmonary trunk, main, lobar and peripheral arteries (250–420 HU). Emboli (30–85 HU):
acute central filling defects (sometimes occlusive) and chronic eccentric wall-adherent
thrombi (some calcified) in the trunk (central) or the left/right main or lobar arteries.
Indeterminate studies: poor opacification (arteries 100–150 HU) or strong motion ghosting.
Gaussian noise 8–25 HU.

Not modelled: real anatomy and its variability, segmental and subsegmental emboli, mixing
and flow artefacts, streaks from dense contrast, lung disease, pleural effusion, lines and
devices, partial-volume slice profiles, breathing stair-steps. A real CTPA is far harder.

## Using other weights
Replace `weights.safetensors` with a state dict of `pacsnode.models.pe.PENetwork`, update
`[weights] sha256` (the loader refuses mismatches), this card, the manifest's `synthetic`
flag and the thresholds from a validation on real data of your own.
"""
    (out / "MODEL_CARD.md").write_text(text, encoding="utf-8")


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=240)
    parser.add_argument("--n-head-extra", type=int, default=60)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--crop-steps", type=int, default=1100)
    parser.add_argument("--crop-batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--full-steps", type=int, default=180)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--full-lr", type=float, default=1e-3)
    parser.add_argument("--dense-weight", type=float, default=1.0)
    parser.add_argument("--head-epochs", type=int, default=60)
    parser.add_argument("--head-lr", type=float, default=2e-3)
    parser.add_argument("--version", default="0.1.0-phantom")
    args = parser.parse_args(argv)
    command = "python -m pacsnode.models.train_pe " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )

    started = time.time()
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    torch.set_num_threads(2)
    manifest = load_manifest(args.out)
    spec = manifest.input.model_copy(update={"size": args.size})
    gen = torch.Generator().manual_seed(args.seed)

    def log(msg: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {msg}", flush=True)

    # --- stage-1 data
    exams = [
        prepare_exam(case_seed(args.seed, i), np.random.default_rng([args.seed, i, 11]), spec)
        for i in range(args.n_train)
    ]
    pos_idx: list[tuple[int, int]] = []
    neg_idx: list[tuple[int, int]] = []
    hard_idx: list[tuple[int, int]] = []
    for e_i, ex in enumerate(exams):
        for m in range(ex.planes.shape[0]):
            if ex.targets[m, 0] >= 0.5:
                pos_idx.append((e_i, m))
            else:
                neg_idx.append((e_i, m))
                if ex.artery_level[m]:
                    hard_idx.append((e_i, m))
    log(
        f"rendered {len(exams)} training exams: {len(pos_idx)} planes with an embolus, "
        f"{len(neg_idx)} without ({len(hard_idx)} of them at artery level)"
    )
    mask_planes = [(e_i, m) for e_i, ex in enumerate(exams) for m in ex.masks]
    col = {name: i for i, name in enumerate(SLICE_TARGETS)}
    heart_planes = [
        (e_i, m)
        for e_i, ex in enumerate(exams)
        for m in range(ex.planes.shape[0])
        if ex.targets[m, col["ventricles"]] >= 0.5
    ]

    def plane_input(e_i: int, m: int) -> torch.Tensor:
        return network_input(exams[e_i].planes, torch.tensor([m]), spec)

    def crop_batch(
        n: int, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """64-pixel crops: half around an embolus, an eighth on the ventricles (RV ≥ LV),
        an eighth elsewhere on planes with an embolus, a quarter on artery-level planes
        without; embolus labels from the embolus pixels."""
        size = spec.size
        xs, ys, ws, ds = [], [], [], []
        for k in range(n):
            u = int(torch.randint(0, 1 << 30, (1,), generator=gen))
            rng = np.random.default_rng([args.seed, step, k, u])
            rv_target, rv_weight = 0.0, 0.0
            if k < n // 2:
                e_i, m = mask_planes[int(rng.integers(len(mask_planes)))]
                mask = exams[e_i].masks[m]
                pts = np.argwhere(mask > 0)
                r, c = pts[int(rng.integers(len(pts)))]
                r0 = int(np.clip(r - rng.integers(8, CROP_PX - 8), 0, size - CROP_PX))
                c0 = int(np.clip(c - rng.integers(8, CROP_PX - 8), 0, size - CROP_PX))
            elif k < 5 * n // 8:
                e_i, m = heart_planes[int(rng.integers(len(heart_planes)))]
                ex = exams[e_i]
                mask = ex.masks.get(m, np.zeros((size, size), np.uint8))
                hr, hc = ex.heart_px
                r0 = int(np.clip(hr - CROP_PX / 2 + rng.integers(-8, 9), 0, size - CROP_PX))
                c0 = int(np.clip(hc - CROP_PX / 2 + rng.integers(-8, 9), 0, size - CROP_PX))
                rv_target, rv_weight = float(ex.targets[m, col["rv_gte_lv"]]), 1.0
            elif k < 3 * n // 4:
                e_i, m = mask_planes[int(rng.integers(len(mask_planes)))]
                mask = exams[e_i].masks[m]
                r0, c0 = (int(v) for v in rng.integers(8, size - CROP_PX - 8, 2))
            else:
                e_i, m = hard_idx[int(rng.integers(len(hard_idx)))]
                mask = exams[e_i].masks.get(m, np.zeros((size, size), np.uint8))
                r0, c0 = (int(v) for v in rng.integers(8, size - CROP_PX - 8, 2))
            window = mask[r0 : r0 + CROP_PX, c0 : c0 + CROP_PX]
            counts = [int((window > 0).sum()), int((window & 1).sum()), int((window & 2).sum())]
            xs.append(plane_input(e_i, m)[:, :, r0 : r0 + CROP_PX, c0 : c0 + CROP_PX])
            ys.append([float(c >= MIN_CROP_PIXELS) for c in counts] + [rv_target])
            ws.append([0.0 if 0 < c < MIN_CROP_PIXELS else 1.0 for c in counts] + [rv_weight])
            ds.append(cells(window))
        return (
            torch.cat(xs).contiguous(memory_format=torch.channels_last),
            torch.tensor(ys),
            torch.tensor(ws),
            torch.from_numpy(np.stack(ds)).float().unsqueeze(1),
        )

    def plane_batch(
        pairs: list[tuple[int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        empty = np.zeros((spec.size, spec.size), np.uint8)
        xs, ys, ms, ds = [], [], [], []
        for e_i, m in pairs:
            ex = exams[e_i]
            xs.append(plane_input(e_i, m))
            ys.append(ex.targets[m])
            ms.append(ex.mask[m])
            ds.append(cells(ex.masks.get(m, empty)))
        return (
            torch.cat(xs).contiguous(memory_format=torch.channels_last),
            torch.from_numpy(np.stack(ys)),
            torch.from_numpy(np.stack(ms)),
            torch.from_numpy(np.stack(ds)).float().unsqueeze(1),
        )

    # --- stage 1: slice encoder with its where map
    net = build_network()
    net.encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    params = list(net.encoder.parameters())
    dense_pos_weight = torch.tensor(5.0)
    crop_cols = [
        SLICE_TARGETS.index(n) for n in ("pe_present_on_image", "acute", "chronic", "rv_gte_lv")
    ]
    crop_w = torch.tensor([3.0, 1.0, 1.0, 1.0])

    def where_loss(where: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(where, target, pos_weight=dense_pos_weight)

    # 1a: crops (a third of the compute of a full plane), embolus and age targets
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.crop_steps, pct_start=0.15
    )
    net.encoder.train()
    running = 0.0
    for step in range(args.crop_steps):
        x, y, w, dense = crop_batch(args.crop_batch, step)
        _, logits, where = net.encoder(x)
        loss_el = F.binary_cross_entropy_with_logits(logits[:, crop_cols], y, reduction="none")
        loss = (loss_el * w * crop_w).sum() / (w * crop_w).sum()
        loss = loss + args.dense_weight * where_loss(where, dense)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 100 == 0 or step + 1 == args.crop_steps:
            log(f"stage 1a (crops) step {step + 1}/{args.crop_steps}: loss {running:.4f}")

    # 1b: whole planes, every per-slice target (sites, heart level, RV:LV, quality)
    opt = torch.optim.AdamW(params, lr=args.full_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.full_lr, total_steps=args.full_steps, pct_start=0.2
    )
    half = args.batch_size // 2
    n_hard = int(round((args.batch_size - half) * HARD_NEGATIVE_FRACTION))
    n_easy = args.batch_size - half - n_hard
    for step in range(args.full_steps):
        p_sel = torch.randint(0, len(pos_idx), (half,), generator=gen).tolist()
        h_sel = torch.randint(0, len(hard_idx), (n_hard,), generator=gen).tolist()
        n_sel = torch.randint(0, len(neg_idx), (n_easy,), generator=gen).tolist()
        pairs = [pos_idx[i] for i in p_sel] + [hard_idx[i] for i in h_sel]
        x, y, defined, dense = plane_batch(pairs + [neg_idx[i] for i in n_sel])
        x = shift_augment(x, gen, 4)
        _, logits, where = net.encoder(x)
        loss_el = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        weights = defined * TARGET_WEIGHT
        loss = (loss_el * weights).sum() / weights.sum()
        loss = loss + args.dense_weight * where_loss(where, dense)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 50 == 0 or step + 1 == args.full_steps:
            log(f"stage 1b (planes) step {step + 1}/{args.full_steps}: loss {running:.4f}")
    net.encoder.eval()

    # --- stage 2: embeddings once, then the GRU head
    seqs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for ex in exams:
        emb, lg = embed_exam(net, ex.planes, spec)
        seqs.append(
            (emb, lg, torch.from_numpy(ex.targets[:, 0]), torch.from_numpy(ex.exam), lg[:, 0])
        )
    exams.clear()  # free the planes; only embeddings are needed from here on
    for i in range(args.n_head_extra):
        seed = case_seed(args.seed + HEAD_SEED_OFFSET, i)
        ex = prepare_exam(seed, np.random.default_rng([args.seed + HEAD_SEED_OFFSET, i, 11]), spec)
        emb, lg = embed_exam(net, ex.planes, spec)
        seqs.append(
            (emb, lg, torch.from_numpy(ex.targets[:, 0]), torch.from_numpy(ex.exam), lg[:, 0])
        )
    log(f"embedded {len(seqs)} exams for the exam head")

    head = net.exam_head
    head.train()
    h_opt = torch.optim.AdamW(head.parameters(), lr=args.head_lr, weight_decay=1e-3)
    head_batch = 16
    steps_per_epoch = math.ceil(len(seqs) / head_batch)
    h_sched = torch.optim.lr_scheduler.OneCycleLR(
        h_opt, max_lr=args.head_lr, total_steps=steps_per_epoch * args.head_epochs, pct_start=0.1
    )
    exam_w = torch.tensor([RSNA_EXAM_WEIGHTS[n] for n in EXAM_LABELS])
    exam_w = exam_w / exam_w.mean()
    for epoch in range(args.head_epochs):
        perm = torch.randperm(len(seqs), generator=gen).tolist()
        total = 0.0
        for start in range(0, len(perm), head_batch):
            chunk = [seqs[i] for i in perm[start : start + head_batch]]
            lengths = torch.tensor([c[0].shape[0] for c in chunk])
            emb = torch.nn.utils.rnn.pad_sequence([c[0] for c in chunk], batch_first=True)
            lg = torch.nn.utils.rnn.pad_sequence([c[1] for c in chunk], batch_first=True)
            y_img = torch.nn.utils.rnn.pad_sequence([c[2] for c in chunk], batch_first=True)
            y_exam = torch.stack([c[3] for c in chunk])
            refined, exam_logits = head(emb, lg, lengths)
            valid = (torch.arange(emb.shape[1])[None, :] < lengths[:, None]).float()
            img_loss = (
                F.binary_cross_entropy_with_logits(refined, y_img, reduction="none") * valid
            ).sum() / valid.sum()
            ex_loss = (
                F.binary_cross_entropy_with_logits(exam_logits, y_exam, reduction="none") * exam_w
            ).mean()
            loss = ex_loss + 0.5 * img_loss
            h_opt.zero_grad(set_to_none=True)
            loss.backward()
            h_opt.step()
            h_sched.step()
            total += loss.item() * len(chunk)
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.head_epochs:
            log(f"stage 2 epoch {epoch + 1}/{args.head_epochs}: loss {total / len(seqs):.4f}")
    head.eval()
    del seqs

    # --- held-out test through the serving path
    served = PEClassifier(manifest.model_copy(update={"input": spec}), net, device)
    exam_y, exam_p, img_y, img_p = [], [], [], []
    violations = 0
    for i in range(args.n_test):
        seed = case_seed(args.seed + TEST_SEED_OFFSET, i)
        rng = np.random.default_rng([args.seed + TEST_SEED_OFFSET, i, 11])
        case, r, spacing = random_render(seed, rng, (256,))
        image, exam = served.predict_array(r.hu, spacing)
        violations += len(consistency_violations(image, exam))
        exam_y.append([case.truth[n] for n in EXAM_LABELS])
        exam_p.append([exam[n] for n in EXAM_LABELS])
        img_y.append(r.slice_truth.astype(np.float64))
        img_p.append(image)
    ey, ep = np.array(exam_y, dtype=np.float64), np.array(exam_p, dtype=np.float64)
    all_y, all_p = np.concatenate(img_y), np.concatenate(img_p)
    loss_value = rsna_weighted_log_loss(ey, ep, img_y, img_p)
    auroc = {IMAGE_LABEL: _auroc(all_y, all_p)}
    accuracy = {IMAGE_LABEL: float(((all_p > 0.5) == (all_y > 0.5)).mean())}
    positives = {IMAGE_LABEL: int(all_y.sum())}
    for j, name in enumerate(EXAM_LABELS):
        auroc[name] = _auroc(ey[:, j], ep[:, j])
        accuracy[name] = float(((ep[:, j] > 0.5) == (ey[:, j] > 0.5)).mean())
        positives[name] = int(ey[:, j].sum())
    log(
        f"held-out: RSNA weighted log loss {loss_value:.4f}; AUROC "
        + ", ".join(f"{n} {_fmt(v)}" for n, v in auroc.items())
    )

    # --- outputs
    weights = args.out / "weights.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {
        "model": "ct-pe-2d-gru",
        "trained_by": "pacsnode.models.train_pe",
        "synthetic": "true",
        "input_size": str(args.size),
        "z_step_mm": str(Z_STEP_MM),
    }
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.chmod(0o644)  # safetensors creates it owner-only; it is a repository file
    tmp.replace(weights)
    manifest_path = args.out / MANIFEST_FILE
    set_manifest_value(manifest_path, "input", "size", str(args.size))
    set_manifest_value(manifest_path, "weights", "sha256", f'"{sha256_file(weights)}"')
    load_manifest(args.out)
    elapsed = time.time() - started
    metrics = {
        "command": command,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seed": args.seed,
        "test_seed_base": args.seed + TEST_SEED_OFFSET,
        "head_seed_base": args.seed + HEAD_SEED_OFFSET,
        "case_seed": "base * 1000000 + index",
        "input_size": args.size,
        "z_step_mm": Z_STEP_MM,
        "n_test": args.n_test,
        "n_test_slices": int(all_y.size),
        "test_positives": positives,
        "rsna_weighted_log_loss": loss_value,
        "heldout_auroc": auroc,
        "heldout_accuracy_at_0.5": accuracy,
        "consistency_violations": violations,
        "weights_mib": weights.stat().st_size / 2**20,
        "seconds": round(elapsed, 1),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()}".strip(),
        "torch": torch.__version__,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    write_model_card(args.out, metrics, args.version)
    log(f"wrote {weights}, manifest.toml, metrics.json and MODEL_CARD.md in {elapsed:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
