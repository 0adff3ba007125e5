"""The bad-input corpus (issue 7, section 3) against one real node.

Every input of :mod:`badinputs` is sent with dcmtk ``storescu`` or pynetdicom and gets
its own expectation: a DIMSE status, a refusal at negotiation, and for stored inputs the
recorded outcome of its series. Good studies go in before, between and after the corpus
and must come out as usual; afterwards the node still answers C-ECHO and processes a new
instance, and its peak memory shows that no claimed image size was ever allocated.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from badinputs import (
    DEAD,
    DECLINED,
    PYNETDICOM,
    RAW,
    REFUSED,
    SR,
    STORESCU,
    Case,
    Expect,
    build_corpus,
    ct_datasets,
    cxr,
    write,
)
from ctgen import save_series
from nodeproc import NodeProcess
from peers import LOOPBACK, combined_output, dciodvfy, echoscu, parse_store_statuses, storescu
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.presentation import build_context
from sqlalchemy import select

from pacsnode.errors import VolumeError
from pacsnode.selection import summarize
from pacsnode.tables import Event, Job, JobState, Output, RoutingDecision, Series
from pacsnode.volumes import plan_volume, read_slice_refs

NODE_TOML = (
    "[completion]\nseries_quiet_seconds = { default = 1.0 }\n"
    "[outputs]\nheatmaps = []\n"  # one SR per job; heatmaps have their own tests
)
pytestmark = pytest.mark.filterwarnings(  # the corpus writes invalid UIDs on purpose
    "ignore:Invalid value for VR UI", "ignore:The value length"
)
MAX_RSS_KIB = 3 * 1024 * 1024
"""Peak RSS of the node after the corpus: far below one 65535x65535 frame (8 GiB)."""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = NodeProcess(
        tmp_path_factory.mktemp("bad-inputs") / "node",
        enabled=["cxr-chexnet", "ct-pe"],
        extra_toml=NODE_TOML,
    ).start()
    yield proc
    proc.stop()


def good_cases(folder: Path, tag: str) -> list[Case]:
    """A plain CXR and a plain CT series: the studies that must not be affected."""
    ds = cxr(200 + len(tag))
    cxr_case = Case(
        f"good CXR {tag}", STORESCU, [write(ds, folder / f"good-{tag}.dcm")], Expect(0, SR)
    )
    cxr_case.series_uid = str(ds.SeriesInstanceUID)
    series = ct_datasets()
    paths = save_series(series, folder / f"good-ct-{tag}")
    ct_case = Case(
        f"good CT {tag}", STORESCU, paths, Expect(0, SR, model="ct-pe"), series[0].SeriesInstanceUID
    )
    return [cxr_case, ct_case]


def send_storescu(node: NodeProcess, cases: list[Case]) -> dict[str, list[int]]:
    """One association per run of cases that need the same proposal (``-xy``: JPEG...)."""
    out: dict[str, list[int]] = {}
    run: list[Case] = []
    for case in cases:
        if run and case.storescu_args != run[-1].storescu_args:
            out |= _storescu_run(node, run)
            run = []
        run.append(case)
    return out | (_storescu_run(node, run) if run else {})


def _storescu_run(node: NodeProcess, cases: list[Case]) -> dict[str, list[int]]:
    files = [path for case in cases for path in case.files]
    result = storescu(
        LOOPBACK,
        node.port,
        files,
        called_aet=node.ae_title,
        extra_args=[*cases[0].storescu_args, "--no-halt"],
        timeout=120,
    )
    statuses = parse_store_statuses(combined_output(result))
    problems = [line for line in combined_output(result).splitlines() if line[:2] in ("E:", "W:")]
    assert len(statuses) == len(files), problems
    out: dict[str, list[int]] = {}
    for case in cases:
        out[case.name], statuses = statuses[: len(case.files)], statuses[len(case.files) :]
    return out


def send_pynetdicom(
    node: NodeProcess, cases: list[Case], monkeypatch: pytest.MonkeyPatch
) -> dict[str, list[int]]:
    """One association; RAW cases go in chunked mode (the file's bytes, unparsed)."""
    contexts = sorted({_pair(path) for case in cases for path in case.files})
    ae = AE(ae_title="PYSCU")
    ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in contexts]
    assoc = ae.associate(LOOPBACK, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    out: dict[str, list[int]] = {}
    try:
        for case in cases:
            monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", case.sender == RAW)
            out[case.name] = []
            for path in case.files:
                if _pair(path) not in accepted:
                    out[case.name].append(REFUSED)  # nothing to send it on
                    continue
                status = assoc.send_c_store(dcmread(path) if case.sender == PYNETDICOM else path)
                assert status is not None and "Status" in status, case.name
                code = int(status.Status)
                comment = str(status.get("ErrorComment", ""))
                assert case.expect.reason in comment or code == 0, (case.name, comment)
                out[case.name].append(code)
    finally:
        assoc.release()
    return out


def _pair(path: Path) -> tuple[str, str]:
    """(SOP class, transfer syntax) from the file meta, which need not parse beyond it."""
    meta = read_file_meta_info(path)
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


def refused_by_storescu(node: NodeProcess, case: Case) -> list[int]:
    """A file whose SOP class or transfer syntax the node does not accept: nothing is sent."""
    result = storescu(LOOPBACK, node.port, case.files, called_aet=node.ae_title, extra_args=["-R"])
    assert result.returncode != 0
    assert parse_store_statuses(combined_output(result)) == []
    return [REFUSED] * len(case.files)


def outcome(node: NodeProcess, case: Case) -> tuple[str, str] | None:
    """(outcome, detail) of the case's series once decided, else None."""
    with node.sessions()() as s:
        series = s.scalar(select(Series).where(Series.series_uid == case.series_uid))
        if series is None:
            return None
        decision = s.scalar(
            select(RoutingDecision).where(
                RoutingDecision.series_id == series.id,
                RoutingDecision.model_name == case.expect.model,
            )
        )
        job = s.scalar(
            select(Job)
            .where(Job.series_id == series.id, Job.model_name == case.expect.model)
            .order_by(Job.id.desc())
        )
        if job is None:
            if decision is not None and not decision.accepted and "waiting" not in decision.reason:
                return DECLINED, decision.reason
            return None
        if job.state is JobState.DEAD:
            return DEAD, job.last_error or ""
        if job.state is JobState.DECLINED:  # a gate declined; the notice was written
            return DECLINED, job.last_error or ""
        if job.state is JobState.SUCCEEDED:
            srs = [o.path for o in s.scalars(select(Output).where(Output.job_id == job.id))]
            return SR, next(p for p in srs if p)
        if job.state is JobState.FAILED:
            return "failed", job.last_error or ""
    return None


def check_sr(case: Case, sr_path: str) -> None:
    sr = dcmread(sr_path)
    source = dcmread(case.files[-1], stop_before_pixels=True)
    assert sr.StudyInstanceUID == source.StudyInstanceUID, case.name
    assert str(sr.PatientName) == str(source.PatientName), case.name
    if case.patient_name is not None:
        assert str(sr.PatientName) == case.patient_name, (case.name, sr.SpecificCharacterSet)
        assert sr.PatientName.components == source.PatientName.components
        errors, _ = dciodvfy(Path(sr_path))
        assert errors == [], (case.name, errors)


def test_corpus_gets_its_statuses_and_reasons_and_the_node_keeps_serving(
    node: NodeProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    corpus = build_corpus(tmp_path / "corpus")
    assert len(corpus) >= 30
    first, middle, last = (good_cases(tmp_path / "good", tag) for tag in ("a", "b", "c"))
    sent = [*first, *corpus[: len(corpus) // 2], *middle, *corpus[len(corpus) // 2 :], *last]

    statuses: dict[str, list[int]] = {}
    dcmtk_ok = [c for c in sent if c.sender == STORESCU and c.expect.status != REFUSED]
    half = len(dcmtk_ok) // 2
    statuses |= send_storescu(node, dcmtk_ok[:half])
    statuses |= send_pynetdicom(node, [c for c in sent if c.sender != STORESCU], monkeypatch)
    statuses |= send_storescu(node, dcmtk_ok[half:])
    for case in sent:
        if case.sender == STORESCU and case.expect.status == REFUSED:
            statuses[case.name] = refused_by_storescu(node, case)

    wrong = {
        c.name: [f"0x{s:04X}" for s in statuses[c.name]]
        for c in sent
        if statuses[c.name] != [c.expect.status] * len(c.files)
    }
    assert not wrong, wrong
    log = node.log()
    unnamed = [
        c.name
        for c in sent
        if c.sender == STORESCU
        and c.expect.status not in (0, REFUSED)
        and c.expect.reason not in log
    ]
    assert not unnamed, f"refusals whose reason is not in the node's log: {unnamed}"

    stored = [c for c in sent if c.expect.status == 0]
    results: dict[str, tuple[str, str]] = {}
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and len(results) < len(stored):
        for case in stored:
            if case.name not in results and (got := outcome(node, case)) is not None:
                results[case.name] = got
        time.sleep(0.5)
    undecided = [c.name for c in stored if c.name not in results]
    assert not undecided, f"no outcome for {undecided}:\n{node.log()[-3000:]}"
    mismatched = {
        c.name: results[c.name]
        for c in stored
        if results[c.name][0] != c.expect.outcome
        or (c.expect.outcome != SR and c.expect.reason not in results[c.name][1])
    }
    assert not mismatched, "\n".join(f"{name}: {got}" for name, got in mismatched.items())
    for case in stored:
        if case.expect.outcome == SR:
            check_sr(case, results[case.name][1])

    # the same instance in two series: the later copy wins, and each move is on record
    moved = [c for c in sent if c.emptied_series]
    with node.sessions()() as s:
        events = s.scalars(select(Event).where(Event.kind == "instance-moved")).all()
        assert len(events) == sum(len(c.files) // 2 for c in moved)
        for case in moved:
            emptied = s.scalar(select(Series).where(Series.series_uid == case.emptied_series))
            assert emptied is not None and emptied.instance_count == 0, case.name
            if case.expect.model == "ct-pe":  # completed after the move: declined, not crashed
                (decision,) = s.scalars(
                    select(RoutingDecision).where(
                        RoutingDecision.series_id == emptied.id,
                        RoutingDecision.model_name == case.expect.model,
                    )
                )
                assert "no instances left" in decision.reason

    # still serving: C-ECHO, and a new instance gets its result
    assert echoscu(LOOPBACK, node.port, called_aet=node.ae_title).returncode == 0
    after = good_cases(tmp_path / "after", "after")[:1]
    assert send_storescu(node, after) == {after[0].name: [0]}
    got = node.wait_until(lambda: outcome(node, after[0]), timeout=60, what="result after corpus")
    assert got[0] == SR
    assert node.proc is not None
    peak = _peak_rss_kib(node.proc.pid)
    assert peak < MAX_RSS_KIB, f"node peak RSS {peak / 1024:.0f} MiB"
    print(
        f"\n{len(corpus)} bad inputs + {len(sent) - len(corpus) + 1} good studies in "
        f"{time.monotonic() - started:.1f} s; node peak RSS {peak / 1024:.0f} MiB"
    )


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


def test_volume_claiming_more_than_max_voxels_is_refused_before_allocating(tmp_path: Path) -> None:
    """The headers alone decide: 20 slices claiming 65535² are never allocated."""
    datasets = ct_datasets()
    for ds in datasets:
        ds.Rows = ds.Columns = 65535
    refs = read_slice_refs(save_series(datasets, tmp_path / "huge"))
    with pytest.raises(VolumeError, match="65535x65535 .* refusing to decode"):
        plan_volume(refs, str(datasets[0].SeriesInstanceUID))


def test_enhanced_ct_with_per_frame_orientation_is_axial() -> None:
    (enhanced,) = ct_datasets(enhanced=True)
    assert "PlaneOrientationSequence" not in enhanced.SharedFunctionalGroupsSequence[0]
    assert summarize(enhanced, 1).plane == "axial"
