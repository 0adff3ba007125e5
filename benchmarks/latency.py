"""Time to result: from ``storescu`` returning to the result stored in a real Orthanc.

A pacsnode (receiver, worker and dispatcher in one ``pacsnode serve``, demo CXR model)
delivers to a real Orthanc. Chest X-rays are sent one at a time with dcmtk ``storescu``;
for each, the clock runs from the moment ``storescu`` exits (the modality is done)
until Orthanc's ``/changes`` shows the new result instance. The reference figures are
the other nodes' completion floors before inference starts (``../shared/ANCHORS.md``):
MONAI Informatics Gateway 5 s, Kaapana 8-12 s, mercure and Orthanc 60 s.

Last line: ``CXR time to result: p50 X s, p95 Y s (n=N)``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from common import LOOPBACK, NodeProcess, Orthanc, dcmtk_env, find_binary, percentile

from pacsnode.phantoms.cxr import write_phantom_set


def _new_instances(orthanc: Orthanc, since: int) -> tuple[int, list[str]]:
    changes = orthanc.changes(since=since)
    new = [c["ID"] for c in changes["Changes"] if c["ChangeType"] == "NewInstance"]
    return int(changes["Last"]), new


def time_to_result(
    node: NodeProcess, orthanc: Orthanc, path: Path, since: int, timeout: float = 120
) -> tuple[float, int]:
    storescu = find_binary("storescu")
    assert storescu is not None, "dcmtk storescu not found: run `make system-deps`"
    subprocess.run(
        [storescu, "-aet", "MODALITY", "-aec", node.ae_title, LOOPBACK, str(node.port), str(path)],
        env=dcmtk_env(),
        check=True,
        capture_output=True,
    )
    sent = time.perf_counter()
    deadline = sent + timeout
    while time.perf_counter() < deadline:
        since, new = _new_instances(orthanc, since)
        if new:
            return time.perf_counter() - sent, since
        time.sleep(0.005)
    raise TimeoutError(f"no result in Orthanc {timeout} s after sending {path.name}")


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048, help="radiograph rows = columns")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pacsnode-bench-") as tmp:
        work = Path(tmp)
        phantoms = write_phantom_set(
            work / "cxr", 700_000, args.images + 1, rows=args.size, cols=args.size
        )
        with Orthanc(workdir=work / "orthanc") as orthanc:
            orthanc.start()
            node = NodeProcess(
                work / "node",
                destinations=[("pacs", orthanc.aet, orthanc.dicom_port)],
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
                _, since = time_to_result(node, orthanc, phantoms[0][0], since)
                times = []
                for path, _labels in phantoms[1:]:
                    os.sync()
                    elapsed, since = time_to_result(node, orthanc, path, since)
                    times.append(elapsed)
            finally:
                node.stop()
    print("times (s): " + ", ".join(f"{t:.3f}" for t in times))
    line = (
        f"CXR time to result: p50 {percentile(times, 50):.2f} s, "
        f"p95 {percentile(times, 95):.2f} s (n={len(times)}, {args.size}x{args.size}, "
        f"{args.device}; other nodes start inference after 5-60 s)"
    )
    print(line)
    return line


if __name__ == "__main__":
    main()
