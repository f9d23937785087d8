"""The clients' splits kept for a run's processes: the same split as one made anew, made by
no process that can read it, one file per thing the split depends on, a damaged file made
again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsparse.data import partition
from fedsparse.data.partition import check_partition, client_indices
from fedsparse.runtime_env import SPLITS_ENV, process_env, splits_dir
from fedsparse.scenario import DataSpec

SPEC = DataSpec(dataset="digits", num_clients=7, partition="dirichlet", alpha=0.5)
SEED = 3


def made_here(spec: DataSpec, seed: int) -> list[tuple[list[int], list[int]]]:
    """Every client's split made in this process, with no store."""
    partition._partitioned_indices.cache_clear()
    partition._stored_splits.cache_clear()
    return [(c.train.tolist(), c.test.tolist()) for c in
            (client_indices(spec, seed, pid) for pid in range(spec.num_clients))]


@pytest.fixture(autouse=True)
def no_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SPLITS_ENV, raising=False)


def test_a_process_that_sees_the_store_reads_the_split_and_makes_none(tmp_path: Path):
    check_partition(SPEC, SEED, store=tmp_path)
    probe = (
        "import json, sys\n"
        "from fedsparse.data.partition import client_indices\n"
        "from fedsparse.scenario import DataSpec\n"
        f"spec = DataSpec.model_validate_json({SPEC.model_dump_json()!r})\n"
        f"splits = [client_indices(spec, {SEED}, p) for p in range({SPEC.num_clients})]\n"
        "print(json.dumps({'splits': [(c.train.tolist(), c.test.tolist()) for c in splits],"
        " 'imported': [m for m in ('datasets', 'flwr_datasets') if m in sys.modules]}))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, env={**process_env(tmp_path), SPLITS_ENV: str(tmp_path)})
    result = json.loads(out.stdout)
    assert result["imported"] == []
    assert [tuple(s) for s in result["splits"]] == made_here(SPEC, SEED)


def test_the_check_reads_a_stored_split_back_unchanged(tmp_path: Path):
    first = check_partition(SPEC, SEED, store=tmp_path)
    again = check_partition(SPEC, SEED, store=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test)


def test_another_seed_or_data_section_has_a_file_of_its_own(tmp_path: Path):
    check_partition(SPEC, SEED, store=tmp_path)
    check_partition(SPEC, SEED + 1, store=tmp_path)
    check_partition(SPEC.model_copy(update={"test_fraction": 0.3}), SEED, store=tmp_path)
    assert len(list(tmp_path.iterdir())) == 3


def test_a_damaged_split_file_is_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    check_partition(SPEC, SEED, store=tmp_path)
    (stored,) = tmp_path.iterdir()
    stored.write_bytes(stored.read_bytes()[:-100])
    monkeypatch.setenv(SPLITS_ENV, str(tmp_path))
    assert made_here(SPEC, SEED) == [(c.train.tolist(), c.test.tolist()) for c in
                                     check_partition(SPEC, SEED, store=tmp_path)]
    monkeypatch.delenv(SPLITS_ENV)
    assert made_here(SPEC, SEED) == [(c.train.tolist(), c.test.tolist()) for c in
                                     check_partition(SPEC, SEED, store=tmp_path)]


def test_the_processes_of_a_run_are_told_where_the_splits_are(tmp_path: Path):
    assert process_env(tmp_path)[SPLITS_ENV] == str(splits_dir(tmp_path))
