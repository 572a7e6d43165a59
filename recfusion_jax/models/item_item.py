"""The closed-form item-item prior of ``model.item_item="ease"``, fitted on training data.

EASE (``baselines.ease``) gives W; its scores x_u W are a regression onto 0/1, on no softmax's
scale, so the model multiplies them by a learned scale. That scale starts where the prior
alone best fits the training interactions as a softmax (``softmax_scale``): Adam moves a scalar
by about the learning rate a step, too slowly to find a scale of tens from 1.
"""

from __future__ import annotations

import numpy as np

from recfusion_jax.baselines.common import binary_matrix
from recfusion_jax.baselines.ease import ease_weights
from recfusion_jax.data.types import RecDataset

SCALE_GRID = tuple(float(s) for s in np.geomspace(1.0, 256.0, 17))


def softmax_scale(x: np.ndarray, weights: np.ndarray, grid: tuple[float, ...] = SCALE_GRID
                  ) -> float:
  """The s of ``grid`` minimising the mean softmax cross-entropy of s * x_u W over every
  training pair (u, i), each scored against the items the user has not interacted with -- the
  negatives of training with ``exclude_history``. W's zero diagonal keeps a pair's own entry
  out of its score, so each pair is predicted from the user's other items."""
  x = np.asarray(x, np.float32)
  scores = x @ weights                                          # [U, N]
  negative = x == 0
  best, best_loss = grid[0], np.inf
  for s in grid:
    logits = s * scores
    peak = logits.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):   # a user with no negative: log 0 = -inf, fine below
      log_neg = np.log(np.sum(np.exp(logits - peak) * negative, axis=1, keepdims=True))
    # -log softmax of the positive among itself and the negatives.
    loss = np.logaddexp(logits - peak, log_neg) - (logits - peak)
    mean = float(np.sum(np.where(x > 0, loss, 0.0)) / np.sum(x))
    if mean < best_loss:
      best, best_loss = s, mean
  return best


def _ease_of(dataset: RecDataset, reg: float) -> tuple[np.ndarray, np.ndarray]:
  x = binary_matrix(dataset.train, dataset.num_users, dataset.catalogue.num_items)
  return x, ease_weights(x, reg)


def ease_weights_of(dataset: RecDataset, reg: float) -> np.ndarray:
  """W [N, N]: EASE's weights on ``dataset.train``."""
  return _ease_of(dataset, reg)[1]


def ease_prior(dataset: RecDataset, reg: float) -> tuple[np.ndarray, float]:
  """(W [N, N], initial scale) from ``dataset.train``: EASE's weights and ``softmax_scale``."""
  x, weights = _ease_of(dataset, reg)
  return weights, softmax_scale(x, weights)
