"""Per-label verdicts of a finished job, kept in the database for the audit's drift check.

The SR a job wrote is the record of what the node told the PACS, so the verdicts are read
back from it (with the same readers the tests use) rather than recomputed from the model's
raw output. One verdict per reported label and series:

* image classifier (chest X-ray): positive when the label is Present on any image;
* volume classifier (CT PE): the exam labels' Present/Absent, and the image label positive
  when the series has at least one positive slice;
* segmenter (CT kidney): positive when the segment was found, negative when reported Absent.

Reading happens before the worker opens its result transaction, so the database's write
lock is not held while an SR is parsed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import delete, insert
from sqlalchemy.orm import Session

from pacsnode.manifest import Manifest
from pacsnode.tables import Finding
from pacsnode.writers.sr import (
    read_absent_segments,
    read_findings,
    read_segmentation_report,
    read_series_report,
    result_uids,
)

log = logging.getLogger(__name__)


class _Result(Protocol):
    """What the worker knows of a file it wrote (``pacsnode.worker.ResultFile``)."""

    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def series_uid(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def path(self) -> Path: ...


def summarize(sr: Dataset, manifest: Manifest) -> dict[str, bool]:
    """``{label: positive}`` for the series an SR of ``manifest``'s model reports on."""
    if manifest.segment_labels:
        found = read_segmentation_report(sr, manifest)
        verdicts = dict.fromkeys(read_absent_segments(sr, manifest), False)
        verdicts.update(dict.fromkeys(found, True))
        return verdicts
    if manifest.exam_labels:
        report = read_series_report(sr, manifest)
        verdicts = dict(report.exam_findings)
        image_labels = [label for label in manifest.image_labels if label.reported]
        if report.positive_slices is not None and image_labels:
            verdicts[image_labels[0].name] = report.positive_slices > 0
        return verdicts
    verdicts = {}
    for per_image in read_findings(sr, manifest).values():
        for label, present in per_image.items():
            verdicts[label] = verdicts.get(label, False) or present
    return verdicts


def from_outputs(
    source_series_uid: str, outputs: Sequence[_Result], manifests: Iterable[Manifest]
) -> dict[str, bool]:
    """The verdicts of the job whose results are ``outputs``; ``{}`` when none can be read.

    The report's UIDs are derived from the source series and the model, which tells which
    manifest wrote it without a database lookup.
    """
    reports = {(o.series_uid, o.sop_instance_uid): o for o in outputs if o.kind == "sr"}
    for manifest in manifests:
        output = reports.get(result_uids(source_series_uid, manifest, "sr"))
        if output is None:
            continue
        try:
            return summarize(dcmread(output.path), manifest)
        except Exception:  # audit bookkeeping must never fail a result that is already written
            log.warning("cannot read findings back from %s", output.path.name, exc_info=True)
            return {}
    return {}


def record(session: Session, job_id: int, verdicts: Mapping[str, bool], now: datetime) -> None:
    """Replace the job's findings by ``verdicts`` in the caller's transaction."""
    session.execute(delete(Finding).where(Finding.job_id == job_id))
    if verdicts:
        session.execute(
            insert(Finding),
            [
                {"job_id": job_id, "label": label, "positive": positive, "recorded_at": now}
                for label, positive in verdicts.items()
            ],
        )
