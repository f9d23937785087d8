"""System metrics: MLflow's monitors sampled into the run folder (the mirror's buffer), the
last sample taken as the run ends, a resumed run counting on, none when turned off."""

from __future__ import annotations

import json
import time

from fedsparse.cli import _parser
from fedsparse.tracking.system_metrics import FILE, SystemSampler, read_samples

MLFLOW_NAMES = {"cpu_utilization_percentage", "system_memory_usage_megabytes",
                "system_memory_usage_percentage", "disk_usage_percentage",
                "network_receive_megabytes", "network_transmit_megabytes"}


def test_samples_go_to_the_run_folder_under_mlflows_names_and_a_resume_counts_on(tmp_path):
    told = []
    sampler = SystemSampler(tmp_path, 0.2, lambda: told.append(1)).start()
    deadline = time.monotonic() + 60
    while len(read_samples(tmp_path)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sampler.stop()
    samples = read_samples(tmp_path)
    assert len(told) == len(samples) >= 3  # the last one as it stopped
    assert [s["step"] for s in samples] == list(range(len(samples)))
    assert samples[0]["metrics"].keys() >= MLFLOW_NAMES
    assert samples[-1]["metrics"]["system_memory_usage_megabytes"] > 0
    again = SystemSampler(tmp_path, 60).start()  # a resumed run: stopped at once
    again.stop()
    assert [s["step"] for s in read_samples(tmp_path)] == list(range(len(samples) + 1))


def test_a_torn_last_line_is_left_out_and_a_resumed_sampler_starts_a_line_of_its_own(tmp_path):
    sample = {"step": 0, "time_ms": 1, "metrics": {"cpu_utilization_percentage": 5.0}}
    (tmp_path / FILE).write_text(json.dumps(sample) + "\n" + '{"step": 1, "ti')
    assert read_samples(tmp_path) == [sample]
    resumed = SystemSampler(tmp_path, 60).start()
    resumed.stop()
    assert [s["step"] for s in read_samples(tmp_path)] == [0, 1]


def test_no_system_metrics_takes_no_sample(tmp_path):
    sampler = SystemSampler(tmp_path, 0).start()
    sampler.stop()
    assert not (tmp_path / FILE).exists()
    for command in (["run", "x.toml"], ["compare", "x.toml"]):
        assert _parser().parse_args([*command, "--no-system-metrics"]).no_system_metrics
        assert not _parser().parse_args(command).no_system_metrics
