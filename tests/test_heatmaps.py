"""Grad-CAM heatmaps of the chest X-ray model, as the radiologist gets them.

Same pass, same probabilities; where the peak falls on the phantoms' findings; the Secondary
Capture on the source pixel grid (MONOCHROME1/2, AP/PA, a mirrored detector); the SR that
points to it; the worker; and the whole path to a real Orthanc, looked at in Orthanc's own
web page. What a person can open afterwards is left under ``var/test-artifacts/heatmaps/``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch
from inprocess import run_worker
from nodeproc import MODELS_DIR, REPO, NodeProcess
from peers import LOOPBACK, Orthanc, combined_output, dciodvfy, parse_store_statuses, storescu
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select

from pacsnode.config import HeatmapEncoding, parse_config
from pacsnode.errors import ConfigError
from pacsnode.models.base import ImageResult, heatmap_on_source
from pacsnode.models.cxr import ChexNetClassifier, preprocess
from pacsnode.phantoms.cxr import finding_regions, make_cxr_dataset
from pacsnode.pixels import to_display_array
from pacsnode.tables import DeliveryState, Output
from pacsnode.writers.heatmap import (
    DISCLAIMER,
    build_heatmap_images,
    heatmap_uids,
    overlay,
)
from pacsnode.writers.sr import (
    build_measurement_report,
    read_findings,
    read_heatmap_references,
    read_measurement_report,
)

ARTIFACTS = REPO / "var" / "test-artifacts" / "heatmaps"
CPU = torch.device("cpu")
NOW = datetime(2026, 5, 6, 7, 8, 9)
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.34"}


@pytest.fixture(scope="module")
def model() -> Iterator[ChexNetClassifier]:
    # one thread: on a busy 2-core machine two threads made a forward pass 70x slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ChexNetClassifier.load(MODELS_DIR / "cxr-chexnet", CPU)
    torch.set_num_threads(before)


def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def sc_peak(sc: Dataset) -> tuple[float, float]:
    """Row and column of the hottest overlay pixel of a heatmap SC, read from its pixels.

    The colour map ends in pure red with the most opacity, so red minus green is largest
    exactly where the map is; the grey underneath cancels out.
    """
    rgb = sc.pixel_array.astype(np.int16)
    score = rgb[..., 0] - rgb[..., 1]
    rows, cols = np.nonzero(score == score.max())
    return float(rows.mean()), float(cols.mean())


def map_peak(result: ImageResult, label: str, shape: tuple[int, int]) -> tuple[int, int]:
    heat = heatmap_on_source(result.heatmaps[label], *shape)
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return int(row), int(col)


# -- the model: same pass, same numbers ---------------------------------------------------


def test_heatmaps_leave_the_probabilities_bit_identical(model: ChexNetClassifier) -> None:
    datasets = [make_cxr_dataset(9100 + i, rows=320, cols=256)[0] for i in range(5)]
    plain = model.predict(datasets)
    explained = model.predict(datasets, heatmaps=True)
    assert [r.probabilities for r in explained] == [r.probabilities for r in plain]
    assert all(r.heatmaps == {} for r in plain)
    assert any(r.heatmaps for r in explained)
    for result in explained:
        positive = {
            label.name
            for label in model.manifest.reported_labels
            if result.probabilities[label.name] >= label.threshold
        }
        assert set(result.heatmaps) == positive
        for heat in result.heatmaps.values():
            assert heat.shape == (28, 28) and heat.dtype == np.float32
            assert heat.min() >= 0.0 and heat.max() in (0.0, 1.0)


def test_heatmaps_do_not_depend_on_the_callers_grad_mode(model: ChexNetClassifier) -> None:
    """A caller inside ``torch.no_grad()`` (a benchmark, a host application) still gets maps."""
    (ds, _) = make_cxr_dataset(9100, rows=320, cols=256)
    (expected,) = model.predict([ds], heatmaps=True)
    with torch.no_grad():
        (result,) = model.predict([ds], heatmaps=True)
    assert result.heatmaps.keys() == expected.heatmaps.keys() and result.heatmaps
    for label, heat in result.heatmaps.items():
        np.testing.assert_array_equal(heat, expected.heatmaps[label])


def test_heatmap_on_source_centres_each_cell_on_its_part_of_the_image() -> None:
    coarse = np.zeros((7, 7), np.float32)
    coarse[2, 5] = 1.0
    heat = heatmap_on_source(coarse, 700, 350)  # not square: rows and columns differ
    assert heat.shape == (700, 350)
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    assert (row, col) in {(249, 274), (249, 275), (250, 274), (250, 275)}  # (2.5/7, 5.5/7)
    assert heat.max() <= 1.0 and heat.min() >= 0.0
    flat = heatmap_on_source(np.full((7, 7), 0.25, np.float32), 40, 30)
    np.testing.assert_allclose(flat, 0.25, atol=1e-6)


# -- where the peak falls ----------------------------------------------------------------

HIT_SIZE = 384
HIT_SEEDS = range(8000, 8010)
NEAR_MM = 30.0
"""Half a cell of the last block's 7x7 grid, the coarsest of the fused maps."""

