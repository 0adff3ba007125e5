"""Shared pieces of the benchmarks: real peers from the test helpers, generated data, medians.

Every benchmark measures pacsnode against a reference in the same run, alternating the
two, and reports the ratio of medians: shared machines are noisy, ratios much less so.
"""

from __future__ import annotations

import statistics
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the real-peer helpers the test suite uses

from dicomgen import image_dataset, save  # noqa: E402
from nodeproc import NodeProcess  # noqa: E402
from peers import LOOPBACK, Orthanc, dcmtk_env, find_binary, free_port  # noqa: E402

from pacsnode.uids import derive_uid  # noqa: E402

__all__ = [
    "LOOPBACK",
    "REPO",
    "NodeProcess",
    "Orthanc",
    "alternate",
    "dcmtk_env",
    "find_binary",
    "free_port",
    "median",
    "percentile",
    "write_ct_series",
]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def alternate(
    runs: int, first: Callable[[], float], second: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """Run ``first`` and ``second`` ``runs`` times each, swapping the order every round."""
    a: list[float] = []
    b: list[float] = []
    for i in range(runs):
        if i % 2 == 0:
            a.append(first())
            b.append(second())
        else:
            b.append(second())
            a.append(first())
    return a, b


def write_ct_series(
    folder: Path, slices: int, size: int = 512, *, seed: str = "bench", thickness: float = 1.0
) -> list[Path]:
    """A plain axial CT series of ``slices`` 16-bit slices, one Part 10 file each.

    Pixel content is a smooth body-like disc plus noise: enough that nothing compresses
    or short-cuts, with the sizes of a real scanner's output (512x512: 512 KiB a slice).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    yy, xx = np.mgrid[0:size, 0:size]
    body = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.42 * size) ** 2
    study_uid = derive_uid("bench-study", seed)
    series_uid = derive_uid("bench-series", seed)
    paths = []
    for index in range(slices):
        pixels = np.where(body, 1064, 24).astype(np.int16)
        pixels += rng.integers(-20, 20, size=(size, size), dtype=np.int16)
        ds = image_dataset(
            study_uid=study_uid, series_uid=series_uid, size=size, position_z=-index * thickness
        )
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = derive_uid(
            "bench-instance", seed, str(index)
        )
        ds.PatientName, ds.PatientID = "Bench^Ingest", "BENCH1"
        ds.InstanceNumber = index + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-175.0, -175.0, -index * thickness]
        ds.PixelSpacing = [350.0 / size, 350.0 / size]
        ds.SliceThickness = thickness
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
        ds.PixelData = pixels.tobytes()
        paths.append(save(ds, folder / f"ct{index:04d}.dcm"))
    return paths
