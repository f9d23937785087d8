"""DDR: dynamic data removal (SparCL, Wang et al. NeurIPS 2022, Section 3.2;
ALGORITHMS.md §4.5).

For each example of the current task, count forgetting events (Toneva et al. 2019: a
presentation classified incorrectly after one classified correctly) over the presentations
since the last removal; an example never classified correctly in that window gets
``max_count``. At epochs ``every, 2*every, ..., until`` of the task, the examples with the
fewest events (the easiest) are removed from the task's training set and the statistics are
reset; a removal whose epoch a client did not train happens at the next epoch it trains. How
many go at each removal (``split``): ``"fedsparse"`` (default) splits the ``round(fraction *
n)`` removals evenly over the removal epochs (the first ones take one more when it does not
divide), so exactly that many go; ``"release"`` removes ``int(remove_n / (until / every))``
at each, as SparCL's release does (``main_sparse_train_w_data_gradient_efficient.py``, with
``remove_n = round(fraction * n)``), which leaves the remainder in. Ties are broken by example
index (the release's ``np.argsort`` is not stable). The replay buffer is untouched.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsparse.schema import ReleaseChoice


def removal_counts(n: int, fraction: float, every: int, until: int,
                   split: ReleaseChoice = "fedsparse") -> dict[int, int]:
    """Epoch -> how many examples are removed at its start."""
    epochs = list(range(every, until + 1, every))
    if not epochs:
        return {}
    total = round(fraction * n)
    if split == "release":
        return dict.fromkeys(epochs, int(total / (until / every)))
    base, extra = divmod(total, len(epochs))
    return {epoch: base + (i < extra) for i, epoch in enumerate(epochs)}


class DataRemoval:
    def __init__(self, n: int, *, fraction: float, every: int, until: int,
                 max_count: int, split: ReleaseChoice = "fedsparse") -> None:
        self.schedule = removal_counts(n, fraction, every, until, split)
        self.max_count = max_count
        self.n = n
        self.kept = torch.arange(n)
        self.reset()

    def reset(self) -> None:
        n = self.n
        self.previous = torch.zeros(n, dtype=torch.bool)
        self.learned = torch.zeros(n, dtype=torch.bool)
        self.events = torch.zeros(n, dtype=torch.int64)

    def record(self, indices: torch.Tensor, correct: torch.Tensor) -> None:
        """One presentation of the examples ``indices`` (positions in the task's set)."""
        self.events[indices] += (self.previous[indices] & ~correct).long()
        self.previous[indices] = correct
        self.learned[indices] |= correct

    def counts(self) -> torch.Tensor:
        return torch.where(self.learned, self.events, torch.full_like(self.events,
                                                                       self.max_count))

    def remove(self, epoch: int) -> int:
        """At the start of ``epoch``: drop the least-forgotten kept examples that the
        schedule has due by then, including those of removal epochs this client did not
        train (a federated client trains only the rounds it is sampled in); returns how
        many were removed."""
        due = sum(count for at, count in self.schedule.items() if at <= epoch)
        count = due - (self.n - len(self.kept))
        if count > 0:
            order = torch.argsort(self.counts()[self.kept], stable=True)
            self.kept = torch.sort(self.kept[order[count:]]).values
            self.reset()
        return count

    def state(self) -> dict[str, np.ndarray]:
        return {"kept": self.kept.numpy(), "previous": self.previous.numpy(),
                "learned": self.learned.numpy(), "events": self.events.numpy()}

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.kept = torch.from_numpy(state["kept"]).long()
        self.previous = torch.from_numpy(state["previous"]).bool()
        self.learned = torch.from_numpy(state["learned"]).bool()
        self.events = torch.from_numpy(state["events"]).long()
