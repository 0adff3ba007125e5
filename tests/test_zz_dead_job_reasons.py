"""Every dead or declined job the suite produced names the input's problem, never ours.

Runs last (pytest takes files in name order, hence ``zz``): it opens every node database
the earlier tests left under this session's temporary folder and reads the reason of each
job that went ``dead`` or ``declined``. A reason that reads like a programming error — a
Python exception class name, a traceback — means a real input reached a code path that
crashed instead of saying what is wrong with it.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

PROGRAMMING_ERROR = re.compile(
    r"\b(Traceback|AttributeError|KeyError|TypeError|IndexError|NameError|AssertionError|"
    r"ZeroDivisionError|UnboundLocalError|NotImplementedError|RecursionError|"
    r"ValueError|RuntimeError|Exception|NoneType|object has no attribute)\b"
)


def reads_like_a_bug(reason: str) -> bool:
    return PROGRAMMING_ERROR.search(reason) is not None


def test_the_classifier_tells_bugs_from_input_problems() -> None:
    assert reads_like_a_bug(
        "AttributeError: 'Dataset' object has no attribute 'SegmentIdentificationSequence'"
    )
    assert reads_like_a_bug("KeyError: 'Rows'")
    assert not reads_like_a_bug("instance 1.2.3: no Pixel Data")
    assert not reads_like_a_bug("body part EXTREMITY is outside this model's scope")


def _reasons(db: Path) -> list[tuple[str, str, str]]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            rows = con.execute(
                "SELECT state, model_name, COALESCE(last_error, '') FROM jobs "
                "WHERE state IN ('dead', 'declined')"
            ).fetchall()
    except sqlite3.Error:  # not a node database, or one a test left half-written on purpose
        return []
    return [(str(s), str(m), str(e)) for s, m, e in rows]


def test_no_dead_or_declined_job_of_the_session_reads_like_a_bug(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    base = tmp_path_factory.getbasetemp()
    databases = [p for p in base.rglob("*") if p.suffix in (".db", ".sqlite") and p.is_file()]
    seen = [(db, *row) for db in databases for row in _reasons(db)]
    bugs = [
        (db.relative_to(base), state, model, e)
        for db, state, model, e in seen
        if reads_like_a_bug(e)
    ]
    assert not bugs, "\n".join(f"{db}: {state} {model}: {e}" for db, state, model, e in bugs)
    if len(databases) > 20:  # the whole suite ran before this file: its bad inputs died
        assert any(state == "dead" for _, state, _, _ in seen)
        assert any(state == "declined" for _, state, _, _ in seen)
