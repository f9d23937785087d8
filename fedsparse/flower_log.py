"""Flower's and Ray's output as fedsparse keeps and shows it: ``flower.log`` without
terminal colour codes (Flower 1.41 colours its console log whatever the output:
``flwr/supercore/logger.py`` sets up its handler with ``colored=True``), and, with
``--log-level``, the lines at or above a level on the terminal as well."""

from __future__ import annotations

import re
from pathlib import Path

from fedsparse.durable import write_bytes

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_LEVEL_ENV = "FLWR_LOG_LEVEL"  # read by every Flower process (flwr/supercore/logger.py)
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
_LEVEL = re.compile(r"^(?:\S+ )?(DEBUG|INFO|WARNING|ERROR)\b")


def uncoloured(line: str) -> str:
    """``line`` without ANSI colour codes."""
    return _COLOUR.sub("", line)


def strip_colours(path: Path) -> None:
    """Rewrite the log at ``path`` without colour codes (the SuperLink's own lines, which it
    writes to the file itself)."""
    if not path.is_file():
        return
    raw = path.read_bytes()
    clean = _COLOUR.sub("", raw.decode(errors="surrogateescape")).encode(
        errors="surrogateescape")
    if clean != raw:
        write_bytes(path, clean)


def shown(line: str, level: str) -> bool:
    """Whether a (colourless) log line is at or above ``level``; a line without a level of
    its own (Ray's, a traceback's) counts as INFO."""
    if not level:
        return False
    found = _LEVEL.match(line)
    return LEVELS.index(found.group(1) if found else "INFO") >= LEVELS.index(level)
