"""An installed node works outside a checkout: the wheel carries the migrations, so
`pacsnode db upgrade` from an unrelated folder brings a new database to the head revision."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIM = """import sys
# the checkout is installed editable in this venv: hide it, so only the wheel is importable
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, {site!r})
"""


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)  # type: ignore[call-overload]


def test_the_wheel_migrates_a_database_outside_the_checkout(tmp_path: Path) -> None:
    wheels, site, shim, elsewhere = (tmp_path / d for d in ("wheels", "site", "shim", "run"))
    for folder in (shim, elsewhere):
        folder.mkdir()
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(wheels), str(REPO)]
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("pacsnode-*.whl")
    installed = _run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
        + [str(wheel)]
    )
    assert installed.returncode == 0, installed.stderr
    (shim / "sitecustomize.py").write_text(SHIM.format(site=str(site)))
    env = {**os.environ, "PYTHONPATH": str(shim)}
    where = _run(
        [sys.executable, "-c", "import pacsnode.db as d; print(d.MIGRATIONS_DIR)"],
        env=env,
        cwd=elsewhere,
    )
    assert where.stdout.strip() == str(site / "pacsnode" / "migrations"), where.stderr
    database = elsewhere / "node.db"
    (elsewhere / "node.toml").write_text(f'[storage]\ndatabase_url = "sqlite:///{database}"\n')
    upgraded = _run(
        [sys.executable, "-m", "pacsnode", "--config", "node.toml", "db", "upgrade"],
        env=env,
        cwd=elsewhere,
    )
    assert upgraded.returncode == 0, upgraded.stderr
    with sqlite3.connect(database) as con:
        (head,) = con.execute("SELECT version_num FROM alembic_version").fetchone()
    versions = sorted(p.stem for p in (REPO / "pacsnode" / "migrations" / "versions").glob("0*.py"))
    assert head == versions[-1].split("_")[0]
