"""SCAFCOM top-1% against dense SCAFFOLD on SCAFCOM's own kind of setup (issue #19): MNIST,
200 clients with 2 classes each (or Dirichlet(0.3)), K = 10 local steps, the arms of
``scenarios/compression/paper/``, at several participation levels.

The paper's axis is uplink bits, not rounds, so SCAFCOM runs ``--scafcom-factor`` times as many
rounds as SCAFFOLD. Per (partition, participation, seed) the table gives SCAFFOLD's final
accuracy ``A``, the target ``T = A - --tolerance``, the uplink bytes each arm had sent when it
first reached ``T`` and their ratio, and SCAFCOM's best accuracy within 1/100 of the bytes
SCAFFOLD needed to reach ``T``. The goal: SCAFCOM reaches ``T`` with at least 100x fewer uplink
bytes (mean of the seeds). Each (partition, participation, arm) is one ``fedsparse compare``
over the seeds, all into the MLflow experiment ``compression-paper-<partition>``; the figure
overlays accuracy against cumulative uplink of every run of a partition.

    python benchmarks/compression_paper.py [--partition pathological dirichlet]
        [--participation 0.1 0.2 0.5] [--seeds 0 1 2] [--rounds 200 150 100]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedsparse.experiments import compare
from fedsparse.tracking.history import Row, series
from fedsparse.tracking.plots import pyplot

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios" / "compression" / "paper"
PARTITIONS = {"pathological": ['data.partition="pathological"', "data.classes_per_client=2"],
              "dirichlet": ['data.partition="dirichlet"', "data.alpha=0.3"]}
BUDGET = 100.0  # the goal's uplink reduction


def bytes_to(rows: Sequence[Row], target: float) -> float | None:
    """Cumulative uplink bytes when the run's centralised accuracy first reached ``target``."""
    sent, accuracy = series(rows, "cum_uplink_bytes", "accuracy")
    return next((b for b, a in zip(sent, accuracy, strict=True) if a >= target), None)


def best_within(rows: Sequence[Row], budget: float) -> float:
    """The best centralised accuracy the run had reached with at most ``budget`` bytes up."""
    sent, accuracy = series(rows, "cum_uplink_bytes", "accuracy")
    return max((a for b, a in zip(sent, accuracy, strict=True) if b <= budget),
               default=float("nan"))


def final_accuracy(rows: Sequence[Row]) -> float:
    return series(rows, "round", "accuracy")[1][-1]


def compare_seeds(partition: str, fraction: float, arm: str, rounds: int,
                  seeds: Sequence[int], out: Path) -> dict[int, list[Row]]:
    """One ``fedsparse compare`` of ``arm`` over ``seeds``; the rounds of each run by seed."""
    result = compare([SCENARIOS / f"{arm}.toml"],
                     overrides=[*PARTITIONS[partition], f"strategy.fraction_train={fraction}",
                                f"run.rounds={rounds}", "run.eval_every=5"],
                     sweeps=[f"seed=[{', '.join(map(str, seeds))}]"],
                     experiment=f"compression-paper-{partition}",
                     out=out / f"{partition}-{fraction:g}-{arm}", quiet=True)
    return dict(zip(seeds, result.histories.values(), strict=True))  # the sweep's order


def table(partition: str, fraction: float, scaffold: dict[int, list[Row]],
          scafcom: dict[int, list[Row]], tolerance: float) -> list[str]:
    lines, ratios, gaps = [], [], []
    for seed in sorted(scaffold):
        final = final_accuracy(scaffold[seed])
        target = final - tolerance
        dense = bytes_to(scaffold[seed], target)
        compressed = bytes_to(scafcom[seed], target)
        ratio = dense / compressed if dense and compressed else float("nan")
        within = best_within(scafcom[seed], dense / BUDGET) if dense else float("nan")
        ratios.append(ratio)
        gaps.append(within - final)
        lines.append(
            f"| {partition} | {fraction:.0%} | {seed} | {final:.4f} | "
            f"{final_accuracy(scafcom[seed]):.4f} | {dense / 1e6:.2f} | "
            + (f"{compressed / 1e6:.2f} | {ratio:.1f}x" if compressed else "never | -")
            + f" | {within:.4f} | {(within - final) * 100:+.2f} |")
    reached = [r for r in ratios if not np.isnan(r)]
    mean_ratio = f"{np.mean(reached):.1f}x" if len(reached) == len(ratios) else \
        f"{len(ratios) - len(reached)} of {len(ratios)} never"
    lines.append(f"| {partition} | {fraction:.0%} | mean | | | | | {mean_ratio} | | "
                 f"{np.mean(gaps) * 100:+.2f} |")
    return lines


def figure(partition: str, runs: dict[str, list[Row]], out: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, rows in runs.items():
        xs, ys = series(rows, "cum_uplink_bytes", "accuracy")
        ax.plot([x / 1e6 for x in xs], ys, label=label, linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink (MB, log scale)")
    ax.set_ylabel("centralised test accuracy")
    ax.set_ylim(0.8, 1.0)
    ax.set_title(f"SCAFCOM top-1% vs SCAFFOLD, MNIST, 200 clients, {partition}")
    ax.legend(fontsize=6, ncol=2)
    path = out / f"compression-paper-{partition}-accuracy-vs-uplink.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partition", nargs="+", default=list(PARTITIONS), choices=PARTITIONS)
    parser.add_argument("--participation", nargs="+", type=float, default=[0.1, 0.2, 0.5],
                        help="fractions of the 200 clients sampled per round")
    parser.add_argument("--rounds", nargs="+", type=int, default=[200, 150, 100],
                        help="SCAFFOLD's rounds at each participation level, in order")
    parser.add_argument("--scafcom-factor", type=float, default=2.0,
                        help="SCAFCOM runs this many times SCAFFOLD's rounds")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="the target is SCAFFOLD's final accuracy minus this")
    parser.add_argument("--out", type=Path, default=Path("reports") / "compression-paper")
    args = parser.parse_args()
    if len(args.rounds) != len(args.participation):
        parser.error("--rounds needs one value per --participation value")
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| partition | participation | seed | SCAFFOLD final | SCAFCOM final | "
             "SCAFFOLD MB to T | SCAFCOM MB to T | reduction | SCAFCOM best within 1/100 | "
             "gap (points) |", "|---" * 10 + "|"]
    for partition in args.partition:
        overlay: dict[str, list[Row]] = {}
        for fraction, rounds in zip(args.participation, args.rounds, strict=True):
            runs = {arm: compare_seeds(partition, fraction, arm, r, args.seeds, args.out)
                    for arm, r in (("scaffold", rounds),
                                   ("scafcom_top1", round(rounds * args.scafcom_factor)))}
            lines += table(partition, fraction, runs["scaffold"], runs["scafcom_top1"],
                           args.tolerance)
            for arm, by_seed in runs.items():
                for seed, rows in by_seed.items():
                    overlay[f"{arm} {fraction:.0%} s{seed}"] = rows
            (args.out / "table.md").write_text("\n".join(lines) + "\n")
        print(f"figure: {figure(partition, overlay, args.out)}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
