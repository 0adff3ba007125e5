"""The Prometheus endpoint during a real run (storescu -> pacsnode -> Orthanc), and JSON logs."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from nodeproc import NodeProcess
from peers import LOOPBACK, combined_output, free_port, parse_store_statuses, storescu
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, func, select

from pacsnode.config import Config, LoggingConfig, MetricsConfig, parse_config
from pacsnode.errors import ConfigError
from pacsnode.logformat import JsonFormatter, formatter
from pacsnode.metrics import OTHER, BoundedLabel, DatabaseCollector, Metrics
from pacsnode.phantoms.cxr import make_cxr_dataset
from pacsnode.service import Node
from pacsnode.tables import Delivery, DeliveryState, Event, Instance

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
MODEL = "cxr-chexnet"


def scrape(url: str) -> tuple[Samples, float]:
    """Every sample of one scrape, parsed by prometheus_client, and how long it took."""
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
    took = time.perf_counter() - started
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, took


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_follow_an_end_to_end_run(tmp_path: Path, orthanc_factory) -> None:
    """Counters and histograms move by what happened; the log is JSON lines throughout."""
    orthanc = orthanc_factory()
    down_port = free_port()  # nothing listens there: every delivery to it fails
    node = NodeProcess(
        tmp_path / "node",
        destinations=[("pacs", orthanc.aet, orthanc.dicom_port), ("down", "NOBODY", down_port)],
        extra_toml='[outputs]\nheatmaps = []\n[logging]\nformat = "json"\n',
    ).start()
    try:
        url = node.metrics_url()
        before, _ = scrape(url)
        assert value(before, "pacsnode_database_up") == 1
        assert value(before, "pacsnode_model_load_seconds", model=MODEL) > 0
        accepted_before = value(before, "pacsnode_associations_total", result="accepted")

        paths = []
        for seed in (3, 4):  # two radiographs, two series, one association
            ds, _ = make_cxr_dataset(seed, rows=256, cols=256)
            paths.append(tmp_path / f"cxr{seed}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
        result = storescu(
            LOOPBACK, node.port, paths, called_aet=node.ae_title, calling_aet="MODALITY1"
        )
        assert parse_store_statuses(combined_output(result)) == [0x0000, 0x0000]

        def delivered() -> int:
            with node.sessions()() as s:
                return int(
                    s.scalar(
                        select(func.count())
                        .select_from(Delivery)
                        .where(Delivery.state == DeliveryState.DELIVERED)
                    )
                    or 0
                )

        node.wait_until(lambda: delivered() == 2, timeout=90, what="two deliveries to Orthanc")

        def failures_counted() -> tuple[Samples, float] | None:
            got = scrape(url)
            down = value(got[0], "pacsnode_delivery_failures_total", destination="down")
            return got if down >= 2 else None

        after, took = node.wait_until(
            failures_counted, timeout=30, what="the failed deliveries to be counted"
        )
        with node.sessions()() as s:
            sizes = list(s.scalars(select(Instance.size_bytes)))
            completions = s.scalar(
                select(func.count()).select_from(Event).where(Event.kind == "series-complete")
            )
    finally:
        node.stop()

    received = value(
        after, "pacsnode_instances_received_total", calling_aet="MODALITY1", modality="DX"
    )
    assert received == len(paths)
    stored = value(after, "pacsnode_received_bytes_total", calling_aet="MODALITY1")
    assert sum(sizes) - 400 * len(sizes) < stored < sum(sizes)  # the datasets, less file meta
    assert value(after, "pacsnode_associations_total", result="accepted") >= accepted_before + 1
    assert value(after, "pacsnode_associations_open") == 0
    assert value(after, "pacsnode_jobs", model=MODEL, state="succeeded") == 2
    assert value(after, "pacsnode_queue_depth", queue="jobs") == 0
    assert value(after, "pacsnode_deliveries", destination="pacs", state="delivered") == 2
    # one per completion event: a series completed again (a late instance) counts twice
    assert value(after, "pacsnode_completion_seconds_count", modality="DX") == completions >= 2
    assert value(after, "pacsnode_inference_seconds_count", model=MODEL) == 2
    assert value(after, "pacsnode_delivery_seconds_count", destination="pacs") == 2
    assert value(after, "pacsnode_delivery_seconds_count", destination="down") == 0
    assert value(after, "pacsnode_end_to_end_seconds_count", model=MODEL) == 2
    assert value(after, "pacsnode_delivery_failures_total", destination="down") >= 2
    assert value(after, "pacsnode_delivery_failures_total", destination="pacs") == 0
    assert took < 1.0, f"a scrape took {took:.3f} s"

    lines = [line for line in node.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line, not just most
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any("metrics on http://" in e["message"] for e in entries)
    assert any(e["message"].startswith("pacsnode listening as") for e in entries)


def test_a_split_process_serves_on_its_offset_port(tmp_path: Path) -> None:
    """One config for every unit: the dispatcher's process listens on port + 2, without
    the database gauges (those come from the receiver's process only)."""
    port = free_port()
    config = Config.model_validate(
        {
            "storage": {"database_url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
            "metrics": {"host": LOOPBACK, "port": port - 2},
        }
    )
    node = Node(config, ("dispatch",))
    node.start()
    try:
        assert node.metrics.port == port
        samples, _ = scrape(f"http://{LOOPBACK}:{port}/metrics")
    finally:
        node.shutdown()
    assert ("pacsnode_database_up", frozenset()) not in samples
    assert ("pacsnode_associations_open", frozenset()) in samples


def test_an_unreachable_database_is_a_gauge_not_a_failed_scrape(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "db.sqlite"
    metrics = Metrics()
    metrics.registry.register(DatabaseCollector(create_engine(f"sqlite:///{missing}"), [MODEL], []))
    port = metrics.serve(MetricsConfig(host=LOOPBACK, port=0))
    try:
        samples, _ = scrape(f"http://{LOOPBACK}:{port}/metrics")
    finally:
        metrics.shutdown()
    assert value(samples, "pacsnode_database_up") == 0


def test_network_label_values_are_capped() -> None:
    """A peer inventing AE titles cannot grow the scrape without bound."""
    label = BoundedLabel(limit=3)
    assert [label(f"AE{i}") for i in range(5)] == ["AE0", "AE1", "AE2", OTHER, OTHER]
    assert label("AE1") == "AE1"


def test_logs_are_text_by_default_and_json_on_request() -> None:
    assert parse_config("").logging.format == "text"
    assert parse_config('[logging]\nformat = "json"\n').logging.format == "json"
    with pytest.raises(ConfigError, match="logging.format"):
        parse_config('[logging]\nformat = "xml"\n')

    record = logging.LogRecord(
        "pacsnode.x", logging.ERROR, __file__, 1, "job %d failed", (7,), None
    )
    text = formatter(LoggingConfig()).format(record)
    assert "ERROR pacsnode.x: job 7 failed" in text
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record.exc_info = sys.exc_info()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.emit(record)
    (line,) = stream.getvalue().splitlines()  # the traceback stays inside the one line
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["message"] == "job 7 failed"
    assert "ValueError: boom" in entry["exception"]
