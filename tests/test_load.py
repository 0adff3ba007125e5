"""Load: eight concurrent CT associations of 200 slices each plus 50 chest X-rays, one node.

The CT series are real CTPA phantoms (128x128, 1.25 mm, contrast) that the enabled
``ct-pe`` model accepts, so every one becomes a job; the radiographs go to
``cxr-chexnet``. All must be stored, every job must succeed and every result must reach
Orthanc, while the node's resident memory, sampled from ``/proc``, stays under
``RSS_LIMIT``. Throughput and peak RSS are printed, never asserted.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from nodeproc import NodeProcess
from peers import LOOPBACK, combined_output, parse_store_statuses, storescu
from sqlalchemy import func, select

from pacsnode.phantoms.ctpa import make_ctpa_case, write_ctpa_series
from pacsnode.phantoms.cxr import make_cxr_dataset
from pacsnode.tables import Delivery, DeliveryState, Instance, Job, JobState, Output

CT_ASSOCIATIONS, CT_SLICES, CT_ROWS = 8, 200, 128
CXR_COUNT, CXR_SIZE = 50, 512
RSS_LIMIT = 3 * 1024**3  # generous: models warm (~1 GiB) plus eight associations' buffers
CONFIG = """
[completion]
series_quiet_seconds = { default = 3.0 }
[queue]
poll_seconds = 0.1
[outputs]
heatmaps = []
"""


class RssSampler:
    """Peak resident set size of one process, read from ``/proc/<pid>/status`` every 0.1 s."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, self.rss())


def _write_ct(folder: Path, seed: int) -> list[Path]:
    """A 200-slice CTPA; a case whose emboli miss the slab is skipped for the next seed."""
    for offset in range(0, 5000, 101):
        try:
            series = write_ctpa_series(
                folder, make_ctpa_case(seed + offset), rows=CT_ROWS, slices=CT_SLICES
            )
            return list(series.paths)
        except ValueError:
            continue
    raise AssertionError(f"no CTPA case near seed {seed} fits {CT_SLICES} slices")


@pytest.mark.slow
def test_eight_ct_associations_and_fifty_radiographs(tmp_path: Path, orthanc_factory) -> None:
    data = tmp_path / "data"
    with ThreadPoolExecutor(2) as pool:
        cts = list(pool.map(lambda i: _write_ct(data / f"ct{i}", 700 + i), range(CT_ASSOCIATIONS)))
    cxrs = []
    for i in range(CXR_COUNT):
        ds, _ = make_cxr_dataset(900 + i, rows=CXR_SIZE, cols=CXR_SIZE)
        cxrs.append(data / f"cxr{i}.dcm")
        ds.save_as(cxrs[-1], enforce_file_format=True)
    batches = [*cts, cxrs]
    total = sum(len(b) for b in batches)
    total_bytes = sum(p.stat().st_size for b in batches for p in b)

    orthanc = orthanc_factory()
    node = NodeProcess(
        tmp_path / "node",
        enabled=("cxr-chexnet", "ct-pe"),
        destinations=[("pacs", orthanc.aet, orthanc.dicom_port)],
        extra_toml=CONFIG,
    ).start()
    try:
        assert node.proc is not None
        with RssSampler(node.proc.pid) as rss:
            began = time.monotonic()
            with ThreadPoolExecutor(len(batches)) as pool:
                results = list(
                    pool.map(
                        lambda files: storescu(
                            LOOPBACK, node.port, files, called_aet=node.ae_title, timeout=600
                        ),
                        batches,
                    )
                )
            stored_in = time.monotonic() - began
            for files, result in zip(batches, results, strict=True):
                statuses = parse_store_statuses(combined_output(result))
                assert statuses == [0x0000] * len(files), combined_output(result)[-2000:]

            def done() -> bool:
                with node.sessions()() as s:
                    states = dict(
                        s.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)).all()
                    )
                    pending = s.scalar(
                        select(func.count(Delivery.id)).where(
                            Delivery.state != DeliveryState.DELIVERED
                        )
                    )
                return states == {JobState.SUCCEEDED: len(batches) - 1 + CXR_COUNT} and not pending

            node.wait_until(done, timeout=900, what="every job done and delivered")
            processed_in = time.monotonic() - began
        with node.sessions()() as s:
            instances = s.scalar(select(func.count(Instance.id)))
            outputs = s.scalar(select(func.count(Output.id)))
            jobs = {
                m: n
                for m, n in s.execute(
                    select(Job.model_name, func.count(Job.id)).group_by(Job.model_name)
                )
            }
        assert instances == total
        assert jobs == {"ct-pe": CT_ASSOCIATIONS, "cxr-chexnet": CXR_COUNT}
        assert len(orthanc.instances()) == outputs
        assert rss.peak < RSS_LIMIT, f"peak RSS {rss.peak / 2**20:.0f} MiB"
        print(
            f"\nload: {total} instances ({total_bytes / 1e6:.0f} MB) over {len(batches)} "
            f"concurrent associations stored in {stored_in:.1f} s: "
            f"{total / stored_in:.0f} instances/s, {total_bytes / 1e6 / stored_in:.1f} MB/s; "
            f"{sum(jobs.values())} jobs and {outputs} results delivered after "
            f"{processed_in:.1f} s; peak RSS {rss.peak / 2**20:.0f} MiB "
            f"(limit {RSS_LIMIT / 2**20:.0f} MiB)"
        )
    finally:
        node.stop()
