"""The node's logging: one line per record on stderr, as text or as JSON for log shippers,
every record through the redaction filter (no patient names in logs)."""

from __future__ import annotations

import enum
import json
import logging
import sys
import warnings

from pipeline.redact import RedactingFilter


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"  # one object a line: time, level, logger, message (and the error, if any)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the fields a log shipper indexes (and the process's
    label, where several processes write to the same log)."""

    def __init__(self, label: str = "") -> None:
        super().__init__()
        self.label = label

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.label:
            entry["process"] = self.label
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, log_format: LogFormat = LogFormat.TEXT, label: str = "") -> None:
    """Log to standard error, one line per record, redacted; ``label`` names the process
    in each record where several write to the same log (the receivers)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format is LogFormat.JSON:
        handler.setFormatter(JsonFormatter(label))
    else:
        prefix = f"{label} " if label else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
        )
    # Libraries quote the values they warn about, and a malformed value can hold a patient's
    # name: their records and Python's warnings go through the handler's redaction.
    handler.addFilter(RedactingFilter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # pynetdicom's own INFO lines repeat ours and, at DEBUG, dump whole datasets (patient
    # names included): keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Its state machine's errors are exceptions it raises next: node.acceptor catches them
    # and logs one line each, so its own two lines per exception would only repeat it.
    logging.getLogger("pynetdicom.fsm").setLevel(logging.CRITICAL)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # "Context impl SQLiteImpl"...
    # uvicorn's access log would repeat every page the console serves (each refresh).
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    # pydicom logs each warning it also issues as a Python warning: once is enough.
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
