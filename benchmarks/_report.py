"""Shared by the benchmark scripts: print a JSON report and optionally save it."""
from __future__ import annotations

import json
from pathlib import Path


def emit(report: dict, out: Path | None = None) -> dict:
    """Print ``report`` as indented JSON; also write it to ``out`` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return report
