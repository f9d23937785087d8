"""Personalised sparse models (issue #5): every arm of scenarios/personal/ as one
``fedsparse compare`` MLflow experiment per dataset, on the Ray simulation.

Arms: FedAvg (one global model), FedAvg + local fine-tuning (one epoch before evaluation),
pFedGate at budgets s = 1, 0.5 and 0.3, pFedGate with heterogeneous budgets drawn from
{0.3, 0.5, 1.0}, and pFedGate at s = 0.5 with 5 novel clients that only fit their gating
layer after the last round. 50 clients, Dirichlet(0.1) label skew, LeNet-style CNN, 20%
participation. The report (``reports/personal-<dataset>/``) gives the personalised accuracy
(each client's own model on its own test split: weighted, mean and mean of the worst 10% of
clients), the global model's accuracy, the budget and the share of parameters actually used,
uplink bytes and training FLOPs; the script then prints pFedGate's gap to FedAvg + FT.

    python benchmarks/pfedgate.py [--datasets mnist fashion_mnist] [--rounds 100]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsparse.data.datasets import available
from fedsparse.experiments import compare

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios" / "personal"
ARMS = ("fedavg", "fedavg_ft", "pfedgate_s1", "pfedgate_s05", "pfedgate_s03", "pfedgate_hetero",
        "pfedgate_novel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"],
                        choices=["mnist", "fashion_mnist"])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    args = parser.parse_args()
    for dataset in args.datasets:
        if dataset == "fashion_mnist" and not available(dataset):
            print("## fashion_mnist: not installed (apt-get install dataset-fashion-mnist); "
                  "skipped")
            continue
        result = compare([SCENARIOS / f"{arm}.toml" for arm in args.arms],
                         overrides=[f"data.dataset={dataset}", f"run.rounds={args.rounds}"],
                         experiment=f"personal-{dataset}",
                         out=Path("reports") / f"personal-{dataset}", quiet=True)
        print(f"## {dataset} ({args.rounds} rounds, MLflow experiment {result.experiment!r})")
        print(result.report.read_text())
        ft = result.summaries.get("personal-fedavg-ft")
        for label, summary in result.summaries.items():
            if ft is not None and label.startswith("personal-pfedgate"):
                gap = 100 * (summary["fed_accuracy_mean"] - ft["fed_accuracy_mean"])
                print(f"- {label}: personalised mean accuracy {gap:+.2f} points vs FedAvg + FT "
                      f"at {summary.get('eval_density_mean', 1.0):.3f} of the parameters")


if __name__ == "__main__":
    main()
