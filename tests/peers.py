"""Real DICOM peers for the tests: dcmtk command-line tools, dciodvfy and Orthanc.

Everything here talks to real processes on loopback; nothing is mocked. The helpers are
plain functions so that a test reads like the command a person would type.

Quirks of the Debian packages that the helpers absorb:

* ``storescu -v`` prints only the *name* of each C-STORE response status ("Success",
  "Refused: OutOfResources"), so :func:`storescu` runs with ``-d``, whose DIMSE dump
  carries the numeric ``DIMSE Status : 0x0000: Success`` line that
  :func:`parse_store_statuses` reads. Its exit code is 0 when every store succeeded, 1 on a
  connection or file error and 167 when a peer answered with a failure status.
* ``dciodvfy`` writes everything to stderr: first the IOD name (``SCImage``), then lines
  starting ``Error -``, ``Warning -`` or ``Abort -``. It exits 0 when it found no error.
* Orthanc only loads plugins its configuration names, so a private configuration with
  ``"Plugins": []`` keeps Debian's ``/usr/share/orthanc/plugins`` out. urllib honours
  ``http_proxy``; the Orthanc client uses a proxy-less opener so loopback calls never leave
  the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")

REQUIRED_BINARIES: tuple[str, ...] = (
    "storescu",
    "echoscu",
    "dciodvfy",
    "Orthanc",
    "dsr2html",
    "dcmj2pnm",
    "chromium",
)
"""Executables the test suite runs; ``make test`` installs them."""

LOOPBACK = "127.0.0.1"


def find_binary(name: str) -> str | None:
    """Path of the native executable ``name`` on ``PATH`` (plus ``/usr/sbin``), or None.

    pynetdicom installs Python apps named ``storescu``/``echoscu`` into the virtualenv's
    ``bin``; with the venv on ``PATH`` they would shadow dcmtk, so Python scripts are
    skipped.
    """
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin", "/sbin"]
    for directory in dirs:
        if not directory:
            continue
        candidate = Path(directory) / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        with candidate.open("rb") as fh:
            head = fh.read(128)
        if head.startswith(b"#!") and b"python" in head.split(b"\n", 1)[0]:
            continue
        return str(candidate)
    return None


def missing_binaries(names: Iterable[str] = REQUIRED_BINARIES) -> list[str]:
    """Return the names in ``names`` for which :func:`find_binary` finds nothing."""
    return [name for name in names if find_binary(name) is None]


def _which(name: str) -> str:
    found = find_binary(name)
    if found is None:
        raise FileNotFoundError(f"{name!r} not found on PATH; run `make test` to install it")
    return found


def free_port() -> int:
    """Return a TCP port on loopback that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def dcmtk_env() -> dict[str, str]:
    """``os.environ`` plus ``TCP_NODELAY=1``.

    Without it dcmtk leaves Nagle's algorithm on and loses ~40 ms per instance to delayed
    ACKs, which turns a 100-instance series into seconds of idle waiting.
    """
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


# --------------------------------------------------------------------------------------
# dcmtk


