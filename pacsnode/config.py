"""The node's one typed configuration, loaded once from TOML and validated strictly.

Relative paths in the file are resolved against the directory the node is started
from (the repository root for ``make run``), so ``var/`` stays next to the checkout.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    ValidationError,
    field_validator,
    model_validator,
)

from pacsnode.errors import ConfigError

DEFAULT_CONFIG = Path("config/pacsnode.toml")
"""A checkout's configuration, relative to the working directory (``make run``)."""
SYSTEM_CONFIG = Path("/etc/pacsnode/pacsnode.toml")
"""An installed node's configuration (the systemd units pass it with ``--config``)."""
CONFIG_ENV = "PACSNODE_CONFIG"


def config_path(explicit: Path | None, environ: Mapping[str, str] = os.environ) -> Path:
    """Which configuration file a command reads: ``--config``, else ``$PACSNODE_CONFIG``,
    else ``config/pacsnode.toml`` in the working directory, else ``/etc/pacsnode/pacsnode.toml``
    when it exists; failing all, the checkout's path, so the error names a file."""
    if explicit is not None:
        return explicit
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    if not DEFAULT_CONFIG.is_file() and SYSTEM_CONFIG.is_file():
        return SYSTEM_CONFIG
    return DEFAULT_CONFIG


_AET_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash

AeTitle = Annotated[str, Field(min_length=1, max_length=16)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_aet(value: str) -> str:
    if not _AET_RE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable ASCII characters)")
    return value


class AllowRule(_Section):
    """One ``[[node.allow]]`` entry: a calling AE title, a source network, or both.

    A peer may associate when it matches at least one rule: its calling AE title equals
    ``ae_title`` (when given) and its address lies in ``address`` (when given; a single
    address or a CIDR network, IPv4 or IPv6).
    """

    ae_title: AeTitle | None = None
    address: IPvAnyNetwork | None = None

    @field_validator("ae_title")
    @classmethod
    def _aet(cls, value: str | None) -> str | None:
        return None if value is None else _check_aet(value)

    @model_validator(mode="after")
    def _not_empty(self) -> AllowRule:
        if self.ae_title is None and self.address is None:
            raise ValueError("an allow rule needs ae_title, address or both")
        return self


class TlsConfig(_Section):
    """``[node.tls]``: DICOM TLS (PS3.15 B.1) on the node's port; off by default.

    With TLS on, the port speaks only TLS: a plain-TCP peer fails the handshake and is
    disconnected. ``client_ca`` turns on mutual TLS: every peer must present a
    certificate signed by one of those CAs (the system's CAs are never trusted for it).
    """

    enabled: bool = False
    certificate: Path | None = None
    """PEM server certificate (chain), sent to peers."""
    private_key: Path | None = None
    """PEM private key of ``certificate``, unencrypted; keep it mode 0600."""
    client_ca: Path | None = None
    """PEM CA bundle; set: client certificates are required and verified against it."""
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    @model_validator(mode="after")
    def _files_given(self) -> TlsConfig:
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("tls.enabled needs certificate and private_key")
        return self


