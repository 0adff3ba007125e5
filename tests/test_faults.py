"""Faults around the node: the destination down, the spool full or read-only, the database locked.

The spool tests mount a small tmpfs in a private mount namespace held by a sleeping
process; the node runs inside it (``nsenter``), so a failed test leaves no mount behind.
As root the namespace is a plain mount namespace; otherwise a user namespace
(``unshare -rm``) grants the mount. Either way nothing is skipped.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from dicomgen import image_dataset, save
from nodeproc import NodeProcess
from peers import LOOPBACK, Orthanc, combined_output, echoscu, parse_store_statuses, storescu
from pydicom.dataset import Dataset
from pynetdicom import AE
from sqlalchemy import func, select

from pacsnode.phantoms.cxr import make_cxr_dataset
from pacsnode.queue import backoff
from pacsnode.spool import spool_path
from pacsnode.status import StoreStatus
from pacsnode.tables import Delivery, DeliveryState, Event, Instance, Series

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.34"}


def _store(node: NodeProcess, files: list[Path]) -> list[int]:
    result = storescu(
        LOOPBACK, node.port, files, called_aet=node.ae_title, extra_args=["--no-halt"]
    )
    return parse_store_statuses(combined_output(result))


def _dataset_bytes(raw: bytes) -> bytes:
    """The encoded dataset of a Part 10 file, after its file meta group."""
    return raw[144 + int.from_bytes(raw[140:144], "little") :]


def _consistent(node: NodeProcess) -> dict[str, int]:
    """SQLite's own check, and every series' count equal to its instance rows."""
    with sqlite3.connect(node.db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with node.sessions()() as s:
        counted = dict(
            s.execute(
                select(Instance.series_id, func.count(Instance.id)).group_by(Instance.series_id)
            ).all()
        )
        for series in s.scalars(select(Series)):
            assert series.instance_count == counted.get(series.id, 0), series.series_uid
        return {
            sop: count
            for sop, count in s.execute(select(Instance.sop_instance_uid, Instance.receive_count))
        }


# -- destination down -------------------------------------------------------------------


def _sr_uids(orthanc: Orthanc) -> list[str]:
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
    return [
        item["MainDicomTags"]["SOPInstanceUID"]
        for item in found
        if orthanc.metadata(item["ID"]).get("SopClassUid") in SR_CLASSES
    ]


@pytest.mark.slow
def test_destination_down_backs_off_and_resumes_by_itself_across_a_restart(
    tmp_path: Path, orthanc_factory
) -> None:
    """Longer than the first retries, and through a kill -9 of the node: nothing is lost.

    (Dead after ``max_attempts``, ``status`` and ``requeue --failed``:
    ``test_end_to_end.test_destination_down_backs_off_dies_and_requeue_delivers``.)
    """
    orthanc = orthanc_factory()
    orthanc.stop(graceful=False)
    base, cap = 0.2, 1.0
    node = NodeProcess(
        tmp_path / "node",
        destinations=[("pacs", orthanc.aet, orthanc.dicom_port)],
        extra_toml=f"[queue]\npoll_seconds = 0.1\n[dispatch]\nmax_attempts = 30\n"
        f"backoff_base_seconds = {base}\nbackoff_max_seconds = {cap}\ntimeout_seconds = 5\n"
        "[outputs]\nheatmaps = []\n",
    ).start()
    try:
        paths = []
        for seed in (31, 32, 33):
            ds, _ = make_cxr_dataset(seed, rows=256, cols=256)
            paths.append(save(ds, tmp_path / f"cxr{seed}.dcm"))
        assert _store(node, paths) == [0x0000] * 3

        def deliveries() -> list[Delivery]:
            with node.sessions()() as s:
                return list(s.scalars(select(Delivery)))

        def retried(times: int) -> bool:
            rows = deliveries()
            return len(rows) == 3 and all(
                d.state is DeliveryState.FAILED and d.attempts >= times for d in rows
            )

        node.wait_until(lambda: retried(4), what="deliveries failed four times")
        node.kill()  # the outage outlives the node process too
        node.start()
        node.wait_until(lambda: retried(5), what="retries resumed after the restart")
        orthanc.start()
        node.wait_until(
            lambda: {d.state for d in deliveries()} == {DeliveryState.DELIVERED},
            what="delivered once the destination is back",
        )
        rows = deliveries()
        assert all(5 <= d.attempts < 30 for d in rows), [d.attempts for d in rows]
        assert len(_sr_uids(orthanc)) == 3

        # each retry waited at least its backoff: base, 2·base, 4·base … capped
        with node.sessions()() as s:
            failures = s.execute(
                select(Event.at, Event.message)
                .where(Event.kind == "delivery-failed")
                .order_by(Event.id)
            ).all()
        times: dict[str, list] = defaultdict(list)
        for at, message in failures:
            times[message.split(" to ")[0]].append(at)
        assert len(times) == 3
        for at in times.values():
            for attempt, (before, after) in enumerate(zip(at, at[1:], strict=False), start=1):
                assert after - before >= backoff(attempt, base, cap) - timedelta(milliseconds=20), (
                    attempt,
                    after - before,
                )
        assert node.cli_json("status")["deliveries"] == {"delivered": 3}
    finally:
        node.stop()


# -- spool full or read-only -------------------------------------------------------------


class MountNamespace:
    """A private mount namespace, held by a sleeping process, for a test's own tmpfs."""

    def __init__(self) -> None:
        root = os.geteuid() == 0
        unshare = ["unshare", "-m" if root else "-rm", "--propagation", "private"]
        self.holder = subprocess.Popen([*unshare, "sleep", "3600"])
        ours = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/mnt") == ours:
            assert time.monotonic() < deadline, "unshare did not create a mount namespace"
            time.sleep(0.01)
        self.enter = ["nsenter", "-t", str(self.holder.pid), "-m", *([] if root else ["-U"])]

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.enter, *command], capture_output=True, text=True, check=check, timeout=60
        )

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait(timeout=10)


