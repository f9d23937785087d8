"""FedProx's Synthetic(alpha, beta), generated lazily per client.

Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020), §5.1 and
appendix C.1, after Shamir et al. (2014). Client k holds examples of its own
softmax-regression model:

    y = argmax(softmax(W_k x + b_k)),  x in R^d, W_k in R^{C x d}, b_k in R^C
    W_k, b_k entries ~ N(u_k, 1),      u_k ~ N(0, alpha)    (model heterogeneity)
    x ~ N(v_k, Sigma),                 Sigma = diag(j^-1.2), j = 1..d
    v_k entries ~ N(B_k, 1),           B_k ~ N(0, beta)     (feature heterogeneity)

and ``n_k = min(size_min + floor(LogNormal(size_log_mean, size_log_sigma)), size_max)``
examples, the release's power law ``lognormal(4, 2).astype(int) + 50`` by default.

Everything of client k comes from the scenario's seed and k alone, through numpy Generators
seeded with ``[seed, k, stream]``: one stream for its size, one for its model and v_k, one
for its features. Serving client k generates no other client, its size alone costs one
draw, and every process gets the same client whatever order it serves clients in.

Where the paper's text and the release (litian96/FedProx,
``data/synthetic_*/generate_synthetic.py``) differ, this follows the release:

- alpha and beta are standard deviations: the release draws ``normal(0, alpha)`` and
  ``normal(0, beta)`` (numpy's scale), where the paper's N(0, alpha) reads as a variance.
  The two agree at 0 and 1 (Synthetic(0, 0), Synthetic(1, 1)), not at 0.5.

As in both, W_k and b_k share the one mean u_k, and Sigma is the covariance of x (feature j
has variance j^-1.2; the release's ``multivariate_normal`` with ``cov = diag(j^-1.2)``).

Where this differs from the release:

- the release draws all its 30 clients from one global stream in sequence, so no client can
  be drawn alone; here each client has its own streams (the same law, other numbers);
- sizes are capped at ``size_max`` (default 10,000; the release has no cap): lognormal(4, 2)
  has a heavy tail (in a 100,000-client draw the largest client has a few hundred thousand
  examples, thousands of times the median client's 104), and a round lasts as long as its
  largest sampled client. The cap changes the size of the 0.5% of clients above it;
  ``size_max`` as large as wanted restores the release's law;
- the local test split is ``data.test_fraction`` of each client, rounded, as for every
  dataset (the release keeps ``int(0.9 n)`` for training; ``scenarios/synthetic.toml``
  sets 0.1);
- features are float32 (the release: float64), and the labels are computed from the float32
  features, so they are exactly the argmax of the client's model on the data it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedsparse.protocol import derive_seed
from fedsparse.scenario import SyntheticSpec

# The per-client streams (non-zero: numpy's SeedSequence ignores trailing zeros).
SIZE, MODEL, FEATURES = 1, 2, 3


@dataclass(frozen=True)
class ClientModel:
    """Client k's draw of the generator's priors: the means u_k and B_k, its softmax
    regression (W_k: C x d, b_k: C) and its feature mean v_k (d)."""

    u: float
    B: float
    W: np.ndarray
    b: np.ndarray
    v: np.ndarray


def client_rng(seed: int, partition_id: int, stream: int) -> np.random.Generator:
    """The generator of one stream of one client."""
    return np.random.default_rng([seed, partition_id, stream])


def client_size(spec: SyntheticSpec, seed: int, partition_id: int) -> int:
    """n_k: ``size_min + floor(LogNormal(size_log_mean, size_log_sigma))``, at most
    ``size_max`` (clipped before the floor, so an overflowing draw is the cap)."""
    draw = client_rng(seed, partition_id, SIZE).lognormal(spec.size_log_mean,
                                                          spec.size_log_sigma)
    return spec.size_min + math.floor(min(draw, spec.size_max - spec.size_min))


def client_model(spec: SyntheticSpec, seed: int, partition_id: int) -> ClientModel:
    """u_k ~ N(0, alpha), B_k ~ N(0, beta); W_k, b_k ~ N(u_k, 1); v_k ~ N(B_k, 1)."""
    rng = client_rng(seed, partition_id, MODEL)
    d, c = spec.dimension, spec.classes
    u = float(rng.normal(0.0, spec.alpha))
    B = float(rng.normal(0.0, spec.beta))
    W = rng.normal(u, 1.0, (c, d))
    b = rng.normal(u, 1.0, c)
    v = rng.normal(B, 1.0, d)
    return ClientModel(u=u, B=B, W=W, b=b, v=v)


def feature_variances(dimension: int) -> np.ndarray:
    """The diagonal of Sigma: j^-1.2 for j = 1..d."""
    return np.arange(1, dimension + 1, dtype=np.float64) ** -1.2


def labels(model: ClientModel, x: np.ndarray) -> np.ndarray:
    """argmax softmax(W_k x + b_k), i.e. the argmax of the logits (softmax is monotone)."""
    return np.argmax(x.astype(np.float64) @ model.W.T + model.b, axis=1).astype(np.int64)


def client_examples(spec: SyntheticSpec, seed: int, partition_id: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Client k's n_k examples: features x ~ N(v_k, Sigma) (float32, n_k x d) and their
    labels under the client's own model (int64)."""
    model = client_model(spec, seed, partition_id)
    n = client_size(spec, seed, partition_id)
    noise = client_rng(seed, partition_id, FEATURES).standard_normal((n, spec.dimension))
    x = (model.v + noise * np.sqrt(feature_variances(spec.dimension))).astype(np.float32)
    return x, labels(model, x)


def central_clients(spec: SyntheticSpec, num_clients: int, seed: int) -> np.ndarray:
    """The clients whose local test splits make the server's test set: a seeded sample of
    ``min(central_test_clients, num_clients)`` distinct clients, in increasing order."""
    rng = np.random.default_rng(derive_seed(seed, "synthetic-central-test"))
    size = min(spec.central_test_clients, num_clients)
    return np.sort(rng.choice(num_clients, size=size, replace=False))
