"""Paired per-text comparison of federated LoRA runs (issue #6): how far an arm is from the
reference, and how sure we can be, on a test set where one point is 3.5 texts.

Each run's exported adapter (``runs/<run>/adapter``, a standard peft adapter) is reloaded with
``PeftModel.from_pretrained`` on its base model and classifies the run's held-out texts; the
script checks that this reproduces the run's final accuracy. Reference and arm runs are
paired by their scenario seed (same split, same client sampling). Per seed it prints both
accuracies, the texts that only one of them gets right and the gap ``g_s = mean_i d_si``
(``d_si`` = arm right - reference right on text ``i``, in {-1, 0, 1}); over the seeds, the mean
gap with two standard errors: over texts, ``std_i(mean_s d_si) / sqrt(n)`` (how much a
different test set could move it, training held fixed; every seed scores the same texts, so
the texts are the sampling unit), and over seeds, ``std(g_s) / sqrt(S)`` (how much training
randomness moves it).

    python benchmarks/lora_paired.py --reference runs/lora-dense-A ... --arm runs/lora-x-A ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from fedsparse.data import held_out_set, load_dataset
from fedsparse.lora.model import base_model, classify
from fedsparse.metrics.aggregate import standard_error
from fedsparse.scenario import load_scenario


def correct(run: Path) -> tuple[int, np.ndarray]:
    """The run's seed and, per held-out text, whether its exported adapter classifies it
    right (checked against the accuracy the run logged)."""
    from peft import PeftModel

    scenario = load_scenario(run / "scenario.toml")
    x, y = held_out_set(scenario.data, scenario.seed)
    model = PeftModel.from_pretrained(
        base_model(scenario.model.base, load_dataset(scenario.data.dataset).num_classes),
        str(run / "adapter")).eval()
    with torch.no_grad():
        predicted = torch.cat([classify(model, ids).argmax(dim=1) for ids in x.split(256)])
    right = (predicted == y).numpy()
    logged = json.loads((run / "summary.json").read_text())["final_accuracy"]
    if abs(right.mean() - logged) > 1e-9:
        raise SystemExit(f"{run}: the reloaded adapter scores {right.mean():.4f}, the run "
                         f"logged {logged:.4f}")
    return scenario.seed, right


def by_seed(runs: list[Path]) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for run in runs:
        seed, right = correct(run)
        if seed in out:
            raise SystemExit(f"two runs with seed {seed} in one group ({run})")
        out[seed] = right
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, nargs="+", required=True,
                        help="run folders of the reference arm (one per seed)")
    parser.add_argument("--arm", type=Path, nargs="+", required=True,
                        help="run folders of the compared arm (one per seed)")
    args = parser.parse_args()
    reference, arm = by_seed(args.reference), by_seed(args.arm)
    seeds = sorted(reference.keys() & arm.keys())
    if not seeds:
        raise SystemExit(f"no seed in common: reference {sorted(reference)}, arm {sorted(arm)}")
    print("| seed | reference | arm | only reference right | only arm right | gap (points) |")
    print("|---|---|---|---|---|---|")
    d = np.stack([arm[seed].astype(int) - reference[seed].astype(int) for seed in seeds])
    for seed, row in zip(seeds, d, strict=True):
        print(f"| {seed} | {reference[seed].mean():.4f} | {arm[seed].mean():.4f} "
              f"| {(row < 0).sum()} | {(row > 0).sum()} | {100 * row.mean():+.2f} |")
    gaps = d.mean(axis=1)
    mean = float(gaps.mean())
    se_texts = standard_error(d.mean(axis=0).tolist())
    se_seeds = standard_error(gaps.tolist())
    print(f"\nmean gap over {len(seeds)} seeds: {100 * mean:+.2f} points; standard error over "
          f"texts {100 * se_texts:.2f}, over seeds {100 * se_seeds:.2f}")


if __name__ == "__main__":
    main()
