"""Reservoir replay buffer (Vitter 1985, Algorithm R; as Mammoth's ``Buffer``).

Holds up to ``capacity`` examples of the stream seen so far, each with its label and the
logits the model gave it when it was inserted (DER/DER++ replay those logits). Every example
seen has the same chance ``capacity / seen`` of being in the buffer. It lives on the
training device; the slots are drawn on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsparse.device import CPU, cpu_numpy


class ReservoirBuffer:
    def __init__(self, capacity: int, input_shape: tuple[int, ...], num_classes: int,
                 device: torch.device = CPU) -> None:
        self.capacity = capacity
        self.examples = torch.zeros((capacity, *input_shape), device=device)
        self.labels = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.logits = torch.zeros((capacity, num_classes), device=device)
        self.seen = 0

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor,
            generator: torch.Generator) -> None:
        """Offer each example once: slot ``seen`` while not full, else a random slot with
        probability ``capacity / (seen + 1)``."""
        for i in range(len(x)):
            if self.seen < self.capacity:
                slot = self.seen
            else:
                slot = int(torch.randint(self.seen + 1, (1,), generator=generator))
            if slot < self.capacity:
                self.examples[slot], self.labels[slot], self.logits[slot] = x[i], y[i], logits[i]
            self.seen += 1

    def sample(self, n: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``min(n, len(self))`` distinct stored examples, labels and logits."""
        idx = torch.randperm(len(self), generator=generator)[:n].to(self.labels.device)
        return self.examples[idx], self.labels[idx], self.logits[idx]

    def state(self) -> dict[str, np.ndarray]:
        filled = len(self)
        return {"examples": cpu_numpy(self.examples[:filled]),
                "labels": cpu_numpy(self.labels[:filled]),
                "logits": cpu_numpy(self.logits[:filled]), "seen": np.array([self.seen])}

    def load(self, state: dict[str, np.ndarray]) -> None:
        filled = len(state["labels"])
        if filled > self.capacity:
            raise ValueError(f"saved buffer holds {filled} examples; capacity is {self.capacity}")
        self.examples[:filled] = torch.from_numpy(state["examples"])
        self.labels[:filled] = torch.from_numpy(state["labels"])
        self.logits[:filled] = torch.from_numpy(state["logits"])
        self.seen = int(state["seen"][0])
