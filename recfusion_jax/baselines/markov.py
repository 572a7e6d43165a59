"""A first-order Markov chain over item IDs (FPMC's MC part, in closed form), for next-item
protocols.

P[j, i] = the share of the transitions out of item j, in every user's time-ordered train
timeline, that go to item i. A user's score of item i reads their latest ``window`` items,
the k-th latest weighted decay^(k-1):

    score(u, i) = sum_k decay^(k-1) P[h_k(u), i]

(``decay=0``: the latest item alone). No training: what SASRec learns of "what follows what",
without its Transformer, as a yardstick for the sequential signal of a split (docs/TUNING.md
§27 measures it on MovieLens loo).
"""

from __future__ import annotations

import numpy as np

from recfusion_jax.baselines.common import Baseline, Ranker
from recfusion_jax.data.examples import TrainExampleIndex
from recfusion_jax.data.types import RecDataset

# Tuned on valid.
GRID = [{"decay": 0.0}, {"decay": 0.5}, {"decay": 0.7}]
WINDOW = 8


def transition_probabilities(index: TrainExampleIndex, num_items: int) -> np.ndarray:
  """[N, N] float32: row j is the distribution of the item that follows j in a timeline
  (all zeros for an item never followed)."""
  same_user = index.user[1:] == index.user[:-1]
  counts = np.zeros((num_items, num_items), np.float32)
  np.add.at(counts, (index.item[:-1][same_user], index.item[1:][same_user]), 1.0)
  return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)


def recency_weights(history: np.ndarray, mask: np.ndarray, num_items: int, decay: float
                    ) -> np.ndarray:
  """[U, N] float32 from left-padded histories [U, L] (most recent last): the k-th latest
  item weighted decay^(k-1) (``decay=0``: the latest alone), padding weighted 0."""
  length = history.shape[1]
  age = np.arange(length)[::-1]                         # 0 for the latest slot
  per_slot = np.power(np.float32(decay), age)           # 0.0 ** 0 = 1: the latest alone
  weights = np.where(mask, per_slot[None, :], 0.0).astype(np.float32)
  out = np.zeros((history.shape[0], num_items), np.float32)
  np.add.at(out, (np.arange(history.shape[0])[:, None].repeat(length, 1), history), weights)
  return out


class MarkovChain(Baseline):
  """First-order transitions from ``dataset.train``; ``decay`` weighs the latest ``window``."""

  iterative = False

  def __init__(self, dataset: RecDataset, decay: float = 0.5, window: int = WINDOW):
    if not 0.0 <= decay < 1.0:
      raise ValueError(f"decay must be in [0, 1), got {decay}")
    if window < 1:
      raise ValueError(f"window must be >= 1, got {window}")
    self.dataset, self.decay, self.window = dataset, decay, window
    self.index = TrainExampleIndex.build(dataset)
    self.probabilities = transition_probabilities(self.index, dataset.catalogue.num_items)

  def ranker(self) -> Ranker:
    num_items = self.dataset.catalogue.num_items

    def user_reps(users: np.ndarray) -> dict[str, np.ndarray]:
      history, mask = self.index.user_history(np.asarray(users), self.window)
      return {"emb": recency_weights(history, mask, num_items, self.decay)}

    # dot_scores: <weights_u, P[:, i]> = sum_j weights_u[j] P[j, i].
    return Ranker(user_reps=user_reps, item_table={"emb": np.ascontiguousarray(
        self.probabilities.T)})
