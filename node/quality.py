"""`dicomnode quality`: the monitor's rolling scores and worst recent studies, as tables."""

from __future__ import annotations

from typing import Any

from node.tables import table


def format_quality(report: dict[str, Any]) -> str:
    """The quality report as tables an admin reads in a terminal (no patient names)."""
    settings = report["settings"]
    if not settings["enabled"]:
        return "QUALITY MONITOR: off ([monitor] enabled = false)"
    rolling_rows = [
        (
            r["scanner"],
            r["protocol"],
            f"{r['model']} {r['model_version']}",
            f"{r['scores_in_window']}/{r['scores']}",
            _figure(r["correlation"], 3),
            _figure(r["ssim"], 3),
            _figure(r["psnr"], 2),
            "PAUSED" if r["paused"] else "ok",
        )
        for r in report["rolling"]
    ]
    worst_rows = [
        (
            s["accession"] or "",
            s["source_series_uid"],
            s["synthetic_series_uid"] or "",
            s["protocol"],
            s["model_version"],
            _figure(s["correlation"], 3),
            _figure(s["ssim"], 3),
            _figure(s["psnr"], 2),
            s["placed_by"] or "",
        )
        for s in report["worst_recent"]
    ]
    failed_rows = [
        (s["job_id"], s["accession"] or "", s["source_series_uid"], s["reason"] or "")
        for s in report["not_scored"]
    ]
    paused = [r["paused"] for r in report["rolling"] if r["paused"]]
    parts = [
        f"QUALITY (rolling over the last {settings['window']} scored studies per scanner, "
        f"protocol and model version; correlation and SSIM inside the head, the paper's PSNR; "
        f"floor: correlation {settings['floor']})\n"
        + table(
            ("scanner", "protocol", "model", "window/all", "corr", "SSIM", "PSNR", "state"),
            rolling_rows,
        ),
        "WORST RECENT STUDIES\n"
        + table(
            (
                "accession",
                "source series UID",
                "synthetic series UID",
                "protocol",
                "model",
                "corr",
                "SSIM",
                "PSNR",
                "real placed by",
            ),
            worst_rows,
        ),
    ]
    if failed_rows:
        parts.append(
            "NOT SCORED\n" + table(("job", "accession", "source series UID", "why"), failed_rows)
        )
    if paused:
        parts.append("PAUSED\n" + "\n".join(f"  {reason}" for reason in paused))
    return "\n\n".join(parts)


def _figure(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
