"""Progress events from the ServerApp to the `fedsparse` CLI.

The ServerApp prints one line per event to stdout; Flower streams the ServerApp's output
to `flwr run --stream` (in simulation and in deployment alike), and the CLI picks these
lines out of the stream to draw its progress bar. Everything else in the stream is Flower
and Ray chatter, which goes to the run's log file.
"""

from __future__ import annotations

import json
import sys
from typing import Any

PREFIX = "@@fedsparse "


def emit(kind: str, **data: Any) -> None:
    """Print one event line (``kind`` plus JSON data) and flush."""
    sys.stdout.write(PREFIX + json.dumps({"event": kind, **data}) + "\n")
    sys.stdout.flush()


def parse(line: str) -> dict[str, Any] | None:
    """The event carried by ``line``, or None for any other line."""
    start = line.find(PREFIX)
    if start < 0:
        return None
    try:
        event = json.loads(line[start + len(PREFIX):])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None
