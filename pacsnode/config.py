"""The node's one typed configuration, loaded once from TOML and validated strictly.

Relative paths in the file are resolved against the directory the node is started
from (the repository root for ``make run``), so ``var/`` stays next to the checkout.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pacsnode.errors import ConfigError

DEFAULT_CONFIG = Path("config/pacsnode.toml")

_AET_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash

AeTitle = Annotated[str, Field(min_length=1, max_length=16)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_aet(value: str) -> str:
    if not _AET_RE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable ASCII characters)")
    return value


class NodeConfig(_Section):
    ae_title: AeTitle = "PACSNODE"
    host: str = "0.0.0.0"
    port: Port = 11112
    allowed_calling_aets: list[AeTitle] = []
    max_pdu_size: int = Field(0, ge=0, description="0: unlimited")
    max_associations: int = Field(16, ge=1)
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)

    _aet = field_validator("ae_title")(_check_aet)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_aets(cls, value: list[str]) -> list[str]:
        return [_check_aet(v) for v in value]


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


class ModelsConfig(_Section):
    dir: Path = Path("models")
    enabled: list[str] = ["cxr-chexnet", "ct-pe"]
    device: str = "auto"  # "auto": CUDA when present, else CPU


HeatmapOutput = Literal["sc"]
HeatmapEncoding = Literal["jpeg", "uncompressed"]


class OutputsConfig(_Section):
    """Optional result objects, besides the reports every model writes."""

    heatmaps: list[HeatmapOutput] = ["sc"]
    """Image models' Grad-CAM heatmaps of positive findings: ``"sc"`` writes one Secondary
    Capture per finding (radiograph + colour overlay + burned-in text); ``[]`` writes none
    and skips computing them."""
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