# Measured at 384 px over the phantoms the model flags (a heatmap is made only for those):
# peak inside the region / within NEAR_MM of it, on seeds 8000-8039 and (in brackets) on the
# ten test seeds, with the fused three-block map (and, after the slash, the last block's 7x7
# map alone, as before). Cardiomegaly 92 / 100 % (90 / 100), was 100 / 100; Pneumonia 100 /
# 100 (100 / 100), was 98 / 100; Consolidation 100 / 100 (100 / 100), was 100 / 100;
# Pneumothorax 28 / 100 (10 / 100), was 48 / 100: the peak sits on the collapsed lung's edge,
# next to the air rim; Emphysema (region: both lungs) 50 / 100 (90 / 100), was 48 / 92;
# Effusion 67 / 100 (80 / 100), was 33 / 95; Mass 58 / 88 (60 / 100), was 18 / 52; Nodule
# 33 / 75 (25 / 75), was 6 / 44. Nodule and Mass are not reported labels of the demo model
# (held-out AUROC 0.67 / 0.71), so the node makes no heatmap for them; the maps are asked for
# explicitly here to see where the model looks.


def peak_and_region(
    model: ChexNetClassifier, finding: str, seed: int
) -> tuple[float, tuple[int, int], np.ndarray]:
    """Probability of ``finding``, its Grad-CAM peak on the source grid, and its true region."""
    ds, _ = make_cxr_dataset(seed, findings=[finding], rows=HIT_SIZE, cols=HIT_SIZE)
    region = finding_regions(seed, findings=[finding], rows=HIT_SIZE, cols=HIT_SIZE)[finding]
    probs, maps = model.predict_tensors_with_heatmaps(
        preprocess(ds, model.manifest.input)[None], labels=[finding]
    )
    p = float(probs[0, model.manifest.label_names.index(finding)])
    heat = heatmap_on_source(maps[0][finding], HIT_SIZE, HIT_SIZE)
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return p, (int(row), int(col)), region


def hit_rates(model: ChexNetClassifier, finding: str) -> tuple[int, float, float]:
    """Over the flagged test phantoms: count, share with the peak inside, share within NEAR_MM."""
    threshold = next(label.threshold for label in model.manifest.labels if label.name == finding)
    spacing = 420.0 / HIT_SIZE
    inside = near = flagged = 0
    for seed in HIT_SEEDS:
        p, (row, col), region = peak_and_region(model, finding, seed)
        if p < threshold:
            continue  # no heatmap is made for it
        flagged += 1
        rows, cols = np.nonzero(region)
        distance_mm = float(np.sqrt((rows - row) ** 2 + (cols - col) ** 2).min()) * spacing
        inside += bool(region[row, col])
        near += distance_mm <= NEAR_MM
    return flagged, inside / max(flagged, 1), near / max(flagged, 1)


