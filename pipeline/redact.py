"""Values from received data sets, made fit for a log line: bounded, and never the contents
of an element.

A malformed element can carry others inside it: a UID whose length field swallowed the
elements after it holds PatientName and PatientID. So a value quoted from a data set, or
from an error a library raised about one, is shown as its length and a short hash, which
lets an admin match two lines about the same value without the log holding it. UIDs, hex
codes, DICOM keywords and the upper layer's state and event names are kept: they cannot
name anyone.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import re

from pydicom.datadict import keyword_dict

# Characters of one log line at most; the fuzzer once made a single line of 292 KB.
MAX_LINE = 1000

# A value in quotes as Python's repr writes it, in either quote.
_QUOTED = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\"""")
_HARMLESS = re.compile(
    r"[0-9]{1,20}(\.[0-9]{1,20}){1,30}"  # a UID
    r"|0x[0-9A-Fa-f]{1,8}"  # a code
    r"|(Sta|Evt)[0-9]{1,2}|(AE|AR|AA|DT)-[0-9]{1,2}"  # PS3.8 states, events, actions
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Loggers whose records quote values the node did not choose to log.
THIRD_PARTY = ("pydicom", "pynetdicom", "py.warnings")


def fingerprint(value: str | bytes) -> str:
    """``<126 characters, sha256 1f2e3d4c5b6a>``: how long ``value`` is and a hash of it."""
    data = value.encode("utf-8", "backslashreplace") if isinstance(value, str) else value
    unit = "characters" if isinstance(value, str) else "bytes"
    return f"<{len(value)} {unit}, sha256 {hashlib.sha256(data).hexdigest()[:12]}>"


def redact(text: str, limit: int = MAX_LINE) -> str:
    """``text`` with every quoted value but a UID or hex code replaced by its fingerprint,
    on one line, at most ``limit`` characters."""

    def replace(match: re.Match[str]) -> str:
        quoted = match.group()
        if _HARMLESS.fullmatch(quoted[1:-1]) or quoted[1:-1] in keyword_dict:
            return quoted
        try:  # the value itself, so its hash matches the node's own lines about it
            value = ast.literal_eval(quoted)
        except (ValueError, SyntaxError):
            value = quoted[1:-1]
        return fingerprint(value if isinstance(value, str) else quoted[1:-1])

    return one_line(_QUOTED.sub(replace, text), limit)


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """``text`` with control characters (line breaks too) escaped, cut at ``limit``."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters in all)"
    return text


class RedactingFilter(logging.Filter):
    """For the node's log handlers: every record becomes one bounded line, and those of
    pydicom, pynetdicom and Python's warnings carry no quoted value and no traceback (the
    exception's type and redacted message instead).

    The node's own lines name UIDs, AE titles and reasons it wrote itself; a traceback of
    the node's own code is kept, its quoted values redacted, since it is how a bug gets found.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name.split(".")[0] in THIRD_PARTY:
            if record.exc_info and record.exc_info[1] is not None:
                error = record.exc_info[1]
                message = f"{message} ({type(error).__name__}: {error})"
            message = redact(message)
            record.exc_info = record.exc_text = record.stack_info = None
        else:
            message = one_line(message)
            if record.exc_info:
                trace = logging.Formatter().formatException(record.exc_info)
                record.exc_text = "\n".join(redact(line) for line in trace.splitlines())
        record.msg, record.args = message, None
        return True
