"""The shipped radiograph content gate: it looks at pixels, never at the header.

Held-out phantoms of every kind (seeds the training never used), lying headers, the real
radiographs of pydicom-data, train/serve preprocessing, and the weights' sha256 check.
Expected rates come from the gate's own ``metrics.json`` (measured by the training script)
minus a margin for the small samples drawn here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peers import dciodvfy
from pydicom import dcmread
from pydicom.data import get_testdata_file

from pacsnode.errors import InputError, ManifestError, WeightsMismatchError
from pacsnode.gates import GateVerdict
from pacsnode.gates.radiograph import RadiographGate, display_to_input, preprocess
from pacsnode.gates.train_radiograph import input_of, plain_cxr_dataset
from pacsnode.phantoms.cxr import make_cxr_dataset
from pacsnode.phantoms.radiographs import (
    CHEST_KINDS,
    CLASSES,
    KIND_SPECS,
    KINDS,
    make_radiograph_dataset,
    render_radiograph,
)

GATE_DIR = Path(__file__).resolve().parents[1] / "models" / "gates" / "radiograph-view"
CPU = torch.device("cpu")
TEST_SEED_BASE = 7_000_000  # training uses 0.., the training script's held-out set 1000e6..
N_PER_KIND = 6
MARGIN = 0.2  # one miss in six below the measured rate, and some more
NON_CHEST = [k for k in KINDS if k not in CHEST_KINDS]


@pytest.fixture(scope="module")
def gate() -> RadiographGate:
    return RadiographGate.load(GATE_DIR, CPU)


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((GATE_DIR / "metrics.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def verdicts(gate: RadiographGate) -> dict[str, list[GateVerdict]]:
    """Gate verdicts on fresh phantoms of every kind, 256–356 px, random CR/DX encodings."""
    out = {}
    for k, kind in enumerate(KINDS):
        datasets = [
            make_radiograph_dataset(
                kind,
                TEST_SEED_BASE + 100 * k + i,
                size=256 + 20 * i,
                modality="DX" if i % 2 else "CR",
            )
            for i in range(N_PER_KIND)
        ]
        out[kind] = gate.check(datasets)
    return out


def _readable(reason: str | None) -> None:
    assert reason, "a refusal must say why"
    assert reason.startswith("image ") and "frontal chest radiograph" in reason
    assert "needs ≥" in reason
    for word in ("Error", "Exception", "Traceback", "tensor", "None"):
        assert word not in reason, reason


def test_gate_toml_is_consistent(gate: RadiographGate, metrics: dict) -> None:
    assert gate.name == "radiograph-view"
    assert gate.synthetic is True
    assert gate.classes() == list(CLASSES)
    assert gate.spec.accepted == "frontal_chest"
    assert 0.0 < gate.threshold < 1.0
    assert gate.input_size == 128
    assert not gate.network.training
    assert metrics["threshold"] == gate.threshold
    assert set(metrics["heldout"]["per_source"]) >= set(KINDS)


def test_every_non_chest_kind_is_refused(
    verdicts: dict[str, list[GateVerdict]], metrics: dict
) -> None:
    measured = metrics["heldout"]["per_source"]
    refused_all = []
    for kind in NON_CHEST:
        refused = [not v.passed for v in verdicts[kind]]
        refused_all += refused
        rate = float(np.mean(refused))
        assert rate >= measured[kind]["refused_rate"] - MARGIN, (
            f"{kind}: refused {rate:.2f} here, {measured[kind]['refused_rate']:.2f} when trained"
        )
        for v in verdicts[kind]:
            assert set(v.scores) == set(CLASSES)
            if not v.passed:
                _readable(v.reason)
    overall = float(np.mean(refused_all))
    assert overall >= min(0.97, 1.0 - metrics["heldout"]["false_accept_rate"] - 0.03)


def test_frontal_chest_phantoms_pass(verdicts: dict[str, list[GateVerdict]], metrics: dict) -> None:
    measured = metrics["heldout"]["per_source"]
    for kind in CHEST_KINDS:
        rate = float(np.mean([v.passed for v in verdicts[kind]]))
        assert rate >= measured[kind]["passed_rate"] - MARGIN, kind
        for v in verdicts[kind]:
            assert v.passed == (v.scores["frontal_chest"] >= 0.5)
            assert v.passed == (v.reason is None)


def test_plain_cxr_phantoms_pass(gate: RadiographGate, metrics: dict) -> None:
    """The chest model's own phantoms, at the sizes the node's tests use, are let through."""
    sizes = [(64, 64), (200, 240), (256, 256), (320, 256), (512, 512), (1024, 1024)]
    datasets = [
        make_cxr_dataset(TEST_SEED_BASE + 900 + i, rows=r, cols=c)[0]
        for i, (r, c) in enumerate(sizes)
    ]
    datasets += [
        plain_cxr_dataset(TEST_SEED_BASE + 950 + i, np.random.default_rng(i), 384) for i in range(6)
    ]
    passed = [v.passed for v in gate.check(datasets)]
    measured = metrics["heldout"]["per_source"]["cxr_plain"]["passed_rate"]
    assert float(np.mean(passed)) >= measured - MARGIN / 2, passed


def test_lying_header_gets_the_same_verdict(gate: RadiographGate) -> None:
    """A leg labelled CHEST PA is refused; the header never changes a verdict."""
    for k, kind in enumerate(("lower_leg_ap", "hand_pa", "abdomen_ap", "lateral_chest")):
        seed = TEST_SEED_BASE + 5000 + k
        common = {"size": 320, "modality": "DX", "photometric": "MONOCHROME2"}
        truthful = make_radiograph_dataset(kind, seed, **common)  # type: ignore[arg-type]
        lying = make_radiograph_dataset(
            kind, seed, body_part="CHEST", view_position="PA", description="Chest PA", **common
        )  # type: ignore[arg-type]
        assert lying.BodyPartExamined == "CHEST" and lying.ViewPosition == "PA"
        assert truthful.BodyPartExamined == KIND_SPECS[kind].body_part
        assert lying.PixelData == truthful.PixelData
        silent = make_radiograph_dataset(kind, seed, **common)  # type: ignore[arg-type]
        for keyword in ("BodyPartExamined", "ViewPosition", "SeriesDescription"):
            delattr(silent, keyword)
        v_truth, v_lie, v_silent = gate.check([truthful, lying, silent])
        assert v_lie == v_truth == v_silent
        assert not v_lie.passed, f"{kind} labelled CHEST PA passed: {v_lie.scores}"
        _readable(v_lie.reason)
    chest = make_radiograph_dataset("frontal_chest_pa", TEST_SEED_BASE + 5100, size=384)
    labelled_leg = make_radiograph_dataset(
        "frontal_chest_pa", TEST_SEED_BASE + 5100, size=384, body_part="EXTREMITY", view_position=""
    )
    assert gate.check([chest]) == gate.check([labelled_leg])


def test_mislabelled_photometric_is_refused(gate: RadiographGate) -> None:
    """A MONOCHROME1 chest whose header says MONOCHROME2 displays inverted: the chest model
    must not read it, and the gate, which sees what the display sees, refuses it."""
    datasets = []
    for i in range(4):
        ds, _ = make_cxr_dataset(TEST_SEED_BASE + 5200 + i, rows=320, cols=320)
        assert gate.check([ds])[0].passed
        ds.PhotometricInterpretation = "MONOCHROME1"  # the stored values are MONOCHROME2
        datasets.append(ds)
    for verdict in gate.check(datasets):
        assert not verdict.passed, verdict.scores
        _readable(verdict.reason)


def test_real_lower_leg_is_refused(gate: RadiographGate) -> None:
    ds = dcmread(get_testdata_file("RG3_UNCR.dcm"))  # real CR, tibia/fibula AP and ankle
    assert ds.BodyPartExamined == "EXTREMITY"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"  # the header lies: no difference
    (verdict,) = gate.check([ds])
    assert not verdict.passed, verdict.scores
    _readable(verdict.reason)


def test_real_chest_is_recorded(gate: RadiographGate, metrics: dict) -> None:
    """RG1 is a real CR chest PA; a phantom-trained gate may refuse it, but must say why."""
    ds = dcmread(get_testdata_file("RG1_UNCR.dcm"))
    (verdict,) = gate.check([ds])
    assert abs(sum(verdict.scores.values()) - 1.0) < 0.01
    assert verdict.passed == (verdict.scores["frontal_chest"] >= gate.threshold)
    if not verdict.passed:
        _readable(verdict.reason)
    recorded = metrics["real_images"]["RG1_UNCR.dcm"]
    assert recorded["passed"] == verdict.passed
    assert abs(recorded["frontal_chest"] - verdict.scores["frontal_chest"]) < 1e-3


def test_training_and_serving_preprocessing_agree(gate: RadiographGate) -> None:
    """Training's input is the serving input, and a phantom rendered small for training
    reads like the same phantom rendered at a real detector's 2048 px."""
    ds = make_radiograph_dataset("knee_ap", TEST_SEED_BASE + 6000, size=300)
    assert torch.equal(input_of(ds)[0], preprocess(ds, gate.input_size))
    for k, kind in enumerate(("lower_leg_ap", "hand_pa", "lspine_lateral")):
        seed = TEST_SEED_BASE + 6001 + k
        small = make_radiograph_dataset(kind, seed, size=224, photometric="MONOCHROME1")
        large = make_radiograph_dataset(kind, seed, size=2048, photometric="MONOCHROME1")
        assert max(large.Rows, large.Columns) == 2048
        x_small, x_large = input_of(small)[0], preprocess(large, gate.input_size)
        diff = float((x_small - x_large).abs().mean()) * 0.25  # in display units
        assert diff < 0.03, f"{kind}: train-size and full-size inputs differ by {diff:.3f}"
        p_small = gate.probabilities(x_small[None])[0]
        p_large = gate.probabilities(x_large[None])[0]
        assert p_small.argmax() == p_large.argmax()
        assert abs(p_small[0] - p_large[0]) < 0.1