@pytest.mark.parametrize(
    ("finding", "min_inside", "min_near"),
    [
        ("Cardiomegaly", 0.8, 1.0),
        ("Pneumonia", 0.9, 1.0),
        ("Consolidation", 0.9, 1.0),
        ("Pneumothorax", 0.1, 0.9),
        ("Effusion", 0.5, 0.9),
        ("Emphysema", 0.4, 0.9),
        ("Mass", 0.5, 0.9),
        ("Nodule", 0.2, 0.7),
    ],
)
def test_gradcam_peak_falls_on_the_finding(
    model: ChexNetClassifier, finding: str, min_inside: float, min_near: float
) -> None:
    flagged, inside, near = hit_rates(model, finding)
    assert flagged >= 4, f"{finding}: only {flagged} of {len(HIT_SEEDS)} phantoms flagged"
    assert inside >= min_inside, f"{finding}: peak inside the region in {inside:.0%}"
    assert near >= min_near, f"{finding}: peak within {NEAR_MM} mm in {near:.0%}"


def test_fused_map_is_finer_than_the_last_block_alone(model: ChexNetClassifier) -> None:
    """The reason for fusing: on the focal findings, the last block's 7x7 map alone (the
    deepest of the fused layers) puts the peak inside the lesion less often."""
    seeds = [s for s in HIT_SEEDS] + list(LEFT_UPPER_ZONE_NODULES)
    fused = last = 0
    for seed in seeds:
        for finding in ("Nodule", "Mass"):
            ds, _ = make_cxr_dataset(seed, findings=[finding], rows=HIT_SIZE, cols=HIT_SIZE)
            region = finding_regions(seed, findings=[finding], rows=HIT_SIZE, cols=HIT_SIZE)
            inputs = preprocess(ds, model.manifest.input)[None]
            _, maps = model.predict_tensors_with_heatmaps(inputs, labels=[finding])
            only_last = last_block_grad_cam(model, inputs, finding)
            for coarse, counter in ((maps[0][finding], "fused"), (only_last, "last")):
                heat = heatmap_on_source(coarse, HIT_SIZE, HIT_SIZE)
                row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
                hit = int(region[finding][row, col])
                fused, last = (fused + hit, last) if counter == "fused" else (fused, last + hit)
    print(f"peak inside the lesion: fused {fused}, last block alone {last}, of {2 * len(seeds)}")
    assert fused >= last + len(seeds) // 3, (fused, last, 2 * len(seeds))


def last_block_grad_cam(model: ChexNetClassifier, inputs: torch.Tensor, finding: str) -> np.ndarray:
    """Plain Grad-CAM on the last block's output (7x7), computed here independently."""
    network = model.network
    with torch.enable_grad():
        features = network.features(inputs).detach().requires_grad_(True)  # type: ignore[operator]
        logits = network.class_layers(features.clone())  # type: ignore[operator]
        index = model.manifest.label_names.index(finding)
        (grads,) = torch.autograd.grad(logits[0, index], features)
    cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * features.detach()).sum(1))[0]
    return (cam / cam.max().clamp_min(1e-12)).numpy().astype(np.float32)


LEFT_UPPER_ZONE_NODULES = (8216, 8218, 8228, 8245, 8248, 8249, 8250, 8263)
"""The phantoms among seeds 8200-8263 with one nodule, in the patient's left upper zone."""


def in_left_upper_zone(row: float, col: float) -> bool:
    """Patient's left is the image right (Patient Orientation L\\F); upper: above the hila."""
    return col > HIT_SIZE * 0.5 and row < HIT_SIZE * 0.45


def test_left_upper_zone_nodule_heatmap_points_at_the_zone(model: ChexNetClassifier) -> None:
    """Every flagged nodule's peak lies in the zone and within NEAR_MM of the nodule."""
    spacing = 420.0 / HIT_SIZE
    threshold = next(label.threshold for label in model.manifest.labels if label.name == "Nodule")
    flagged = inside = 0
    for seed in LEFT_UPPER_ZONE_NODULES:
        p, (row, col), nodule = peak_and_region(model, "Nodule", seed)
        rows, cols = np.nonzero(nodule)
        assert in_left_upper_zone(rows.mean(), cols.mean()), seed
        if p < threshold:
            continue
        flagged += 1
        inside += bool(nodule[row, col])
        assert in_left_upper_zone(row, col), (seed, row, col)
        distance_mm = float(np.sqrt((rows - row) ** 2 + (cols - col) ** 2).min()) * spacing
        assert distance_mm <= NEAR_MM, (seed, distance_mm)
    assert flagged >= 5
    assert inside >= 1


