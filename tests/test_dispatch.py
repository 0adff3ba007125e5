"""Dispatch over several concurrent associations, against a real receiver.

The destination is a pacsnode receiver itself: its audit trail records every association
with the number of instances it brought, so the test sees how the parcels were spread.
(Speed: 3 associations bring the chest X-ray p95 time to result from 1.2 s to 0.85-0.95 s,
see benchmarks/latency.py and the README.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomgen import image_dataset, save
from nodeproc import NodeProcess
from peers import LOOPBACK
from sqlalchemy import func, select

from pacsnode.config import DestinationConfig
from pacsnode.dispatch import Parcel, send
from pacsnode.tables import AssociationLog, Instance


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path / "dest", ae_title="DEST", components="receiver")
    node.start()
    yield node
    node.stop()


def our_associations(node: NodeProcess) -> list[AssociationLog]:
    """The receiver's audit rows of our associations (not its readiness probe's), once each
    has ended: their counts are written when the association ends, by a writer thread."""
    deadline = time.monotonic() + 20
    while True:
        with node.sessions()() as s:
            rows = list(
                s.scalars(
                    select(AssociationLog)
                    .where(AssociationLog.calling_aet == "PACSNODE")
                    .order_by(AssociationLog.id)
                )
            )
        if all(r.ended_at is not None for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def parcels(tmp_path: Path, count: int) -> list[Parcel]:
    study = "1.2.826.0.1.3680043.8.498.77"
    out = []
    for i in range(count):
        ds = image_dataset(study_uid=study, series_uid=f"{study}.1", position_z=float(i))
        path = save(ds, tmp_path / f"result-{i}.dcm")
        out.append(Parcel(i + 1, 0, "dest", str(path), ds.SOPClassUID, ds.SOPInstanceUID))
    return out


def test_results_are_spread_over_concurrent_associations(
    receiver: NodeProcess, tmp_path: Path
) -> None:
    dest = DestinationConfig(name="dest", ae_title="DEST", host=LOOPBACK, port=receiver.port)
    batch = parcels(tmp_path, 7)
    outcome = send(dest, "PACSNODE", batch, 30, associations=3)
    assert outcome == {p.delivery_id: None for p in batch}
    with receiver.sessions()() as s:
        assert s.scalar(select(func.count(Instance.id))) == 7
    counts = sorted(r.instances for r in our_associations(receiver))
    assert counts == [2, 2, 3]  # 7 results, round robin over 3 associations


def test_one_association_when_asked_and_a_refused_one_fails_each_parcel(
    receiver: NodeProcess, tmp_path: Path
) -> None:
    batch = parcels(tmp_path, 3)
    dest = DestinationConfig(name="dest", ae_title="DEST", host=LOOPBACK, port=receiver.port)
    assert send(dest, "PACSNODE", batch, 30, associations=1) == {1: None, 2: None, 3: None}
    wrong = DestinationConfig(name="dest", ae_title="NOTDEST", host=LOOPBACK, port=receiver.port)
    failed = send(dest=wrong, calling_aet="PACSNODE", parcels=batch, timeout=30, associations=3)
    assert set(failed) == {1, 2, 3}
    # each parcel fails with its association's reason (the receiver's audit, below, shows the
    # three rejections; pynetdicom under load may report a rejection as not established)
    assert all(error is not None and "association to NOTDEST" in error for error in failed.values())
    rows = our_associations(receiver)
    assert [(r.result, r.instances) for r in rows if r.result == "accepted"] == [("accepted", 3)]
    assert sum(r.result == "rejected" for r in rows) == 3
