"""Reproducible training of the CXR DenseNet-121 on synthetic phantoms.

``python -m pacsnode.models.train_cxr --out models/cxr-chexnet --seed 0``

Train/serve skew: every input tensor goes through :func:`pacsnode.models.cxr.image_to_tensor`,
the resize/normalise step of the serving :func:`~pacsnode.models.cxr.preprocess`. A fraction
(``--dicom-fraction``) of the training cases is fully encoded as DICOM (random CR/DX, PA/AP,
MONOCHROME1/2, bit depth, window/rescale) and decoded by the serving ``preprocess``; the rest
use the fast renderer followed by :func:`pacsnode.pixels.robust_scale`, which is what
``to_display_array`` does for a dataset without a window. Validation (thresholds) and the
held-out test (AUROC, ``reported`` flags) go entirely through DICOM and ``preprocess``, with
different seeds from training.

Training runs at ``--train-size`` for most epochs and at the serving size (224) for the last
``--full-size-epochs``, so the network is tuned at the resolution it serves.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score, roc_curve

from pacsnode.manifest import InputSpec, load_manifest, sha256_file
from pacsnode.models.cxr import build_network, image_to_tensor, preprocess
from pacsnode.phantoms.cxr import (
    CHEXNET_LABELS,
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION,
    DX_FOR_PROCESSING,
    RENDERED_FINDINGS,
    make_cxr_dataset,
    render,
)
from pacsnode.pixels import robust_scale

SERVE_SIZE = 224
REPORT_MIN_AUROC = 0.90
TEST_SEED_OFFSET = 1000
VAL_SEED_OFFSET = 2000
CASE_STRIDE = 1_000_000


def _sct(keyword: str) -> tuple[str, str, str]:
    c = getattr(codes.SCT, keyword)
    return (c.scheme_designator, c.value, c.meaning)


LABEL_CODES: dict[str, tuple[str, str, str]] = {
    "Atelectasis": ("SCT", "46621007", "Atelectasis"),
    "Cardiomegaly": _sct("Cardiomegaly"),
    "Effusion": _sct("PleuralEffusion"),
    "Infiltration": ("SCT", "409609008", "Radiologic infiltrate of lung"),
    "Mass": _sct("Mass"),
    "Nodule": _sct("Nodule"),
    "Pneumonia": ("SCT", "233604007", "Pneumonia"),
    "Pneumothorax": _sct("Pneumothorax"),
    "Consolidation": ("SCT", "95436008", "Lung consolidation"),
    "Edema": _sct("PulmonaryEdema"),
    "Emphysema": ("SCT", "87433001", "Pulmonary emphysema"),
    "Fibrosis": ("SCT", "51615001", "Fibrosis of lung"),
    "Hernia": ("SCT", "84089009", "Hiatal hernia"),
}
"""SNOMED CT codes; Pleural_Thickening has none we could verify offline, and is not reported."""


def case_seed(base: int, index: int) -> int:
    return base * CASE_STRIDE + index


def random_dicom_kwargs(rng: np.random.Generator, sizes: tuple[int, ...]) -> dict[str, object]:
    """A random mix of the encodings the node must accept."""
    modality = str(rng.choice(["CR", "DX"]))
    kw: dict[str, object] = {
        "modality": modality,
        "view": str(rng.choice(["PA", "AP"])),
        "photometric": str(rng.choice(["MONOCHROME1", "MONOCHROME2"])),
        "rows": int(rng.choice(sizes)),
        "cols": int(rng.choice(sizes)),
        "bits_stored": int(rng.choice([8, 10, 12, 16])),
        "window": bool(rng.random() < 0.5),
    }
    if modality == "CR":
        kw["pixel_representation"] = int(rng.random() < 0.3)
        kw["rescale"] = bool(rng.random() < 0.3)
    u = rng.random()
    kw["transfer_syntax"] = (
        JPEG2000Lossless if u < 0.05 else RLELossless if u < 0.1 else ExplicitVRLittleEndian
    )
    return kw


def dicom_set(
    base_seed: int, n: int, sizes: tuple[int, ...], spec: InputSpec, prevalence: float
) -> tuple[torch.Tensor, np.ndarray]:
    """Render ``n`` phantoms as DICOM and preprocess them exactly as serving does."""
    xs, ys = [], []
    for i in range(n):
        seed = case_seed(base_seed, i)
        kw = random_dicom_kwargs(np.random.default_rng([base_seed, i, 7]), sizes)
        ds, labels = make_cxr_dataset(seed, prevalence=prevalence, **kw)  # type: ignore[arg-type]
        xs.append(preprocess(ds, spec)[:1].to(torch.float16))
        ys.append([labels[name] for name in CHEXNET_LABELS])
    return torch.stack(xs), np.asarray(ys, dtype=np.float32)


def fast_case(seed: int, spec: InputSpec, prevalence: float) -> tuple[torch.Tensor, list[int]]:
    """Fast renderer + the display scaling used for datasets without a window."""
    rng = np.random.default_rng(seed)
    side = int(rng.choice([256, 288, 320]))
    image, labels = render(rng, None, (side, side), prevalence=prevalence)
    x = image_to_tensor(robust_scale(image), spec)[:1].to(torch.float16)
    return x, [labels[name] for name in CHEXNET_LABELS]


def predict(net: torch.nn.Module, x: torch.Tensor, device: torch.device) -> np.ndarray:
    net.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, x.shape[0], 32):
            chunk = x[start : start + 32].float().expand(-1, 3, -1, -1).to(device)
            out.append(torch.sigmoid(net(chunk)).cpu())
    return torch.cat(out).numpy()


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    if y.min() == y.max():
        return 0.5
    fpr, tpr, thr = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thr[best], 0.0, 1.0))


def write_manifest(
    out: Path,
    sha256: str,
    thresholds: dict[str, float],
    reported: dict[str, bool],
    version: str,
    batch_size: int,
) -> None:
    lines = [
        'name = "cxr-chexnet"',
        f'version = "{version}"',
        'kind = "cxr-densenet121"',
        'description = "DenseNet-121 (CheXNet layout) trained only on synthetic phantoms by '
        'pacsnode.models.train_cxr; NOT FOR CLINICAL USE"',
        "synthetic = true",
        f"batch_size = {batch_size}",
        "",
        "[accepts]",
        'modalities = ["CR", "DX"]',
        f'sop_classes = ["{CR_IMAGE_STORAGE}", "{DX_FOR_PRESENTATION}", "{DX_FOR_PROCESSING}"]',
        'view_positions = ["PA", "AP", ""]',
        "",
        "[input]",
        f"size = {SERVE_SIZE}",
        "channels = 3",
        "mean = [0.485, 0.456, 0.406]",
        "std = [0.229, 0.224, 0.225]",
        "",
        "[weights]",
        'file = "weights.safetensors"',
        f'sha256 = "{sha256}"',
    ]
    for name in CHEXNET_LABELS:
        lines += ["", "[[labels]]", f'name = "{name}"']
        lines.append(f"reported = {'true' if reported.get(name) else 'false'}")
        lines.append(f"threshold = {thresholds.get(name, 0.5):.4f}")
        if name in LABEL_CODES:
            scheme, value, meaning = LABEL_CODES[name]
            lines.append(
                f'code = {{ scheme = "{scheme}", value = "{value}", meaning = "{meaning}" }}'
            )
    (out / "manifest.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=1600)
    parser.add_argument("--n-val", type=int, default=240)
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--full-size-epochs", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--prevalence", type=float, default=0.3)
    parser.add_argument("--dicom-fraction", type=float, default=0.2)
    parser.add_argument("--version", default="0.1.0-phantom")
    args = parser.parse_args(argv)
    command = "python -m pacsnode.models.train_cxr " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )

    started = time.time()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(2)
    spec = InputSpec(size=SERVE_SIZE)
    trained = [CHEXNET_LABELS.index(name) for name in RENDERED_FINDINGS]
    mask = torch.zeros(len(CHEXNET_LABELS))
    mask[trained] = 1.0

    def log(msg: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {msg}", flush=True)

    # --- data
    n_dicom = int(round(args.n_train * args.dicom_fraction))
    x_dicom, y_dicom = dicom_set(args.seed, n_dicom, (256, 320, 384), spec, args.prevalence)
    fast = [
        fast_case(case_seed(args.seed, i), spec, args.prevalence)
        for i in range(n_dicom, args.n_train)
    ]
    x_train = torch.cat([x_dicom, torch.stack([f[0] for f in fast])])
    y_train = torch.cat(
        [torch.from_numpy(y_dicom), torch.tensor([f[1] for f in fast], dtype=torch.float32)]
    )
    log(f"rendered {len(x_train)} training cases ({n_dicom} through DICOM)")
    sizes = (256, 320, 384, 512)
    x_val, y_val = dicom_set(args.seed + VAL_SEED_OFFSET, args.n_val, sizes, spec, args.prevalence)
    x_test, y_test = dicom_set(
        args.seed + TEST_SEED_OFFSET, args.n_test, sizes, spec, args.prevalence
    )
    log(f"rendered {len(x_val)} validation and {len(x_test)} held-out DICOM cases")

    # --- training
    net = build_network().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=steps_per_epoch * args.epochs, pct_start=0.15
    )
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        size = SERVE_SIZE if epoch >= args.epochs - args.full_size_epochs else args.train_size
        net.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for start in range(0, len(perm), args.batch_size):
            idx = perm[start : start + args.batch_size]
            x = x_train[idx].float()
            if size != SERVE_SIZE:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
            x = x.expand(-1, 3, -1, -1).to(device)
            y = y_train[idx].to(device)
            loss_el = F.binary_cross_entropy_with_logits(net(x), y, reduction="none")
            loss = (loss_el * mask.to(device)).sum() / (mask.sum() * len(idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        p_val = predict(net, x_val, device)
        aucs = [
            roc_auc_score(y_val[:, k], p_val[:, k])
            for k in trained
            if y_val[:, k].min() != y_val[:, k].max()
        ]
        log(
            f"epoch {epoch + 1}/{args.epochs} size {size}: loss {total / len(x_train):.4f}, "
            f"val mean AUROC {np.mean(aucs):.3f}"
        )

    # --- thresholds on validation, AUROC on the held-out test
    p_val = predict(net, x_val, device)
    p_test = predict(net, x_test, device)
    thresholds: dict[str, float] = {}
    auroc: dict[str, float | None] = {}
    reported: dict[str, bool] = {}
    for k, name in enumerate(CHEXNET_LABELS):
        if k not in trained:
            auroc[name] = None
            continue
        thresholds[name] = youden_threshold(y_val[:, k], p_val[:, k])
        has_both = y_test[:, k].min() != y_test[:, k].max()
        auroc[name] = float(roc_auc_score(y_test[:, k], p_test[:, k])) if has_both else None
        value = auroc[name]
        reported[name] = value is not None and value >= REPORT_MIN_AUROC and name in LABEL_CODES
    log("held-out AUROC: " + ", ".join(f"{n} {a:.3f}" for n, a in auroc.items() if a is not None))

    # --- outputs
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "weights.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(weights))
    write_manifest(args.out, sha256_file(weights), thresholds, reported, args.version, batch_size=8)
    load_manifest(args.out)
    elapsed = time.time() - started
    metrics = {
        "command": command,
        "seed": args.seed,
        "val_seed_base": args.seed + VAL_SEED_OFFSET,
        "test_seed_base": args.seed + TEST_SEED_OFFSET,
        "case_seed": "base * 1000000 + index",
        "n_train": args.n_train,
        "n_train_dicom": n_dicom,
        "n_val": args.n_val,
        "n_test": args.n_test,
        "epochs": args.epochs,
        "train_size": args.train_size,
        "full_size_epochs": args.full_size_epochs,
        "prevalence": args.prevalence,
        "test_positives": {
            name: int(y_test[:, k].sum()) for k, name in enumerate(CHEXNET_LABELS) if k in trained
        },
        "heldout_auroc": auroc,
        "thresholds_youden_val": thresholds,
        "reported": sorted(name for name, on in reported.items() if on),
        "report_min_auroc": REPORT_MIN_AUROC,
        "seconds": round(elapsed, 1),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()}".strip(),
        "torch": torch.__version__,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {weights}, manifest.toml and metrics.json in {elapsed:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