def echoscu(
    host: str,
    port: int,
    *,
    called_aet: str,
    calling_aet: str = "TESTSCU",
    timeout: float = 10,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run ``echoscu -v``; ``returncode == 0`` means the C-ECHO succeeded.

    ``extra_args`` go before the host, e.g. :func:`dcmtk_tls_args`.
    """
    cmd = [
        _which("echoscu"),
        "-v",
        "-aet",
        calling_aet,
        "-aec",
        called_aet,
        "-to",
        str(int(timeout)),
        *extra_args,
        host,
        str(port),
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout + 10, check=False
    )


def storescu(
    host: str,
    port: int,
    files: Sequence[Path],
    *,
    called_aet: str,
    calling_aet: str = "TESTSCU",
    extra_args: Sequence[str] = (),
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` in one association with ``storescu -d``.

    Pass the combined ``stdout + stderr`` to :func:`parse_store_statuses` to get one status
    per file actually sent. ``extra_args`` go before the host, e.g. ``["-xs"]`` to propose
    only explicit little endian or ``["--no-halt"]``.
    """
    if not files:
        raise ValueError("storescu: files is empty; give at least one DICOM file")
    cmd = [
        _which("storescu"),
        "-d",
        "-aet",
        calling_aet,
        "-aec",
        called_aet,
        "-to",
        str(int(timeout)),
        *extra_args,
        host,
        str(port),
        *(str(f) for f in files),
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout + 30, check=False
    )


def dcmtk_tls_args(ca: Path, key: Path | None = None, certificate: Path | None = None) -> list[str]:
    """dcmtk options for DICOM TLS: verify the node against ``ca``; present ``certificate``
    (with its unencrypted ``key``) or, without one, connect as an anonymous TLS client."""
    identity = ["+tls", str(key), str(certificate), "-pw"] if key and certificate else ["+tla"]
    return [*identity, "+cf", str(ca)]


_DIMSE_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")
_MESSAGE_TYPE = re.compile(r"Message Type\s*:\s*(\S+ \S+)")


def parse_store_statuses(output: str) -> list[int]:
    """Return the C-STORE response status codes in ``storescu -d`` output, in send order.

    Only statuses inside an incoming ``C-STORE RSP`` DIMSE dump count, so a C-ECHO or any
    other message in the same log is ignored. An empty list means nothing was acknowledged
    (association refused, file unreadable, ...).
    """
    statuses: list[int] = []
    message_type: str | None = None
    for line in output.splitlines():
        if (m := _MESSAGE_TYPE.search(line)) is not None:
            message_type = m.group(1)
        elif (m := _DIMSE_STATUS.search(line)) is not None and message_type == "C-STORE RSP":
            statuses.append(int(m.group(1), 16))
        elif "END DIMSE MESSAGE" in line:
            message_type = None
    return statuses


def combined_output(proc: subprocess.CompletedProcess[str]) -> str:
    """``stdout`` and ``stderr`` of a finished dcmtk run, joined (dcmtk logs to both)."""
    return (proc.stdout or "") + (proc.stderr or "")


# --------------------------------------------------------------------------------------
# dciodvfy


def dciodvfy(path: Path, *, timeout: float = 120) -> tuple[list[str], list[str]]:
    """Validate ``path`` against its IOD; return ``(errors, warnings)`` as message lines.

    ``Abort -`` lines (unreadable file) count as errors, as does a non-zero exit code with
    no error line, so an empty error list really means the object passed. Continuation
    lines (indented) are appended to the message they continue.
    """
    proc = subprocess.run(
        [_which("dciodvfy"), str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    errors: list[str] = []
    warnings: list[str] = []
    last: list[str] | None = None
    for raw in (proc.stderr + proc.stdout).splitlines():
        line = raw.rstrip()
        if not line:
            continue
        if line.startswith(("Error", "Abort")):
            last = errors
            errors.append(line)
        elif line.startswith("Warning"):
            last = warnings
            warnings.append(line)
        elif raw[:1].isspace() and last:
            last[-1] = f"{last[-1]} {line.strip()}"
        else:
            last = None  # the IOD name, e.g. "SCImage"
    if proc.returncode != 0 and not errors:
        errors.append(f"dciodvfy exited with {proc.returncode} without an Error line")
    return errors, warnings


# --------------------------------------------------------------------------------------
# Orthanc


def _segment(value: str) -> str:
    return urllib.parse.quote(value, safe="")


class OrthancError(RuntimeError):
    """An Orthanc REST call failed; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass(frozen=True)
class InstanceInfo:
    """What tests usually want to know about one instance stored in Orthanc."""

    orthanc_id: str
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    remote_aet: str
    transfer_syntax: str


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    *,
    interval: float = 0.1,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that value.

    Raises :class:`TimeoutError` naming ``message`` (called lazily if it is a function, so
    it can describe the state at the time of failure) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {text}")
        time.sleep(interval)


class Orthanc:
    """A real Orthanc on free loopback ports with its own temporary storage.

    ``modalities`` maps a modality name to ``(aet, host, port)``; Orthanc can C-STORE to
    those with :meth:`send_to_modality`. :meth:`stop` and :meth:`restart` keep the storage
    and the ports, so a test can take the destination down and bring it back;
    :meth:`close` (or leaving the ``with`` block) also removes the storage.
    """

    STARTUP_TIMEOUT = 60.0

    def __init__(
        self,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        workdir: Path | None = None,
        dicom_port: int | None = None,
        http_port: int | None = None,
        overwrite_instances: bool = False,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.aet = aet
        self.modalities: dict[str, tuple[str, str, int]] = dict(modalities or {})
        self.dicom_port = dicom_port if dicom_port is not None else free_port()
        self.http_port = http_port if http_port is not None else free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="orthanc-")) if workdir is None else workdir
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._console_path = self.workdir / "orthanc.console.log"
        self._overwrite = overwrite_instances
        self._extra_config = dict(extra_config or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.startup_seconds: float | None = None

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config(self) -> dict[str, Any]:
        """The JSON configuration written before each start."""
        cfg: dict[str, Any] = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.storage_dir),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()
            },
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "UnknownSopClassAccepted": False,
            "OverwriteInstances": self._overwrite,
            "StableAge": 1,
            "SaveJobs": False,
            "StorageCompression": False,
            "HttpCompressionEnabled": False,
            "DicomAssociationCloseDelay": 0,
            "DicomScuTimeout": 10,
            "HttpTimeout": 30,
            "LogExportedResources": False,
        }
        cfg.update(self._extra_config)
        return cfg

    def start(self, timeout: float | None = None) -> Self:
        """Start Orthanc and wait until ``GET /system`` answers."""
        if self.running:
            return self
        timeout = self.STARTUP_TIMEOUT if timeout is None else timeout
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        started = time.monotonic()
        with self._console_path.open("ab") as console:
            self._proc = subprocess.Popen(
                [_which("Orthanc"), f"--logfile={self.log_path}", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = started + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise OrthancError(
                    f"Orthanc {self.aet} exited with {code} during startup "
                    f"(DICOM port {self.dicom_port}, HTTP port {self.http_port}):\n"
                    f"{self.log_tail()}"
                )
            with contextlib.suppress(OSError, OrthancError):
                self.get("/system", timeout=2)
                break
            if time.monotonic() >= deadline:
                self.stop()
                raise OrthancError(
                    f"Orthanc {self.aet} did not answer GET /system within {timeout:g} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self, *, graceful: bool = True, timeout: float = 20) -> None:
        """Stop Orthanc; storage and ports are kept.

        Graceful (SIGTERM) takes ~3.5 s because Orthanc's HTTP and DICOM servers poll for
        shutdown; ``graceful=False`` SIGKILLs at once, like a crash (the SQLite index
        survives it).
        """
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if graceful:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
        proc.wait(timeout=timeout)

    def restart(self, *, graceful: bool = True, timeout: float | None = None) -> Self:
        """Stop and start again on the same ports with the same storage."""
        self.stop(graceful=graceful)
        return self.start(timeout)

    def close(self) -> None:
        """Kill Orthanc and delete its working directory if this object created it."""
        self.stop(graceful=False)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of Orthanc's log and console output, for messages."""
        text = ""
        for path in (self.log_path, self._console_path):
            if path.exists():
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        return (
            f"Orthanc(aet={self.aet!r}, dicom_port={self.dicom_port}, "
            f"http_port={self.http_port}, running={self.running})"
        )

    # -- REST plumbing ------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | Mapping[str, Any] | Sequence[Any] | None = None,
        *,
        timeout: float = 60,
        content_type: str | None = None,
    ) -> bytes:
        """Send one HTTP request to the REST API and return the raw response body."""
        data: bytes | None
        if body is None:
            data = None
        elif isinstance(body, bytes):
            data = body
            content_type = content_type or "application/octet-stream"
        elif isinstance(body, str):
            data = body.encode()
            content_type = content_type or "text/plain"
        else:
            data = json.dumps(body).encode()
            content_type = content_type or "application/json"
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                payload: bytes = resp.read()
                return payload
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            raise OrthancError(
                f"Orthanc {self.aet}: {method} {path} -> HTTP {err.code}: {text}",
                status=err.code,
                body=text,
            ) from err

    def get(self, path: str, *, timeout: float = 60) -> Any:
        return json.loads(self.request("GET", path, timeout=timeout))

    def post(self, path: str, body: Any, *, timeout: float = 60) -> Any:
        raw = self.request("POST", path, body, timeout=timeout)
        return json.loads(raw) if raw.strip() else {}

    def put(self, path: str, body: Any, *, timeout: float = 60) -> Any:
        raw = self.request("PUT", path, body, timeout=timeout)
        return json.loads(raw) if raw.strip() else {}

    def delete(self, path: str, *, timeout: float = 60) -> None:
        self.request("DELETE", path, timeout=timeout)

    # -- REST API -----------------------------------------------------------------------

    def system(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/system")
        return result

    def upload(self, path: Path) -> dict[str, Any]:
        """``POST /instances`` with the file's bytes; returns Orthanc's answer (``ID``...)."""
        result: dict[str, Any] = self.post("/instances", Path(path).read_bytes())
        return result

    def instances(self) -> list[str]:
        """Orthanc identifiers of all stored instances."""
        result: list[str] = self.get("/instances")
        return result

    def studies(self) -> list[str]:
        """Orthanc identifiers of all stored studies."""
        result: list[str] = self.get("/studies")
        return result

    def study_instances(self, study_id: str) -> list[str]:
        """Orthanc identifiers of the instances of one study (by Orthanc study id)."""
        return [item["ID"] for item in self.get(f"/studies/{study_id}/instances")]

    def find_instances(self, **query: str) -> list[str]:
        """``POST /tools/find`` at instance level; keys are DICOM keywords at any level.

        Example: ``find_instances(StudyInstanceUID=uid, Modality="SR")``. Values accept
        Orthanc's wildcards (``*``, ``?``).
        """
        result: list[str] = self.post(
            "/tools/find", {"Level": "Instance", "Query": dict(query), "Expand": False}
        )
        return result

    def tags(self, instance_id: str) -> dict[str, Any]:
        """``/instances/{id}/simplified-tags``: keyword → value (sequences as lists)."""
        result: dict[str, Any] = self.get(f"/instances/{instance_id}/simplified-tags")
        return result

    def metadata(self, instance_id: str) -> dict[str, str]:
        """Orthanc's metadata of an instance (``RemoteAET``, ``SopClassUid``...)."""
        result: dict[str, str] = self.get(f"/instances/{instance_id}/metadata?expand")
        return result

    def instance_info(self, instance_id: str) -> InstanceInfo:
        tags = self.tags(instance_id)
        meta = self.metadata(instance_id)
        return InstanceInfo(
            orthanc_id=instance_id,
            sop_instance_uid=str(tags.get("SOPInstanceUID", "")),
            sop_class_uid=str(tags.get("SOPClassUID") or meta.get("SopClassUid", "")),
            study_instance_uid=str(tags.get("StudyInstanceUID", "")),
            series_instance_uid=str(tags.get("SeriesInstanceUID", "")),
            modality=str(tags.get("Modality", "")),
            remote_aet=meta.get("RemoteAET", ""),
            transfer_syntax=meta.get("TransferSyntax", ""),
        )

    def list_instances(self, ids: Iterable[str] | None = None) -> list[InstanceInfo]:
        """:class:`InstanceInfo` for ``ids`` (default: every stored instance)."""
        return [self.instance_info(i) for i in (self.instances() if ids is None else ids)]

    def download(self, instance_id: str) -> bytes:
        """The stored DICOM file (``/instances/{id}/file``)."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare a modality; at once over REST if running, and in the config for restarts."""
        self.modalities[name] = (aet, host, port)
        if self.running:
            self.put(f"/modalities/{_segment(name)}", {"AET": aet, "Host": host, "Port": port})

    def echo_modality(self, name: str, timeout: float = 10) -> bool:
        """C-ECHO from Orthanc to a declared modality; True on success."""
        try:
            self.post(
                f"/modalities/{_segment(name)}/echo", {"Timeout": int(timeout)}, timeout=timeout + 5
            )
        except OrthancError:
            return False
        return True

    def send_to_modality(
        self,
        modality_name: str,
        resources: Sequence[str],
        synchronous: bool = True,
        *,
        timeout: float = 120,
    ) -> dict[str, Any]:
        """C-STORE ``resources`` (any level) to a modality (``POST /modalities/{name}/store``).

        Synchronous: returns the job's summary and raises :class:`OrthancError` if the
        store failed. Asynchronous: returns ``{"ID": job_id, ...}`` at once.
        """
        body = {"Resources": list(resources), "Synchronous": synchronous}
        result: dict[str, Any] = self.post(
            f"/modalities/{_segment(modality_name)}/store", body, timeout=timeout
        )
        return result

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get(f"/jobs/{job_id}")
        return result

    def wait_for_job(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        """Wait until a job ends (``State`` ``Success`` or ``Failure``); return the job."""
        return self.wait_for(
            lambda: job if (job := self.job(job_id))["State"] in ("Success", "Failure") else None,
            timeout,
            message=f"job {job_id} to finish",
        )

    def changes(self, since: int = 0, limit: int = 1000) -> dict[str, Any]:
        """``/changes``: ``{"Changes": [...], "Done": bool, "Last": seq}``."""
        result: dict[str, Any] = self.get(f"/changes?since={since}&limit={limit}")
        return result

    def wait_for(
        self,
        predicate: Callable[[], T | None],
        timeout: float = 60,
        *,
        interval: float = 0.1,
        message: str = "condition",
    ) -> T:
        """:func:`wait_for`, with Orthanc's log tail in the timeout message."""
        return wait_for(
            predicate,
            timeout,
            interval=interval,
            message=lambda: f"{message} on {self!r}; log tail:\n{self.log_tail(20)}",
        )

    def wait_for_instances(self, count: int, timeout: float = 60) -> list[str]:
        """Wait until at least ``count`` instances are stored; return their ids."""
        return self.wait_for(
            lambda: ids if len(ids := self.instances()) >= count else None,
            timeout,
            message=f"{count} instance(s)",
        )

    def wait_for_sop_instance(self, sop_instance_uid: str, timeout: float = 60) -> str:
        """Wait until the instance with this SOPInstanceUID is stored; return its id."""
        found: list[str] = self.wait_for(
            lambda: self.find_instances(SOPInstanceUID=sop_instance_uid),
            timeout,
            message=f"SOPInstanceUID {sop_instance_uid}",
        )
        return found[0]
