"""Per-round metric history: one dict per round, written as a CSV table."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    """Write rows with the union of their keys as columns, in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[Row]:
    """Read a table written by :func:`write_csv` (numbers parsed, empty cells dropped)."""
    with open(path, newline="") as fh:
        return [{k: _number(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


def _number(text: str) -> Any:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def series(rows: Sequence[Row], x: str, y: str) -> tuple[list[float], list[float]]:
    """The (x, y) points of rows that have a finite ``y``."""
    points = [(float(r[x]), float(r[y])) for r in rows
              if x in r and y in r and math.isfinite(float(r[y]))]
    return [p[0] for p in points], [p[1] for p in points]
