"""Durable files: write to a temp file, fsync, rename into place, fsync the folder.

A crash at any moment leaves either the old file, the new file, or a stray
``.tmp`` that :func:`sweep_temp_files` removes at start; never a partial object
under its final name.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path

from pacsnode.errors import SpoolError

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
TEMP_SUFFIX = ".tmp"


def is_valid_uid(uid: str) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters; also safe as a path component."""
    return 0 < len(uid) <= 64 and _UID_RE.match(uid) is not None


def spool_path(spool_dir: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    return spool_dir / study_uid / series_uid / f"{sop_uid}.dcm"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(folder: Path) -> None:
    """Create ``folder`` and its parents (0700: they hold patient data), fsyncing each new
    entry's parent."""
    missing: list[Path] = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):
            new.mkdir(mode=0o700)
        _fsync_dir(new.parent)


def write_durably(final: Path, data: bytes | memoryview) -> None:
    """Atomically replace ``final`` with ``data``, durable before returning.

    Raises :class:`SpoolError` (disk full, read-only, permissions) and leaves no
    temp file behind.
    """
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}"
    try:
        _make_dirs(final.parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise SpoolError(f"cannot write {final}: {exc.strerror or exc}") from exc


INCOMING_DIR = ".incoming"


class IncomingFile:
    """A file written as its bytes arrive, published under its final name only once complete.

    The receiver does not know an instance's study and series (its folder) until the
    whole header is in, so the file grows in ``<spool>/.incoming`` and is renamed into
    place after fsync. Until :meth:`publish` returns, a crash leaves only a stray
    ``.tmp`` that :func:`sweep_temp_files` removes.
    """

    def __init__(self, spool_dir: Path) -> None:
        folder = spool_dir / INCOMING_DIR
        self.path = folder / f".{uuid.uuid4().hex}{TEMP_SUFFIX}"
        self.size = 0
        try:
            if not folder.exists():
                _make_dirs(folder)
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise SpoolError(f"cannot create a file in {folder}: {exc.strerror or exc}") from exc

    def write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None, "write after sync"
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
                self.size += written
        except OSError as exc:
            self.discard()
            raise SpoolError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    def sync(self) -> None:
        """fsync and close; the bytes are durable, the name not yet."""
        assert self._fd is not None, "sync twice"
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self.discard()
            raise SpoolError(f"cannot fsync {self.path}: {exc.strerror or exc}") from exc
        os.close(self._fd)
        self._fd = None

    def publish(self, final: Path) -> None:
        """Rename into ``final`` (replacing an older copy) and fsync its folder."""
        assert self._fd is None, "publish before sync"
        try:
            _make_dirs(final.parent)
            os.replace(self.path, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            self.discard()
            raise SpoolError(f"cannot move into {final}: {exc.strerror or exc}") from exc

    def discard(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):
            self.path.unlink()


def sweep_temp_files(root: Path) -> int:
    """Remove temp files left by a crash mid-write; returns how many."""
    removed = 0
    if not root.exists():
        return 0
    for path in root.rglob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed
