"""flower.log without colour codes, and ``--log-level``: the lines of Flower's log at or
above a level on the terminal too. The stream is a stand-in ``flwr run`` (a Python process
printing Flower-style coloured lines and fedsparse's ``done`` event) under the real
supervisor and the real reader (``launch._stream``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from fedsparse.flower_log import shown, strip_colours, uncoloured
from fedsparse.launch import Launch, _stream
from fedsparse.scenario import parse_scenario
from fedsparse.tracking import events
from tests.conftest import DATA

COLOURED = {"INFO": "\x1b[92mINFO \x1b[0m:      Starting Flower SuperLink",
            "WARNING": "\x1b[93mWARNING \x1b[0m:   Option `--insecure` was set.",
            "ERROR": "\x1b[91mERROR \x1b[0m:     ServerApp thread raised"}


def test_colour_codes_are_removed_and_levels_ordered():
    assert uncoloured(COLOURED["WARNING"]) == "WARNING :   Option `--insecure` was set."
    line = uncoloured(COLOURED["INFO"])
    assert shown(line, "DEBUG") and shown(line, "INFO") and not shown(line, "WARNING")
    assert shown(uncoloured(COLOURED["ERROR"]), "WARNING")
    assert shown("2026-12-01T21:45:59.898Z WARNING [uvicorn.error] x", "WARNING")
    assert shown("Traceback (most recent call last):", "INFO")  # no level: INFO
    assert not shown(line, "")  # no --log-level: nothing on the terminal


def test_a_log_written_with_colours_is_rewritten_without(tmp_path: Path):
    log = tmp_path / "superlink.log"
    log.write_text("\n".join(COLOURED.values()) + "\n")
    strip_colours(log)
    assert "\x1b[" not in log.read_text()
    assert log.read_text().splitlines()[1] == "WARNING :   Option `--insecure` was set."


@pytest.mark.parametrize("level", ["", "WARNING"])
def test_the_stream_keeps_every_line_uncoloured_and_shows_those_at_the_level(
        tmp_path: Path, capsys, level: str):
    done = events.PREFIX + json.dumps({"event": "done", "summary": {"rounds": 1}})
    script = "\n".join(f"print({line!r}, flush=True)" for line in [*COLOURED.values(), done])
    launch = Launch(scenario=parse_scenario((DATA / "digits.toml").read_text()),
                    run_dir=tmp_path, workdir=tmp_path, log_level=level)
    seen: list[dict] = []
    summary = _stream([sys.executable, "-c", script], dict(os.environ), launch, seen.append,
                      None)
    assert summary == {"rounds": 1} and [e["event"] for e in seen] == ["done"]
    log = launch.log_path.read_text()
    assert "\x1b[" not in log and all(uncoloured(line) in log for line in COLOURED.values())
    err = capsys.readouterr().err
    assert ("Option `--insecure` was set." in err) == (level == "WARNING")
    assert ("ServerApp thread raised" in err) == (level == "WARNING")
    assert "Starting Flower SuperLink" not in err
