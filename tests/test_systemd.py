"""The systemd units verify cleanly, carry the hardening the README promises, and stay exposed
no more than systemd's own audit allows.

``systemd-analyze verify`` needs each ExecStart binary to exist, so the units are copied
with ``/opt/pacsnode/.venv/bin/pacsnode`` rewritten to this checkout's venv: the check then
also covers the command line's executable. It prints warnings (unknown keys, bad values)
without failing, so any output line naming a unit fails the test.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pacsnode.cli import main as cli_main

UNITS_DIR = Path(__file__).resolve().parent.parent / "systemd"
SERVICES = ("pacsnode-receiver.service", "pacsnode-worker.service", "pacsnode-scheduler.service")
INSTALLED = "/opt/pacsnode/.venv/bin/pacsnode"


def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze missing: run `make system-deps` (Debian package systemd)")
    return found


def service(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS_DIR / name)
    return parser["Service"]


def multi(name: str, key: str) -> list[str]:
    """Every value of a key that may repeat (configparser keeps only the last)."""
    prefix = f"{key}="
    return [
        line[len(prefix) :]
        for line in (UNITS_DIR / name).read_text().splitlines()
        if line.startswith(prefix)
    ]


@pytest.fixture
def units(tmp_path: Path) -> Path:
    venv_pacsnode = Path(sys.executable).parent / "pacsnode"
    assert venv_pacsnode.is_file(), "the venv has no pacsnode script; run `make install`"
    for unit in [*UNITS_DIR.glob("*.service"), *UNITS_DIR.glob("*.target")]:
        text = unit.read_text().replace(INSTALLED, str(venv_pacsnode))
        (tmp_path / unit.name).write_text(text)
    return tmp_path


def test_units_verify_without_any_message(units: Path) -> None:
    files = sorted(str(p) for p in units.iterdir())
    assert len(files) == 4
    proc = subprocess.run(
        [analyze(), "verify", "--man=no", *files],
        capture_output=True,
        text=True,
        timeout=60,
    )
    about_us = [line for line in (proc.stdout + proc.stderr).splitlines() if "pacsnode" in line]
    assert proc.returncode == 0 and not about_us, "\n".join(about_us) or proc.stderr


def test_verify_would_catch_a_broken_unit(units: Path) -> None:
    """The check above is not vacuous: an unknown key and a missing binary are reported."""
    broken = units / "pacsnode-worker.service"
    broken.write_text(
        broken.read_text().replace("PrivateTmp=yes", "PrivateTmp=yes\nPrivateTeapot=yes")
    )
    scheduler = units / "pacsnode-scheduler.service"
    scheduler.write_text(
        re.sub(r"ExecStart=\S+", "ExecStart=/nonexistent/pacsnode", scheduler.read_text())
    )
    proc = subprocess.run(
        [analyze(), "verify", "--man=no", str(broken), str(scheduler)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert "PrivateTeapot" in output
    assert "/nonexistent/pacsnode" in output


@pytest.mark.parametrize("name", SERVICES)
def test_services_are_hardened_and_run_as_pacsnode(name: str) -> None:
    unit = service(name)
    assert unit["User"] == "pacsnode" and unit["Group"] == "pacsnode"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
    }.items():
        assert unit[key] == value, f"{name}: {key}"
    assert "/var/lib/pacsnode" in unit["ReadWritePaths"].split()
    assert unit["ExecStart"].startswith(f"{INSTALLED} --config /etc/pacsnode/pacsnode.toml ")


def test_each_service_runs_its_components() -> None:
    commands = {name: service(name)["ExecStart"].split(" ", 3)[3] for name in SERVICES}
    assert commands == {
        "pacsnode-receiver.service": "serve --components receiver",
        "pacsnode-worker.service": "serve --components worker,dispatch",
        "pacsnode-scheduler.service": "scheduler",
    }
    # and the CLI accepts exactly those
    from click.testing import CliRunner

    for command in commands.values():
        result = CliRunner().invoke(cli_main, [*command.split(), "--help"])
        assert result.exit_code == 0, result.output


def test_only_the_worker_sees_the_gpu() -> None:
    assert "PrivateDevices" not in service("pacsnode-worker.service")
    assert service("pacsnode-worker.service")["DevicePolicy"] == "closed"
    allowed = {value.split()[0] for value in multi("pacsnode-worker.service", "DeviceAllow")}
    assert {"char-nvidia-frontend", "char-nvidia-uvm"} <= allowed
    for name in ("pacsnode-receiver.service", "pacsnode-scheduler.service"):
        assert service(name)["PrivateDevices"] == "yes"


def test_target_groups_the_services() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read(UNITS_DIR / "pacsnode.target")
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    for name in SERVICES:
        text = (UNITS_DIR / name).read_text()
        assert "PartOf=pacsnode.target" in text and "WantedBy=pacsnode.target" in text


@pytest.mark.parametrize(
    ("name", "ceiling"),
    [
        ("pacsnode-receiver.service", 2.5),
        ("pacsnode-scheduler.service", 2.5),
        ("pacsnode-worker.service", 4.0),  # needs the GPU devices and W+X memory for CUDA
    ],
)
def test_exposure_stays_low(units: Path, name: str, ceiling: float) -> None:
    """`systemd-analyze security` scores 0 (locked down) to 10 (unprotected)."""
    proc = subprocess.run(
        [analyze(), "security", "--offline=yes", "--no-pager", str(units / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= ceiling