def test_left_upper_zone_nodule_heatmap_peak_is_inside_the_nodule(
    model: ChexNetClassifier,
) -> None:
    results = [peak_and_region(model, "Nodule", seed) for seed in LEFT_UPPER_ZONE_NODULES]
    hits = [bool(nodule[row, col]) for _, (row, col), nodule in results]
    assert sum(hits) >= len(hits) / 2, hits


# -- the Secondary Capture on the source grid --------------------------------------------


def heatmaps_of(
    model: ChexNetClassifier, ds: Dataset, encoding: HeatmapEncoding = "uncompressed"
) -> tuple[ImageResult, dict[str, hd.sc.SCImage]]:
    """Result and heatmap SCs of ``ds``; uncompressed unless asked, so pixels compare exactly."""
    (result,) = model.predict([ds], heatmaps=True)
    return result, build_heatmap_images(ds, result, model.manifest, now=NOW, encoding=encoding)


@pytest.mark.parametrize("view", ["PA", "AP"])
def test_overlay_lines_up_for_monochrome1_and_monochrome2(
    model: ChexNetClassifier, view: str
) -> None:
    shape = (384, 320)
    common = dict(findings=["Cardiomegaly"], modality="CR", view=view, rows=384, cols=320)
    peaks = {}
    greys = {}
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        ds, _ = make_cxr_dataset(9201, photometric=photometric, **common)
        result, scs = heatmaps_of(model, ds)
        assert "Cardiomegaly" in scs, result.probabilities["Cardiomegaly"]
        sc = scs["Cardiomegaly"]
        assert (sc.Rows, sc.Columns) == shape
        assert list(sc.PatientOrientation) == ["L", "F"]
        assert sc.PhotometricInterpretation == "RGB"
        peaks[photometric] = sc_peak(sc)
        expected = map_peak(result, "Cardiomegaly", shape)
        assert np.hypot(*np.subtract(peaks[photometric], expected)) <= 3, (photometric, expected)
        # away from the burned-in text the SC is exactly the display image under the overlay
        display = to_display_array(ds)
        grey = np.clip(display * 255.0 + 0.5, 0, 255).astype(np.uint8)
        heat = heatmap_on_source(result.heatmaps["Cardiomegaly"], *shape)
        middle = slice(60, 320)
        np.testing.assert_array_equal(sc.pixel_array[middle], overlay(grey, heat)[middle])
        greys[photometric] = sc.pixel_array[middle].astype(np.int16)
    assert np.hypot(*np.subtract(peaks["MONOCHROME1"], peaks["MONOCHROME2"])) <= 2
    # MONOCHROME1 was inverted: bright is dense in both, so the two SCs look alike
    assert np.abs(greys["MONOCHROME1"] - greys["MONOCHROME2"]).mean() < 2.0


