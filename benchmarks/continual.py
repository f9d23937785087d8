"""Sparse continual learning on Split-MNIST (issue #4): every arm of
scenarios/continual/split_mnist/, once per seed, each seed one ``fedsparse compare`` into
the MLflow experiment ``continual-split-mnist``.

Arms, all on one device (a one-client federation: one round = one epoch), MLP 784-400-400-10,
5 tasks x 2 classes, 5 epochs per task, class-IL: naive fine-tuning, dense DER++,
SparCL-DER++ (TDM + DGM + DDR) at 75%, 85% and 90% weight sparsity, and dynamic sparse training
at 90% with ERK and uniform initial masks. Per seed the report (``reports/continual-split-
mnist-seed<k>/``) gives average class-IL accuracy, forgetting, task-IL accuracy, training
FLOPs (only active weights, unmasked gradient entries and examples not removed), the
dense-equivalent FLOPs, the FLOPs reduction against dense DER++ and wall time; the script
then prints the mean and standard deviation over seeds, the accuracy gap to dense DER++ and
the FLOPs ratio.

    python benchmarks/continual.py [--seeds 0 1 2] [--epochs-per-task 5] [--arms ...]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from fedsparse.experiments import compare

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios" / "continual" / "split_mnist"
ARMS = ("naive", "derpp", "sparcl_75", "sparcl_85", "sparcl_90", "dst_erk", "dst_uniform",
        "dst_isolation")
DEFAULT_ARMS = ARMS[:-1]  # dst_isolation is task-aware at test time: run it on request
REFERENCE = "split-mnist-derpp"


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs-per-task", type=int, default=5)
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=ARMS)
    args = parser.parse_args()
    e = args.epochs_per_task
    runs: dict[str, list[dict]] = {}
    for seed in args.seeds:
        result = compare([SCENARIOS / f"{arm}.toml" for arm in args.arms],
                         overrides=[f"seed={seed}", f"continual.rounds_per_task={e}",
                                    f"run.rounds={5 * e}", f"run.eval_every={e}"],
                         experiment="continual-split-mnist",
                         out=Path("reports") / f"continual-split-mnist-seed{seed}",
                         reference=REFERENCE if "derpp" in args.arms else "", quiet=True)
        print(f"## seed {seed}, {e} epochs per task (MLflow experiment {result.experiment!r})")
        print(result.report.read_text())
        for label, summary in result.summaries.items():
            runs.setdefault(label, []).append(summary)
    print(f"## mean ± std over seeds {args.seeds}\n")
    print("| run | avg class-IL acc | forgetting | avg task-IL acc | train GFLOPs "
          "| gap to DER++ (points) | FLOPs reduction x | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    dense = runs.get(REFERENCE)
    for label, summaries in runs.items():
        acc = [s["average_accuracy"] for s in summaries]
        gap = ratio = "-"
        if dense is not None:
            pairs = list(zip(summaries, dense, strict=True))
            gaps = [100 * (s["average_accuracy"] - d["average_accuracy"]) for s, d in pairs]
            ratios = [d["train_flops"] / s["train_flops"] for s, d in pairs]
            gap, ratio = f"{statistics.mean(gaps):+.2f}", f"{statistics.mean(ratios):.1f}"
        print(f"| {label} | {mean_std(acc)} | {mean_std([s['forgetting'] for s in summaries])} "
              f"| {mean_std([s['task_il_average_accuracy'] for s in summaries])} "
              f"| {statistics.mean(s['train_flops'] for s in summaries) / 1e9:.1f} "
              f"| {gap} | {ratio} | {statistics.mean(s['wall_s'] for s in summaries):.0f} |")


if __name__ == "__main__":
    main()