def test_letterbox_keeps_the_aspect() -> None:
    tall = np.zeros((300, 100), dtype=np.float32)
    tall[:, 40:60] = 1.0
    x = display_to_input(tall, 128) * 0.25 + 0.5
    assert x.shape == (1, 128, 128)
    profile = x[0].mean(0)  # 300x100 -> 128x43, centred: the 20-px bone is 8.5 px wide
    centre = float((profile * torch.arange(128)).sum() / profile.sum())
    assert abs(centre - 63.5) < 1.0
    assert 7.5 < float(profile.sum()) < 9.5
    assert float(x[0, :, :20].abs().max()) == 0.0  # black letterbox beside the image
    wide = render_radiograph("foot_lateral", 3, size=200).image
    assert display_to_input(wide, 128).shape == (1, 128, 128)


def test_batch_equals_single(gate: RadiographGate) -> None:
    datasets = [
        make_radiograph_dataset(kind, TEST_SEED_BASE + 7000 + i, size=320)
        for i, kind in enumerate(("skull_pa", "frontal_chest_ap", "foot_ap"))
    ]
    batch = gate.check(datasets)
    for ds, v in zip(datasets, batch, strict=True):
        (single,) = gate.check([ds])
        assert single.passed == v.passed
        for name, p in v.scores.items():
            assert abs(single.scores[name] - p) < 1e-3


