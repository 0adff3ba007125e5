"""Inference efficiency: chest X-rays per second through the whole worker vs the raw network.

The worker path is everything a production worker does per job: claim it, read the
instance from the spool, decode and window the pixels, preprocess, batch, run the
network, build and fsync the Structured Report, record the output and its deliveries.
The reference is the same network's bare ``model(x)`` forward on ready tensors at its
best batch size, measured in the same run, alternating with the worker passes.

Last line: ``worker/raw throughput ratio: R``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from common import REPO, median
from pydicom import dcmread
from sqlalchemy import select

from pacsnode import admin
from pacsnode.config import parse_config
from pacsnode.db import make_engine, make_sessionmaker, upgrade, utcnow
from pacsnode.manifest import load_enabled
from pacsnode.phantoms.cxr import write_phantom_set
from pacsnode.receiver import InstanceHeader, record_instance
from pacsnode.service import Intake
from pacsnode.spool import spool_path
from pacsnode.tables import Job, JobState
from pacsnode.worker import Worker

MODEL = "cxr-chexnet"


def make_node(work: Path, images: int, size: int, device: str) -> tuple[Worker, Intake]:
    """A database with ``images`` spooled radiographs, one queued job each."""
    config = parse_config(
        f"""
[storage]
spool_dir = "{work / "spool"}"
output_dir = "{work / "outputs"}"
database_url = "sqlite:///{work / "bench.db"}"
[models]
dir = "{REPO / "models"}"
enabled = ["{MODEL}"]
device = "{device}"
"""
    )
    engine = make_engine(config.storage.database_url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    phantoms = write_phantom_set(work / "phantoms", 900_000, images, rows=size, cols=size)
    now = utcnow()
    with sessions.begin() as session:
        for path, _labels in phantoms:
            ds = dcmread(path, stop_before_pixels=True)
            header = InstanceHeader(
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                study_uid=str(ds.StudyInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                modality=str(ds.Modality),
                view_position=str(ds.get("ViewPosition", "")),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            )
            target = spool_path(
                config.storage.spool_dir,
                header.study_uid,
                header.series_uid,
                header.sop_instance_uid,
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            record_instance(session, header, target, target.stat().st_size, "BENCH", now)
    intake = Intake(config, sessions, load_enabled(config.models.dir, config.models.enabled))
    queued = intake.loop()
    if queued != images:
        raise RuntimeError(f"{queued} jobs queued for {images} images")
    worker = Worker(config, sessions)
    worker.initialize()
    return worker, intake


def worker_pass(worker: Worker, images: int) -> float:
    """Seconds for the worker to finish every queued job; then requeue them for the next pass."""
    start = time.perf_counter()
    done = 0
    while done < images:
        finished = worker.loop()
        if not finished:
            raise RuntimeError(f"worker stopped after {done} of {images} jobs")
        done += finished
    elapsed = time.perf_counter() - start
    with worker.sessions.begin() as session:
        jobs = session.scalars(select(Job)).all()
        states = {job.state for job in jobs}
        if states != {JobState.SUCCEEDED}:
            raise RuntimeError(f"jobs ended in {states}")
        admin.requeue(session, jobs, utcnow())
    return elapsed


def raw_pass(network: torch.nn.Module, device: torch.device, images: int, batch: int) -> float:
    """Seconds for ``images`` forwards of ready 224x224 tensors at ``batch``."""
    x = torch.randn(batch, 3, 224, 224, device=device)
    rounds = max(1, images // batch)
    with torch.inference_mode():
        network(x)  # warm
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(rounds):
            network(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) * images / (rounds * batch)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=2048, help="radiograph rows = columns")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batches", default="1,4,8,16", help="raw batch sizes to try")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    # no autograd for the reference; a context, so a test calling main() keeps its grad mode
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="pacsnode-bench-") as tmp:
        worker, _intake = make_node(Path(tmp), args.images, args.size, args.device)
        model = worker.models[MODEL]
        network, device = model.network, model.device  # type: ignore[attr-defined]
        batches = [int(b) for b in args.batches.split(",")]
        per_batch = {
            b: median([raw_pass(network, device, args.images, b) for _ in range(2)])
            for b in batches
        }
        best = min(per_batch, key=lambda b: per_batch[b])
        print(
            "raw forward images/s by batch: "
            + ", ".join(f"{b}: {args.images / t:.1f}" for b, t in per_batch.items())
        )
        worker_times: list[float] = []
        raw_times: list[float] = []
        for i in range(args.runs):
            pair = [
                lambda: worker_times.append(worker_pass(worker, args.images)),
                lambda: raw_times.append(raw_pass(network, device, args.images, best)),
            ]
            for step in pair if i % 2 == 0 else reversed(pair):
                step()
        worker.shutdown()
    worker_rate = args.images / median(worker_times)
    raw_rate = args.images / median(raw_times)
    print(
        f"{args.images} radiographs {args.size}x{args.size}, worker batch "
        f"{model.manifest.batch_size}, device {args.device}: worker {worker_rate:.1f} images/s, "
        f"raw forward {raw_rate:.1f} images/s at batch {best}"
    )
    line = f"worker/raw throughput ratio: {worker_rate / raw_rate:.2f}"
    print(line)
    return line


if __name__ == "__main__":
    main()
