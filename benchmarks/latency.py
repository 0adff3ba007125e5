"""Time to result: from ``storescu`` returning to the result stored in a real Orthanc.

A pacsnode (receiver, worker and dispatcher in one ``pacsnode serve``, demo CXR model)
delivers to a real Orthanc. Chest X-rays are sent one at a time with dcmtk ``storescu``;
for each, the clock runs from the moment ``storescu`` exits (the modality is done)
until Orthanc holds every result of its job: the SR and, for each finding reported
Present, its Grad-CAM heatmap Secondary Capture (``--heatmaps none`` turns them off, for
the figure without them); the time to the first result is printed too. The reference figures are
the other nodes' completion floors before inference starts (``../shared/ANCHORS.md``):
MONAI Informatics Gateway 5 s, Kaapana 8-12 s, mercure and Orthanc 60 s.

CT pulmonary angiograms (``--ct-slices``, default 300 slices of 512x512, a positive
phantom so both the SR and the key-image KOS are made) are sent the same way, one series
per association; the clock runs from ``storescu`` exiting until Orthanc holds every
result of the job. This includes the node's series quiet period (default 5 s: a CT series
is complete only when no slice has arrived for that long). Target: 20 s on 2 CPU cores.
Abdominal CTs (``--abdomen-slices``, default 200 slices of 512x512 over 250 mm, a phantom
with a kidney tumour and a cyst) go the same way to the kidney cascade, whose results are
a DICOM SEG and an SR; target: 30 s on 2 CPU cores (TotalSegmentator's fast CPU mode takes
about a minute). Then one ``--rss-slices`` series (default 400) is sent and the node process's peak
resident memory (VmHWM: receiver, worker with both models, dispatcher) is read. Target:
2.5 GB.

Last line: ``CXR time to result: p50 X s, p95 Y s (...); CT PE time to result: ...;
CT kidney time to result: ...; node peak RSS ...`` (``--ct-runs 0``: the CXR part only).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from common import LOOPBACK, NodeProcess, Orthanc, dcmtk_env, find_binary, median, percentile
from sqlalchemy import func, select

from pacsnode.phantoms.abdomen import make_abdomen_case, write_abdomen_series
from pacsnode.phantoms.ctpa import make_ctpa_case, write_ctpa_series
from pacsnode.phantoms.cxr import write_phantom_set
from pacsnode.tables import DeliveryState, Job, JobState, Output

ABDOMEN_SCAN_MM = 250.0
"""z range of the abdominal series: a 200-slice series is 1.25 mm apart."""


def _new_instances(orthanc: Orthanc, since: int) -> tuple[int, list[str]]:
    changes = orthanc.changes(since=since)
    new = [c["ID"] for c in changes["Changes"] if c["ChangeType"] == "NewInstance"]
    return int(changes["Last"]), new


def send(node: NodeProcess, paths: Sequence[Path]) -> float:
    """Send ``paths`` in one association; returns the moment ``storescu`` exited."""
    storescu = find_binary("storescu")
    assert storescu is not None, "dcmtk storescu not found: run `make system-deps`"
    subprocess.run(
        [storescu, "-aet", "MODALITY", "-aec", node.ae_title, LOOPBACK, str(node.port)]
        + [str(p) for p in paths],
        env=dcmtk_env(),
        check=True,
        capture_output=True,
    )
    return time.perf_counter()


def cxr_time_to_results(
    node: NodeProcess, orthanc: Orthanc, path: Path, since: int, timeout: float = 120
) -> tuple[float, float, int, int]:
    """Seconds from ``storescu`` exiting to the first and to the last result of the image's
    job stored in Orthanc, and how many results there were."""
    with node.sessions()() as s:
        jobs_before = int(s.scalar(select(func.count(Job.id))) or 0)
    sent = send(node, [path])
    deadline = sent + timeout
    arrived: list[float] = []
    expected: int | None = None
    while time.perf_counter() < deadline:
        since, new = _new_instances(orthanc, since)
        arrived += [time.perf_counter()] * len(new)
        if expected is None:
            expected = _job_outputs(node, jobs_before)
        if expected is not None and len(arrived) >= expected:
            return arrived[0] - sent, arrived[expected - 1] - sent, expected, since
        time.sleep(0.005)
    raise TimeoutError(f"results not in Orthanc {timeout} s after sending {path.name}")


def _job_outputs(node: NodeProcess, jobs_before: int) -> int | None:
    """Outputs of the new jobs that succeeded, once no new job is still to run and all their
    deliveries are done, else None. The other models' jobs for the study end declined
    (the benchmark nodes send no "not analysed" notices, so nothing else arrives)."""
    with node.sessions()() as s:
        jobs = s.scalars(select(Job).where(Job.id > jobs_before)).all()
        if not jobs:
            return None
        for job in jobs:
            if job.state is JobState.DEAD:
                raise RuntimeError(f"job {job.id} ({job.model_name}) died: {job.last_error}")
        if any(j.state not in (JobState.SUCCEEDED, JobState.DECLINED) for j in jobs):
            return None
        done = [j for j in jobs if j.state is JobState.SUCCEEDED]
        if not done:
            declined = "; ".join(f"{j.model_name}: {j.last_error}" for j in jobs)
            raise RuntimeError(f"every model declined the input: {declined}")
        outputs = [o for j in done for o in s.scalars(select(Output).where(Output.job_id == j.id))]
        states = [d.state for o in outputs for d in o.deliveries]
        if not states or any(state is not DeliveryState.DELIVERED for state in states):
            return None
        return len(outputs)


def ct_time_to_result(
    node: NodeProcess, orthanc: Orthanc, paths: Sequence[Path], since: int, timeout: float = 300
) -> tuple[float, int]:
    """From ``storescu`` exiting to the last result of the series' job stored in Orthanc."""
    with node.sessions()() as s:
        jobs_before = int(s.scalar(select(func.count(Job.id))) or 0)
    sent = send(node, paths)
    deadline = sent + timeout
    arrived: list[float] = []
    expected: int | None = None
    while time.perf_counter() < deadline:
        since, new = _new_instances(orthanc, since)
        arrived += [time.perf_counter()] * len(new)
        if expected is None:
            expected = _job_outputs(node, jobs_before)
        if expected is not None and len(arrived) >= expected:
            return arrived[expected - 1] - sent, since
        time.sleep(0.01)
    raise TimeoutError(f"CT results not in Orthanc {timeout} s after sending {len(paths)} slices")