def test_overlay_follows_a_mirrored_source(model: ChexNetClassifier) -> None:
    """A detector read out the other way round (R\\F): the SC keeps the source's grid and
    orientation, so the hot spot stays on the finding. (Pneumonia: the demo model calls
    Cardiomegaly only on a heart on the image right; mirrored, p drops from 0.77 to 0.02.)"""
    shape = (384, 320)
    common = dict(findings=["Pneumonia"], rows=shape[0], cols=shape[1])
    plain, _ = make_cxr_dataset(9210, **common)
    mirrored, _ = make_cxr_dataset(9210, mirror=True, **common)
    assert list(mirrored.PatientOrientation) == ["R", "F"]
    np.testing.assert_array_equal(mirrored.pixel_array, plain.pixel_array[:, ::-1])
    peaks = {}
    for name, ds in (("plain", plain), ("mirrored", mirrored)):
        result, scs = heatmaps_of(model, ds)
        sc = scs["Pneumonia"]
        assert list(sc.PatientOrientation) == list(ds.PatientOrientation)
        peaks[name] = sc_peak(sc)
        # the SC is at its hottest where the map peaks (the fused map may plateau: the SC's
        # colour levels are 8 bit, so several spots can share the top one)
        score = sc.pixel_array.astype(np.int16)[..., 0] - sc.pixel_array.astype(np.int16)[..., 1]
        assert score[map_peak(result, "Pneumonia", shape)] >= score.max() - 1, name
        region = finding_regions(9210, mirror=name == "mirrored", **common)["Pneumonia"]
        assert region[int(round(peaks[name][0])), int(round(peaks[name][1]))], name
    # the model itself is not exactly mirror-symmetric (measured: 11 px apart); half a cell
    row, col = peaks["plain"]
    mirror_gap = np.hypot(peaks["mirrored"][0] - row, peaks["mirrored"][1] - (shape[1] - 1 - col))
    assert mirror_gap <= shape[0] / 14


@pytest.mark.parametrize("encoding", ["jpeg", "uncompressed"])
def test_heatmap_sc_is_valid_readable_and_replaces_on_resend(
    model: ChexNetClassifier, tmp_path: Path, encoding: HeatmapEncoding
) -> None:
    ds, _ = make_cxr_dataset(9203, findings=["Cardiomegaly", "Effusion"], rows=512, cols=448)
    result, scs = heatmaps_of(model, ds, encoding)
    assert scs, result.probabilities
    again = build_heatmap_images(ds, result, model.manifest, now=NOW, encoding=encoding)
    exact = build_heatmap_images(ds, result, model.manifest, now=NOW, encoding="uncompressed")
    series = {str(sc.SeriesInstanceUID) for sc in scs.values()}
    assert len(series) == 1  # one heatmap series
    for label, sc in scs.items():
        assert (sc.SeriesInstanceUID, sc.SOPInstanceUID) == heatmap_uids(
            ds.SeriesInstanceUID, ds.SOPInstanceUID, model.manifest, label
        )
        assert sc.SOPInstanceUID == again[label].SOPInstanceUID
        assert sc.StudyInstanceUID == ds.StudyInstanceUID
        assert sc.PatientID == ds.PatientID
        assert sc.BurnedInAnnotation == "YES"
        assert sc.SeriesDescription.startswith("pacsnode heatmaps")
        assert [float(v) for v in sc.PixelSpacing] == [float(v) for v in ds.PixelSpacing]
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
        if encoding == "jpeg":
            assert sc.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
            assert sc.LossyImageCompression == "01" and float(sc.LossyImageCompressionRatio) > 2
            # lossy, but the hot spot is where the lossless one has it
            assert np.hypot(*np.subtract(sc_peak(sc), sc_peak(exact[label]))) <= 8
        else:
            assert sc.LossyImageCompression == "00" and sc.PhotometricInterpretation == "RGB"
        path = tmp_path / f"{label}.dcm"
        sc.save_as(path, enforce_file_format=True)
        errors, _ = dciodvfy(path)
        assert errors == [], errors
        back = hd.imread(path)
        assert back.SOPClassUID == SC_STORAGE
        assert back.get_frame(1).shape == (512, 448, 3)
        png = artifacts() / f"sc-{label}-{encoding}.png"
        subprocess.run(["dcmj2pnm", "+on", str(path), str(png)], check=True)
        assert png.stat().st_size > 20_000
    assert len({sc.SOPInstanceUID for sc in scs.values()}) == len(scs)
    # the disclaimer is in the pixels: the bottom-left box is dark with bright text
    box = next(iter(scs.values())).pixel_array[-14:, :200].astype(int)
    assert box.max() > 200 and np.median(box) < 90, DISCLAIMER


# -- the SR points to the heatmaps --------------------------------------------------------


