"""The nightly audit, from five weeks of synthetic history laid out with an injected clock.

Every number in the report is recomputed here from the records the test generated (plain
Python and numpy, not the audit's queries), drift is checked both ways (a label that
rises, one that falls, one that holds, one with too few results), and the HTML page is
rendered by headless Chromium to a screenshot under ``var/`` for a person to look at.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from click.testing import CliRunner
from opsdb import History, make_config, make_sessions
from PIL import Image
from pydicom import dcmread
from sqlalchemy import select
from test_sr import dx_image, make_manifest, results_for

from pacsnode import findings
from pacsnode.audit import AuditReport, percentile, run_audit
from pacsnode.cli import main as cli_main
from pacsnode.config import Config
from pacsnode.db import make_engine, make_sessionmaker
from pacsnode.tables import DeliveryState, Finding, JobState
from pacsnode.writers.sr import build_measurement_report, result_uids

TZ = ZoneInfo("Europe/Berlin")
DAY = date(2025, 3, 12)  # UTC+1 all window long (DST starts 30 March)
NOW = datetime(2025, 3, 13, 1, 0)  # 02:00 Berlin, the night after
REPO = Path(__file__).resolve().parent.parent

# positive rate per (model, label): over the trailing window, and on DAY
RATES = {
    ("cxr-chexnet", "Effusion"): (0.2, 0.7),  # rises: flagged
    ("cxr-chexnet", "Cardiomegaly"): (0.3, 0.3),  # holds
    ("ct-pe", "central_pe"): (0.5, 0.0),  # falls: flagged
}
RARE = ("ct-pe", "rare_label")  # 0 % before, 2 of 2 on DAY: too few results to flag
MODEL = {"CT": "ct-pe", "DX": "cxr-chexnet"}
AETS = {"CT": ["CT_ROOM1", "CT_ROOM2"], "DX": ["DX&<ER>"]}  # '<' and '&' must be escaped


@dataclass
class Rec:
    """What the test laid out for one series, and so what the audit must find."""

    study: int
    modality: str
    aet: str
    instances: int
    received: datetime  # naive UTC, as stored
    state: JobState
    finished: datetime
    deliveries: list[tuple[str, DeliveryState, datetime]] = field(default_factory=list)
    findings: dict[str, bool] = field(default_factory=dict)
    error: str | None = None
    retries: int = 0

    @property
    def model(self) -> str:
        return MODEL[self.modality]


def utc(d: date, seconds: float) -> datetime:
    local = datetime.combine(d, time(0), tzinfo=TZ) + timedelta(seconds=seconds)
    return local.astimezone(UTC).replace(tzinfo=None)


def local(at: datetime) -> date:
    return at.replace(tzinfo=UTC).astimezone(TZ).date()


def generate() -> list[Rec]:
    rng = random.Random(20250312)
    recs: list[Rec] = []
    counters: dict[tuple[str, str], int] = defaultdict(int)
    study = 0
    for offset in range(-34, 2):
        d = DAY + timedelta(days=offset)
        on_day = offset == 0
        n = 16 if on_day else rng.randint(3, 7)
        for i in range(n):
            study += 1
            modality = "CT" if i % 2 else "DX"
            seconds = rng.uniform(60, 86_000)
            if on_day and i == 0:
                seconds = 30  # 00:00:30 local is 23:00:30 UTC the day before: counts on DAY
            if on_day and i == 1:
                seconds = 86_395  # 23:59:55 local: still DAY
            if offset == 1 and i == 0:
                seconds = 5  # 00:00:05 the next day: not DAY
            received = utc(d, seconds)
            state = JobState.SUCCEEDED
            if on_day and i in (2, 3):
                state = JobState.DEAD
            elif on_day and i == 4:
                state = JobState.QUEUED
            elif rng.random() < 0.08:
                state = JobState.DEAD
            finished = received + timedelta(seconds=rng.uniform(4, 90))
            rec = Rec(
                study,
                modality,
                rng.choice(AETS[modality]),
                rng.randint(1, 40),
                received,
                state,
                finished,
            )
            if state is JobState.DEAD:
                rec.error = rng.choice(["cannot read spooled instance x.dcm", "slice gap 7.5 mm"])
            if state is JobState.SUCCEEDED:
                for dest in ("pacs", "archive") if rng.random() < 0.5 else ("pacs",):
                    dstate = DeliveryState.DELIVERED
                    if on_day and i == 5 and dest == "pacs":
                        dstate = DeliveryState.PENDING
                    if on_day and i == 6:
                        dstate = DeliveryState.DEAD
                    rec.deliveries.append(
                        (dest, dstate, finished + timedelta(seconds=rng.uniform(0.5, 20)))
                    )
                for (model, label), (window_rate, day_rate) in RATES.items():
                    if model == rec.model:
                        k = counters[(model, label, on_day)]  # type: ignore[index]
                        counters[(model, label, on_day)] += 1  # type: ignore[index]
                        rate = day_rate if on_day else window_rate
                        rec.findings[label] = int((k + 1) * rate) > int(
                            k * rate
                        )  # rate, evenly spread
                if rec.model == RARE[0] and not on_day:
                    rec.findings[RARE[1]] = False  # never positive before DAY ...
                elif rec.model == RARE[0] and local(finished) == DAY and counters[RARE] < 2:  # type: ignore[index]
                    counters[RARE] += 1  # type: ignore[index]
                    rec.findings[RARE[1]] = True  # ... then twice positive: too few to judge
            rec.retries = 1 if rng.random() < 0.2 else 0
            recs.append(rec)
            if on_day and i == 7:  # a second series, other modality, same study
                twin = Rec(
                    study,
                    "CT",
                    "CT_ROOM1",
                    12,
                    received + timedelta(minutes=3),
                    JobState.SUCCEEDED,
                    received + timedelta(minutes=4),
                )
                twin.deliveries.append(
                    ("pacs", DeliveryState.DELIVERED, twin.finished + timedelta(seconds=2))
                )
                recs.append(twin)
    return recs


def lay_out(config: Config, recs: list[Rec]) -> None:
    sessions = make_sessions(config)
    with sessions() as session:
        h = History(session, config.storage.spool_dir)
        studies: dict[int, Any] = {}
        for rec in recs:
            series = h.series(
                rec.received,
                modality=rec.modality,
                aet=rec.aet,
                instances=rec.instances,
                study=studies.get(rec.study),
                size=100,
            )
            studies[rec.study] = series.study
            at = rec.finished if rec.state is not JobState.QUEUED else rec.received
            job = h.job(
                series, rec.state, at, model=rec.model, created=rec.received, error=rec.error
            )
            for n in range(rec.retries):
                h.event(
                    "job-failed",
                    rec.finished - timedelta(seconds=n + 1),
                    f"job {job.id} ({rec.model} 1.0) running → failed: RuntimeError: CUDA out of memory",
                    job.id,
                )
            for dest, state, at in rec.deliveries:
                output = h.output(job, rec.finished)
                error = "association rejected" if state is DeliveryState.DEAD else None
                h.delivery(output, state, at, destination=dest, created=rec.finished, error=error)
            for label, positive in rec.findings.items():
                h.finding(job, label, positive, rec.finished)
        h.commit()


def stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "p50": None, "p95": None, "max": None}
    return {
        "count": len(values),
        "p50": pytest.approx(float(np.percentile(values, 50)), abs=2e-3),
        "p95": pytest.approx(float(np.percentile(values, 95)), abs=2e-3),
        "max": pytest.approx(max(values), abs=2e-3),
    }


def delivered_at(rec: Rec) -> datetime | None:
    if rec.state is not JobState.SUCCEEDED or not rec.deliveries:
        return None
    if any(state is not DeliveryState.DELIVERED for _, state, _ in rec.deliveries):
        return None
    return max(at for _, _, at in rec.deliveries)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, list[Rec], AuditReport]:
    tmp = tmp_path_factory.mktemp("audit")
    config = make_config(
        tmp,
        'timezone = "Europe/Berlin"\ndrift_bound = 0.15\ndrift_min_results = 5\n'
        "drift_window_days = 30\n",
    )
    recs = generate()
    lay_out(config, recs)
    with make_sessions(config)() as session:
        report = run_audit(session, DAY, NOW, config)
    return config, recs, report


def on_day(at: datetime) -> bool:
    return local(at) == DAY


def test_files_are_written_and_json_is_the_report(history: Any) -> None:
    config, _, report = history
    assert report.json_path == config.audit.reports_dir / "2025-03-12.json"
    assert report.html_path == config.audit.reports_dir / "2025-03-12.html"
    assert json.loads(report.json_path.read_text()) == report.data
    assert report.data["start_utc"] == "2025-03-11T23:00:00"


def test_received_per_modality_and_calling_aet(history: Any) -> None:
    _, recs, report = history
    day = [r for r in recs if on_day(r.received)]
    assert len(day) == 17  # 16 studies, one with a second series; the boundary rows count right
    for key, column in (("modality", "by_modality"), ("aet", "by_calling_aet")):
        expected = []
        for value in sorted({getattr(r, key) for r in day}):
            mine = [r for r in day if getattr(r, key) == value]
            expected.append(
                {
                    "calling_aet" if key == "aet" else "modality": value,
                    "studies": len({r.study for r in mine}),
                    "series": len(mine),
                    "instances": sum(r.instances for r in mine),
                }
            )
        assert report.data["received"][column] == expected
    assert report.data["received"]["total"] == {
        "studies": 16,
        "series": 17,
        "instances": sum(r.instances for r in day),
    }


def test_jobs_per_model_and_state(history: Any) -> None:
    _, recs, report = history
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for r in recs:
        if on_day(r.received):
            counts[(r.model, r.state.value)] += 1
    expected = [{"model": m, "state": s, "count": n} for (m, s), n in sorted(counts.items())]
    assert report.data["jobs"] == expected
    assert {"model": "ct-pe", "state": "queued", "count": 1} in expected or {
        "model": "cxr-chexnet",
        "state": "queued",
        "count": 1,
    } in expected


def test_latency_percentiles_per_model(history: Any) -> None:
    _, recs, report = history
    expected = []
    for model in sorted(MODEL.values()):
        ready = [
            (r.finished - r.received).total_seconds()
            for r in recs
            if r.model == model and r.state is JobState.SUCCEEDED and on_day(r.finished)
        ]
        delivered = [
            (at - r.received).total_seconds()
            for r in recs
            if r.model == model and (at := delivered_at(r)) is not None and on_day(at)
        ]
        expected.append(
            {"model": model, "to_result": stats(ready), "to_delivered": stats(delivered)}
        )
        assert len(delivered) >= 3
    assert report.data["latency"] == expected


def test_failures_and_dead_work_with_reasons(history: Any) -> None:
    _, recs, report = history
    failures = report.data["failures"]
    dead = [r for r in recs if r.state is JobState.DEAD and on_day(r.finished)]
    assert len(dead) >= 2
    assert [(d["modality"], d["reason"]) for d in failures["dead_jobs"]] == [
        (r.modality, r.error) for r in sorted(dead, key=lambda r: r.finished)
    ]
    retries: dict[str, int] = defaultdict(int)
    for r in recs:
        if r.retries and on_day(r.finished - timedelta(seconds=1)):
            retries[r.model] += 1
    assert failures["retries"] == [
        {"model": m, "reason": "RuntimeError: CUDA out of memory", "count": n}
        for m, n in sorted(retries.items())
    ]
    dead_deliveries = [
        (dest, r.model)
        for r in recs
        for dest, state, at in r.deliveries
        if state is DeliveryState.DEAD and on_day(at)
    ]
    assert sorted((d["destination"], d["model"]) for d in failures["dead_deliveries"]) == sorted(
        dead_deliveries
    )


def test_deliveries_per_destination_and_state(history: Any) -> None:
    _, recs, report = history
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for r in recs:
        for dest, state, _ in r.deliveries:
            if on_day(r.finished):
                counts[(dest, state.value)] += 1
    assert report.data["deliveries"] == [
        {"destination": d, "state": s, "count": n} for (d, s), n in sorted(counts.items())
    ]
    assert ("pacs", "pending") in counts and ("pacs", "dead") in counts


def test_spool_usage(history: Any) -> None:
    _, recs, report = history
    spool = report.data["spool"]
    assert spool["spool"] == {
        "files": sum(r.instances for r in recs),
        "bytes": 100 * sum(r.instances for r in recs),
    }
    assert spool["database"] == {
        "instances": spool["spool"]["files"],
        "bytes": spool["spool"]["bytes"],
    }
    assert spool["filesystem"]["free_bytes"] > 0


def test_drift_is_flagged_both_ways_and_only_beyond_the_bound(history: Any) -> None:
    _, recs, report = history
    window_start = DAY - timedelta(days=30)
    rows = {(r["model"], r["label"]): r for r in report.data["drift"]}
    assert set(rows) == {*RATES, RARE}
    for key, row in rows.items():
        day = [
            r.findings[key[1]]
            for r in recs
            if r.model == key[0] and key[1] in r.findings and on_day(r.finished)
        ]
        window = [
            r.findings[key[1]]
            for r in recs
            if r.model == key[0]
            and key[1] in r.findings
            and window_start <= local(r.finished) < DAY
        ]
        assert (row["day_results"], row["day_positive"]) == (len(day), sum(day))
        assert (row["window_results"], row["window_positive"]) == (len(window), sum(window))
        if window:
            assert row["difference"] == pytest.approx(
                sum(day) / len(day) - sum(window) / len(window), abs=1e-4
            )
    assert rows[("cxr-chexnet", "Effusion")]["flagged"]  # up
    assert rows[("cxr-chexnet", "Effusion")]["difference"] > 0.15
    assert rows[("ct-pe", "central_pe")]["flagged"]  # down
    assert rows[("ct-pe", "central_pe")]["difference"] < -0.15
    assert not rows[("cxr-chexnet", "Cardiomegaly")]["flagged"]
    assert abs(rows[("cxr-chexnet", "Cardiomegaly")]["difference"]) <= 0.15
    assert not rows[RARE]["flagged"] and rows[RARE]["day_results"] == 2
    assert {(r["model"], r["label"]) for r in report.flagged} == {
        ("cxr-chexnet", "Effusion"),
        ("ct-pe", "central_pe"),
    }


def test_drift_bound_is_configurable(history: Any, tmp_path: Path) -> None:
    config, _, _ = history
    wide = config.model_copy(
        update={
            "audit": config.audit.model_copy(update={"drift_bound": 0.9, "reports_dir": tmp_path})
        }
    )
    with make_sessions(config)() as session:
        assert run_audit(session, DAY, NOW, wide).flagged == []


def test_history_gives_the_chart_its_days(history: Any) -> None:
    _, recs, report = history
    days = report.data["history"]
    assert len(days) == 30 and days[-1]["day"] == "2025-03-12" and days[0]["day"] == "2025-02-11"
    for row in days:
        d = date.fromisoformat(row["day"])
        mine = [r for r in recs if local(r.received) == d]
        assert row["studies"] == len({r.study for r in mine})
        assert row["instances"] == sum(r.instances for r in mine)
        latencies = [
            (at - r.received).total_seconds()
            for r in recs
            if (at := delivered_at(r)) is not None and local(at) == d
        ]
        assert row["delivered"] == len(latencies)
        if latencies:
            assert row["latency_p50_s"] == pytest.approx(
                float(np.percentile(latencies, 50)), abs=2e-3
            )


def test_percentile_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 101):
        values = list(rng.exponential(10, n))
        for q in (0, 50, 95, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None


def test_html_renders_in_chromium(history: Any) -> None:
    """A person can read it: one table per section, the chart, escaped AE titles."""
    _, _, report = history
    page = report.html_path.read_text()
    assert page.count("<table>") >= 8 and "<svg" in page and "<polyline" in page
    assert "DX&amp;&lt;ER&gt;" in page and "DX&<ER>" not in page
    assert "2 label(s) drifted" in page
    chromium = shutil.which("chromium")
    assert chromium, "chromium missing: run `make system-deps`"
    out = REPO / "var" / "audit-report.png"
    out.parent.mkdir(exist_ok=True)
    out.unlink(missing_ok=True)
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={out}",
            "--window-size=1150,2600",
            report.html_path.as_uri(),
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    with Image.open(out) as image:
        assert image.size == (1150, 2600)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # text, tables and chart, not a blank page


def test_cli_audit_json_and_exit_status(history: Any, tmp_path: Path) -> None:
    config, _, report = history
    toml = tmp_path / "pacsnode.toml"
    toml.write_text(
        f"""
