"""Reproducible training of the radiograph content gate on synthetic radiographs.

``python -m pacsnode.gates.train_radiograph --out models/gates/radiograph-view --seed 0``

Every image, training and held-out, is a DICOM dataset decoded by the serving path:
:func:`pacsnode.pixels.to_display_array` then :func:`pacsnode.gates.radiograph.display_to_input`.
Training renders small (long side 160–288 px; the anatomy of a seed does not depend on the
matrix, see :mod:`pacsnode.phantoms.radiographs`); the held-out set is rendered at 384–1023 px
plus a few at the 1024–3000 px of real detectors, from other seeds.

Frontal chest positives: the two frontal chest kinds of :mod:`pacsnode.phantoms.radiographs`
(cxr phantoms placed, tilted, collimated and marked) and plain
:func:`pacsnode.phantoms.cxr.make_cxr_dataset` instances exactly as the chest model and the
node's tests make them (every encoding; 64–288 px in training, 384–1023 px held out).
Negatives: every other kind, including frontal chests turned or with inverted grey scale,
and images without anatomy.

Writes ``weights.safetensors``, ``gate.toml``, ``metrics.json`` and ``MODEL_CARD.md`` into
``--out``. CPU only, one thread by default (the machine is shared).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from safetensors.torch import save_file

from pacsnode.gates.radiograph import (
    GATE_FILE,
    INPUT_MEAN,
    INPUT_STD,
    GateSpec,
    RadiographGate,
    build_network,
    display_to_input,
    load_gate_spec,
)
from pacsnode.manifest import sha256_file
from pacsnode.phantoms.cxr import make_cxr_dataset
from pacsnode.phantoms.radiographs import CLASSES, KIND_SPECS, KINDS, make_radiograph_dataset
from pacsnode.pixels import to_display_array

NAME = "radiograph-view"
VERSION = "0.1.0-phantom"
KIND = "radiograph-view-resnet"
ACCEPTED = "frontal_chest"
THRESHOLD = 0.5
INPUT_SIZE = 128
LAYERS = [1, 1, 1, 1]
BLOCK_INPLANES = [16, 32, 64, 128]
CASE_STRIDE = 1_000_000
HELDOUT_SEED_OFFSET = 1000
CHEST_CLASSES = ("frontal_chest", "chest_rotated", "chest_inverted")
"""Classes made from frontal chests: quarter turns would move them to another class."""
CXR_PLAIN = "cxr_plain"
"""Source name of plain :func:`make_cxr_dataset` phantoms (class frontal_chest)."""

CLASS_DESCRIPTIONS: dict[str, str] = {
    "frontal_chest": "a frontal chest radiograph",
    "lateral_chest": "a lateral chest radiograph",
    "lower_leg": "a lower-leg radiograph",
    "knee": "a knee radiograph",
    "hand": "a hand or wrist radiograph",
    "foot": "a foot radiograph",
    "cervical_spine": "a cervical-spine radiograph",
    "lumbar_spine": "a lumbar-spine radiograph",
    "skull": "a skull radiograph",
    "abdomen": "an abdominal radiograph",
    "pelvis": "a pelvis radiograph",
    "chest_rotated": "a chest radiograph turned on its side or upside down",
    "chest_inverted": "a chest radiograph with inverted grey scale (bone dark, air bright)",
    "blank": "a blank image, noise or a test pattern",
}

SOURCE_WEIGHTS: dict[str, float] = {
    "frontal_chest_pa": 0.12,
    "frontal_chest_ap": 0.08,
    CXR_PLAIN: 0.14,
    "lateral_chest": 0.06,
    "chest_rotated": 0.05,
    "chest_inverted": 0.04,
    "blank": 0.03,
}
"""Sampling weights; the kinds not named share the rest equally."""

REAL_IMAGES = {
    "RG1_UNCR.dcm": "real CR chest PA (pydicom-data)",
    "RG3_UNCR.dcm": "real CR lower leg AP, header EXTREMITY (pydicom-data)",
}


def case_seed(base: int, index: int) -> int:
    return base * CASE_STRIDE + index


def source_probabilities() -> dict[str, float]:
    named = sum(SOURCE_WEIGHTS.values())
    rest = [k for k in KINDS if k not in SOURCE_WEIGHTS]
    probs = dict(SOURCE_WEIGHTS)
    probs.update({k: (1.0 - named) / len(rest) for k in rest})
    return probs


def label_of(source: str) -> str:
    return ACCEPTED if source == CXR_PLAIN else KIND_SPECS[source].label


def plain_cxr_dataset(seed: int, rng: np.random.Generator, long_side: int) -> Dataset:
    """A :func:`make_cxr_dataset` phantom with a random encoding, as the node's tests make."""
    aspect = 1.0 if rng.random() < 0.5 else rng.uniform(0.75, 1.33)
    rows = max(32, int(round(long_side * min(1.0, 1 / aspect))))
    cols = max(32, int(round(long_side * min(1.0, aspect))))
    modality = str(rng.choice(["CR", "DX"]))
    kw: dict[str, object] = {
        "modality": modality,
        "view": str(rng.choice(["PA", "AP"])),
        "photometric": str(rng.choice(["MONOCHROME1", "MONOCHROME2"])),
        "bits_stored": int(rng.choice([8, 10, 12, 16])),
        "window": bool(rng.random() < 0.5),
        "mirror": bool(rng.random() < 0.1),
        "prevalence": float(rng.choice([0.0, 0.3, 0.5])),
    }
    if modality == "CR":
        kw["pixel_representation"] = int(rng.random() < 0.3)
        kw["rescale"] = bool(rng.random() < 0.3)
    u = rng.random()
    kw["transfer_syntax"] = (
        JPEG2000Lossless if u < 0.03 else RLELossless if u < 0.06 else ExplicitVRLittleEndian
    )
    ds, _ = make_cxr_dataset(seed, rows=rows, cols=cols, **kw)  # type: ignore[arg-type]
    return ds


