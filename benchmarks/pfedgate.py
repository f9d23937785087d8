"""Personalised sparse models (issue #5): every arm of scenarios/personal/ as one
``fedsparse compare`` MLflow experiment per dataset, on the Ray simulation.

Arms: FedAvg (one global model), FedAvg + local fine-tuning (one epoch before evaluation),
pFedGate at budgets s = 1, 0.5 and 0.3, pFedGate with heterogeneous budgets drawn from
{0.3, 0.5, 1.0}, pFedGate at s = 0.5 with 5 novel clients that only fit their gating layer
after the last round, and pFedGate + fine-tuning at s = 0.5 (one epoch of local gated
training before evaluation, as FedAvg + FT gets). 50 clients, Dirichlet(0.1) label skew
(``--alpha`` for another concentration, e.g. the release's 0.4),
LeNet-style CNN, 20% participation. The report (``reports/personal-<dataset>/``) gives the
personalised accuracy (each client's own model on its own test split: weighted, mean and
mean of the worst 10% of clients), the global model's accuracy, the budget and the share of
parameters actually used, uplink bytes and training FLOPs; the script then prints each
pFedGate arm's gap to FedAvg + FT at the last evaluation, over the last 5 evaluations, and
paired client by client at the last evaluation (mean, standard error over clients, clients
better and worse): one run's mean hides a per-client spread of several points.
``--ceiling`` and ``--local-only`` add two references that are not federated: a CNN trained
centrally on the pooled client data (as is, restricted to each client's classes, and moved
to each client's label prior) and one CNN per client trained on its own data alone.

    python benchmarks/pfedgate.py [--datasets mnist fashion_mnist] [--rounds 100] [--arms ...]
                                  [--seed 0] [--alpha 0.1] [--ceiling] [--local-only]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from fedsparse.data import client_data
from fedsparse.data.datasets import available
from fedsparse.experiments import compare
from fedsparse.metrics.aggregate import bottom_decile_mean, standard_error
from fedsparse.models import scenario_model
from fedsparse.scenario import Scenario, load_scenario
from fedsparse.tracking.history import read_csv
from fedsparse.training import evaluate, num_steps, train_sgd

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios" / "personal"
ARMS = ("fedavg", "fedavg_ft", "pfedgate_s1", "pfedgate_s05", "pfedgate_s03", "pfedgate_hetero",
        "pfedgate_novel", "pfedgate_s05_ft")
LATE = 5  # evaluations averaged for the late gap
CEILING_EPOCHS, CEILING_BATCH = 8, 64  # the central model: lr x 0.1 for the last quarter
LOCAL_EPOCHS = (5, 10, 20)  # the local-only reference is evaluated after each


def setting(dataset: str, seed: int, alpha: float | None) -> tuple[list[str], str]:
    """The overrides every arm and reference shares, and the MLflow experiment they go to:
    ``personal-<dataset>``, suffixed ``-alpha<A>`` and ``-seed<S>`` away from the defaults."""
    overrides = [f"data.dataset={dataset}", f"seed={seed}"]
    experiment = f"personal-{dataset}"
    if alpha is not None:
        overrides.append(f"data.alpha={alpha}")
        experiment += f"-alpha{alpha}"
    return overrides, experiment + (f"-seed{seed}" if seed else "")


def reference_scenario(overrides: list[str]) -> Scenario:
    """The FedAvg arm's scenario: the clients' data and local SGD the references reuse."""
    return load_scenario(SCENARIOS / "fedavg.toml", overrides)


def ceiling(scenario: Scenario) -> str:
    """A reference point for personalised accuracy, not a federated method: one CNN trained
    centrally on the union of the clients' training splits, evaluated on each client's test
    split as it is, with its logits restricted to the classes of that client's training
    split, and with its posterior moved to that client's label prior (Saerens et al. 2002,
    eq. 2.4: p_k(y|x) ~ p(y|x) p_k(y) / p(y), priors from the training splits). A Dirichlet
    label partition changes only p(y) from client to client, never p(x|y), so the last is
    the Bayes-optimal personalised classifier built on this central model."""
    seed = scenario.seed
    clients = [client_data(scenario.data, seed, pid) for pid in
               range(scenario.data.num_clients)]
    x, y = torch.cat([c.x_train for c in clients]), torch.cat([c.y_train for c in clients])
    torch.manual_seed(seed)
    model = scenario_model(scenario)
    for epoch in range(CEILING_EPOCHS):
        lr = scenario.client.lr * (0.1 if epoch >= 3 * CEILING_EPOCHS // 4 else 1.0)
        train_sgd(model, x, y, lr=lr, batch_size=CEILING_BATCH,
                  steps=num_steps(len(x), CEILING_BATCH, 1, None),
                  generator=torch.Generator().manual_seed(seed + epoch),
                  momentum=scenario.client.momentum, weight_decay=scenario.client.weight_decay)
    model.eval()
    log_prior = torch.log(torch.bincount(y).double() / len(y))
    accuracy: dict[str, list[float]] = {"plain": [], "restricted": [], "prior": []}
    with torch.no_grad():
        for c in clients:
            log_posterior = torch.log_softmax(model(c.x_test).double(), dim=1)
            counts = torch.bincount(c.y_train, minlength=len(log_prior)).double()
            scores = {"plain": log_posterior,
                      "restricted": log_posterior.masked_fill(counts == 0, -math.inf),
                      "prior": log_posterior + torch.log(counts / counts.sum()) - log_prior}
            for name, score in scores.items():
                accuracy[name].append(float((score.argmax(1) == c.y_test).double().mean()))
    return (f"central CNN ({CEILING_EPOCHS} epochs on the union of the training splits), "
            f"per-client mean accuracy {np.mean(accuracy['plain']):.4f}; restricted to each "
            f"client's classes {np.mean(accuracy['restricted']):.4f} (bottom 10% "
            f"{bottom_decile_mean(accuracy['restricted']):.4f}); moved to each client's label "
            f"prior {np.mean(accuracy['prior']):.4f} (bottom 10% "
            f"{bottom_decile_mean(accuracy['prior']):.4f})")


def local_only(scenario: Scenario) -> str:
    """The other end from the central model, also not federated: every client trains its own
    CNN on its training split alone (the clients' local SGD, constant learning rate; the
    momentum buffer restarts at each reported epoch count) and is evaluated on its test
    split after each of ``LOCAL_EPOCHS`` epochs."""
    seed, p = scenario.seed, scenario.client
    accuracy: dict[int, list[float]] = {epochs: [] for epochs in LOCAL_EPOCHS}
    for pid in range(scenario.data.num_clients):
        c = client_data(scenario.data, seed, pid)
        torch.manual_seed(seed)
        model, done = scenario_model(scenario), 0
        for epochs in LOCAL_EPOCHS:
            train_sgd(model, c.x_train, c.y_train, lr=p.lr, batch_size=p.batch_size,
                      steps=num_steps(len(c.x_train), p.batch_size, epochs - done, None),
                      generator=torch.Generator().manual_seed(seed + pid + done),
                      momentum=p.momentum, weight_decay=p.weight_decay)
            with torch.no_grad():
                accuracy[epochs].append(evaluate(model, c.x_test, c.y_test).accuracy)
            done = epochs
    return "local training only, per-client mean accuracy " + ", ".join(
        f"{np.mean(acc):.4f} after {epochs} epochs (bottom 10% {bottom_decile_mean(acc):.4f})"
        for epochs, acc in accuracy.items())


def final_accuracy(run_dir: str) -> dict[int, float]:
    """Each client's personalised accuracy at the run's last evaluation (``clients.csv``)."""
    rows = [r for r in read_csv(Path(run_dir) / "clients.csv")
            if r["phase"] == "evaluate" and r["status"] == "ok"]
    last = max(r["round"] for r in rows)
    return {r["partition_id"]: r["eval_acc"] for r in rows if r["round"] == last}


def late_mean(run_dir: str, evaluations: int = LATE) -> float:
    """Personalised mean accuracy averaged over the run's last ``evaluations`` evaluations
    (``metrics.csv``): FedAvg + FT moves by 1-2 points from one evaluation to the next."""
    rows = [r for r in read_csv(Path(run_dir) / "metrics.csv") if "fed_accuracy_mean" in r]
    return float(np.mean([r["fed_accuracy_mean"] for r in rows[-evaluations:]]))


def paired_gap(arm: dict[int, float], reference: dict[int, float]) -> str:
    """Mean per-client accuracy gap in points, its standard error, clients better/worse."""
    gaps = 100 * np.array([arm[p] - reference[p] for p in sorted(arm.keys() & reference)])
    se = standard_error(gaps.tolist())
    return (f"{gaps.mean():+.2f} +- {se:.2f} points per client (SE over {len(gaps)}; "
            f"better on {(gaps > 0).sum()}, worse on {(gaps < 0).sum()})")


def compare_arms(arms: list[str], rounds: int, overrides: list[str], experiment: str) -> None:
    """Run ``arms`` as one MLflow experiment; print the report and the gaps to FedAvg + FT."""
    result = compare([SCENARIOS / f"{arm}.toml" for arm in arms],
                     overrides=[*overrides, f"run.rounds={rounds}"],
                     experiment=experiment, out=Path("reports") / experiment, quiet=True)
    print(f"## {', '.join(overrides)} ({rounds} rounds, MLflow experiment "
          f"{result.experiment!r})")
    print(result.report.read_text())
    ft = result.summaries.get("personal-fedavg-ft")
    if ft is None:
        return
    ft_clients, ft_late = final_accuracy(ft["run_dir"]), late_mean(ft["run_dir"])
    for label, summary in result.summaries.items():
        if label.startswith("personal-pfedgate"):
            gap = 100 * (summary["fed_accuracy_mean"] - ft["fed_accuracy_mean"])
            paired = paired_gap(final_accuracy(summary["run_dir"]), ft_clients)
            late = 100 * (late_mean(summary["run_dir"]) - ft_late)
            print(f"- {label}: personalised mean accuracy {gap:+.2f} points vs FedAvg + FT "
                  f"at {summary.get('eval_density_mean', 1.0):.3f} of the parameters "
                  f"({late:+.2f} over the last {LATE} evaluations); {paired}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"],
                        choices=["mnist", "fashion_mnist"])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS,
                        help="the arms to run (none: only the references)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the scenarios' seed (partition, sampling, initialisation); a "
                             "seed other than 0 gets its own experiment, personal-<dataset>-"
                             "seed<S>")
    parser.add_argument("--alpha", type=float, default=None,
                        help="the Dirichlet concentration (default: the scenarios' 0.1); "
                             "another value gets its own experiment, personal-<dataset>-"
                             "alpha<A>[-seed<S>]")
    parser.add_argument("--ceiling", action="store_true",
                        help="also train one CNN centrally on the clients' pooled data and "
                             "report its per-client accuracy restricted to each client's "
                             "classes or moved to its label prior: a reference for what "
                             "personalisation can reach")
    parser.add_argument("--local-only", action="store_true",
                        help="also train one CNN per client on its own data alone and report "
                             "its accuracy after 5, 10 and 20 epochs: the no-federation "
                             "reference")
    args = parser.parse_args()
    for dataset in args.datasets:
        if dataset == "fashion_mnist" and not available(dataset):
            print("## fashion_mnist: not installed (apt-get install dataset-fashion-mnist); "
                  "skipped")
            continue
        overrides, experiment = setting(dataset, args.seed, args.alpha)
        if args.arms:
            compare_arms(args.arms, args.rounds, overrides, experiment)
        if args.ceiling:
            print(f"- {dataset}, reference: {ceiling(reference_scenario(overrides))}")
        if args.local_only:
            print(f"- {dataset}, reference: {local_only(reference_scenario(overrides))}")


if __name__ == "__main__":
    main()
