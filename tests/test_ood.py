"""Out-of-distribution gate (pacsnode.gates.ood) and `pacsnode models calibrate`.

The statistics are checked against an independent implementation (scikit-learn's
Ledoit-Wolf), the threshold against its definition, and the command end to end on a copy of
the chest X-ray model folder with a folder of DICOM the way a site would have it: phantoms of
the kind the model reads, plus files it must skip.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from nodeproc import MODELS_DIR
from pydicom.data import get_testdata_file
from sklearn.covariance import LedoitWolf

from pacsnode.cli import main
from pacsnode.errors import ManifestError
from pacsnode.gates import ood
from pacsnode.gates.calibrate import image_features, write_ood_spec
from pacsnode.manifest import load_manifest
from pacsnode.phantoms.cxr import make_cxr_dataset
from pacsnode.phantoms.radiographs import make_radiograph_dataset


def test_shrunk_covariance_matches_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 40)) @ rng.normal(size=(40, 40))
    mean, cov = ood.ledoit_wolf(x)
    reference = LedoitWolf().fit(x)
    assert np.allclose(mean, reference.location_)
    assert np.allclose(cov, reference.covariance_, atol=1e-10)


def test_threshold_is_the_held_out_quantile_and_far_inputs_fail() -> None:
    rng = np.random.default_rng(4)
    fit, held = rng.normal(size=(300, 8)), rng.normal(size=(400, 8))
    stats = ood.calibrate(fit, held, quantile=0.95, source="test", features="gaussian")
    assert np.mean(stats.distances(held) > stats.threshold) == pytest.approx(0.05, abs=0.005)
    fresh = rng.normal(size=(4000, 8))
    assert np.mean(stats.distances(fresh) > stats.threshold) == pytest.approx(0.05, abs=0.02)
    verdict = stats.verdict(float(stats.distances(np.full(8, 6.0))[0]))
    assert not verdict.passed
    assert verdict.reason is not None and "outside the data this model was trained on" in (
        verdict.reason
    )
    assert verdict.scores["ood_threshold"] == stats.threshold
    with pytest.raises(ValueError, match="features: 3 values per input"):
        stats.distances(np.zeros(3))


def test_saved_statistics_are_pinned_by_the_manifest(tmp_path: Path) -> None:
    model = tmp_path / "cxr-chexnet"
    shutil.copytree(MODELS_DIR / "cxr-chexnet", model)
    stats = ood.load(model, load_manifest(model))
    assert stats is not None and stats.quantile == 0.99 and stats.n_fit > 100
    (model / ood.OOD_FILE).write_bytes((model / ood.OOD_FILE).read_bytes()[:-8] + b"tampered")
    with pytest.raises(ManifestError, match="ood.safetensors has sha256"):
        ood.load(model, load_manifest(model))


def test_calibrate_command_on_a_site_folder(tmp_path: Path) -> None:
    """The command a site runs: statistics from its own folder replace the shipped ones, are
    pinned in the manifest, and flag an image unlike the folder's."""
    models = tmp_path / "models"
    model = models / "cxr-chexnet"
    shutil.copytree(MODELS_DIR / "cxr-chexnet", model)
    folder = tmp_path / "site"
    (folder / "deep" / "er").mkdir(parents=True)
    for i in range(48):
        ds, _ = make_cxr_dataset(4000 + i, rows=256, cols=256, modality="CR")
        ds.save_as(folder / "deep" / "er" / f"cxr{i}.dcm", enforce_file_format=True)
    (folder / "README.txt").write_text("not DICOM")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")  # another modality
    shutil.copy(get_testdata_file("RG3_UNCR.dcm"), folder / "leg.dcm")  # EXTREMITY: skipped
    config = tmp_path / "pacsnode.toml"
    config.write_text(f'[models]\ndir = "{models}"\n')
    old = (model / ood.OOD_FILE).read_bytes()

    result = CliRunner().invoke(
        main,
        ["--config", str(config), "models", "calibrate", str(model), "--images", str(folder)]
        + ["--quantile", "0.95", "--json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout[result.stdout.index("[") :])
    assert row["inputs"] == 48 and row["fitted"] + row["threshold_set_on"] == 48
    assert "not DICOM: 1" in row["skipped"] and "modality CT: 1" in row["skipped"]
    assert "outside the header scope (body_part): 1" in row["skipped"]
    assert row["note"].startswith("fewer than 200 inputs")
    assert (model / ood.OOD_FILE).read_bytes() != old
    manifest = load_manifest(model)
    assert manifest.ood is not None and manifest.ood.sha256 == row["sha256"]
    stats = ood.load(model, manifest)
    assert stats is not None and stats.quantile == 0.95 and "site" in stats.source
    foreign = [make_radiograph_dataset(k, 7, size=256) for k in ("hand_pa", "blank")]
    distances = stats.distances(image_features(model, foreign, torch.device("cpu")))
    assert (distances > stats.threshold).all(), (distances, stats.threshold)


def test_calibrate_refuses_a_folder_without_enough_inputs(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(MODELS_DIR / "cxr-chexnet", models / "cxr-chexnet")
    folder = tmp_path / "empty"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    config = tmp_path / "pacsnode.toml"
    config.write_text(f'[models]\ndir = "{models}"\n')
    result = CliRunner().invoke(
        main,
        ["--config", str(config), "models", "calibrate", str(models / "cxr-chexnet")]
        + ["--images", str(folder)],
    )
    assert result.exit_code != 0
    assert "0 usable inputs for cxr-chexnet; at least 20 are needed" in result.output


def test_ood_table_is_written_once_and_replaced(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.toml"
    manifest.write_text('name = "x"\n\n[[labels]]\nname = "a"\n')
    write_ood_spec(manifest, "ood.safetensors", "a" * 64)
    write_ood_spec(manifest, "ood.safetensors", "b" * 64)
    text = manifest.read_text()
    assert text.count("[ood]") == 1 and "b" * 64 in text and "a" * 64 not in text
    assert text.index("[[labels]]") < text.index("[ood]")
