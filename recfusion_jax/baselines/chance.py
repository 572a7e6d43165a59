"""Chance level, measured: random user and item vectors ranked by the same evaluator.

With several relevant items per user (or a small candidate set) chance is far above
10 / num_items, so the benchmark measures it instead of computing it.
"""

from __future__ import annotations

import numpy as np

from recfusion_jax.baselines.common import Baseline, Ranker
from recfusion_jax.data.types import RecDataset


class RandomScores(Baseline):
  """Gaussian ``dim``-d user and item vectors drawn from ``seed``; ignores the train data."""

  iterative = False

  def __init__(self, dataset: RecDataset, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.users = rng.normal(size=(dataset.num_users, dim)).astype(np.float32)
    self.items = rng.normal(size=(dataset.catalogue.num_items, dim)).astype(np.float32)

  def ranker(self) -> Ranker:
    return Ranker(user_reps=lambda u: {"emb": self.users[u]}, item_table={"emb": self.items})
