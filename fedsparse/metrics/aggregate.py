"""Aggregation of the scalar metrics clients report with their replies."""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Mapping, Sequence


def aggregate_client_metrics(metrics: Sequence[Mapping[str, float]], weights: Sequence[int],
                             summed: Collection[str] = ()) -> dict[str, float]:
    """Per key: the sum over clients if the key is in ``summed``, else the weighted mean.

    Keys a client does not report are aggregated over the clients that do; list-valued
    metrics are skipped (they belong in per-client tables, not round summaries).
    """
    keys = {k for m in metrics for k, v in m.items() if isinstance(v, int | float)}
    out: dict[str, float] = {}
    for key in sorted(keys):
        pairs = [(float(m[key]), w) for m, w in zip(metrics, weights, strict=True) if key in m]
        if key in summed:
            out[key] = math.fsum(v for v, _ in pairs)
        else:
            total = sum(w for _, w in pairs)
            out[key] = math.fsum(v * w for v, w in pairs) / total if total else float("nan")
    return out


def unweighted_mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of ``values``: sample standard deviation over sqrt(n)
    (NaN below two values)."""
    if len(values) < 2:
        return float("nan")
    return statistics.stdev(values) / math.sqrt(len(values))


def bottom_decile_mean(values: Sequence[float]) -> float:
    """Mean of the worst 10% of ``values`` (at least one): the fairness figure of
    personalised FL."""
    return unweighted_mean(sorted(values)[:max(1, len(values) // 10)])
