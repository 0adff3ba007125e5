"""Crash safety, proven: SIGKILL the receiver and the worker at random moments while studies stream in.

The node runs split in two processes (``receiver``: C-STORE + completion/routing;
``worker,dispatch``: inference + delivery to a real Orthanc), so each can be killed on
its own. A seeded schedule kills one of them at least ``KILLS`` times and restarts it;
two senders (CT and chest X-ray) behave like modalities and resend whatever did not get
a success status. Afterwards every acknowledged instance must be in the spool and the
database, every series must have exactly its jobs, every job must have ended exactly
once, and Orthanc must hold exactly one copy of each result object.

Leases are never waited out: each restarted component releases the leases its killed
predecessor held at once (``queue.release_orphans``: same host, pid gone). Set
``PACSNODE_CRASH_SEED`` to replay another schedule.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from nodeproc import NodeProcess
from peers import LOOPBACK, Orthanc, combined_output, parse_store_statuses, storescu
from pydicom import dcmread
from sqlalchemy import func, select

from pacsnode import queue
from pacsnode.config import QueueConfig
from pacsnode.db import make_engine, make_sessionmaker, upgrade
from pacsnode.phantoms.ctpa import CtpaSeries, make_ctpa_case, write_ctpa_series
from pacsnode.phantoms.cxr import make_cxr_dataset
from pacsnode.receiver import InstanceHeader, record_instance
from pacsnode.tables import Delivery, DeliveryState, Event, Instance, Job, JobState, Output, Series

KILLS = 50
RECEIVER_SHARE = 0.6
SEED = int(os.environ.get("PACSNODE_CRASH_SEED", "20240607"))
CT_SLICES, CT_ROWS = 24, 64
MIN_SLICES = 20  # ct-pe's minimum, of at most 3 mm
LOST = "worker lost the job"  # the one reason a job may end dead here
CXR_SIZE = 256
FAST = """
[completion]
series_quiet_seconds = { default = 1.0 }
[queue]
poll_seconds = 0.1
lease_seconds = 20
backoff_base_seconds = 0.2
backoff_max_seconds = 1.0
[dispatch]
lease_seconds = 20
backoff_base_seconds = 0.2
backoff_max_seconds = 1.0
timeout_seconds = 10
[outputs]
heatmaps = []
"""
TERMINAL = {"job-succeeded", "job-dead"}


def _dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, after its file meta group."""
    raw = path.read_bytes()
    return raw[144 + int.from_bytes(raw[140:144], "little") :]


class Component:
    """One ``pacsnode serve --components …`` process of a shared node, killable and restartable.

    Each component logs to its own file; readiness is the start line written after
    ``Node.start()`` (models loaded, port bound) in the part of the log this start wrote.
    """

    def __init__(self, node: NodeProcess, components: str, ready_text: str) -> None:
        self.node = node
        self.components = components
        self.ready_text = ready_text
        self.log_path = node.workdir / f"{components.replace(',', '-')}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = threading.Event()
        self.start_seconds: list[float] = []

    def start(self, timeout: float = 120) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.node.command("serve", "--components", self.components),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.node.workdir,
            )
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.components} exited:\n{self.log()[-4000:]}")
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                if self.ready_text.encode() in fh.read():
                    self.start_seconds.append(time.monotonic() - started)
                    self.ready.set()
                    return
            time.sleep(0.05)
        raise TimeoutError(f"{self.components} not ready in {timeout} s:\n{self.log()[-4000:]}")

    def kill(self) -> None:
        self.ready.clear()
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.ready.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Sent:
    """What the modalities were told: instances acknowledged with 0x0000, by SOP Instance UID."""

    acked: dict[str, Path] = field(default_factory=dict)
    series: dict[str, tuple[str, set[str]]] = field(default_factory=dict)  # uid → (kind, sops)
    attempts: int = 0
    refused: Counter[int] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _send_until_acked(node: NodeProcess, files: dict[str, Path], sent: Sent) -> None:
    """Resend what got no success status, as a modality would, until every instance has one."""
    pending = dict(files)
    while pending:
        paths = list(pending.values())
        result = storescu(
            LOOPBACK, node.port, paths, called_aet=node.ae_title, extra_args=["--no-halt"]
        )
        statuses = parse_store_statuses(combined_output(result))
        with sent.lock:
            sent.attempts += len(statuses)
            for (sop, path), status in zip(list(pending.items()), statuses, strict=False):
                if status == 0x0000:
                    sent.acked[sop] = path
                    del pending[sop]
                else:
                    sent.refused[status] += 1
        if pending:
            time.sleep(0.2)


