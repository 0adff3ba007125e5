"""Smoke test: every benchmark runs end to end at a tiny size and prints its headline line.

No timing is asserted (shared CI machines are too noisy for that); the figures come
from ``make bench``. What is asserted is that each benchmark still measures something:
its runs succeeded (they check their own stored counts) and its last line parses.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import inference  # noqa: E402
import ingest  # noqa: E402
import latency  # noqa: E402

NUMBER = r"([0-9]+\.[0-9]+)"


def _positive(*values: str) -> list[float]:
    numbers = [float(v) for v in values]
    assert all(n > 0 for n in numbers), numbers
    return numbers


@pytest.mark.slow
def test_ingest_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    line = ingest.main(["--slices", "8", "--size", "64", "--runs", "1", "--assocs", "2"])
    match = re.fullmatch(
        rf"ingest node/storescp wall ratio: {NUMBER} \(1 assoc\), {NUMBER} \(2 assoc\)", line
    )
    assert match, line
    _positive(*match.groups())
    assert capsys.readouterr().out.strip().splitlines()[-1] == line


@pytest.mark.slow
def test_inference_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    line = inference.main(["--images", "3", "--size", "256", "--runs", "1", "--batches", "1,2"])
    match = re.fullmatch(rf"worker/raw throughput ratio: {NUMBER}", line)
    assert match, line
    _positive(*match.groups())
    assert capsys.readouterr().out.strip().splitlines()[-1] == line


@pytest.mark.slow
def test_latency_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    line = latency.main(
        [
            "--images", "2", "--size", "256",
            "--ct-slices", "24", "--ct-size", "64", "--ct-runs", "1", "--rss-slices", "30",
            "--abdomen-slices", "60", "--abdomen-size", "128",
        ]
    )  # fmt: skip
    match = re.match(rf"CXR time to result: p50 {NUMBER} s, p95 {NUMBER} s \(n=2,", line)
    assert match, line
    p50, p95 = _positive(*match.groups())
    assert p50 <= p95
    ct = re.search(
        rf"CT PE time to result: median {NUMBER} s, max {NUMBER} s \(n=1, 24 slices 64x64.*"
        rf"CT kidney time to result: median {NUMBER} s, max {NUMBER} s \(n=1, 60 slices 128x128.*"
        rf"node peak RSS {NUMBER} GB after a 30-slice CT",
        line,
    )
    assert ct, line
    _positive(*ct.groups())
    assert capsys.readouterr().out.strip().splitlines()[-1] == line
