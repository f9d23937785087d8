"""Sparse federated LoRA (issue #6): every arm of scenarios/lora/ as one ``fedsparse compare``
MLflow experiment (``lora-chatterbot``), on the Ray simulation.

Arms: dense federated LoRA, FLASC at density 1/4 and 1/16 (both ways), FLASC at 1/16 with
client error feedback, SoRA (rank gates, pruned ranks no longer sent; with its schedule of xi,
with the release's threshold rule at a constant xi, and with that and the release's
gradient-norm clip 0.1), and FLASC with a dense download and uploads at 1/16 (without and with
error feedback), at 1/8 with error feedback and float16 values, at 1/4 and 1/8 with error
feedback and int8 values, at 1/2 with error feedback and int4 values, and dense with error
feedback and int3 or int2 values. MiniLM with LoRA (r = 8 on query and value) + head, English
chatterbot topics, 20 clients with Dirichlet(0.5) label skew. The report (``--out``, by
default ``reports/lora-chatterbot/``) gives final accuracy, cumulative uplink and downlink
bytes and their reduction against dense LoRA, surviving ranks and wall time; the script then
prints each arm's accuracy gap to dense LoRA.

    python benchmarks/lora.py [--rounds 40] [--seed 0] [--arms dense flasc_4 ...] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsparse.experiments import compare
from fedsparse.tracking.plots import MB

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios" / "lora"
ARMS = ("dense", "flasc_4", "flasc_16", "flasc_16_ef", "sora", "sora_release",
        "sora_release_clip", "flasc_up16", "flasc_up16_ef", "flasc_up8_ef_fp16",
        "flasc_up4_ef_int8", "flasc_up8_ef_int8", "flasc_up2_ef_int4", "flasc_up1_ef_int3",
        "flasc_up1_ef_int2")
REFERENCE = "lora-dense"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40,
                        help="federated rounds of every arm (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="scenario seed: the split, the "
                        "client sampling and the training (default: %(default)s)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--out", type=Path, default=Path("reports") / "lora-chatterbot",
                        help="report folder (default: %(default)s)")
    args = parser.parse_args()
    result = compare([SCENARIOS / f"{arm}.toml" for arm in args.arms],
                     overrides=[f"run.rounds={args.rounds}", f"seed={args.seed}"],
                     experiment="lora-chatterbot", out=args.out,
                     reference=REFERENCE if "dense" in args.arms else "", quiet=True)
    print(f"## {args.rounds} rounds, seed {args.seed} (MLflow experiment {result.experiment!r})")
    print(result.report.read_text())
    dense = result.summaries.get(REFERENCE)
    print("| run | accuracy gap to dense (points) | uplink reduction x | downlink reduction x "
          "| uplink MB | ranks alive |")
    print("|---|---|---|---|---|---|")
    for label, s in result.summaries.items():
        gap = up = down = "-"
        if dense is not None:
            gap = f"{100 * (s['final_accuracy'] - dense['final_accuracy']):+.2f}"
            up = f"{dense['uplink_bytes'] / s['uplink_bytes']:.1f}"
            down = f"{dense['downlink_bytes'] / s['downlink_bytes']:.1f}"
        print(f"| {label} | {gap} | {up} | {down} | {s['uplink_bytes'] / MB:.2f} "
              f"| {s.get('ranks_alive', '-')} |")


if __name__ == "__main__":
    main()