[storage]
spool_dir = "{config.storage.spool_dir}"
output_dir = "{config.storage.output_dir}"
database_url = "{config.storage.database_url}"
[audit]
reports_dir = "{tmp_path / "reports"}"
timezone = "Europe/Berlin"
drift_min_results = 5
"""
    )
    result = CliRunner().invoke(
        cli_main, ["--config", str(toml), "audit", "--date", "2025-03-12", "--json"]
    )
    assert result.exit_code == 3, result.output  # written, drift flagged
    printed = json.loads(result.output)
    assert printed["html"] == str(tmp_path / "reports" / "2025-03-12.html")
    assert printed["received"] == report.data["received"]
    assert printed["drift"] == report.data["drift"]
    quiet = CliRunner().invoke(cli_main, ["--config", str(toml), "audit", "--date", "2024-01-01"])
    assert quiet.exit_code == 0, quiet.output
    assert "0 studies" in quiet.output


# -- findings: what the worker stores for the drift check ------------------------------


@dataclass(frozen=True)
class Result:
    sop_instance_uid: str
    series_uid: str
    kind: str
    path: Path


def test_findings_are_read_back_from_the_sr_the_worker_wrote(tmp_path: Path) -> None:
    manifest = make_manifest()
    sources = [dx_image(1), dx_image(2)]
    probabilities = [
        {"no_finding": 0.1, "effusion": 0.1, "cardiomegaly": 0.2, "pneumothorax": 0.2},
        {"no_finding": 0.1, "effusion": 0.45, "cardiomegaly": 0.9, "pneumothorax": 0.3},
    ]
    sr = build_measurement_report(sources, results_for(sources, probabilities), manifest)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    # reported labels only; positive when Present on any image (effusion: 0.45 >= 0.4)
    assert findings.summarize(dcmread(path), manifest) == {"effusion": True, "pneumothorax": False}

    source_series = str(sources[0].SeriesInstanceUID)
    series_uid, sop_uid = result_uids(source_series, manifest, "sr")
    assert (str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID)) == (series_uid, sop_uid)
    outputs = [Result(sop_uid, series_uid, "sr", path)]
    other = make_manifest(version="2.0.0")  # another model's report is not this one
    assert findings.from_outputs(source_series, outputs, [other]) == {}
    verdicts = findings.from_outputs(source_series, outputs, [other, manifest])
    assert verdicts == {"effusion": True, "pneumothorax": False}
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom")
    assert (
        findings.from_outputs(
            source_series, [Result(sop_uid, series_uid, "sr", broken)], [manifest]
        )
        == {}
    )

    config = make_config(tmp_path)
    sessions = make_sessions(config)
    with sessions() as session:
        h = History(session, config.storage.spool_dir)
        job = h.job(h.series(NOW, modality="DX"), JobState.SUCCEEDED, NOW, model="cxr-demo")
        findings.record(session, job.id, verdicts, NOW)
        findings.record(session, job.id, {"effusion": False}, NOW)  # a rerun replaces
        session.commit()
        rows = session.execute(select(Finding.label, Finding.positive)).all()
    assert rows == [("effusion", False)]


def test_a_real_worker_run_records_one_finding_per_reported_label(tmp_path: Path) -> None:
    """The worker hunk: the chest X-ray model's SR is read back into ``findings``."""
    from inprocess import run_worker

    from pacsnode.manifest import load_manifest
    from pacsnode.phantoms.cxr import make_cxr_dataset

    ds, _ = make_cxr_dataset(9206, findings=["Cardiomegaly"], rows=320, cols=320)
    outputs = run_worker(tmp_path, ds, "[]")
    db = next(tmp_path.rglob("db.sqlite"))
    sessions = make_sessionmaker(make_engine(f"sqlite:///{db}"))
    with sessions() as session:
        rows = dict(session.execute(select(Finding.label, Finding.positive)).all())
        job_ids = set(session.scalars(select(Finding.job_id)))
    manifest = load_manifest(REPO / "models" / "cxr-chexnet")
    assert set(rows) == {label.name for label in manifest.reported_labels}
    assert job_ids == {outputs[0].job_id}
    sr = dcmread(outputs[-1].path)
    assert rows == findings.summarize(sr, manifest)