class NodeConfig(_Section):
    """The DICOM listener: who may associate, how, and the limits that keep it serving.

    Access: with neither ``allowed_calling_aets`` nor ``allow`` set, any peer may
    associate (as before). Otherwise a peer must match one ``[[node.allow]]`` rule or
    have a calling AE title listed in ``allowed_calling_aets`` (kept as shorthand for
    rules with an AE title and no address). Refused peers get A-ASSOCIATE-RJ
    permanent, "calling AE title not recognized" (PS3.8 9.3.4) whether the title or the
    address failed, so a prober learns nothing; the log and the audit row say which.

    Limits: ``max_associations`` concurrent associations (more get A-ASSOCIATE-RJ
    transient, "local limit exceeded"); ``max_pdu_size`` is what we announce and enforce
    on received P-DATA-TF (a larger one aborts the association); ``acse_timeout`` bounds
    the whole opening (TLS handshake and A-ASSOCIATE-RQ, however slowly it trickles);
    ``dimse_timeout`` bounds the arrival of one DIMSE message, command and dataset,
    from its first byte to its last (raise it for very large objects over slow links);
    ``network_timeout`` is the longest silence between PDUs.

    Per association: after ``max_association_instances`` C-STOREs, each further one is
    answered 0xA700 (Refused: Out of Resources) and its bytes dropped, so the modality
    retries it on a new association; once ``max_association_bytes`` of dataset bytes
    have arrived the association is aborted (A-ABORT) at once, the instance in flight
    discarded, and the reason logged and audited. 0 means no cap.
    """

    ae_title: AeTitle = "PACSNODE"
    host: str = "0.0.0.0"
    port: Port = 11112
    allowed_calling_aets: list[AeTitle] = []
    allow: list[AllowRule] = []
    tls: TlsConfig = TlsConfig()
    max_pdu_size: int = Field(0, ge=0, description="0: unlimited")
    max_associations: int = Field(16, ge=1)
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(120.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    max_association_instances: int = Field(0, ge=0, description="0: unlimited")
    max_association_bytes: int = Field(0, ge=0, description="0: unlimited")

    _aet = field_validator("ae_title")(_check_aet)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_aets(cls, value: list[str]) -> list[str]:
        return [_check_aet(v) for v in value]

    @field_validator("max_pdu_size")
    @classmethod
    def _pdu_size(cls, value: int) -> int:
        if value and value < 4096:
            raise ValueError("max_pdu_size must be 0 (unlimited) or at least 4096")
        return value


class StorageConfig(_Section):
    spool_dir: Path = Path("var/spool")
    output_dir: Path = Path("var/outputs")
    database_url: str = "sqlite:///var/pacsnode.db"
    db_busy_timeout_seconds: float = Field(10.0, gt=0)


class DestinationConfig(_Section):
    name: str = Field(min_length=1)
    ae_title: AeTitle
    host: str
    port: Port
    calling_ae_title: AeTitle | None = None  # default: node.ae_title

    _aet = field_validator("ae_title")(_check_aet)


class CompletionConfig(_Section):
    series_quiet_seconds: dict[str, float] = {"default": 5.0}
    series_max_wait_seconds: float = Field(600.0, gt=0)

    def quiet_seconds(self, modality: str) -> float:
        return self.series_quiet_seconds.get(
            modality, self.series_quiet_seconds.get("default", 5.0)
        )


class RetryPolicy(_Section):
    """Attempts, exponential backoff and lease of work that is retried (jobs, deliveries)."""

    max_attempts: int = Field(5, ge=1)
    backoff_base_seconds: float = Field(5.0, gt=0)
    backoff_max_seconds: float = Field(600.0, gt=0)
    lease_seconds: float = Field(300.0, gt=0)


class QueueConfig(RetryPolicy):
    poll_seconds: float = Field(1.0, gt=0)


class DispatchConfig(RetryPolicy):
    max_attempts: int = Field(10, ge=1)
    lease_seconds: float = Field(120.0, gt=0)
    timeout_seconds: float = Field(30.0, gt=0)
    associations: int = Field(3, ge=1, le=16)
    """Concurrent associations per destination when several results are due at once (a
    radiograph's SR and heatmaps): the PACS stores them in parallel. 1: one at a time."""


GatePolicy = Literal["decline", "flag"]


class ModelsConfig(_Section):
    dir: Path = Path("models")
    enabled: list[str] = ["cxr-chexnet", "ct-pe"]
    device: str = "auto"  # "auto": CUDA when present, else CPU
    on_gate_failure: dict[str, GatePolicy] = {"default": "decline"}
    """What a model does with an input its content or out-of-distribution gate fails, by
    model name ("default" for the rest): ``"decline"``, no finding is sent (a "not analysed"
    notice is, with ``[outputs] not_analysed``); ``"flag"``, results are sent, marked in the
    SR and burned into every image as outside the model's validated input range. A header
    outside the manifest's scope is always declined."""

    def gate_policy(self, model: str) -> GatePolicy:
        return self.on_gate_failure.get(model, self.on_gate_failure.get("default", "decline"))


HeatmapOutput = Literal["sc"]
HeatmapEncoding = Literal["jpeg", "uncompressed"]


class OutputsConfig(_Section):
    """Optional result objects, besides the reports every model writes."""

    heatmaps: list[HeatmapOutput] = ["sc"]
    """Image models' Grad-CAM heatmaps of positive findings: ``"sc"`` writes one Secondary
    Capture per finding (radiograph + colour overlay + burned-in text); ``[]`` writes none
    and skips computing them."""
    not_analysed: bool = True
    """A study a model would take by modality but that a gate kept from it gets one small
    "not analysed" SR and a one-line Secondary Capture in the source study, saying which
    model declined and why (:mod:`pacsnode.writers.notice`)."""
    heatmap_encoding: HeatmapEncoding = "jpeg"
    """``"jpeg"``: JPEG baseline, quality 95 (1.5 MB for a 2048x2048 image, flagged lossy);
    ``"uncompressed"``: 12 MB each, lossless, about 0.2 s more per image to deliver."""

    @field_validator("heatmaps", mode="before")
    @classmethod
    def _known_outputs(cls, value: object) -> object:
        if isinstance(value, list) and "pm" in value:
            raise ValueError(
                "'pm' (Parametric Map) is not available: highdicom 0.28 cannot build one on a "
                'projection radiograph, which has no frame of reference; use ["sc"] or []'
            )
        if isinstance(value, list) and len(set(map(str, value))) != len(value):
            raise ValueError(f"{value!r} names an output twice")
        return value


class LoggingConfig(_Section):
    level: str = "INFO"
    format: Literal["text", "json"] = "text"
    """"text": one line for a person; "json": one JSON object per line, for a log shipper."""


class MetricsConfig(_Section):
    """``[metrics]``: the Prometheus endpoint each ``pacsnode serve`` process offers."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9110, ge=0, le=65535)
    """0: any free port (tests; the bound port is logged). A split deployment's processes
    add an offset so they share one config: receiver +0, worker +1, dispatch +2,
    scheduler +3, by the first component the process runs."""


_CLOCK_RE = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


def _check_clock(value: str) -> str:
    if not _CLOCK_RE.match(value):
        raise ValueError(f"{value!r} is not a local time of day as HH:MM (00:00-23:59)")
    return value


class AuditConfig(_Section):
    """``[audit]``: the nightly report of the previous local day (see :mod:`pacsnode.audit`)."""

    reports_dir: Path = Path("var/reports")
    run_at: str = "02:00"
    """Local time of day (HH:MM, in ``timezone``) the scheduler writes yesterday's report."""
    timezone: str = ""
    """IANA name (e.g. "Europe/Berlin") for day boundaries and ``run_at``; "": the host's."""
    drift_bound: float = Field(0.15, gt=0, le=1)
    """Flag a label when the day's positive rate differs from the trailing rate by more
    than this, as an absolute difference of rates (0.15: 15 percentage points)."""
    drift_window_days: int = Field(30, ge=1)
    drift_min_results: int = Field(10, ge=1)
    """A label with fewer results on the day (or in the window) is shown but never flagged."""

    _run_at = field_validator("run_at")(_check_clock)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        if value:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"{value!r} is not a known IANA time zone") from exc
        return value


