"""The README's Python API example, run as it is, and what it returns."""

from __future__ import annotations

import re

import pytest

import fedsparse
from tests.conftest import REPO, flower_processes

pytestmark = pytest.mark.simulation


def api_example() -> str:
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(),
                                      flags=re.S) if b.startswith("import fedsparse\n")]
    return block


def test_importing_fedsparse_imports_no_api():
    import subprocess
    import sys

    probe = ("import sys, fedsparse; print(*[m for m in ('fedsparse.api', 'mlflow', "
             "'fedsparse.experiments') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == []
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = fedsparse.nope


def test_the_readme_python_example_runs_as_it_is(workdir, capsys):
    (workdir / "scenarios").symlink_to(REPO / "scenarios")
    namespace: dict = {}
    exec(compile(api_example(), "README.md", "exec"), namespace)
    summary, comparison, run = namespace["summary"], namespace["comparison"], namespace["run"]
    assert summary["rounds"] == 2 and 0.5 < summary["final_accuracy"] <= 1
    assert list(comparison.summaries) == ["quickstart client.lr=0.05", "quickstart client.lr=0.1"]
    assert comparison.summaries["quickstart client.lr=0.05"]["final_accuracy"] == \
        summary["final_accuracy"]  # the same scenario, seed and split: the same run
    assert comparison.report.is_file()
    assert run.history[-1]["accuracy"] == summary["final_accuracy"]
    printed = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("quickstart FINISHED 2 ") for line in printed) == 3
    assert not flower_processes(workdir)
