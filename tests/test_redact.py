"""Log lines: bounded, one line each, and no quoted value from a library's record."""

from __future__ import annotations

import logging

from pipeline.redact import MAX_LINE, RedactingFilter, fingerprint, redact


def record(name: str, message: str, *args, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc else None
    return logging.LogRecord(name, logging.WARNING, __file__, 1, message, args, exc_info)


def formatted(rec: logging.LogRecord) -> str:
    assert RedactingFilter().filter(rec)
    return logging.Formatter("%(name)s: %(message)s").format(rec)


def test_quoted_values_become_their_length_and_hash_but_uids_stay():
    swallowed = "1.2.3\x08\x00`\x00PN\x0c\x00SECRET^NAME"
    text = redact(f"Invalid value for VR UI: {swallowed!r}; context '1.2.840.10008.1.2.1'")
    assert "SECRET" not in text and fingerprint(swallowed) in text
    assert "'1.2.840.10008.1.2.1'" in text
    assert redact("no 'CommandField' in Sta6 ('Evt10', 'AE-6')") == (
        "no 'CommandField' in Sta6 ('Evt10', 'AE-6')"
    )
    assert fingerprint("SECRET^NAME") == fingerprint("SECRET^NAME") != fingerprint("OTHER")


def test_a_library_record_with_a_traceback_becomes_one_redacted_line():
    try:
        raise ValueError("invalid literal for int() with base 10: 'SECRET^NAME'")
    except ValueError as error:
        line = formatted(record("pynetdicom.fsm", "decoding failed", exc=error))
    assert "\n" not in line and "SECRET" not in line and "Traceback" not in line
    assert line.startswith("pynetdicom.fsm: decoding failed (ValueError: invalid literal")


def test_the_nodes_own_lines_stay_readable_but_bounded_and_on_one_line():
    assert formatted(record("node.scp", "series %s: new, from %s", "1.2.3", "MRI'1")) == (
        "node.scp: series 1.2.3: new, from MRI'1"
    )
    line = formatted(record("node.scp", "refused: %s", "x\ny" * 1000))
    assert "\n" not in line and len(line) < MAX_LINE + 100