class RetentionConfig(_Section):
    """``[retention]``: when source instances leave the spool (see :mod:`pacsnode.retention`)."""

    enabled: bool = True
    delivered_days: float = Field(7.0, ge=1)
    """Days after every result of a series was delivered (or, for a series no model took,
    after it completed) before its instances are deleted."""
    failed_days: float = Field(30.0, ge=1)
    """Days to keep a series with a dead job or a dead delivery, for investigation."""
    run_at: str = "03:00"
    """Local time of day (HH:MM, in ``[audit] timezone``) the scheduler purges."""

    _run_at = field_validator("run_at")(_check_clock)


class Config(_Section):
    node: NodeConfig = NodeConfig()
    storage: StorageConfig = StorageConfig()
    destinations: list[DestinationConfig] = []
    completion: CompletionConfig = CompletionConfig()
    queue: QueueConfig = QueueConfig()
    dispatch: DispatchConfig = DispatchConfig()
    models: ModelsConfig = ModelsConfig()
    outputs: OutputsConfig = OutputsConfig()
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()
    audit: AuditConfig = AuditConfig()
    retention: RetentionConfig = RetentionConfig()

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: list[DestinationConfig]) -> list[DestinationConfig]:
        names = [d.name for d in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique; repeated: {', '.join(dupes)}")
        return value


def _describe(exc: ValidationError, path: Path) -> str:
    lines = [f"{path}: invalid configuration"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_config(text: str, path: Path = Path("<string>")) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from exc


def load_config(path: Path = DEFAULT_CONFIG) -> Config:
    """Read and validate the config file; every problem names its key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from exc
    return parse_config(text, path)
