"""Which configuration a command reads, and `pacsnode --version`: an installed node is run
from anywhere, not only from a checkout's folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pacsnode import __version__
from pacsnode.cli import main
from pacsnode.config import DEFAULT_CONFIG, SYSTEM_CONFIG, config_path


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"pacsnode, version {__version__}"


def test_order_is_option_then_environment_then_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit, env = tmp_path / "a.toml", tmp_path / "b.toml"
    assert config_path(explicit, {"PACSNODE_CONFIG": str(env)}) == explicit
    assert config_path(None, {"PACSNODE_CONFIG": str(env)}) == env
    monkeypatch.chdir(tmp_path)  # no config/pacsnode.toml here
    expected = SYSTEM_CONFIG if SYSTEM_CONFIG.is_file() else DEFAULT_CONFIG
    assert config_path(None, {}) == expected
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "pacsnode.toml").write_text("")
    assert config_path(None, {}) == DEFAULT_CONFIG


def test_the_environment_variable_reaches_every_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "site.toml"
    config.write_text('[node]\nae_title = "SITE_NODE"\n')
    monkeypatch.setenv("PACSNODE_CONFIG", str(config))
    result = CliRunner().invoke(main, ["config", "check"])
    assert result.exit_code == 0, result.output
    assert '"ae_title": "SITE_NODE"' in result.stdout
    assert f"{config}: OK" in result.stderr
    monkeypatch.setenv("PACSNODE_CONFIG", str(tmp_path / "missing.toml"))
    failed = CliRunner().invoke(main, ["config", "check"])
    assert failed.exit_code == 2 and "missing.toml: cannot read configuration" in failed.output
