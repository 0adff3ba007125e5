"""`pacsnode serve`: receiver, completion/routing, worker, dispatcher and scheduler in one process.

Each component runs its own thread around ``loop()`` and is woken early by the
stage before it (a stored instance wakes completion, a new job wakes the
worker, a new result wakes the dispatcher), so a radiograph flows through
without polling delays. Split deployments (one process per component) fall
back to polling the database every ``queue.poll_seconds``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from pacsnode import completion, routing
from pacsnode.config import Config
from pacsnode.db import make_engine, make_sessionmaker, upgrade, utcnow
from pacsnode.dispatch import Dispatcher
from pacsnode.manifest import Manifest, load_enabled
from pacsnode.metrics import Metrics
from pacsnode.receiver import InstanceHeader, Receiver
from pacsnode.scheduler import NightlyScheduler

log = logging.getLogger(__name__)

COMPONENTS = ("receiver", "worker", "dispatch", "scheduler")


class Intake:
    """Completion and routing: turns stored instances into queued jobs."""

    def __init__(
        self,
        config: Config,
        sessions: sessionmaker[Session],
        manifests: list[Manifest],
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.manifests = manifests
        self.metrics = metrics or Metrics()

    def initialize(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def loop(self, now: datetime | None = None) -> int:
        """Complete due series and route them; returns the number of jobs queued."""
        now = now or utcnow()
        jobs = 0
        with self.sessions.begin() as session:
            for series in completion.complete_due_series(session, self.config.completion, now):
                self.metrics.series_completed(series)
                jobs += len(
                    routing.route_series(
                        session,
                        series,
                        self.manifests,
                        now,
                        notices=self.config.outputs.not_analysed,
                        declined=self.metrics.input_declined,
                    )
                )
        return jobs

    def wait_hint(self) -> float:
        with self.sessions.begin() as session:
            due = completion.next_due(session, self.config.completion, utcnow())
        return self.config.queue.poll_seconds if due is None else min(due + 0.05, 5.0)


@dataclass
class Loop:
    """A thread that calls ``step`` whenever woken or after ``idle`` seconds."""

    name: str
    step: Callable[[], int]
    idle: Callable[[], float]
    after: Callable[[], None] = lambda: None
    wake: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.wake.clear()
            try:
                did = self.step()
            except Exception:  # a component's main loop: log, back off, keep serving
                log.exception("%s loop failed; retrying", self.name)
                stop.wait(1.0)
                continue
            if did:
                self.after()
                continue
            self.wake.wait(self.idle())


def _wake_for_immediate(wake: threading.Event) -> Callable[[InstanceHeader], None]:
    """A radiograph is complete once stored: wake intake at once. A CT series waits for
    its quiet period, which intake's own timer covers, so its slices wake nobody."""

    def on_stored(header: InstanceHeader) -> None:
        if header.modality in completion.IMMEDIATE_MODALITIES:
            wake.set()

    return on_stored


class Node:
    """The whole node in one process; ``components`` selects the parts to run."""

    def __init__(self, config: Config, components: tuple[str, ...] = COMPONENTS) -> None:
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components: {', '.join(sorted(unknown))}")
        self.config = config
        self.components = components
        self.engine: Engine = make_engine(
            config.storage.database_url, config.storage.db_busy_timeout_seconds
        )
        self.sessions = make_sessionmaker(self.engine)
        self.stop = threading.Event()
        self.loops: list[Loop] = []
        self.receiver: Receiver | None = None
        self.nightly: NightlyScheduler | None = None
        self.metrics = Metrics()

    def start(self) -> None:
        upgrade(self.engine)
        self._serve_metrics()
        poll = self.config.queue.poll_seconds
        dispatch_loop = worker_loop = None
        if "dispatch" in self.components:
            dispatcher = Dispatcher(self.config, self.sessions, metrics=self.metrics)
            dispatcher.initialize()
            dispatch_loop = Loop("dispatch", dispatcher.loop, lambda: poll)
        if "worker" in self.components:
            # imports torch (seconds): a receiver restarting after a crash must not wait for it
            from pacsnode.worker import Worker

            worker = Worker(self.config, self.sessions, metrics=self.metrics)
            worker.initialize()
            wake_dispatch = dispatch_loop.wake.set if dispatch_loop else (lambda: None)
            worker_loop = Loop("worker", worker.loop, lambda: poll, after=wake_dispatch)
        if "receiver" in self.components:
            manifests = load_enabled(self.config.models.dir, self.config.models.enabled)
            intake = Intake(self.config, self.sessions, manifests, self.metrics)
            wake_worker = worker_loop.wake.set if worker_loop else (lambda: None)
            intake_loop = Loop("intake", intake.loop, intake.wait_hint, after=wake_worker)
            self.loops.append(intake_loop)
            self.receiver = Receiver(
                self.config,
                self.sessions,
                on_stored=_wake_for_immediate(intake_loop.wake),
                metrics=self.metrics,
            )
        self.loops += [loop for loop in (worker_loop, dispatch_loop) if loop is not None]
        for loop in self.loops:
            loop.thread = threading.Thread(
                target=loop.run, args=(self.stop,), name=f"pacsnode-{loop.name}", daemon=True
            )
            loop.thread.start()
        if self.receiver is not None:
            self.receiver.initialize()
        if "scheduler" in self.components:
            self.nightly = NightlyScheduler(self.config, self.sessions)
            self.nightly.initialize()
        log.info("pacsnode started: %s", ", ".join(self.components))

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.shutdown()
        if self.nightly is not None:
            self.nightly.shutdown()
        self.stop.set()
        for loop in self.loops:
            loop.wake.set()
        for loop in self.loops:
            if loop.thread is not None:
                loop.thread.join(timeout=30)
        self.metrics.shutdown()
        self.engine.dispose()
        log.info("pacsnode stopped")

    def _serve_metrics(self) -> None:
        """The endpoint of this process; the database gauges only in the receiver's process
        (there is one), so a split deployment does not report every job count twice."""
        cfg = self.config.metrics
        if not cfg.enabled:
            return
        if "receiver" in self.components:
            self.metrics.watch_database(
                self.engine,
                self.config.models.enabled,
                [dest.name for dest in self.config.destinations],
            )
        offset = min((COMPONENTS.index(c) for c in self.components), default=0)
        self.metrics.serve(cfg, offset)