def _sender(
    node: NodeProcess, kind: str, out: Path, stop: threading.Event, sent: Sent, seed: int
) -> None:
    """Make and send studies of ``kind`` until ``stop``; each is sent to completion."""
    n = 0
    rng = random.Random(seed)
    while not stop.is_set():
        n += 1
        folder = out / f"{kind}{n}"
        if kind == "ct":
            series = _write_ct(folder, seed + n)
            paths = list(series.paths)
            series_uid = series.series_uid
        else:
            folder.mkdir(parents=True)
            ds, _ = make_cxr_dataset(seed + n, rows=CXR_SIZE, cols=CXR_SIZE)
            paths = [folder / "cxr.dcm"]
            ds.save_as(paths[0], enforce_file_format=True)
            series_uid = ds.SeriesInstanceUID
        files = {_sop_uid(p): p for p in paths}
        with sent.lock:
            sent.series[series_uid] = (kind, set(files))
        if kind == "ct":  # in two associations: a pause past the quiet period reruns the job
            head = dict(list(files.items())[:MIN_SLICES])
            _send_until_acked(node, head, sent)
            stop.wait(rng.uniform(0.0, 2.0))
            _send_until_acked(node, {k: v for k, v in files.items() if k not in head}, sent)
        else:
            _send_until_acked(node, files, sent)
            stop.wait(0.3)  # about as fast as the worker on two cores: CT jobs do not queue up


def _write_ct(folder: Path, seed: int) -> CtpaSeries:
    """A short CTPA series; cases whose emboli fall outside the few slices are skipped."""
    for offset in range(0, 10_000, 97):
        try:
            return write_ctpa_series(
                folder,
                make_ctpa_case(seed + offset),
                rows=CT_ROWS,
                slices=CT_SLICES,
                slice_spacing_mm=2.5,
                shuffle=False,  # slice order: the first MIN_SLICES make a volume of their own
            )
        except ValueError:
            continue
    raise AssertionError(f"no CTPA case near seed {seed} fits {CT_SLICES} slices")


def _sop_uid(path: Path) -> str:
    return str(
        dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID
    )


def _settled(node: NodeProcess) -> bool:
    with node.sessions()() as s:
        open_series = s.scalar(
            select(Series.id).where(
                (Series.completed_at.is_(None)) | (Series.last_received_at > Series.completed_at)
            )
        )
        busy_jobs = s.scalar(
            select(Job.id).where(
                Job.state.in_([JobState.QUEUED, JobState.RUNNING, JobState.FAILED])
            )
        )
        busy_deliveries = s.scalar(
            select(Delivery.id).where(
                Delivery.state.in_(
                    [DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.FAILED]
                )
            )
        )
    return open_series is None and busy_jobs is None and busy_deliveries is None


def _orthanc_sop_uids(orthanc: Orthanc) -> list[str]:
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
    return [item["MainDicomTags"]["SOPInstanceUID"] for item in found]


