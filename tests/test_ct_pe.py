"""CT PE through the whole node: dcmtk storescu -> pacsnode -> SR + KOS -> a real Orthanc.

Also: the same anatomy in every acquisition geometry gives the same labels, and bad CT
series are refused with their reason without holding up the good one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch
from nodeproc import MODELS_DIR, NodeProcess
from peers import LOOPBACK, Orthanc, combined_output, dciodvfy, parse_store_statuses, storescu
from pydicom import dcmread
from sqlalchemy import select

from pacsnode.manifest import load_manifest
from pacsnode.models.pe import PEClassifier, consistency_violations
from pacsnode.phantoms.ctpa import make_ctpa_case, write_ctpa_series, write_scout
from pacsnode.tables import Job, JobState, Output, RoutingDecision, Series
from pacsnode.volumes import Volume, load_volume, plan_volume, read_slice_refs
from pacsnode.writers.sr import read_series_report

PE_DIR = MODELS_DIR / "ct-pe"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
QUIET = "[completion]\nseries_quiet_seconds = { default = 2.0 }\n"
ROWS, SLICES = 128, 48


def volume_of(paths: list[Path] | tuple[Path, ...], series_uid: str) -> Volume:
    return load_volume(plan_volume(read_slice_refs(list(paths)), series_uid))


@pytest.fixture(scope="module")
def model() -> PEClassifier:
    return PEClassifier.load(PE_DIR, torch.device("cpu"))


def test_same_anatomy_in_every_geometry_gives_the_same_labels(
    tmp_path: Path, model: PEClassifier
) -> None:
    case = make_ctpa_case(4242, kind="acute", location="left", rv_lv="gte_1")
    results = {}
    arrays = {}
    for position, shuffle in [("HFS", False), ("FFS", True), ("HFP", True), ("FFP", True)]:
        written = write_ctpa_series(
            tmp_path / position,
            case,
            patient_position=position,
            shuffle=shuffle,
            rows=ROWS,
            slices=SLICES,
        )
        volume = volume_of(written.paths, written.series_uid)
        arrays[position] = volume.array
        result = model.classify(volume)
        results[position] = result
        assert [s.sop_instance_uid for s in result.slices] == list(written.canonical_uids)
        probs = np.array([s.probability for s in result.slices])
        assert consistency_violations(probs, result.exam) == []
    reference = results["HFS"]
    for position, result in results.items():
        assert np.array_equal(arrays[position], arrays["HFS"]), position
        for label, p in reference.exam.items():
            assert result.exam[label] == pytest.approx(p, abs=1e-5), (position, label)
        got = [s.probability for s in result.slices]
        assert got == pytest.approx([s.probability for s in reference.slices], abs=1e-5)


@pytest.fixture
def pacs_and_node(tmp_path: Path, orthanc_factory):
    orthanc = orthanc_factory()
    node = NodeProcess(
        tmp_path / "node",
        enabled=("ct-pe",),
        destinations=[("pacs", orthanc.aet, orthanc.dicom_port)],
        extra_toml=QUIET,
    ).start()
    yield orthanc, node
    node.stop()


def _results(orthanc: Orthanc, study_uid: str) -> dict[str, str]:
    return {
        info.sop_class_uid: info.orthanc_id
        for info in orthanc.list_instances()
        if info.study_instance_uid == study_uid and info.sop_class_uid in (SR_CLASS, KOS_CLASS)
    }


def test_ctpa_study_selects_the_ctpa_and_returns_sr_and_key_images(
    pacs_and_node, tmp_path: Path, model: PEClassifier
) -> None:
    orthanc, node = pacs_and_node
    case = make_ctpa_case(7, kind="acute", location="central", rv_lv="gte_1")
    common = {"rows": ROWS, "shuffle": True}
    ctpa = write_ctpa_series(
        tmp_path / "ctpa", case, slices=SLICES, series_number=2, convolution_kernel="B30f", **common
    )
    study = ctpa.study_uid
    thick = write_ctpa_series(
        tmp_path / "thick",
        case,
        slices=14,
        slice_spacing_mm=5.0,
        study_uid=study,
        series_number=3,
        series_description="CTPA 5 mm",
        **common,
    )
    lung = write_ctpa_series(
        tmp_path / "lung",
        case,
        slices=SLICES,
        study_uid=study,
        series_number=4,
        series_description="CTPA lung",
        convolution_kernel="Bl57d",
        **common,
    )
    scout = write_scout(tmp_path / "scout", study, case=case, rows=ROWS, columns=ROWS)
    files = [scout, *ctpa.paths, *thick.paths, *lung.paths]
    result = storescu(LOOPBACK, node.port, files, called_aet=node.ae_title)
    assert parse_store_statuses(combined_output(result)) == [0x0000] * len(files)

    expected = model.classify(volume_of(ctpa.paths, ctpa.series_uid))
    threshold = load_manifest(PE_DIR).image_labels[0].threshold
    positive = any(s.probability >= threshold for s in expected.slices)
    want = {SR_CLASS, KOS_CLASS} if positive else {SR_CLASS}
    found = orthanc.wait_for(
        lambda: (r := _results(orthanc, study)) and set(r) == want and r, timeout=180
    )

    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(orthanc.download(found[SR_CLASS]))
    errors, _ = dciodvfy(sr_path)
    assert errors == [], errors
    sr = dcmread(sr_path)
    assert isinstance(hd.sr.srread(sr_path), hd.sr.EnhancedSR)
    report = read_series_report(sr, load_manifest(PE_DIR))
    for label, p in expected.exam.items():
        assert report.exam_probabilities[label] == pytest.approx(p, abs=1e-4), label
        assert report.exam_findings[label] == (p >= 0.5), label
    assert report.positive_slices == sum(s.probability >= threshold for s in expected.slices)
    assert report.max_probability is not None
    assert report.max_probability.value == pytest.approx(
        max(s.probability for s in expected.slices), abs=1e-4
    )
    if positive:
        kos_path = tmp_path / "kos.dcm"
        kos_path.write_bytes(orthanc.download(found[KOS_CLASS]))
        errors, _ = dciodvfy(kos_path)
        assert errors == [], errors
        kos = hd.ko.KeyObjectSelectionDocument.from_dataset(dcmread(kos_path))
        referenced = {
            str(item.ReferencedSOPInstanceUID)
            for study_item in kos.CurrentRequestedProcedureEvidenceSequence
            for series_item in study_item.ReferencedSeriesSequence
            for item in series_item.ReferencedSOPSequence
        }
        assert referenced and referenced <= set(ctpa.canonical_uids)

    # the choice and every rejection, as the administrator sees them
    shown = json.loads(node.cli("jobs", "--study", study, "--json").stdout)
    reasons = {row["series"]: row for row in shown["routing"]}
    assert reasons[ctpa.series_uid]["accepted"]
    assert reasons[ctpa.series_uid]["reason"].startswith("selected:")
    assert "above the 3 mm limit" in reasons[thick.series_uid]["reason"]
    assert "preferred kernel" in reasons[lung.series_uid]["reason"]
    scout_uid = str(dcmread(scout, stop_before_pixels=True).SeriesInstanceUID)
    assert "localizer" in reasons[scout_uid]["reason"]
    assert [j["series"] for j in shown["jobs"]] == [ctpa.series_uid]
    assert shown["jobs"][0]["state"] == "succeeded"


def test_bad_ct_series_are_refused_with_their_reason_and_do_not_block_others(
    tmp_path: Path,
) -> None:
    node = NodeProcess(tmp_path / "node", enabled=("ct-pe",), extra_toml=QUIET).start()
    try:
        series = {}
        for seed, name in enumerate(["gap", "mixed", "single", "good"], start=100):
            written = write_ctpa_series(
                tmp_path / name,
                make_ctpa_case(seed, kind="negative"),
                rows=64,
                slices=30,
                shuffle=False,
            )
            series[name] = written
        gap = series["gap"]
        for path in gap.paths[10:13]:  # three slices missing in the middle
            path.unlink()
        mixed = series["mixed"]
        for path in mixed.paths[15:]:
            ds = dcmread(path)
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, -0.0998334]
            ds.save_as(path)
        scout = write_scout(tmp_path / "scout", "1.2.826.0.1.3680043.10.543.9", rows=64, columns=64)
        files = [
            *[p for p in gap.paths if p.exists()],
            *mixed.paths,
            series["single"].paths[0],
            *series["good"].paths,
            scout,
        ]
        result = storescu(LOOPBACK, node.port, files, called_aet=node.ae_title)
        assert parse_store_statuses(combined_output(result)) == [0x0000] * len(files)
        sessions = node.sessions()

        def settled() -> bool:
            with sessions() as s:
                states = {j.state for j in s.scalars(select(Job))}
                decided = s.scalar(select(RoutingDecision.id).where(RoutingDecision.id > 0))
                return (
                    bool(decided)
                    and len(states) > 0
                    and states
                    <= {
                        JobState.SUCCEEDED,
                        JobState.DEAD,
                    }
                )

        node.wait_until(settled, timeout=180, what="all CT jobs finished")
        node.wait_until(
            lambda: len(node.cli_json("jobs", "--json")["jobs"]) == 3, timeout=30, what="3 jobs"
        )
        with sessions() as s:
            by_series = {
                series_uid: job
                for job, series_uid in s.execute(
                    select(Job, Series.series_uid).join(Series, Job.series_id == Series.id)
                )
            }
            assert by_series[series["good"].series_uid].state is JobState.SUCCEEDED
            assert s.scalars(select(Output)).all(), "the good series produced its SR"
            dead_gap = by_series[gap.series_uid]
            assert dead_gap.state is JobState.DEAD and "gap" in (dead_gap.last_error or "")
            assert gap.series_uid in (dead_gap.last_error or "")
            dead_mixed = by_series[mixed.series_uid]
            assert dead_mixed.state is JobState.DEAD
            assert "orientation" in (dead_mixed.last_error or "")
            decisions = {
                uid: d.reason
                for d, uid in s.execute(
                    select(RoutingDecision, Series.series_uid).join(
                        Series, RoutingDecision.series_id == Series.id
                    )
                )
            }
            assert "1 slices" in decisions[series["single"].series_uid]
            scout_uid = str(dcmread(scout, stop_before_pixels=True).SeriesInstanceUID)
            assert "localizer" in decisions[scout_uid]
        assert node.alive()
    finally:
        node.stop()
    shutil.rmtree(tmp_path / "node" / "spool", ignore_errors=True)
