"""BPR matrix factorisation (Rendle et al., 2009) in JAX/optax.

score(u, i) = <p_u, q_i>; trained with the BPR pairwise loss on (user, positive, uniform
negative) triples, Adam, and an L2 penalty on the rows in the batch. A whole epoch is one
jitted ``lax.scan`` (``common.make_bpr_epoch``).
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from recfusion_jax.baselines.common import Baseline, Ranker, make_bpr_epoch, unique_pairs
from recfusion_jax.data.types import RecDataset

# Tuned on valid (with the number of epochs, scored every EVAL_EVERY up to MAX_EPOCHS).
GRID = [{"learning_rate": lr, "reg": reg} for lr in (1e-3, 3e-3) for reg in (1e-2, 3e-2)]
MAX_EPOCHS = 100
EVAL_EVERY = 10


class BPRMF(Baseline):
  """BPR-MF on ``dataset.train``: ``dim``-d user and item factors."""

  iterative = True

  def __init__(self, dataset: RecDataset, *, dim: int = 64, learning_rate: float = 1e-3,
               reg: float = 1e-4, batch_size: int = 1024, seed: int = 0):
    num_items = dataset.catalogue.num_items
    self.pair_users, self.pair_items = unique_pairs(dataset.train)
    k_user, k_item, self.key = jax.random.split(jax.random.key(seed), 3)
    self.params = {"user": 0.1 * jax.random.normal(k_user, (dataset.num_users, dim)),
                   "item": 0.1 * jax.random.normal(k_item, (num_items, dim))}
    tx = optax.adam(learning_rate)
    self.opt_state = tx.init(self.params)
    self._epoch = make_bpr_epoch(lambda p: (p["user"], p["item"]), tx,
                                 num_pairs=self.pair_users.size, num_items=num_items,
                                 batch_size=batch_size, reg=reg)

  def train(self, epochs: int) -> list[float]:
    losses = []
    for _ in range(epochs):
      self.key, key = jax.random.split(self.key)
      self.params, self.opt_state, loss = self._epoch(self.params, self.opt_state, key,
                                                      self.pair_users, self.pair_items)
      losses.append(float(loss))
    return losses

  def ranker(self) -> Ranker:
    users, items = np.asarray(self.params["user"]), np.asarray(self.params["item"])
    return Ranker(user_reps=lambda u: {"emb": users[u]}, item_table={"emb": items})
