"""Most-popular: every user gets the items ranked by their number of training users."""

from __future__ import annotations

import numpy as np

from recfusion_jax.baselines.common import Baseline, Ranker, unique_pairs
from recfusion_jax.data.types import RecDataset


class Popularity(Baseline):
  """Scores item i by how many distinct users it has in ``dataset.train``."""

  iterative = False

  def __init__(self, dataset: RecDataset):
    _, items = unique_pairs(dataset.train)
    self.counts = np.bincount(items, minlength=dataset.catalogue.num_items).astype(np.float32)

  def ranker(self) -> Ranker:
    # A rank-1 score: user vector [1] times item vector [count].
    return Ranker(user_reps=lambda users: {"emb": np.ones((len(users), 1), np.float32)},
                  item_table={"emb": self.counts[:, None]})