def peak_rss_gb(node: NodeProcess) -> float:
    """The node process's peak resident set (VmHWM), in GB."""
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmHWM in /proc status")


def ct_benchmark(
    work: Path,
    orthanc: Orthanc,
    args: argparse.Namespace,
) -> tuple[list[float], list[float], float]:
    """Time to result for CTPA and abdominal series, then the peak RSS after a long CTPA.

    One node with every model warm; each series is its own study, so each model reads only
    the series made for it (the others decline it; their "not analysed" notices are off, so
    what arrives is the model's result alone).
    """
    node = NodeProcess(
        work / "ct-node",
        enabled=("cxr-chexnet", "ct-pe", "ct-kidney"),
        destinations=[("pacs", orthanc.aet, orthanc.dicom_port)],
        extra_toml="[outputs]\nnot_analysed = false\n",
    )
    if args.device != "cpu":
        node.config_path.write_text(
            node.config_path.read_text().replace('device = "cpu"', f'device = "{args.device}"')
        )
    node.start()

    def ctpa(seed: int, count: int) -> list[Path]:
        case = make_ctpa_case(seed, kind="acute", location="central")
        folder = work / f"ct-{seed}"
        written = write_ctpa_series(folder, case, rows=args.ct_size, slices=count, shuffle=True)
        return list(written.paths)

    def abdomen(seed: int, count: int) -> list[Path]:
        case = make_abdomen_case(seed, kind="tumour_and_cyst")
        folder = work / f"abdomen-{seed}"
        written = write_abdomen_series(
            folder,
            case,
            rows=args.abdomen_size,
            slices=count,
            slice_spacing_mm=ABDOMEN_SCAN_MM / count,
            shuffle=True,
        )
        return list(written.paths)

    def timed(make: Callable[[int, int], list[Path]], seed: int, count: int, what: str) -> float:
        nonlocal since
        paths = make(seed, count)
        os.sync()
        elapsed, since = ct_time_to_result(node, orthanc, paths, since)
        print(f"{what} {seed}: {elapsed:.2f} s ({count} slices)", flush=True)
        shutil.rmtree(paths[0].parent, ignore_errors=True)
        return elapsed

    try:
        since, _ = _new_instances(orthanc, 0)
        # short series first warm every path (model, volume, writers, association)
        _, since = ct_time_to_result(node, orthanc, ctpa(800, 24), since)
        _, since = ct_time_to_result(node, orthanc, abdomen(850, 60), since)
        pe_times = [timed(ctpa, 801 + run, args.ct_slices, "CT PE") for run in range(args.ct_runs)]
        kidney_times = [
            timed(abdomen, 851 + run, args.abdomen_slices, "CT kidney")
            for run in range(args.ct_runs)
        ]
        timed(ctpa, 900, args.rss_slices, "CT PE (memory)")
        rss = peak_rss_gb(node)
    finally:
        node.stop()
    return pe_times, kidney_times, rss


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048, help="radiograph rows = columns")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ct-slices", type=int, default=300)
    parser.add_argument("--ct-size", type=int, default=512, help="CT rows = columns")
    parser.add_argument("--ct-runs", type=int, default=3)
    parser.add_argument("--rss-slices", type=int, default=400)
    parser.add_argument("--abdomen-slices", type=int, default=200)
    parser.add_argument("--abdomen-size", type=int, default=512, help="abdomen rows = columns")
    parser.add_argument(
        "--heatmaps", choices=("sc", "none"), default="sc", help="[outputs] heatmaps of the node"
    )
    parser.add_argument(
        "--associations", type=int, default=3, help="[dispatch] associations of the node"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pacsnode-bench-") as tmp:
        work = Path(tmp)
        phantoms = write_phantom_set(
            work / "cxr", 700_000, args.images + 1, rows=args.size, cols=args.size
        )
        with Orthanc(workdir=work / "orthanc") as orthanc:
            orthanc.start()
            outputs = '["sc"]' if args.heatmaps == "sc" else "[]"
            node = NodeProcess(
                work / "node",
                destinations=[("pacs", orthanc.aet, orthanc.dicom_port)],
                extra_toml=f"[outputs]\nheatmaps = {outputs}\n"
                f"[dispatch]\nassociations = {args.associations}\n",
            )
            if args.device != "cpu":
                text = node.config_path.read_text().replace(
                    'device = "cpu"', f'device = "{args.device}"'
                )
                node.config_path.write_text(text)
            node.start()
            try:
                since, _ = _new_instances(orthanc, 0)
                # the first image warms every path (model, SR writer, association to Orthanc)
                *_, since = cxr_time_to_results(node, orthanc, phantoms[0][0], since)
                times, firsts, counts = [], [], []
                for path, _labels in phantoms[1:]:
                    os.sync()
                    first, last, count, since = cxr_time_to_results(node, orthanc, path, since)
                    times.append(last)
                    firsts.append(first)
                    counts.append(count)
            finally:
                node.stop()
            print("times (s): " + ", ".join(f"{t:.3f}" for t in times))
            print("first result (s): " + ", ".join(f"{t:.3f}" for t in firsts))
            print("results per image: " + ", ".join(map(str, counts)))
            if args.ct_runs > 0:
                ct_times, kidney_times, rss = ct_benchmark(work, orthanc, args)
    line = (
        f"CXR time to result: p50 {percentile(times, 50):.2f} s, "
        f"p95 {percentile(times, 95):.2f} s (n={len(times)}, {args.size}x{args.size}, "
        f"{args.device}, heatmaps {args.heatmaps}: {sum(counts) - len(counts)} SCs, "
        f"{args.associations} associations, first result "
        f"p95 {percentile(firsts, 95):.2f} s; other nodes start inference after 5-60 s)"
    )
    if args.ct_runs <= 0:
        print(line)
        return line
    line += (
        "; "
        f"CT PE time to result: median {median(ct_times):.2f} s, max {max(ct_times):.2f} s "
        f"(n={len(ct_times)}, {args.ct_slices} slices {args.ct_size}x{args.ct_size}, "
        f"incl. 5 s quiet period; target 20 s); "
        f"CT kidney time to result: median {median(kidney_times):.2f} s, "
        f"max {max(kidney_times):.2f} s (n={len(kidney_times)}, {args.abdomen_slices} slices "
        f"{args.abdomen_size}x{args.abdomen_size}, incl. 5 s quiet period; target 30 s); "
        f"node peak RSS {rss:.2f} GB after a {args.rss_slices}-slice CT (target 2.5 GB)"
    )
    print(line)
    return line


if __name__ == "__main__":
    main()
