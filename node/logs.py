"""The node's log: standard error, one line per record, never a patient's name."""

from __future__ import annotations

import logging
import sys
import warnings

from pipeline.redact import RedactingFilter


def setup_logging(level: str, label: str = "") -> None:
    """Log to standard error, one line per record, redacted; ``label`` names the process
    in each line where several write to the same log (the receivers)."""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {label + ' ' if label else ''}%(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom's own INFO lines repeat ours and, at DEBUG, dump whole datasets (patient
    # names included): keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Its state machine's errors are exceptions it raises next: node.acceptor catches them
    # and logs one line each, so its own two lines per exception would only repeat it.
    logging.getLogger("pynetdicom.fsm").setLevel(logging.CRITICAL)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # "Context impl SQLiteImpl"...
    # Libraries quote the values they warn about, and a malformed value can hold a patient's
    # name: their records and Python's warnings go through the handler's redaction.
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    logging.captureWarnings(True)
    # pydicom logs each warning it also issues as a Python warning: once is enough.
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
