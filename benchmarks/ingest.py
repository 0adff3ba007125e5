"""Ingest: how fast the node swallows a CT series from a scanner, against dcmtk storescp.

A CT series (default 200 slices of 512x512, about 100 MB) is sent with dcmtk ``storescu``
to dcmtk ``storescp`` writing to a folder and to the pacsnode receiver (its production
path: well-formedness check, fsync + rename into the spool, database row, then the
status), alternating, each on a fresh folder/database. Then the same series as 4
concurrent associations of a quarter each (``storescp --fork`` there, so the reference
is concurrent too). The reference storescp runs with its largest PDU (131072): its
faster setting, not its default.

Last line: ``ingest node/storescp wall ratio: X (1 assoc), Y (4 assoc)``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from common import (
    LOOPBACK,
    NodeProcess,
    alternate,
    dcmtk_env,
    find_binary,
    free_port,
    median,
    write_ct_series,
)
from sqlalchemy import func, select

from pacsnode.tables import Instance

STORESCP_PDU = "131072"


def _storescu_command(port: int, aet: str, files: Sequence[Path]) -> list[str]:
    storescu = find_binary("storescu")
    if storescu is None:
        raise SystemExit("dcmtk storescu not found: run `make system-deps`")
    return [storescu, "-aet", "BENCHSCU", "-aec", aet, LOOPBACK, str(port), *map(str, files)]


def send(port: int, aet: str, batches: Sequence[Sequence[Path]]) -> float:
    """Wall time for all ``batches`` sent concurrently, one storescu association each.

    The page cache is flushed first: storescp does not fsync, and its 100 MB of dirty
    pages would otherwise be written back during (and billed to) the next run.
    """
    os.sync()
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            _storescu_command(port, aet, batch),
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for batch in batches
    ]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    elapsed = time.perf_counter() - start
    for proc, output in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed ({proc.returncode}): {output.decode()[-2000:]}")
    return elapsed


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    echoscu = find_binary("echoscu")
    assert echoscu is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"storescp exited with {proc.returncode}")
        probe = subprocess.run(
            [echoscu, "-aec", "STORESCP", LOOPBACK, str(port)],
            env=dcmtk_env(),
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return
        time.sleep(0.1)
    raise TimeoutError("storescp did not answer C-ECHO")


def run_storescp(work: Path, batches: Sequence[Sequence[Path]]) -> float:
    out = Path(tempfile.mkdtemp(prefix="storescp-", dir=work))
    port = free_port()
    storescp = find_binary("storescp")
    if storescp is None:
        raise SystemExit("dcmtk storescp not found: run `make system-deps`")
    args = [storescp, "-aet", "STORESCP", "-od", str(out), "-pdu", STORESCP_PDU]
    if len(batches) > 1:
        args.append("--fork")
    proc = subprocess.Popen(
        [*args, str(port)], env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_port(port, proc)
        elapsed = send(port, "STORESCP", batches)
        stored = sum(1 for _ in out.glob("*"))
        expected = sum(len(b) for b in batches)
        if stored != expected:
            raise RuntimeError(f"storescp stored {stored} files, expected {expected}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(out, ignore_errors=True)
    return elapsed


def run_node(work: Path, batches: Sequence[Sequence[Path]]) -> float:
    folder = Path(tempfile.mkdtemp(prefix="node-", dir=work))
    node = NodeProcess(folder, enabled=(), components="receiver").start()
    try:
        elapsed = send(node.port, node.ae_title, batches)
        with node.sessions().begin() as session:
            stored = session.scalar(select(func.count()).select_from(Instance))
        expected = sum(len(b) for b in batches)
        if stored != expected:
            raise RuntimeError(f"pacsnode recorded {stored} instances, expected {expected}")
    finally:
        node.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return elapsed


def split(files: Sequence[Path], parts: int) -> list[list[Path]]:
    return [list(files[i::parts]) for i in range(parts)]


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512, help="rows = columns")
    parser.add_argument("--runs", type=int, default=5, help="alternating runs per side")
    parser.add_argument("--assocs", type=int, default=4, help="concurrent associations")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="pacsnode-bench-") as tmp:
        work = Path(tmp)
        files = write_ct_series(work / "series", args.slices, args.size)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        print(f"series: {args.slices} slices of {args.size}x{args.size}, {megabytes:.1f} MB")
        ratios = []
        for batches in ([files], split(files, args.assocs)):
            label = f"{len(batches)} assoc"
            node, ref = alternate(
                args.runs,
                lambda b=batches: run_node(work, b),
                lambda b=batches: run_storescp(work, b),
            )
            ratio = median(node) / median(ref)
            ratios.append(ratio)
            print(
                f"{label}: pacsnode median {median(node):.3f} s "
                f"({megabytes / median(node):.0f} MB/s, runs {', '.join(f'{t:.3f}' for t in node)}); "
                f"storescp median {median(ref):.3f} s (runs {', '.join(f'{t:.3f}' for t in ref)})"
            )
    line = (
        f"ingest node/storescp wall ratio: {ratios[0]:.2f} (1 assoc), "
        f"{ratios[1]:.2f} ({args.assocs} assoc)"
    )
    print(line)
    return line


if __name__ == "__main__":
    main()