def test_sr_links_each_heatmap_and_lists_it_as_evidence(
    model: ChexNetClassifier, tmp_path: Path
) -> None:
    ds, _ = make_cxr_dataset(9204, findings=["Cardiomegaly", "Pneumothorax"], rows=448, cols=448)
    result, scs = heatmaps_of(model, ds)
    assert len(scs) >= 2, result.probabilities
    uid = str(ds.SOPInstanceUID)
    heatmaps = {(uid, label): sc for label, sc in scs.items()}
    sr = build_measurement_report([ds], [result], model.manifest, now=NOW, heatmaps=heatmaps)
    plain = build_measurement_report([ds], [result], model.manifest, now=NOW)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy(path)
    assert errors == [], errors
    back = dcmread(path)
    manifest = model.manifest
    assert read_measurement_report(back, manifest) == read_measurement_report(plain, manifest)
    assert read_findings(back, manifest) == read_findings(plain, manifest)
    assert read_heatmap_references(back, manifest) == {
        uid: {label: str(sc.SOPInstanceUID) for label, sc in scs.items()}
    }
    assert read_heatmap_references(plain, manifest) == {uid: {}}
    (evidence,) = back.CurrentRequestedProcedureEvidenceSequence
    listed = {
        str(item.ReferencedSOPInstanceUID)
        for series in evidence.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert listed == {uid, *(str(sc.SOPInstanceUID) for sc in scs.values())}
    html = artifacts() / "sr-with-heatmaps.html"
    subprocess.run(["dsr2html", str(path), str(html)], check=True)
    text = html.read_text(errors="replace")
    assert "Source of Measurement" in text and "Cardiomegaly" in text


def test_sr_refuses_a_heatmap_of_a_finding_reported_absent(model: ChexNetClassifier) -> None:
    ds, _ = make_cxr_dataset(9205, findings=["Cardiomegaly"], rows=256, cols=256)
    result, scs = heatmaps_of(model, ds)
    sc = scs["Cardiomegaly"]
    absent = next(
        label.name
        for label in model.manifest.reported_labels
        if result.probabilities[label.name] < label.threshold
    )
    with pytest.raises(ValueError, match="below its threshold"):
        build_measurement_report(
            [ds], [result], model.manifest, heatmaps={(str(ds.SOPInstanceUID), absent): sc}
        )
    with pytest.raises(ValueError, match="not one of the sources"):
        build_measurement_report(
            [ds], [result], model.manifest, heatmaps={("1.2.3", "Cardiomegaly"): sc}
        )


# -- the worker and its switch ------------------------------------------------------------


def test_outputs_switch_defaults_to_sc_and_refuses_pm() -> None:
    assert parse_config("").outputs.heatmaps == ["sc"]
    assert parse_config("[outputs]\nheatmaps = []\n").outputs.heatmaps == []
    with pytest.raises(ConfigError, match="frame of reference"):
        parse_config('[outputs]\nheatmaps = ["pm"]\n')


def test_worker_writes_heatmaps_before_the_sr_and_can_be_switched_off(tmp_path: Path) -> None:
    ds, _ = make_cxr_dataset(9206, findings=["Cardiomegaly"], rows=320, cols=320)
    outputs = run_worker(tmp_path, ds, '["sc"]')
    kinds = [o.kind for o in outputs]
    assert kinds[-1] == "sr" and kinds[:-1] and set(kinds[:-1]) == {"heatmap"}
    scs = [dcmread(o.path) for o in outputs[:-1]]
    sr = dcmread(outputs[-1].path)
    assert all(sc.StudyInstanceUID == ds.StudyInstanceUID for sc in scs)
    refs = read_heatmap_references(sr)[str(ds.SOPInstanceUID)]
    assert set(refs.values()) == {str(sc.SOPInstanceUID) for sc in scs}
    assert {o.sop_class_uid for o in outputs[:-1]} == {SC_STORAGE}

    outputs = run_worker(tmp_path, ds, "[]")
    assert [o.kind for o in outputs] == ["sr"]
    assert read_heatmap_references(dcmread(outputs[0].path)) == {str(ds.SOPInstanceUID): {}}


# -- end to end: a real Orthanc, and what its web page shows ------------------------------


def chromium(url: str, work: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={work}",
            "--virtual-time-budget=15000",
            "--window-size=1400,1000",
            *args,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def orthanc_results(orthanc: Orthanc, study_uid: str) -> list[tuple[str, str]]:
    """(Orthanc id, SOP class) of every instance Orthanc holds in the study."""
    return [
        (info.orthanc_id, info.sop_class_uid)
        for info in orthanc.list_instances()
        if info.study_instance_uid == study_uid
    ]


@pytest.mark.slow
def test_heatmaps_and_sr_arrive_in_orthanc_and_show_in_its_explorer(
    tmp_path: Path, orthanc_factory
) -> None:
    orthanc = orthanc_factory()
    ds, _ = make_cxr_dataset(9207, findings=["Cardiomegaly", "Pneumonia"], rows=512, cols=512)
    path = tmp_path / "cxr.dcm"
    ds.save_as(path, enforce_file_format=True)
    node = NodeProcess(
        tmp_path / "node", destinations=[("pacs", orthanc.aet, orthanc.dicom_port)]
    ).start()
    try:
        result = storescu(LOOPBACK, node.port, [path], called_aet=node.ae_title)
        assert parse_store_statuses(combined_output(result)) == [0x0000]

        def delivered() -> int | None:
            with node.sessions()() as s:
                outputs = s.scalars(select(Output)).all()
                states = [d.state for o in outputs for d in o.deliveries]
                done = states and all(state is DeliveryState.DELIVERED for state in states)
                return len(outputs) if done else None

        count = node.wait_until(delivered, what="every result delivered")
    finally:
        node.stop()

    # in the source study: the SR and the heatmaps (the radiograph itself was never sent there)
    def arrived() -> list[tuple[str, str]] | None:
        found = orthanc_results(orthanc, ds.StudyInstanceUID)
        return found if len(found) == count else None

    results = orthanc.wait_for(arrived, timeout=60, message="SR and heatmaps in Orthanc")
    srs = [oid for oid, cls in results if cls in SR_CLASSES]
    scs = [oid for oid, cls in results if cls == SC_STORAGE]
    assert len(srs) == 1 and len(scs) == count - 1 >= 1
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(orthanc.download(srs[0]))
    assert dciodvfy(sr_path)[0] == []
    refs = read_heatmap_references(dcmread(sr_path))[str(ds.SOPInstanceUID)]
    for oid in scs:
        sc_path = tmp_path / f"{oid}.dcm"
        sc_path.write_bytes(orthanc.download(oid))
        assert dciodvfy(sc_path)[0] == []
        sc = dcmread(sc_path)
        assert str(sc.SOPInstanceUID) in refs.values()
        assert hd.imread(sc_path).get_frame(1).shape == (512, 512, 3)
    (study,) = {orthanc.get(f"/instances/{oid}/study")["ID"] for oid, _ in results}
    url = f"{orthanc.base_url}/app/explorer.html#study?uuid={study}"
    shot = artifacts() / "orthanc-explorer-study.png"
    shot.unlink(missing_ok=True)
    proc = chromium(url, tmp_path / "chromium-shot", f"--screenshot={shot}")
    assert shot.exists(), proc.stderr[-2000:]
    assert shot.stat().st_size > 20_000
    dom = chromium(url, tmp_path / "chromium-dom", "--dump-dom")
    (artifacts() / "orthanc-explorer-study.html").write_text(dom.stdout)
    assert "pacsnode heatmaps" in dom.stdout, dom.stdout[-3000:]
    assert "AI cxr-chexnet" in dom.stdout
    # Orthanc's own rendering of one heatmap, as its viewer shows it
    preview = artifacts() / "orthanc-heatmap-preview.png"
    preview.write_bytes(orthanc.request("GET", f"/instances/{scs[0]}/preview"))
    with Image.open(preview) as image:
        assert image.size == (512, 512) and image.mode == "RGB"
        rgb = np.asarray(image).astype(int)
    assert (rgb[..., 0] - rgb[..., 1]).max() > 60  # the red hot spot came through
