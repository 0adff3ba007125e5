"""Log output of `pacsnode serve`: a line for a person, or a JSON object per line for a shipper.

``[logging] format = "json"`` makes every line on stderr one JSON object (``time`` in UTC,
``level``, ``logger``, ``thread``, ``message``, and ``exception`` with the traceback), so
journald-to-Loki or Filebeat need no parsing rules. The messages are the same in both
formats, and none carries patient data: UIDs, AE titles and addresses only.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from pacsnode.config import LoggingConfig

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter(cfg: LoggingConfig) -> logging.Formatter:
    return JsonFormatter() if cfg.format == "json" else logging.Formatter(TEXT_FORMAT)


def configure(cfg: LoggingConfig, level: str | None = None) -> None:
    """Send every logger to stderr in the configured format; ``level`` overrides the config's.

    Python warnings (torch, pydicom) go through logging too, so JSON output stays JSON.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(cfg))
    logging.basicConfig(level=(level or cfg.level).upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def announce(cfg: LoggingConfig, message: str) -> None:
    """Print a start-up line whatever the log level, in the log's format."""
    if cfg.format == "json":
        record = logging.LogRecord("pacsnode", logging.INFO, __file__, 0, message, None, None)
        message = JsonFormatter().format(record)
    print(message, file=sys.stderr, flush=True)