@pytest.mark.slow
def test_random_sigkills_lose_nothing_and_duplicate_nothing(
    tmp_path: Path, orthanc_factory
) -> None:
    begun = time.monotonic()
    orthanc = orthanc_factory()
    node = NodeProcess(
        tmp_path / "node",
        enabled=("cxr-chexnet", "ct-pe"),
        destinations=[("pacs", orthanc.aet, orthanc.dicom_port)],
        extra_toml=FAST,
    )
    receiver = Component(node, "receiver", "pacsnode listening as")
    worker = Component(node, "worker,dispatch", "pacsnode running")
    components = [receiver, worker]
    receiver.start()  # first: it migrates the database
    worker.start()

    sent = Sent()
    stop_sending = threading.Event()
    senders = [
        threading.Thread(
            target=_sender, args=(node, kind, tmp_path / "sent", stop_sending, sent, seed)
        )
        for kind, seed in (("ct", 1000), ("cxr", 5000))
    ]
    for thread in senders:
        thread.start()

    rng = random.Random(SEED)
    kills: Counter[str] = Counter()
    restarts: list[threading.Thread] = []
    errors: list[BaseException] = []

    def restart(component: Component) -> None:
        try:
            component.start()
        except BaseException as exc:  # reported after the kill phase
            errors.append(exc)

    try:
        while sum(kills.values()) < KILLS and not errors:
            time.sleep(rng.uniform(0.2, 2.0))
            # the receiver restarts in about half the worker's time (no torch, no models)
            wanted = receiver if rng.random() < RECEIVER_SHARE else worker
            ready = [c for c in (wanted, *components) if c.ready.is_set()]
            if not ready:
                continue
            victim = ready[0]
            victim.kill()
            kills[victim.components] += 1
            restarts.append(threading.Thread(target=restart, args=(victim,)))
            restarts[-1].start()
        kill_phase = time.monotonic() - begun
        for thread in restarts:
            thread.join(timeout=180)
        assert not errors, errors
        stop_sending.set()
        for thread in senders:
            thread.join(timeout=300)
        assert not any(t.is_alive() for t in senders), "a sender never got its study stored"
        node.wait_until(lambda: _settled(node), timeout=300, what="queue and deliveries settled")
        _check(node, orthanc, sent, kills)
    finally:
        for component in components:
            component.stop()
    starts = {c.components: c.start_seconds for c in components}
    print(
        f"\ncrash safety (seed {SEED}): kills {dict(kills)} in {kill_phase:.0f} s; "
        + ", ".join(
            f"{name} start {sum(s) / len(s):.1f} s mean, {max(s):.1f} s max"
            for name, s in starts.items()
        )
        + f"; whole test {time.monotonic() - begun:.0f} s"
    )


