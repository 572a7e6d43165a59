"""BPR matrix factorisation (Rendle et al., 2009) in JAX/optax.

score(u, i) = <p_u, q_i>; trained with the BPR pairwise loss on (user, positive, uniform
negative) triples, Adam, and an L2 penalty on the rows in the batch. A whole epoch is one
jitted ``lax.scan`` (``common.make_bpr_epoch``).
"""

from __future__ import annotations

import jax

from recfusion_jax.baselines.common import BprEmbeddings, unique_pairs
from recfusion_jax.data.types import RecDataset

# Tuned on valid (with the number of epochs, scored every EVAL_EVERY up to MAX_EPOCHS).
GRID = [{"learning_rate": lr, "reg": reg} for lr in (1e-3, 3e-3) for reg in (1e-2, 3e-2)]
MAX_EPOCHS = 100
EVAL_EVERY = 10


class BPRMF(BprEmbeddings):
  """BPR-MF on ``dataset.train``: ``dim``-d user and item factors."""


  def __init__(self, dataset: RecDataset, *, dim: int = 64, learning_rate: float = 1e-3,
               reg: float = 1e-4, batch_size: int = 1024, seed: int = 0):
    num_items = dataset.catalogue.num_items
    self.pair_users, self.pair_items = unique_pairs(dataset.train)
    k_user, k_item, self.key = jax.random.split(jax.random.key(seed), 3)
    self.params = {"user": 0.1 * jax.random.normal(k_user, (dataset.num_users, dim)),
                   "item": 0.1 * jax.random.normal(k_item, (num_items, dim))}
    self._init_bpr(lambda p: (p["user"], p["item"]), learning_rate=learning_rate,
                   batch_size=batch_size, reg=reg, num_items=num_items)
