"""Compressed controlled averaging on MNIST (issue #3): every arm of scenarios/compression/
as one ``fedsparse compare`` MLflow experiment per partition, on the Ray simulation.

Arms: FedAvg (dense), SCAFFOLD (dense, one vector up), FedAvg + top-1% + error feedback,
SCALLION with rand-5%, SCAFCOM with top-1%. 100 clients, 10% participation, K = 10 local
steps. The report gives final centralised accuracy, rounds to reach ``--target``, cumulative
uplink bytes and the uplink reduction against dense SCAFFOLD, plus accuracy-vs-round and
accuracy-vs-cumulative-uplink plots (``reports/compression-<partition>/``).

    python benchmarks/compression.py [--partition pathological dirichlet] [--rounds 300]
                                     [--target 0.9]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsparse.experiments import compare

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios" / "compression"
ARMS = ("fedavg", "scaffold", "fedavg_ef_top1", "scallion_randk", "scafcom_top1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partition", nargs="+", default=["pathological", "dirichlet"],
                        choices=["pathological", "dirichlet"])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--target", type=float, default=0.9)
    args = parser.parse_args()
    for partition in args.partition:
        result = compare([SCENARIOS / partition / f"{arm}.toml" for arm in ARMS],
                         overrides=[f"run.rounds={args.rounds}"],
                         experiment=f"compression-{partition}",
                         out=Path("reports") / f"compression-{partition}",
                         target=args.target, reference=f"scaffold-{partition}", quiet=True)
        print(f"## {partition} ({args.rounds} rounds, MLflow experiment {result.experiment!r})")
        print(result.report.read_text())


if __name__ == "__main__":
    main()
