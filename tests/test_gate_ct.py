"""CT content gate: body region and contrast from the pixels, whatever the header says."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread

from pacsnode.errors import ManifestError
from pacsnode.gates.ct import (
    GATE_FILE,
    REGIONS,
    CtContent,
    CtGate,
    contrast_verdict,
    region_verdict,
    sample_slices,
)
from pacsnode.gates.train_ct import GATE_REGION, evaluate, held_out_set, volume_of
from pacsnode.phantoms.abdomen import make_abdomen_case, write_abdomen_series
from pacsnode.phantoms.ctpa import make_ctpa_case, write_ctpa_series
from pacsnode.phantoms.ctregions import (
    PlainChestCase,
    make_region_case,
    render_region,
    write_region_series,
)
from pacsnode.volumes import Volume, load_volume, plan_volume, read_slice_refs

GATE_DIR = Path(__file__).resolve().parents[1] / "models" / "gates" / "ct-region-contrast"

# Measured on the held-out set below (seed base 1000, small volumes) with the shipped weights;
# the floors are those figures minus a margin, so a worse retraining fails here.
TEST_PER_ANATOMY = {"chest": 10, "abdomen": 10, "head": 5, "pelvis": 5, "lower_limb": 5}
MIN_REGION_ACCURACY = {"chest": 0.9, "abdomen": 0.9, "other": 0.9}
MIN_CONTRAST_ACCURACY = {"chest": 0.9, "abdomen": 0.9, "other": 0.9}


@pytest.fixture(scope="module")
def gate() -> CtGate:
    return CtGate.load(GATE_DIR, torch.device("cpu"))


def _load(paths: tuple[Path, ...] | list[Path], uid: str, min_slices: int = 2) -> Volume:
    return load_volume(plan_volume(read_slice_refs(list(paths)), uid, min_slices=min_slices))


def _check(content: CtContent) -> None:
    assert set(content.region_scores) == set(REGIONS)
    assert sum(content.region_scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert content.region == max(content.region_scores, key=content.region_scores.__getitem__)
    assert 0.0 <= content.enhanced <= 1.0
    assert content.features.dtype == np.float32 and content.features.ndim == 1
    assert np.isfinite(content.features).all()


# ---------------------------------------------------------------- held-out accuracy


def test_held_out_accuracy_per_region_and_contrast(gate: CtGate) -> None:
    cases = held_out_set(1000, TEST_PER_ANATOMY, max_slices=24, rows=(128, 160))
    got = evaluate(gate, cases)
    assert got["cases"] == 2 * sum(TEST_PER_ANATOMY.values())
    for region in REGIONS:
        assert got["region_accuracy"][region] >= MIN_REGION_ACCURACY[region], (region, got)
        assert got["contrast_accuracy"][region] >= MIN_CONTRAST_ACCURACY[region], (region, got)


# ---------------------------------------------------------------- lying headers


@pytest.mark.parametrize(
    ("anatomy", "contrast", "body_part", "agent", "description", "position"),
    [
        ("chest", True, "CHEST", None, "CT chest without contrast", "HFS"),  # silent header
        ("chest", False, "CHEST", "Iohexol", "CTPA", "FFS"),  # plain chest said to be a CTPA
        ("abdomen", True, "CHEST", "NONE", "CT thorax", "HFP"),  # abdomen labelled chest
        ("abdomen", False, "CHEST", "Omnipaque 350", "CTPA", "HFS"),
        ("head", True, "ABDOMEN", "", "CT abdomen", "FFP"),
        ("pelvis", False, "ABDOMEN", "Iohexol", "CT abdomen portal venous", "HFS"),
        ("lower_limb", True, "CHEST", None, "CT chest", "FFS"),
    ],
)
def test_lying_headers_do_not_fool_the_gate(
    gate: CtGate,
    tmp_path: Path,
    anatomy: str,
    contrast: bool,
    body_part: str,
    agent: str | None,
    description: str,
    position: str,
) -> None:
    case = make_region_case(anatomy, 31, contrast=contrast)
    series = write_region_series(
        tmp_path,
        case,
        rows=128,
        slices=24,
        patient_position=position,
        body_part=body_part,
        contrast_agent=agent,
        series_description=description,
    )
    ds = dcmread(series.paths[0], stop_before_pixels=True)
    assert ds.BodyPartExamined == body_part
    assert ds.get("ContrastBolusAgent") == agent
    got = gate.inspect(_load(series.paths, series.series_uid))
    _check(got)
    assert got.region == GATE_REGION[anatomy], got.region_scores
    assert (got.enhanced >= 0.5) == contrast, got.enhanced


def test_the_same_pixels_under_opposite_headers_give_the_same_answer(
    gate: CtGate, tmp_path: Path
) -> None:
    case = make_abdomen_case(12, contrast=False)
    answers = []
    for n, (part, agent) in enumerate((("ABDOMEN", None), ("CHEST", "Iohexol"))):
        s = write_abdomen_series(
            tmp_path / str(n),
            case,
            rows=96,
            slices=20,
            slice_spacing_mm=10.0,
            body_part=part,
            contrast_agent=agent,
            series_number=2 + n,
        )
        answers.append(gate.inspect(_load(s.paths, s.series_uid)))
    a, b = answers
    assert a.region == b.region == "abdomen"
    assert a.enhanced == pytest.approx(b.enhanced, abs=1e-6) and a.enhanced < 0.5
    np.testing.assert_allclose(a.features, b.features, atol=1e-6)


def test_a_ctpa_written_by_its_own_phantom_with_a_silent_header(
    gate: CtGate, tmp_path: Path
) -> None:
    case = make_ctpa_case(4, kind="negative")
    s = write_ctpa_series(
        tmp_path, case, rows=128, slices=60, slice_spacing_mm=3.0, contrast_agent=None
    )
    got = gate.inspect(_load(s.paths, s.series_uid))
    assert got.region == "chest" and got.enhanced >= 0.5, (got.region_scores, got.enhanced)


# ---------------------------------------------------------------- partial coverage, odd input


def test_five_slices_through_the_kidneys(gate: CtGate) -> None:
    case = make_region_case("abdomen", 44, contrast=True)
    r = render_region(
        case, rows=128, slices=5, slice_spacing_mm=5.0, z_centre_mm=case.anatomy.centre[2]
    )
    got = gate.inspect(volume_of(r))
    _check(got)
    assert got.region == "abdomen" and got.enhanced >= 0.5, (got.region_scores, got.enhanced)


def test_a_ctpa_down_to_the_lung_bases_and_upper_abdomen(gate: CtGate) -> None:
    case = make_region_case("chest", 45, contrast=True)
    chest = case.anatomy
    assert not isinstance(chest, PlainChestCase)
    top = chest.centre[2] - 20.0  # below the carina
    bottom = chest.centre[2] + min(chest.dome_top) - 60.0  # liver and stomach
    r = render_region(
        case,
        rows=128,
        slices=30,
        slice_spacing_mm=(top - bottom) / 29,
        z_centre_mm=(top + bottom) / 2,
    )
    got = gate.inspect(volume_of(r))
    _check(got)
    assert got.region == "chest" and got.enhanced >= 0.5, (got.region_scores, got.enhanced)


def test_one_slice_read_from_dicom(gate: CtGate, tmp_path: Path) -> None:
    case = make_region_case("head", 46, contrast=False)
    s = write_region_series(tmp_path, case, rows=96, slices=9, shuffle=False)
    got = gate.inspect(_load([s.paths[3]], s.series_uid, min_slices=1))
    _check(got)


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [
        ((1, 40, 300), (5.0, 0.4, 0.4)),
        ((3, 700, 90), (1.0, 0.6, 2.5)),
        ((2, 20, 20), (5.0, 4.0, 4.0)),
    ],
)
def test_any_shape_and_spacing(gate: CtGate, shape: tuple[int, ...], spacing: tuple) -> None:
    rng = np.random.default_rng(0)
    array = rng.normal(0.0, 300.0, size=shape).astype(np.float32) - 500.0
    got = gate.inspect(Volume(array, np.eye(4), spacing, (), "odd"))
    _check(got)


def test_sample_slices_are_spread_evenly() -> None:
    assert sample_slices(1, 12).tolist() == [0]
    assert sample_slices(5, 12).tolist() == [0, 1, 2, 3, 4]
    picked = sample_slices(300, 12)
    assert len(picked) == 12 and picked[0] > 0 and picked[-1] < 299
    assert np.ptp(np.diff(picked)) <= 1


def test_real_slices_from_pydicom_data(gate: CtGate) -> None:
    """Real CT (one slice each): an unenhanced head, and an 85 mm crop of a thoracic spine."""
    from pydicom.data import get_testdata_file

    head = gate.inspect(_load([Path(get_testdata_file("693_UNCR.dcm"))], "693", min_slices=1))
    _check(head)
    assert head.region == "other" and head.enhanced < 0.5, (head.region_scores, head.enhanced)
    crop = gate.inspect(_load([Path(get_testdata_file("CT_small.dcm"))], "small", min_slices=1))
    _check(crop)  # far outside what the gate was made for: only that it answers


# ---------------------------------------------------------------- verdicts


def _content(region: dict[str, float], enhanced: float) -> CtContent:
    best = max(region, key=region.__getitem__)
    return CtContent(best, region, enhanced, np.zeros(4, dtype=np.float32))


def test_region_verdict_reasons_read_as_sentences() -> None:
    abdomen = _content({"chest": 0.02, "abdomen": 0.97, "other": 0.01}, 0.9)
    v = region_verdict(abdomen, ["chest"])
    assert not v.passed
    assert v.reason == (
        "CT looks like an abdomen (abdomen 0.97), not a chest examination this model reads"
    )
    assert v.scores["region_abdomen"] == pytest.approx(0.97)
    assert region_verdict(abdomen, ["abdomen"]).passed
    assert region_verdict(abdomen, ["abdomen"]).reason is None
    head = _content({"chest": 0.05, "abdomen": 0.05, "other": 0.9}, 0.1)
    reason = region_verdict(head, ["chest", "abdomen"]).reason
    assert reason is not None and "another body region (other 0.90)" in reason
    assert "not a chest or abdomen examination" in reason
    unsure = _content({"chest": 0.4, "abdomen": 0.35, "other": 0.25}, 0.5)
    reason = region_verdict(unsure, ["chest"]).reason
    assert reason is not None and "uncertain" in reason and "chest 0.40" in reason
    with pytest.raises(ValueError, match="thorax"):
        region_verdict(abdomen, ["thorax"])
    with pytest.raises(ValueError, match="threshold"):
        region_verdict(abdomen, ["chest"], threshold=1.5)


def test_contrast_verdict_reasons_read_as_sentences() -> None:
    plain = _content({"chest": 0.9, "abdomen": 0.05, "other": 0.05}, 0.04)
    v = contrast_verdict(plain, require=True)
    assert not v.passed and v.scores == {"enhanced": pytest.approx(0.04)}
    assert v.reason is not None
    assert v.reason.startswith("CT shows no intravenous contrast (enhanced 0.04")
    assert v.reason.endswith("this model needs a contrast-enhanced series")
    assert contrast_verdict(plain, require=False).passed
    enhanced = _content({"chest": 0.9, "abdomen": 0.05, "other": 0.05}, 0.93)
    assert contrast_verdict(enhanced, require=True).passed
    assert not contrast_verdict(enhanced, require=True, threshold=0.95).passed


# ---------------------------------------------------------------- the gate folder


def test_the_shipped_gate_describes_itself() -> None:
    gate = CtGate.load(GATE_DIR, torch.device("cpu"))
    assert gate.name == "ct-region-contrast" and gate.synthetic is True and gate.version
    assert (GATE_DIR / "MODEL_CARD.md").read_text(encoding="utf-8").count("synthetic") >= 1


def test_tampered_weights_are_refused_naming_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "gate"
    shutil.copytree(GATE_DIR, folder)
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"weights\.safetensors.*sha256"):
        CtGate.load(folder, torch.device("cpu"))
    weights.unlink()
    with pytest.raises(ManifestError, match="missing"):
        CtGate.load(folder, torch.device("cpu"))
    (folder / GATE_FILE).write_text('name = "x"\n', encoding="utf-8")
    with pytest.raises(ManifestError, match=GATE_FILE):
        CtGate.load(folder, torch.device("cpu"))


# ---------------------------------------------------------------- the phantoms


def test_contrast_changes_hu_not_anatomy() -> None:
    for anatomy in ("head", "pelvis", "lower_limb"):
        grid = dict(rows=96, slices=8, slice_spacing_mm=15.0)
        plus = render_region(make_region_case(anatomy, 3, contrast=True), **grid).hu
        plain = render_region(make_region_case(anatomy, 3, contrast=False), **grid).hu
        assert ((plus > 500) == (plain > 500)).mean() > 0.995, anatomy  # bone: same place
        assert ((plus > -500) == (plain > -500)).all(), anatomy  # same body outline
        assert (plus - plain).max() > 100.0, anatomy  # enhanced vessels
    chest = make_region_case("chest", 3, contrast=False).anatomy
    assert isinstance(chest, PlainChestCase)
    assert chest.role_hu("pa") == chest.role_hu("ivc") == chest.blood_hu < 60.0
