"""Importing a checkpoint in the public CheXNet layout reproduces the original outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet121

from pacsnode.errors import ManifestError
from pacsnode.manifest import load_manifest, sha256_file
from pacsnode.models.cxr import ChexNetClassifier, import_chexnet, preprocess
from pacsnode.phantoms.cxr import make_cxr_dataset

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "cxr-chexnet"


def _to_public_layout(name: str) -> str:
    """MONAI name -> public CheXNet name, by explicit per-part rules (independent of the code)."""
    parts = name.split(".")
    if parts[0] == "class_layers":
        return "module.densenet121.classifier.0." + parts[-1]
    out = []
    for part in parts:
        if part == "layers":
            continue
        if part in ("norm1", "norm2", "conv1", "conv2", "relu1", "relu2") and any(
            p.startswith("denselayer") for p in parts
        ):
            out += [part[:-1], part[-1]]
        else:
            out.append(part)
    return "module.densenet121." + ".".join(out)


def _public_checkpoint(tmp_path: Path, drop_counters: bool) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(123)
    original = DenseNet121(spatial_dims=2, in_channels=3, out_channels=14)
    # give BatchNorm non-trivial statistics so a mis-mapped buffer would show
    with torch.no_grad():
        for module in original.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.8, 1.2)
                module.weight.uniform_(0.8, 1.2)
    original.eval()
    state = {}
    for key, value in original.state_dict().items():
        if drop_counters and key.endswith("num_batches_tracked"):
            continue
        state[_to_public_layout(key)] = value.clone()
    assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in state
    assert "module.densenet121.features.transition1.conv.weight" in state
    assert state["module.densenet121.classifier.0.weight"].shape == (14, 1024)
    path = tmp_path / "model.pth.tar"
    torch.save({"epoch": 1, "state_dict": state}, path)
    return path, original


@pytest.mark.parametrize("drop_counters", [False, True])
def test_import_reproduces_outputs(tmp_path: Path, drop_counters: bool) -> None:
    checkpoint, original = _public_checkpoint(tmp_path, drop_counters)
    model_dir = tmp_path / "cxr"
    shutil.copytree(MODEL_DIR, model_dir)
    before = (model_dir / "manifest.toml").read_text()

    weights = import_chexnet(checkpoint, model_dir)

    manifest = load_manifest(model_dir)
    assert manifest.weights.sha256 == sha256_file(weights)
    after = (model_dir / "manifest.toml").read_text()
    changed = [
        (a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b
    ]
    assert len(changed) == 1 and changed[0][1].startswith("sha256")

    classifier = ChexNetClassifier.load(model_dir, torch.device("cpu"))
    datasets = [make_cxr_dataset(500 + i, rows=160, cols=160)[0] for i in range(2)]
    results = classifier.predict(datasets)
    x = torch.stack([preprocess(ds, manifest.input) for ds in datasets])
    with torch.inference_mode():
        expected = torch.sigmoid(original(x)).numpy()
    got = np.array([[r.probabilities[n] for n in manifest.label_names] for r in results])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_wrong_shape_and_unknown_key_refused(tmp_path: Path) -> None:
    checkpoint, _ = _public_checkpoint(tmp_path, drop_counters=False)
    model_dir = tmp_path / "cxr"
    shutil.copytree(MODEL_DIR, model_dir)
    state = torch.load(checkpoint, weights_only=True)["state_dict"]

    bad = dict(state)
    bad["module.densenet121.classifier.0.weight"] = torch.zeros(15, 1024)
    torch.save({"state_dict": bad}, tmp_path / "shape.pth")
    with pytest.raises(ManifestError, match="shape"):
        import_chexnet(tmp_path / "shape.pth", model_dir)

    extra = dict(state)
    extra["module.densenet121.features.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": extra}, tmp_path / "extra.pth")
    with pytest.raises(ManifestError, match="unexpected key"):
        import_chexnet(tmp_path / "extra.pth", model_dir)

    missing = {k: v for k, v in state.items() if "denseblock4.denselayer16.conv.2" not in k}
    torch.save({"state_dict": missing}, tmp_path / "missing.pth")
    with pytest.raises(ManifestError, match="missing"):
        import_chexnet(tmp_path / "missing.pth", model_dir)
    assert load_manifest(model_dir).weights.sha256 == load_manifest(MODEL_DIR).weights.sha256
