"""Calibrate the shipped demo models' out-of-distribution gates on their own synthetic data.

``python -m pacsnode.gates.train_ood --model cxr-chexnet`` writes phantoms of the kind the
model was trained on (same generator, seeds it was not trained on) as DICOM into a temporary
folder and runs exactly what a site runs, ``pacsnode models calibrate`` (half fit, half set
the threshold at the 0.99 quantile). It then measures the false-flag rate on the model's
*held-out* phantoms (its test seed range, never seen by the calibration) and writes the
figures to ``ood-metrics.json`` and the model card's "Out-of-distribution gate" section.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pydicom import dcmread

from pacsnode.gates import ood
from pacsnode.gates.calibrate import calibrate_folder, image_features
from pacsnode.manifest import load_manifest
from pacsnode.volumes import load_volume, plan_volume, read_slice_refs

CARD_START = "<!-- ood:start -->"
CARD_END = "<!-- ood:end -->"


def write_cxr(folder: Path, seed_base: int, n: int) -> None:
    """``n`` chest phantoms as the CXR model's training renders them through DICOM."""
    from pacsnode.models.train_cxr import case_seed, random_dicom_kwargs
    from pacsnode.phantoms.cxr import make_cxr_dataset

    for i in range(n):
        kw = random_dicom_kwargs(np.random.default_rng([seed_base, i, 7]), (256, 320, 384, 512))
        ds, _ = make_cxr_dataset(case_seed(seed_base, i), **kw)  # type: ignore[arg-type]
        ds.save_as(folder / f"{i:05d}.dcm", enforce_file_format=True)


def write_ctpa(folder: Path, seed_base: int, n: int) -> None:
    from pacsnode.phantoms.ctpa import make_ctpa_case, write_ctpa_series

    for i in range(n):
        case = make_ctpa_case(seed_base * 100_000 + i)
        write_ctpa_series(folder / f"{i:04d}", case, rows=160, slices=64, slice_spacing_mm=2.5)


def write_abdomen(folder: Path, seed_base: int, n: int) -> None:
    from pacsnode.phantoms.abdomen import make_abdomen_case, write_abdomen_series

    for i in range(n):
        case = make_abdomen_case(seed_base * 100_000 + i)
        write_abdomen_series(folder / f"{i:04d}", case, rows=160)


WRITERS: dict[str, Callable[[Path, int, int], None]] = {
    "cxr-chexnet": write_cxr,
    "ct-pe": write_ctpa,
    "ct-kidney": write_abdomen,
}


def held_out_distances(
    model_dir: Path, folder: Path, gates_dir: Path, stats: ood.OodStats
) -> np.ndarray:
    """Distances of every input under ``folder`` (all of them: held-out phantoms)."""
    manifest = load_manifest(model_dir)
    device = torch.device("cpu")
    if manifest.accepts.ct is None:
        datasets = [dcmread(p) for p in sorted(folder.rglob("*.dcm"))]
        return stats.distances(image_features(model_dir, datasets, device))
    from pacsnode.gates.ct import CtGate

    assert manifest.accepts.scope.content_gate is not None
    gate = CtGate.load(gates_dir / manifest.accepts.scope.content_gate, device)
    rows = []
    for series in sorted(p for p in folder.iterdir() if p.is_dir()):
        paths = sorted(series.rglob("*.dcm"))
        volume = load_volume(plan_volume(read_slice_refs(paths), series.name))
        rows.append(gate.inspect(volume).features)
    return stats.distances(np.stack(rows))


def write_card(card: Path, metrics: dict[str, object]) -> None:
    """Replace the card's out-of-distribution section (between markers) with ``metrics``."""
    section = (
        f"{CARD_START}\n## Out-of-distribution gate\n\n"
        f"Made by `{metrics['command']}`, which runs `pacsnode models calibrate` on "
        f"{metrics['calibration_inputs']} synthetic phantoms from this model's own training "
        f"generator, on seeds it was not trained on: {metrics['n_fit']} fit the distribution of "
        f"the {metrics['features']}, {metrics['n_threshold']} set the threshold at the "
        f"{metrics['quantile']} quantile (Mahalanobis distance {metrics['threshold']:.2f}).\n\n"
        f"Measured on {metrics['n_test']} **held-out** phantoms (seeds used neither in "
        f"training nor above): **{100 * float(str(metrics['held_out_flagged'])):.1f} %** flagged "
        f"(target about {100 * (1 - float(str(metrics['quantile']))):.0f} %).\n\n"
        "These statistics describe synthetic phantoms only: nearly every real image lies "
        "outside them and is declined, which is the correct answer for demo weights. A site "
        "with real weights runs `pacsnode models calibrate` on its own studies.\n"
        f"{CARD_END}\n"
    )
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    pattern = re.compile(re.escape(CARD_START) + r".*?" + re.escape(CARD_END) + r"\n?", re.S)
    text = pattern.sub(section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    card.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=sorted(WRITERS))
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--n-calibration", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--quantile", type=float, default=ood.DEFAULT_QUANTILE)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    image = args.model == "cxr-chexnet"
    n_cal = args.n_calibration or (800 if image else 240)
    n_test = args.n_test or (400 if image else 120)
    model_dir = args.models_dir / args.model
    gates_dir = args.models_dir / "gates"
    started = time.time()
    # calibration: the model's validation seeds (unseen in training, like the inputs it
    # will meet); evaluation: its held-out test seeds
    seed_train, seed_test = (2000, 1000) if image else (7, 8)
    with tempfile.TemporaryDirectory(prefix="pacsnode-ood-") as tmp:
        cal, test = Path(tmp) / "calibration", Path(tmp) / "test"
        cal.mkdir()
        test.mkdir()
        WRITERS[args.model](cal, seed_train, n_cal)
        WRITERS[args.model](test, seed_test, n_test)
        result = calibrate_folder(model_dir, cal, gates_dir=gates_dir, quantile=args.quantile)
        distances = held_out_distances(model_dir, test, gates_dir, result.stats)
    command = f"python -m pacsnode.gates.train_ood --model {args.model}"
    metrics: dict[str, object] = {
        "command": command,
        "calibration_inputs": result.inputs,
        "n_fit": result.stats.n_fit,
        "n_threshold": result.stats.n_calibration,
        "features": result.stats.features,
        "quantile": args.quantile,
        "threshold": result.stats.threshold,
        "n_test": int(len(distances)),
        "held_out_flagged": float(np.mean(distances > result.stats.threshold)),
        "held_out_distance_median": float(np.median(distances)),
        "seconds": round(time.time() - started, 1),
    }
    (model_dir / "ood-metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_card(model_dir / "MODEL_CARD.md", metrics)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