def test_reason_reads_like_a_report(gate: RadiographGate) -> None:
    probs = np.full(len(CLASSES), 0.01, dtype=np.float32)
    probs[CLASSES.index("frontal_chest")] = 0.03
    probs[CLASSES.index("lower_leg")] = 0.88
    verdict = gate.verdict(probs)
    assert not verdict.passed
    assert verdict.reason == (
        "image looks like a lower-leg radiograph, not a frontal chest radiograph "
        "(frontal chest 0.03, needs ≥ 0.50)"
    )
    assert verdict.scores["lower_leg"] == pytest.approx(0.88)
    probs = np.full(len(CLASSES), 0.04, dtype=np.float32)
    probs[0] = 0.45
    unsure = gate.verdict(probs)
    assert not unsure.passed
    _readable(unsure.reason)
    probs[0] = 0.6
    assert gate.verdict(probs) == GateVerdict(True, None, gate.verdict(probs).scores)


def test_undecodable_pixels_raise_input_error(gate: RadiographGate) -> None:
    ds = make_radiograph_dataset("hand_pa", TEST_SEED_BASE + 8000, size=128)
    ds.PixelData = ds.PixelData[:-64]
    with pytest.raises(InputError, match=str(ds.SOPInstanceUID)):
        gate.check([ds])
    assert gate.check([]) == []


def test_tampered_weights_refused(tmp_path: Path) -> None:
    copy = tmp_path / "gate"
    shutil.copytree(GATE_DIR, copy)
    weights = copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsMismatchError, match=r"weights\.safetensors has sha256"):
        RadiographGate.load(copy, CPU)
    weights.unlink()
    with pytest.raises(ManifestError, match="missing"):
        RadiographGate.load(copy, CPU)


def test_invalid_gate_toml_refused(tmp_path: Path) -> None:
    copy = tmp_path / "gate"
    shutil.copytree(GATE_DIR, copy)
    toml = copy / "gate.toml"
    toml.write_text(
        toml.read_text(encoding="utf-8").replace(
            'accepted = "frontal_chest"', 'accepted = "chest"'
        ),
        encoding="utf-8",
    )
    with pytest.raises(ManifestError, match=r"gate\.toml.*accepted class 'chest'"):
        RadiographGate.load(copy, CPU)
    shutil.rmtree(copy)
    with pytest.raises(ManifestError, match="no gate.toml"):
        RadiographGate.load(copy, CPU)


@pytest.mark.parametrize(
    ("kind", "kw"),
    [
        ("lower_leg_lateral", {"modality": "DX"}),
        ("hand_pa", {"modality": "CR"}),
        ("frontal_chest_ap", {"modality": "DX"}),
        ("knee_ap", {"modality": "DX", "body_part": "CHEST", "view_position": "PA"}),
    ],
)
def test_phantom_datasets_are_valid(tmp_path: Path, kind: str, kw: dict) -> None:
    """The phantoms are valid CR / DX instances, lying header or not (dciodvfy)."""
    ds = make_radiograph_dataset(kind, TEST_SEED_BASE + 9000, size=160, **kw)
    path = tmp_path / f"{kind}.dcm"
    ds.save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy(path)
    assert errors == [], errors