class NamespacedNode(NodeProcess):
    """A node whose ``serve`` runs inside ``ns`` (nsenter execs it: same pid, kill works)."""

    def __init__(self, workdir: Path, ns: MountNamespace, **kwargs: object) -> None:
        super().__init__(workdir, **kwargs)  # type: ignore[arg-type]
        self.ns = ns

    def command(self, *args: str) -> list[str]:
        return [*self.ns.enter, *super().command(*args)]

    def read_spooled(self, ds: Dataset) -> bytes:
        path = _spooled(self, ds)
        return subprocess.run([*self.ns.enter, "cat", path], capture_output=True, check=True).stdout

    def spool_files(self) -> list[str]:
        """Every file in the spool, as the node sees it (the tmpfs exists only in ``ns``)."""
        found = self.ns.run("find", str(self.spool_dir), "-type", "f")
        return sorted(found.stdout.split())


@pytest.fixture
def spool_node(tmp_path: Path) -> Iterator[NamespacedNode]:
    ns = MountNamespace()
    node = NamespacedNode(tmp_path / "node", ns, enabled=(), components="receiver")
    node.spool_dir.mkdir(parents=True)
    ns.run("mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(node.spool_dir))
    node.start()
    yield node
    node.stop()
    ns.close()


def _spooled(node: NodeProcess, ds: Dataset) -> str:
    return str(
        spool_path(node.spool_dir, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    )


def test_full_or_read_only_spool_answers_a700_and_recovers(
    spool_node: NamespacedNode, tmp_path: Path
) -> None:
    node = spool_node
    series = image_dataset().SeriesInstanceUID
    study = image_dataset().StudyInstanceUID

    def instance(name: str, size: int) -> tuple[Dataset, Path]:
        ds = image_dataset(size=size, study_uid=study, series_uid=series)
        return ds, save(ds, tmp_path / f"{name}.dcm")

    first, first_path = instance("first", 16)
    assert _store(node, [first_path]) == [0x0000]

    # full: the filler takes every page, then gives back 16 KiB: a 128 KiB instance fails
    # part-way through, a new file cannot even start once the space is gone
    filler = str(node.spool_dir / "filler")
    node.ns.run("dd", "if=/dev/zero", f"of={filler}", "bs=4k", check=False)
    node.ns.run("truncate", "-s", "-16k", filler)
    big, big_path = instance("big", 256)
    assert _store(node, [big_path]) == [StoreStatus.OUT_OF_RESOURCES]
    node.ns.run(
        "dd", "if=/dev/zero", f"of={filler}", "bs=4k", "oflag=append", "conv=notrunc", check=False
    )
    small, small_path = instance("small", 16)
    assert _store(node, [small_path, first_path]) == [StoreStatus.OUT_OF_RESOURCES] * 2
    assert node.spool_files() == sorted([_spooled(node, first), filler]), "partial files left"
    counts = _consistent(node)
    assert counts == {first.SOPInstanceUID: 1}, "a refused instance has a row"

    # space returns: the same instances are stored
    node.ns.run("rm", filler)
    assert _store(node, [big_path, small_path]) == [0x0000, 0x0000]
    assert _dataset_bytes(node.read_spooled(big)) == _dataset_bytes(big_path.read_bytes())

    # read-only: refused, the stored copies and their rows untouched; rw again: stored
    node.ns.run("mount", "-o", "remount,ro", str(node.spool_dir))
    late, late_path = instance("late", 16)
    assert _store(node, [late_path, first_path]) == [StoreStatus.OUT_OF_RESOURCES] * 2
    assert echoscu(LOOPBACK, node.port, called_aet=node.ae_title).returncode == 0
    counts = _consistent(node)
    assert late.SOPInstanceUID not in counts and counts[first.SOPInstanceUID] == 1
    node.ns.run("mount", "-o", "remount,rw", str(node.spool_dir))
    assert _store(node, [late_path, first_path]) == [0x0000, 0x0000]
    assert _consistent(node)[first.SOPInstanceUID] == 2
    spooled = node.spool_files()
    assert spooled == sorted(_spooled(node, ds) for ds in (first, big, small, late))
    assert node.alive()


# -- database locked -----------------------------------------------------------------------


BUSY_SECONDS = 2.0


@pytest.fixture
def busy_node(tmp_path: Path) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path / "node", enabled=(), components="receiver")
    text = node.config_path.read_text()
    node.config_path.write_text(
        text.replace("[storage]\n", f"[storage]\ndb_busy_timeout_seconds = {BUSY_SECONDS}\n", 1)
    )
    node.start()
    yield node
    node.stop()


def _timed_stores(node: NodeProcess, datasets: list[Dataset]) -> list[tuple[int, float]]:
    """C-STORE each dataset over one pynetdicom association: (status, seconds) each."""
    ae = AE(ae_title="LOCKSCU")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 60
    assoc = ae.associate(LOOPBACK, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    out = []
    try:
        for ds in datasets:
            began = time.monotonic()
            status = assoc.send_c_store(ds)
            out.append((int(status.Status) if status else -1, time.monotonic() - began))
    finally:
        assoc.release()
    return out


def test_locked_database_answers_a700_within_the_busy_timeout_then_recovers(
    busy_node: NodeProcess,
) -> None:
    node = busy_node
    study = image_dataset().StudyInstanceUID
    datasets = [image_dataset(study_uid=study) for _ in range(4)]
    assert [s for s, _ in _timed_stores(node, datasets[:1])] == [0x0000]

    lock = sqlite3.connect(node.db_path, isolation_level=None, timeout=30, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        began = time.monotonic()
        answers = _timed_stores(node, datasets[1:3])
        held = time.monotonic() - began
    finally:
        lock.execute("ROLLBACK")
    assert [s for s, _ in answers] == [StoreStatus.OUT_OF_RESOURCES] * 2, answers
    # each waited the busy timeout (the first also waited for the association's audit row),
    # and none hung the sender: bounded by the timeout, not by the lock
    for _, seconds in answers:
        assert BUSY_SECONDS * 0.9 <= seconds <= 2 * BUSY_SECONDS + 5, answers
    assert held <= 4 * BUSY_SECONDS + 10
    assert "database unavailable" in node.log()

    # a lock shorter than the timeout only delays the store
    lock.execute("BEGIN EXCLUSIVE")
    threading.Timer(BUSY_SECONDS / 3, lambda: lock.execute("ROLLBACK")).start()
    (answer,) = _timed_stores(node, datasets[3:])
    assert answer[0] == 0x0000, answer

    assert [s for s, _ in _timed_stores(node, datasets[1:3])] == [0x0000] * 2
    rows = _consistent(node)
    assert set(rows) == {ds.SOPInstanceUID for ds in datasets}
    assert all(count == 1 for count in rows.values()), "a refused store left a row"
    lock.close()


def test_locked_database_leaves_no_file_for_a_refused_instance(busy_node: NodeProcess) -> None:
    """The file is renamed into the spool before its row commits; a refusal removes it again."""
    node = busy_node
    ds = image_dataset()
    lock = sqlite3.connect(node.db_path, isolation_level=None, timeout=30, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        assert [s for s, _ in _timed_stores(node, [ds])] == [StoreStatus.OUT_OF_RESOURCES]
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    final = spool_path(node.spool_dir, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert not final.exists(), "a refused instance was left in the spool without a row"
    assert not list(node.spool_dir.rglob("*.tmp"))
    assert [s for s, _ in _timed_stores(node, [ds])] == [0x0000]
    assert _dataset_bytes(final.read_bytes())
