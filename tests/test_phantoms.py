"""Phantoms are valid CR/DX objects, deterministic, and carry the requested labels."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from pacsnode.phantoms.cxr import (
    CHEXNET_LABELS,
    RENDERED_FINDINGS,
    finding_regions,
    make_cxr_dataset,
    render,
    render_with_regions,
    write_phantom_set,
)


def _dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (proc.stderr + proc.stdout).splitlines() if "Error" in line]


@pytest.mark.parametrize(
    "kw",
    [
        dict(modality="CR", view="PA"),
        dict(
            modality="CR",
            view="AP",
            photometric="MONOCHROME1",
            rescale=True,
            pixel_representation=1,
            bits_stored=10,
            window=False,
        ),
        dict(modality="DX", view="PA", window=True, bits_stored=16),
        dict(modality="DX", view="AP", window=False, photometric="MONOCHROME1", bits_stored=8),
        dict(modality="DX", transfer_syntax="1.2.840.10008.1.2.4.90"),
        dict(
            modality="CR",
            transfer_syntax="1.2.840.10008.1.2.5",
            specific_character_set="ISO_IR 192",
            patient_name="Müller^Jörg",
        ),
    ],
)
def test_dciodvfy_has_no_errors(tmp_path: Path, kw: dict) -> None:
    ds, _ = make_cxr_dataset(21, rows=128, cols=160, **kw)
    path = tmp_path / "cxr.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert _dciodvfy_errors(path) == []
    back = dcmread(path)
    assert back.Modality == kw["modality"]
    assert back.BodyPartExamined == "CHEST"
    assert back.ViewPosition == kw.get("view", "PA")
    assert back.pixel_array.shape == (128, 160)


def test_sop_classes() -> None:
    cr, _ = make_cxr_dataset(1, modality="CR", rows=64, cols=64)
    dxp, _ = make_cxr_dataset(1, modality="DX", window=True, rows=64, cols=64)
    dxq, _ = make_cxr_dataset(1, modality="DX", window=False, rows=64, cols=64)
    assert cr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"
    assert dxp.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
    assert dxq.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1.1"


@pytest.mark.parametrize("finding", RENDERED_FINDINGS)
def test_labels_match_requested_findings(finding: str) -> None:
    _, labels = make_cxr_dataset(3, findings=[finding], rows=96, cols=96)
    assert set(labels) == set(CHEXNET_LABELS)
    assert [name for name, v in labels.items() if v] == [finding]
    _, none = make_cxr_dataset(3, findings={}, rows=96, cols=96)
    assert sum(none.values()) == 0


def test_findings_change_the_image() -> None:
    normal, _ = render(4, [], (128, 128))
    for finding in RENDERED_FINDINGS:
        img, _ = render(4, [finding], (128, 128))
        assert np.abs(img - normal).mean() > 1e-3, finding


def test_random_findings_prevalence() -> None:
    counts = np.zeros(len(RENDERED_FINDINGS))
    for seed in range(60):
        _, labels = render(seed, None, (64, 64), prevalence=0.3)
        counts += [labels[name] for name in RENDERED_FINDINGS]
    assert np.all(counts > 5) and np.all(counts < 35)


def test_unknown_finding_rejected() -> None:
    with pytest.raises(ValueError, match="Hernia"):
        render(0, ["Hernia"], (64, 64))


def test_deterministic_by_seed() -> None:
    a, la = make_cxr_dataset(42, rows=96, cols=128)
    b, lb = make_cxr_dataset(42, rows=96, cols=128)
    c, _ = make_cxr_dataset(43, rows=96, cols=128)
    assert la == lb
    assert a.PixelData == b.PixelData
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.StudyInstanceUID == b.StudyInstanceUID
    assert a.PixelData != c.PixelData
    assert a.StudyInstanceUID != c.StudyInstanceUID


def test_write_phantom_set(tmp_path: Path) -> None:
    written = write_phantom_set(tmp_path, 100, 3, rows=64, cols=64, modality="CR")
    assert len(written) == 3
    uids = {dcmread(path).SOPInstanceUID for path, _ in written}
    assert len(uids) == 3


@pytest.mark.parametrize("finding", RENDERED_FINDINGS)
def test_regions_leave_the_pixels_alone_and_cover_the_finding(finding: str) -> None:
    plain, labels = render(77, [finding], (160, 128))
    image, same_labels, regions = render_with_regions(77, [finding], (160, 128))
    np.testing.assert_array_equal(image, plain)
    assert same_labels == labels and set(regions) == {finding}
    mask = regions[finding]
    assert mask.shape == (160, 128) and mask.dtype == bool and 0 < mask.mean() < 0.6
    # the finding changes the image where its region is
    without, _ = render(77, [], (160, 128))
    changed = np.abs(image - without) > 0.02
    assert (changed & mask).sum() > 0.2 * mask.sum() or finding == "Emphysema"
    assert render_with_regions(77, [], (64, 64))[2] == {}


def test_mirrored_phantom_and_its_regions() -> None:
    ds, _ = make_cxr_dataset(78, findings=["Cardiomegaly"], rows=96, cols=80)
    mirrored, _ = make_cxr_dataset(78, findings=["Cardiomegaly"], rows=96, cols=80, mirror=True)
    np.testing.assert_array_equal(mirrored.pixel_array, ds.pixel_array[:, ::-1])
    assert list(ds.PatientOrientation) == ["L", "F"]
    assert list(mirrored.PatientOrientation) == ["R", "F"]
    assert mirrored.SOPInstanceUID != ds.SOPInstanceUID
    heart = finding_regions(78, findings=["Cardiomegaly"], rows=96, cols=80)["Cardiomegaly"]
    flipped = finding_regions(78, findings=["Cardiomegaly"], rows=96, cols=80, mirror=True)
    np.testing.assert_array_equal(flipped["Cardiomegaly"], heart[:, ::-1])
    # the heart lies towards the patient's left: the image right, or left when mirrored
    cols = np.nonzero(heart)[1]
    assert cols.mean() > 40
