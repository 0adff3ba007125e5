"""The shipped CXR model: verified loading, batching, and held-out performance."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pacsnode.errors import InputError, WeightsMismatchError
from pacsnode.manifest import load_manifest
from pacsnode.models import load_model
from pacsnode.models.cxr import ChexNetClassifier
from pacsnode.models.train_cxr import random_dicom_kwargs
from pacsnode.phantoms.cxr import CHEXNET_LABELS, make_cxr_dataset

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "cxr-chexnet"
CPU = torch.device("cpu")
HELDOUT_SEED_BASE = 7_000_000  # training uses 0.., validation 2000e6.., test 1000e6..


@pytest.fixture(scope="module")
def model() -> ChexNetClassifier:
    torch.set_num_threads(2)
    loaded = load_model(MODEL_DIR, CPU)
    assert isinstance(loaded, ChexNetClassifier)
    return loaded


def test_manifest_is_consistent(model: ChexNetClassifier) -> None:
    manifest = model.manifest
    assert manifest.kind == "cxr-densenet121"
    assert manifest.synthetic is True
    assert manifest.label_names == list(CHEXNET_LABELS)
    assert not model.network.training
    assert (MODEL_DIR / "weights.safetensors").stat().st_size < 30 * 2**20


def test_tampered_weights_refused(tmp_path: Path) -> None:
    copy = tmp_path / "cxr"
    shutil.copytree(MODEL_DIR, copy)
    weights = copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsMismatchError, match="sha256"):
        ChexNetClassifier.load(copy, CPU)


def test_batch_equals_single(model: ChexNetClassifier) -> None:
    datasets = [
        make_cxr_dataset(HELDOUT_SEED_BASE + 900 + i, rows=200, cols=240)[0] for i in range(3)
    ]
    batch = model.predict(datasets)
    assert [r.sop_instance_uid for r in batch] == [ds.SOPInstanceUID for ds in datasets]
    for ds, result in zip(datasets, batch, strict=True):
        (single,) = model.predict([ds])
        assert set(single.probabilities) == set(CHEXNET_LABELS)
        for name in CHEXNET_LABELS:
            assert abs(single.probabilities[name] - result.probabilities[name]) < 1e-4
            assert 0.0 <= result.probabilities[name] <= 1.0


def test_undecodable_instance_named(model: ChexNetClassifier) -> None:
    ds, _ = make_cxr_dataset(HELDOUT_SEED_BASE + 950, rows=64, cols=64)
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(InputError, match=ds.SOPInstanceUID):
        model.predict([ds])


def test_heldout_auroc_of_reported_labels(model: ChexNetClassifier) -> None:
    manifest = load_manifest(MODEL_DIR)
    reported = [label.name for label in manifest.reported_labels]
    assert reported, "the shipped model reports no label"
    n = 200
    datasets, truth = [], []
    for i in range(n):
        kw = random_dicom_kwargs(np.random.default_rng([HELDOUT_SEED_BASE, i]), (224, 288))
        kw["transfer_syntax"] = "1.2.840.10008.1.2.1"
        ds, labels = make_cxr_dataset(HELDOUT_SEED_BASE + i, **kw)
        datasets.append(ds)
        truth.append(labels)
    results = model.predict(datasets)
    for name in reported:
        y = np.array([t[name] for t in truth])
        p = np.array([r.probabilities[name] for r in results])
        assert 0 < y.sum() < n, name
        auroc = roc_auc_score(y, p)
        assert auroc >= 0.90, f"{name}: held-out AUROC {auroc:.3f}"
