"""``pacsnode models calibrate``: out-of-distribution statistics from a folder of DICOM.

A site that brings its own weights calibrates the out-of-distribution gate on its own
studies: every file under the folder that the model would take (modality, SOP class and
header scope) is read; the model's features (images) or the content gate's embedding (CT
series) are computed; half the inputs (by UID, so reruns split alike) fit the distribution,
the other half set the threshold at the chosen quantile. The statistics are written to
the model folder and pinned in its manifest (``[ood]``), so the next ``serve`` uses them.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pacsnode import scope
from pacsnode.errors import InputError, ManifestError
from pacsnode.gates import ood
from pacsnode.manifest import MANIFEST_FILE, Manifest, load_manifest
from pacsnode.volumes import load_volume, plan_volume, read_slice_refs

MIN_INPUTS = 20
"""Fewer usable inputs are refused: half of them set a 0.99 quantile."""
FEW_INPUTS = 200
"""Below this many the threshold is rough, and the command says so."""


@dataclass(frozen=True)
class Calibration:
    """What a calibration used and found."""

    stats: ood.OodStats
    sha256: str
    inputs: int  # images or series used
    skipped: dict[str, int]  # why the other files were not used, with counts
    held_out_flagged: float  # fraction of the threshold's own half above it


def split(uids: Iterable[str]) -> tuple[list[int], list[int]]:
    """Indices of the fitting half and the threshold half, decided by each UID's hash."""
    fit: list[int] = []
    held: list[int] = []
    for i, uid in enumerate(uids):
        (fit if hashlib.sha256(uid.encode()).digest()[0] % 2 == 0 else held).append(i)
    return fit, held


def image_features(
    model_dir: Path, datasets: Sequence[Dataset], device: torch.device
) -> np.ndarray:
    """Pooled penultimate features of an image classifier, one row per dataset."""
    from pacsnode.models import load_model
    from pacsnode.models.base import ImageClassifier

    model = load_model(model_dir, device)
    if not isinstance(model, ImageClassifier):
        raise ManifestError(f"model {model.manifest.name}: not an image classifier")
    rows = []
    for start in range(0, len(datasets), model.manifest.batch_size):
        for result in model.predict(datasets[start : start + model.manifest.batch_size]):
            if result.features is None:
                raise ManifestError(f"model {model.manifest.name} gives no features")
            rows.append(result.features)
    return np.stack(rows)


def calibrate_folder(
    model_dir: Path,
    folder: Path,
    *,
    gates_dir: Path,
    quantile: float = ood.DEFAULT_QUANTILE,
    device: torch.device | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> Calibration:
    """Calibrate ``model_dir``'s out-of-distribution gate on the DICOM under ``folder``."""
    device = device or torch.device("cpu")
    manifest = load_manifest(model_dir)
    skipped: dict[str, int] = defaultdict(int)
    by_series: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (OSError, InvalidDicomError, ValueError, EOFError):
            skipped["not DICOM"] += 1
            continue
        reason = _out_of_contract(manifest, ds)
        if reason is not None:
            skipped[reason] += 1
            continue
        by_series[str(ds.get("SeriesInstanceUID", ""))].append((path, ds))
    if manifest.accepts.ct is None:
        uids, rows = _images(model_dir, by_series, device, skipped, progress)
        what = f"pooled penultimate features of {manifest.name}"
    else:
        uids, rows = _series(manifest, by_series, gates_dir, device, skipped, progress)
        what = f"embedding of content gate {manifest.accepts.scope.content_gate}"
    if len(uids) < MIN_INPUTS:
        raise InputError(
            f"{folder}: {len(uids)} usable inputs for {manifest.name}; at least {MIN_INPUTS} "
            f"are needed (skipped: {dict(skipped) or 'none'})"
        )
    features = np.stack(rows)
    fit, held = split(uids)
    if len(fit) < 2 or len(held) < 2:
        fit, held = list(range(0, len(uids), 2)), list(range(1, len(uids), 2))
    stats = ood.calibrate(
        features[fit],
        features[held],
        quantile=quantile,
        source=f"{len(uids)} inputs from {folder.name}",
        features=what,
    )
    sha256 = ood.save(stats, model_dir / ood.OOD_FILE)
    write_ood_spec(model_dir / MANIFEST_FILE, ood.OOD_FILE, sha256)
    load_manifest(model_dir)  # still valid
    flagged = float(np.mean(stats.distances(features[held]) > stats.threshold))
    return Calibration(stats, sha256, len(uids), dict(skipped), flagged)


def write_ood_spec(manifest_path: Path, file: str, sha256: str) -> None:
    """Set ``[ood]`` in a manifest, leaving the rest of the file as written."""
    text = manifest_path.read_text(encoding="utf-8")
    table = f'[ood]\nfile = "{file}"\nsha256 = "{sha256}"\n'
    pattern = re.compile(r"^\[ood\]\n(?:(?!\[).*\n?)*", re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(table + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + table
    manifest_path.write_text(text, encoding="utf-8")


def _out_of_contract(manifest: Manifest, ds: Dataset) -> str | None:
    accepts = manifest.accepts
    modality = str(ds.get("Modality", ""))
    if modality not in accepts.modalities:
        return f"modality {modality or '(none)'}"
    if accepts.sop_classes and str(ds.get("SOPClassUID", "")) not in accepts.sop_classes:
        return "SOP class not read by the model"
    refusal = scope.check(scope.facts(ds), accepts, manifest.name)
    if refusal is not None and (accepts.ct is None or refusal.kind != "view"):
        return f"outside the header scope ({refusal.kind})"
    return None


def _images(
    model_dir: Path,
    by_series: dict[str, list[tuple[Path, Dataset]]],
    device: torch.device,
    skipped: dict[str, int],
    progress: Callable[[str], None],
) -> tuple[list[str], list[np.ndarray]]:
    datasets: list[Dataset] = []
    uids: list[str] = []
    for members in by_series.values():
        for path, header in members:
            try:
                datasets.append(dcmread(path))
                uids.append(str(header.SOPInstanceUID))
            except (OSError, InvalidDicomError, ValueError, EOFError, AttributeError):
                skipped["unreadable"] += 1
    progress(f"computing features of {len(datasets)} images")
    if not datasets:
        return [], []
    return uids, list(image_features(model_dir, datasets, device))


def _series(
    manifest: Manifest,
    by_series: dict[str, list[tuple[Path, Dataset]]],
    gates_dir: Path,
    device: torch.device,
    skipped: dict[str, int],
    progress: Callable[[str], None],
) -> tuple[list[str], list[np.ndarray]]:
    from pacsnode.gates.ct import CtGate

    name = manifest.accepts.scope.content_gate
    if name is None:
        raise ManifestError(
            f"model {manifest.name}: a CT model's out-of-distribution score is measured on its "
            "content gate's embedding; the manifest names no [accepts.scope] content_gate"
        )
    gate = CtGate.load(gates_dir / name, device)
    criteria = manifest.accepts.ct
    min_slices = criteria.min_slices if criteria is not None else 2
    uids, rows = [], []
    for series_uid, members in sorted(by_series.items()):
        try:
            plan = plan_volume(read_slice_refs([p for p, _ in members]), series_uid)
            if len(plan.slices) < min_slices:
                skipped[f"fewer than {min_slices} slices"] += 1
                continue
            volume = load_volume(plan)
        except InputError:
            skipped["not a volume"] += 1
            continue
        progress(f"series {series_uid}: {len(plan.slices)} slices")
        uids.append(series_uid)
        rows.append(gate.inspect(volume).features)
    return uids, rows