def _check(node: NodeProcess, orthanc: Orthanc, sent: Sent, kills: Counter[str]) -> None:
    """The promises, one by one; prints the counts."""
    assert sum(kills.values()) >= KILLS
    assert min(kills[c] for c in ("receiver", "worker,dispatch")) >= KILLS // 5, kills
    with node.sessions()() as s:
        instances = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
        series = {x.series_uid: x for x in s.scalars(select(Series))}
        jobs = list(s.scalars(select(Job)))
        job_series = sorted((j.series.series_uid, j.model_name) for j in jobs)
        outputs = list(s.scalars(select(Output)))
        deliveries = list(s.scalars(select(Delivery)))
        again = s.scalar(
            select(func.count(Event.id)).where(Event.message.contains("complete again"))
        )
        job_events = [
            (e.job_id, e.kind)
            for e in s.scalars(select(Event).where(Event.job_id.is_not(None)).order_by(Event.id))
        ]

    # 1. every acknowledged instance is in the spool, byte for byte, and in the database
    for sop, source in sent.acked.items():
        row = instances.get(sop)
        assert row is not None, f"instance {sop} was acknowledged but has no row"
        assert _dataset_bytes(Path(row.path)) == _dataset_bytes(source), sop
    all_sent = {sop for _, sops in sent.series.values() for sop in sops}
    assert set(sent.acked) == all_sent  # the senders got everything stored in the end
    assert not list(node.spool_dir.rglob("*.tmp")), "partial files left in the spool"
    for uid, (_, sops) in sent.series.items():
        assert series[uid].instance_count == len(sops), uid
        assert series[uid].completed_at is not None

    # 2. every complete series got exactly its jobs
    model = {"ct": "ct-pe", "cxr": "cxr-chexnet"}
    expected = sorted((uid, model[kind]) for uid, (kind, _) in sent.series.items())
    assert job_series == expected

    # 3. every job ended exactly once (per time it was queued), succeeded or dead with a reason
    episodes: dict[int, list[list[str]]] = defaultdict(list)
    for job_id, kind in job_events:
        if kind == "job-queued":
            episodes[job_id].append([])
        elif episodes[job_id]:
            episodes[job_id][-1].append(kind)
    for job in jobs:
        assert job.state in (JobState.SUCCEEDED, JobState.DEAD), (job.id, job.state)
        if job.state is JobState.DEAD:  # only by the kills: any other reason is a bug
            assert (job.last_error or "").startswith(LOST), (job.id, job.last_error)
            assert job.attempts <= kills["worker,dispatch"]
        runs = episodes[job.id]
        assert runs, f"job {job.id} has no queued event"
        for run in runs:
            assert sum(k in TERMINAL for k in run) <= 1, (job.id, run)
        assert [k for k in runs[-1] if k in TERMINAL] == [f"job-{job.state.value}"], (job.id, runs)
    succeeded = [j for j in jobs if j.state is JobState.SUCCEEDED]
    with_output = {o.job_id for o in outputs}
    assert all(j.id in with_output for j in succeeded), "a succeeded job has no result"

    # 4. Orthanc holds exactly one copy of each result object, and nothing else
    assert sorted(d.output_id for d in deliveries) == sorted(o.id for o in outputs)
    assert {d.state for d in deliveries} <= {DeliveryState.DELIVERED}, Counter(
        d.state for d in deliveries
    )
    in_orthanc = Counter(_orthanc_sop_uids(orthanc))
    assert set(in_orthanc) == {o.sop_instance_uid for o in outputs}
    assert max(in_orthanc.values()) == 1
    # a kill inside write_durably leaves its temp file in the outputs (nothing sweeps them)
    stray = len(list(node.output_dir.rglob("*.tmp")))

    kinds = Counter(kind for kind, _ in sent.series.values())
    reruns = sum(len(episodes[j.id]) - 1 for j in jobs)
    print(
        f"\nstored {len(sent.acked)} acknowledged instances ({sent.attempts} C-STOREs answered, "
        f"refused {dict(sent.refused)}) in {kinds['ct']} CT and {kinds['cxr']} CXR series; "
        f"jobs {len(jobs)} ({len(succeeded)} succeeded, {len(jobs) - len(succeeded)} dead, "
        f"{reruns} reruns; {again} series completed again by a late instance, {sum(len(r) for j in jobs for r in episodes[j.id])} state changes); "
        f"{len(outputs)} results, {sum(in_orthanc.values())} in Orthanc; "
        f"{stray} stray temp files in the outputs"
    )


def test_a_job_lost_before_is_claimed_alone_not_in_a_batch(tmp_path: Path) -> None:
    """A worker killed mid-batch charges every job of the batch an attempt; a job that may be
    the cause (tried before) must not drag fresh neighbours to their deaths with it."""
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    cfg = QueueConfig(lease_seconds=10)
    t0 = datetime(2026, 1, 1, 8, 0, 0)
    with sessions.begin() as s:
        for n in range(3):
            header = InstanceHeader(
                "1.2.840.10008.5.1.4.1.1.1.1",
                f"1.2.9.{n}",
                "1.2.3",
                f"1.2.4.{n}",
                "DX",
                "PA",
                "1.2",
            )
            record_instance(s, header, Path("/dev/null"), 0, "SCU", t0)
        for series_id in s.scalars(select(Series.id).order_by(Series.id)):
            queue.enqueue(s, series_id, "cxr", "1", t0)
    with sessions.begin() as s:
        (lost,) = queue.claim(s, ["cxr"], "w:1:a", t0, cfg, limit=1)
    later = t0 + timedelta(seconds=11)  # its lease lapsed: the worker died
    with sessions.begin() as s:
        batch = queue.claim(s, ["cxr"], "w:2:b", later, cfg, limit=8, first_attempts_only=True)
        assert lost.id not in [j.id for j in batch] and len(batch) == 2
        assert all(j.attempts == 1 for j in batch)
        (alone,) = queue.claim(s, ["cxr"], "w:2:b", later, cfg, limit=8)
        assert alone.id == lost.id and alone.attempts == 2