def make_case(source: str, seed: int, long_side: int, rng: np.random.Generator) -> Dataset:
    """The DICOM dataset of one case (training or held-out)."""
    if source == CXR_PLAIN:
        return plain_cxr_dataset(seed, rng, long_side)
    return make_radiograph_dataset(
        source, seed, size=long_side, modality=str(rng.choice(["CR", "DX"]))
    )


def input_of(ds: Dataset, size: int = INPUT_SIZE) -> tuple[torch.Tensor, tuple[int, int]]:
    """Network input of ``ds`` (the serving preprocessing) and its letterboxed extent."""
    display = to_display_array(ds)
    scale = size / max(display.shape)
    extent = (max(1, round(display.shape[0] * scale)), max(1, round(display.shape[1] * scale)))
    return display_to_input(display, size), extent


# ---------------------------------------------------------------- training data


def build_training_set(
    seed: int, n: int, log: Callable[[str], None]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Inputs (float16, N×1×S×S), class indices, letterbox extents and the source of each."""
    probs = source_probabilities()
    sources = list(probs)
    weights = np.array([probs[s] for s in sources])
    pick = np.random.default_rng([seed, 1]).choice(len(sources), size=n, p=weights / weights.sum())
    inputs = torch.empty((n, 1, INPUT_SIZE, INPUT_SIZE), dtype=torch.float16)
    labels = torch.empty(n, dtype=torch.long)
    extents = torch.empty((n, 2), dtype=torch.long)
    names: list[str] = []
    start = time.perf_counter()
    for i in range(n):
        source = sources[int(pick[i])]
        rng = np.random.default_rng([seed, i, 7])
        long_side = int(rng.integers(64, 289) if source == CXR_PLAIN else rng.integers(160, 289))
        ds = make_case(source, case_seed(seed, i), long_side, rng)
        x, extent = input_of(ds)
        inputs[i] = x.half()
        labels[i] = CLASSES.index(label_of(source))
        extents[i] = torch.tensor(extent)
        names.append(source)
        if (i + 1) % 1000 == 0:
            log(f"  rendered {i + 1}/{n} training images ({time.perf_counter() - start:.0f} s)")
    return inputs, labels, extents, names


def augment(
    x: torch.Tensor, extents: torch.Tensor, labels: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """Contrast, window, noise, flips, rotation, scale and shift on a batch of inputs.

    Intensity changes touch only the image inside its letterbox, which stays black; the
    geometric ones fill with black as the letterbox does. Frontal chests are tilted only a
    little; no chest-derived class is turned by 90° (that would change its class), other
    classes may be.
    """
    n, _, size, _ = x.shape
    d = x.float() * INPUT_STD + INPUT_MEAN
    rows = torch.arange(size)[None, :, None]
    cols = torch.arange(size)[None, None, :]
    h, w = extents[:, 0, None, None], extents[:, 1, None, None]
    top, left = (size - h) // 2, (size - w) // 2
    valid = ((rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w))[:, None]

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen)

    gamma = torch.exp((rand(n) - 0.5) * 0.9)[:, None, None, None]
    lo = (rand(n) * 0.25 - 0.1)[:, None, None, None]
    hi = (1.1 - rand(n) * 0.25)[:, None, None, None]
    d = ((d.clamp(0, 1) ** gamma - lo) / (hi - lo)).clamp(0, 1)
    d = d + rand(n)[:, None, None, None] * 0.03 * torch.randn(d.shape, generator=gen)
    d = torch.where(valid, d.clamp(0, 1), torch.zeros_like(d))

    chest = labels == CLASSES.index(ACCEPTED)
    upright_matters = torch.isin(labels, torch.tensor([CLASSES.index(c) for c in CHEST_CLASSES]))
    angle = (rand(n) - 0.5) * 2 * torch.where(chest, 7.0, 20.0)
    turn = ~upright_matters & (rand(n) < 0.3)
    quarter = torch.where(turn, torch.randint(1, 4, (n,), generator=gen), 0)
    theta = torch.deg2rad(angle) + quarter * (math.pi / 2)
    scale = 0.9 + rand(n) * 0.2
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(theta) / scale, torch.sin(theta) / scale
    affine = torch.zeros((n, 2, 3))
    affine[:, 0, 0], affine[:, 0, 1] = cos * flip, -sin
    affine[:, 1, 0], affine[:, 1, 1] = sin * flip, cos
    affine[:, :, 2] = (rand(n, 2) - 0.5) * 0.12
    grid = F.affine_grid(affine, list(d.shape), align_corners=False)
    d = F.grid_sample(d, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (d - INPUT_MEAN) / INPUT_STD


def train(
    network: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    extents: torch.Tensor,
    *,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    log: Callable[[str], None],
) -> None:
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(labels) / batch)
    opt = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    network.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        total, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        for k in range(0, len(order), batch):
            idx = order[k : k + batch]
            if len(idx) < 2:
                continue
            x = augment(inputs[idx], extents[idx], labels[idx], gen)
            logits = network(x)
            loss = F.cross_entropy(logits, labels[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == labels[idx]).sum())
            seen += len(idx)
        log(
            f"  epoch {epoch + 1}/{epochs}: loss {total / seen:.4f}, train accuracy "
            f"{correct / seen:.3f} ({time.perf_counter() - start:.0f} s)"
        )
    network.eval()


# ---------------------------------------------------------------- evaluation


Case = tuple[str, int, int, bool]
"""Source, case seed, long side in px, and whether it is one of the full-size cases."""


def heldout_cases(base: int, n_per_kind: int, n_plain: int, n_full: int) -> list[Case]:
    """The held-out set: other seeds, 384–1023 px plus ``n_full`` per kind at 1024–3000 px."""
    cases = []
    rng = np.random.default_rng([base, 3])
    index = 0
    for source in (*KINDS, CXR_PLAIN):
        count = n_plain if source == CXR_PLAIN else n_per_kind
        for _ in range(count):
            cases.append((source, case_seed(base, index), int(rng.integers(384, 1024)), False))
            index += 1
        if source != CXR_PLAIN:
            for _ in range(n_full):
                cases.append((source, case_seed(base, index), int(rng.integers(1024, 3001)), True))
                index += 1
    return cases


def evaluate(gate: RadiographGate, cases: list[Case], log: Callable[[str], None]) -> dict:
    classes = gate.classes()
    accepted = classes.index(gate.spec.accepted)
    probs, truth, sources = [], [], []
    start = time.perf_counter()
    for n, (source, seed, long_side, _) in enumerate(cases):
        rng = np.random.default_rng([seed, 9])
        ds = make_case(source, seed, long_side, rng)
        probs.append(gate.probabilities(input_of(ds, gate.input_size)[0][None])[0])
        truth.append(classes.index(label_of(source)))
        sources.append(source)
        if (n + 1) % 200 == 0:
            log(f"  evaluated {n + 1}/{len(cases)} ({time.perf_counter() - start:.0f} s)")
    p = np.array(probs)
    t = np.array(truth)
    pred = p.argmax(1)
    accept = p[:, accepted] >= gate.threshold
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    for ti, pi in zip(t, pred, strict=True):
        confusion[ti, pi] += 1
    src = np.array(sources)
    per_class = {
        name: {"n": int((t == i).sum()), "accuracy": float((pred[t == i] == i).mean())}
        for i, name in enumerate(classes)
        if (t == i).any()
    }
    per_source = {}
    for source in dict.fromkeys(sources):
        m = src == source
        positive = label_of(source) == gate.spec.accepted
        per_source[source] = {
            "n": int(m.sum()),
            "class": label_of(source),
            "accuracy": float((pred[m] == t[m]).mean()),
            "passed_rate": float(accept[m].mean()),
            "refused_rate": float((~accept[m]).mean()),
            "correct_decision_rate": float((accept[m] if positive else ~accept[m]).mean()),
            "min_frontal_chest": float(p[m, accepted].min()),
            "max_frontal_chest": float(p[m, accepted].max()),
        }
    chest = t == accepted
    big = np.array([case[3] for case in cases], dtype=bool)
    return {
        "n": len(cases),
        "seed_base": int(cases[0][1] // CASE_STRIDE) if cases else None,
        "accuracy": float((pred == t).mean()),
        "per_class": per_class,
        "per_source": per_source,
        "classes": classes,
        "confusion_matrix": confusion.tolist(),
        "confusion_rows": "truth",
        "false_accept_rate": float(accept[~chest].mean()),
        "false_accepts": int(accept[~chest].sum()),
        "n_negatives": int((~chest).sum()),
        "false_reject_rate": float((~accept[chest]).mean()),
        "false_rejects": int((~accept[chest]).sum()),
        "n_positives": int(chest.sum()),
        "full_size": {
            "n": int(big.sum()),
            "accuracy": float((pred[big] == t[big]).mean()) if big.any() else None,
            "false_accepts": int((accept & ~chest & big).sum()),
            "false_rejects": int((~accept & chest & big).sum()),
        },
        "seconds": round(time.perf_counter() - start, 1),
    }


def real_images(gate: RadiographGate) -> dict:
    """What the gate says on the real radiographs of pydicom-data, when it is installed."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        return {}
    out = {}
    for name, what in REAL_IMAGES.items():
        path = get_testdata_file(name)
        if path is None:
            continue
        ds = dcmread(path)
        (verdict,) = gate.check([ds])
        top = sorted(verdict.scores.items(), key=lambda kv: -kv[1])[:3]
        out[name] = {
            "what": what,
            "header": f"{ds.get('BodyPartExamined', '')} {ds.get('ViewPosition', '')}".strip(),
            "size": f"{ds.Rows}x{ds.Columns}",
            "passed": verdict.passed,
            "reason": verdict.reason,
            "frontal_chest": verdict.scores[gate.spec.accepted],
            "top3": dict(top),
        }
    return out


def time_inference(gate: RadiographGate, seed: int) -> dict:
    """Seconds per image at 2048×2048 (decode, display, downsample, forward), batch of 8."""
    ds, _ = make_cxr_dataset(seed, rows=2048, cols=2048, modality="CR")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)

    def fresh() -> list[Dataset]:  # pydicom caches decoded pixels: time the decode too
        return [dcmread(io.BytesIO(buffer.getvalue())) for _ in range(8)]

    gate.check(fresh()[:1])
    datasets = fresh()
    start = time.perf_counter()
    gate.check(datasets)
    batch = (time.perf_counter() - start) / 8
    datasets = fresh()
    start = time.perf_counter()
    inputs = torch.stack([input_of(d)[0] for d in datasets])
    pre = time.perf_counter() - start
    start = time.perf_counter()
    gate.probabilities(inputs)
    forward = time.perf_counter() - start
    return {
        "image": "2048x2048 CR, 12-bit",
        "seconds_per_image_in_batch_of_8": round(batch, 4),
        "preprocess_seconds_per_image": round(pre / 8, 4),
        "forward_seconds_batch_of_8": round(forward, 4),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- outputs


def gate_toml(sha256: str, weights_file: str) -> str:
    classes = "\n".join(
        f'[[classes]]\nname = "{c}"\ndescription = "{CLASS_DESCRIPTIONS[c]}"\n' for c in CLASSES
    )
    return f'''name = "{NAME}"
version = "{VERSION}"
kind = "{KIND}"
description = "Is this a frontal chest radiograph? MONAI ResNet (2D, basic blocks) on the letterboxed image; trained only on synthetic phantoms by pacsnode.gates.train_radiograph; NOT FOR CLINICAL USE"
synthetic = true
accepted = "{ACCEPTED}"
threshold = {THRESHOLD:.2f}
batch_size = 8

[input]
size = {INPUT_SIZE}

[network]
layers = {LAYERS}
block_inplanes = {BLOCK_INPLANES}

[weights]
file = "{weights_file}"
sha256 = "{sha256}"

{classes}'''


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def write_model_card(out: Path, spec: GateSpec, metrics: dict) -> None:
    h = metrics["heldout"]
    a = metrics["training"]
    rows = "\n".join(
        f"| {name} | {v['n']} | {_pct(v['accuracy'])} |" for name, v in h["per_class"].items()
    )
    src_rows = "\n".join(
        f"| {s} | {v['class']} | {v['n']} | {_pct(v['accuracy'])} | {_pct(v['passed_rate'])} |"
        for s, v in h["per_source"].items()
    )
    real = metrics.get("real_images", {})
    real_rows = (
        "\n".join(
            f"| {name} | {r['what']} | {r['header']} | {r['frontal_chest']:.3f} | "
            f"{'passed' if r['passed'] else 'refused'} | "
            f"{', '.join(f'{k} {v:.3f}' for k, v in r['top3'].items())} |"
            for name, r in real.items()
        )
        or "| — | pydicom-data not installed: not measured | | | | |"
    )
    timing = metrics["inference"]
    text = f"""# {spec.name} {spec.version} — model card

> **NOT FOR CLINICAL USE.** This gate was trained only on synthetic radiographs rendered by
> `pacsnode.phantoms.radiographs` and `pacsnode.phantoms.cxr`. It has never been trained on a
> real radiograph. Its job is narrow: keep the chest model off images that are plainly not a
> frontal chest radiograph, whatever their header says.

## What it is
- Question: "is this a frontal chest radiograph?" Passes when the softmax probability of
  `{spec.accepted}` is ≥ {spec.threshold:.2f}; otherwise the verdict names the most likely other
  class in words (e.g. "image looks like a lower-leg radiograph, not a frontal chest
  radiograph (frontal chest 0.03, needs ≥ 0.50)"). The DICOM header is never read.
- Architecture: MONAI `ResNet("basic", layers={LAYERS}, block_inplanes={BLOCK_INPLANES},
  spatial_dims=2, n_input_channels=1, conv1_t_size=7, conv1_t_stride=2)`, {len(CLASSES)}
  classes: {", ".join(f"`{c}`" for c in CLASSES)}. {metrics["parameters"]:,} parameters.
- Input: `pacsnode.pixels.to_display_array` (modality LUT, VOI, MONOCHROME1 inverted), long
  side shrunk to {INPUT_SIZE} px (antialiased), aspect kept, letterboxed on black to
  {INPUT_SIZE}×{INPUT_SIZE}, normalised (x − {INPUT_MEAN}) / {INPUT_STD}
  (`pacsnode.gates.radiograph.display_to_input`, the same function in training).
- Weights: `{spec.weights.file}` (fp32, {metrics["weights_kib"]:.0f} KiB), sha256 in `gate.toml`;
  the loader refuses any other file.
- Speed ({timing["threads"]} CPU thread): {1000 * timing["seconds_per_image_in_batch_of_8"]:.0f} ms
  per 2048×2048 image in a batch of 8, decode and display included; the network's forward pass
  on the batch of 8 takes {1000 * timing["forward_seconds_batch_of_8"]:.0f} ms.

## How it was trained
```
{metrics["command"]}
```
- {a["n"]} training images, case seeds `{a["seed"]}·10⁶ + i`, rendered at 160–288 px on the
  long side (plain cxr phantoms 64–288 px), each encoded as a CR or DX instance (random bit
  depth, MONOCHROME1/2, window or none, rescale) and decoded by the serving path. Sources:
  {", ".join(f"{k} {v:.3f}" for k, v in a["source_probabilities"].items())}.
- Augmentation: contrast (gamma), window, noise, horizontal flip, rotation (±7° frontal chest,
  ±20° and quarter turns for the others), scale 0.9–1.1, shift.
- Loss: cross-entropy with label smoothing 0.05; AdamW, one-cycle lr {a["lr"]}, batch
  {a["batch"]}, {a["epochs"]} epochs.
- Time: {metrics["seconds_total"]:.0f} s wall for the whole script ({a["render_seconds"]:.0f} s
  rendering, {a["train_seconds"]:.0f} s training, {h["seconds"]:.0f} s held-out), CPU only,
  `torch.set_num_threads({metrics["threads"]})`, {metrics["platform"]}, torch {torch.__version__}.

## Held-out results (measured, {h["n"]} images, seed base {h["seed_base"]})
Rendered at 384–1023 px plus {metrics["n_full_size_per_kind"]} per kind at 1024–3000 px
({h["full_size"]["n"]} images, accuracy {_pct(h["full_size"]["accuracy"] or 0.0)}), every image
through DICOM and the serving preprocessing.

- Overall accuracy (argmax class): **{_pct(h["accuracy"])}**
- False accept (a non-frontal-chest image passes): **{_pct(h["false_accept_rate"])}**
  ({h["false_accepts"]} of {h["n_negatives"]})
- False reject (a frontal chest phantom is refused): **{_pct(h["false_reject_rate"])}**
  ({h["false_rejects"]} of {h["n_positives"]})

| Class | n | Accuracy |
|---|---|---|
{rows}

| Source | Class | n | Accuracy | Passed |
|---|---|---|---|---|
{src_rows}

The confusion matrix (rows: truth) is in `metrics.json`.

## Real radiographs (measured by the training script, pydicom-data)
| File | What | Header | frontal_chest | Verdict | Top classes |
|---|---|---|---|---|---|
{real_rows}

These two images are the only real radiographs this gate has been measured on. What it does
on other real images is unknown: the phantoms model silhouettes and layout, not real anatomy,
processing or devices.

## Limits
- Trained on phantoms only. A real frontal chest that looks unlike the cxr phantoms (children,
  extreme rotation, lines and devices, heavy post-processing) may be refused; that is the safe
  direction for this gate, and the refusal reason says what the gate thought it saw.
- A frontal chest turned on its side or upside down, or shown with inverted grey scale (a
  MONOCHROME1 image labelled MONOCHROME2), is refused as its own class (`chest_rotated`,
  `chest_inverted`); a left–right mirrored chest passes, as the chest model reads those.
- Body parts and views not in the class list (forearm, humerus, shoulder, hip, dental,
  mammography, scouts) were never shown to it; it will map them to the nearest class it
  knows, which is usually not `frontal_chest` but is not guaranteed.

## Published figures, for comparison only
MI2RLNet (Korean J Radiol 2021) ships a chest X-ray view classifier among its "Checker"
gates, trained on real radiographs. The figures above are on synthetic held-out images and
are not comparable: they show that the phantoms are easy to tell apart, not how the gate
does on a real department's images. A site validates (or replaces) this gate on its own.
"""
    (out / "MODEL_CARD.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--n-heldout", type=int, default=25, help="held-out images per kind")
    parser.add_argument("--n-full-size", type=int, default=2, help="per kind, 1024–3000 px")
    parser.add_argument("--n-plain-cxr", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    log(f"rendering {args.n_train} training images (seed {args.seed})")
    inputs, labels, extents, sources = build_training_set(args.seed, args.n_train, log)
    render_seconds = time.perf_counter() - t0
    counts = {c: int((labels == i).sum()) for i, c in enumerate(CLASSES)}
    log(f"training set per class: {counts}")

    network = build_network(
        GateSpec.model_validate(
            {
                "name": NAME,
                "version": VERSION,
                "kind": KIND,
                "synthetic": True,
                "classes": [{"name": c, "description": CLASS_DESCRIPTIONS[c]} for c in CLASSES],
                "accepted": ACCEPTED,
                "network": {"layers": LAYERS, "block_inplanes": BLOCK_INPLANES},
                "weights": {"sha256": "0" * 64},
            }
        )
    )
    t_train = time.perf_counter()
    log(f"training {sum(p.numel() for p in network.parameters()):,} parameters")
    train(
        network,
        inputs,
        labels,
        extents,
        epochs=args.epochs,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        log=log,
    )
    train_seconds = time.perf_counter() - t_train

    weights = args.out / "weights.safetensors"
    state = {k: v.detach().contiguous() for k, v in network.state_dict().items()}
    save_file(state, str(weights))
    (args.out / GATE_FILE).write_text(gate_toml(sha256_file(weights), weights.name), "utf-8")
    spec = load_gate_spec(args.out)
    gate = RadiographGate.load(args.out, torch.device("cpu"))

    base = args.seed + HELDOUT_SEED_OFFSET
    cases = heldout_cases(base, args.n_heldout, args.n_plain_cxr, args.n_full_size)
    log(f"held-out: {len(cases)} images, seed base {base}")
    heldout = evaluate(gate, cases, log)
    log(
        f"held-out accuracy {heldout['accuracy']:.3f}, false accept "
        f"{heldout['false_accept_rate']:.4f}, false reject {heldout['false_reject_rate']:.4f}"
    )
    real = real_images(gate)
    for name, r in real.items():
        log(f"{name} ({r['what']}): passed={r['passed']} scores {r['top3']} reason {r['reason']}")
    timing = time_inference(gate, case_seed(base, 999_999))
    log(f"inference at 2048²: {timing}")

    metrics = {
        "name": NAME,
        "version": VERSION,
        "command": "python -m pacsnode.gates.train_radiograph " + shlex.join(sys.argv[1:] or []),
        "threads": args.threads,
        "platform": f"{platform.machine()} {platform.processor() or platform.system()}",
        "parameters": sum(p.numel() for p in network.parameters()),
        "weights_kib": weights.stat().st_size / 1024,
        "n_full_size_per_kind": args.n_full_size,
        "training": {
            "n": args.n_train,
            "seed": args.seed,
            "per_class": counts,
            "per_source": {s: sources.count(s) for s in dict.fromkeys(sources)},
            "source_probabilities": {k: round(v, 4) for k, v in source_probabilities().items()},
            "epochs": args.epochs,
            "batch": args.batch,
            "lr": args.lr,
            "render_seconds": round(render_seconds, 1),
            "train_seconds": round(train_seconds, 1),
        },
        "heldout": heldout,
        "real_images": real,
        "inference": timing,
        "threshold": THRESHOLD,
    }
    metrics["seconds_total"] = round(time.perf_counter() - t0, 1)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", "utf-8")
    write_model_card(args.out, spec, metrics)
    log(f"wrote {args.out} in {metrics['seconds_total']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
