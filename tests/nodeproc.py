"""Run pacsnode itself as a real process for the tests: config file, start, kill -9, CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from peers import LOOPBACK, echoscu, free_port
from sqlalchemy.orm import Session, sessionmaker

from pacsnode.db import make_engine, make_sessionmaker

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "models"


def _toml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, Path) else json.dumps(str(value))


class NodeProcess:
    """One ``pacsnode serve`` subprocess with its own spool, database and port."""

    def __init__(
        self,
        workdir: Path,
        *,
        ae_title: str = "PACSNODE",
        enabled: Sequence[str] = ("cxr-chexnet",),
        destinations: Iterable[tuple[str, str, int]] = (),
        allowed_calling_aets: Sequence[str] = (),
        components: str | None = None,
        extra_toml: str = "",
        node_toml: str = "",
        probe_args: Sequence[str] = (),
        gate_policy: str = "flag",
    ) -> None:
        """``node_toml``: more ``[node]`` keys (limits, timeouts); ``probe_args``: extra
        echoscu arguments for the start-up probe (``+tls key cert ...`` on a TLS node).

        ``gate_policy``: ``[models] on_gate_failure`` for every model. "flag" by default:
        about 1 % of in-distribution phantoms fail the out-of-distribution gate by design,
        and tests of other stages must not depend on which; the gate tests pass "decline".
        """
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = free_port()
        self.components = components
        self.spool_dir = workdir / "spool"
        self.output_dir = workdir / "outputs"
        self.db_path = workdir / "pacsnode.db"
        self.config_path = workdir / "pacsnode.toml"
        self.log_path = workdir / "node.log"
        lines = [
            "[node]",
            f"ae_title = {_toml_value(ae_title)}",
            f'host = "{LOOPBACK}"',
            f"port = {self.port}",
            f"allowed_calling_aets = {_toml_value(list(allowed_calling_aets))}",
            node_toml,
            "[storage]",
            f"spool_dir = {_toml_value(self.spool_dir)}",
            f"output_dir = {_toml_value(self.output_dir)}",
            f'database_url = "sqlite:///{self.db_path}"',
            "[models]",
            f"dir = {_toml_value(MODELS_DIR)}",
            f"enabled = {_toml_value(list(enabled))}",
            'device = "cpu"',
            f'on_gate_failure = {{ default = "{gate_policy}" }}',
            "[metrics]",
            "port = 0",  # any free port, logged: test nodes never collide (metrics_url)
        ]
        for name, aet, port in destinations:
            lines += [
                "[[destinations]]",
                f"name = {_toml_value(name)}",
                f"ae_title = {_toml_value(aet)}",
                f'host = "{LOOPBACK}"',
                f"port = {port}",
            ]
        self.config_path.write_text("\n".join(lines) + "\n" + extra_toml, encoding="utf-8")
        self.probe_aet = allowed_calling_aets[0] if allowed_calling_aets else "TESTSCU"
        self.probe_args = tuple(probe_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._sessions: sessionmaker[Session] | None = None

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pacsnode", "--config", str(self.config_path), *args]

    def start(self, timeout: float = 120) -> NodeProcess:
        args = ["serve"] + (["--components", self.components] if self.components else [])
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(*args), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pacsnode exited with {self.proc.returncode}:\n{self.log()}")
            if self.components and "receiver" not in self.components:
                if b"pacsnode running" in self.log_path.read_bytes()[offset:]:  # this start's
                    return self
            elif (
                echoscu(
                    LOOPBACK,
                    self.port,
                    called_aet=self.ae_title,
                    calling_aet=self.probe_aet,
                    timeout=5,
                    extra_args=self.probe_args,
                ).returncode
                == 0
            ):
                return self
            time.sleep(0.3)
        raise TimeoutError(f"pacsnode did not answer C-ECHO in {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup, like a power cut for the process."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args), capture_output=True, text=True, timeout=timeout, check=False
        )

    def cli_json(self, *args: str) -> Any:
        proc = self.cli(*args, "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def sessions(self) -> sessionmaker[Session]:
        if self._sessions is None:
            self._sessions = make_sessionmaker(make_engine(f"sqlite:///{self.db_path}"))
        return self._sessions

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics_url(self) -> str:
        """The /metrics address the node logged at start (its port is ephemeral)."""
        found = re.findall(r"metrics on (http://\S+?:\d+/metrics)", self.log())
        assert found, f"no metrics endpoint in the log:\n{self.log()[-2000:]}"
        return str(found[-1])

    def wait_until(self, predicate: Any, timeout: float = 120, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"pacsnode died while waiting for {what}:\n{self.log()}")
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}:\n{self.log()[-4000:]}")
