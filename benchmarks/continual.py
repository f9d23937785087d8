"""Sparse continual learning on Split-MNIST (issue #4): every arm of
scenarios/continual/split_mnist/ as one ``fedsparse compare`` MLflow experiment.

Arms, all on one device (a one-client federation: one round = one epoch), MLP 784-400-400-10,
5 tasks x 2 classes, 5 epochs per task, class-IL: naive fine-tuning, dense DER++,
SparCL-DER++ (TDM + DGM + DDR) at 75% and 90% weight sparsity, and dynamic sparse training
at 90% with ERK and uniform initial masks. The report gives average class-IL accuracy,
forgetting, task-IL accuracy, training FLOPs (counting only active weights, unmasked
gradient entries and examples not removed), the dense-equivalent FLOPs, the FLOPs reduction
against dense DER++ and wall time (``reports/continual-split-mnist/``).

    python benchmarks/continual.py [--epochs-per-task 5] [--arms naive derpp ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsparse.experiments import compare

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios" / "continual" / "split_mnist"
ARMS = ("naive", "derpp", "sparcl_75", "sparcl_90", "dst_erk", "dst_uniform")
REFERENCE = "split-mnist-derpp"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs-per-task", type=int, default=5)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    args = parser.parse_args()
    e = args.epochs_per_task
    result = compare([SCENARIOS / f"{arm}.toml" for arm in args.arms],
                     overrides=[f"continual.rounds_per_task={e}", f"run.rounds={5 * e}",
                                f"run.eval_every={e}"],
                     experiment="continual-split-mnist",
                     out=Path("reports") / "continual-split-mnist",
                     reference=REFERENCE if "derpp" in args.arms else "", quiet=True)
    print(f"## Split-MNIST, {e} epochs per task (MLflow experiment {result.experiment!r})")
    print(result.report.read_text())
    if "derpp" in args.arms:
        dense = result.summaries[REFERENCE]
        for label, summary in result.summaries.items():
            gap = 100 * (summary["average_accuracy"] - dense["average_accuracy"])
            ratio = dense["train_flops"] / summary["train_flops"]
            print(f"{label:28s} class-IL avg acc {gap:+6.2f} points vs dense DER++, "
                  f"{ratio:5.1f}x fewer training FLOPs")


if __name__ == "__main__":
    main()
