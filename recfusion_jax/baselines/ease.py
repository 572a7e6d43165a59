"""EASE^R (Steck, 2019): a closed-form item-item linear autoencoder on the binary train matrix.

With X the [U, I] 0/1 train matrix and G = X^T X + lambda I, the item-item weights

  B = argmin_B ||X - X B||^2 + lambda ||B||^2   subject to diag(B) = 0

are B = I - P diag(1 / diag(P)) with P = G^{-1}: B_ij = -P_ij / P_jj off the diagonal, 0 on it.
A user's scores are x_u B. Only lambda is tuned (on valid).
"""

from __future__ import annotations

import numpy as np

from recfusion_jax.baselines.common import Baseline, Ranker, binary_matrix
from recfusion_jax.data.types import RecDataset

GRID = [{"reg": r} for r in (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)]


def ease_weights(x: np.ndarray, reg: float) -> np.ndarray:
  """[I, I] EASE^R weights of the 0/1 matrix ``x`` [U, I] (float64 solve, float32 result)."""
  x = np.asarray(x, np.float64)
  gram = x.T @ x
  gram[np.diag_indices_from(gram)] += reg
  p = np.linalg.inv(gram)
  b = -p / np.diag(p)[None, :]
  b[np.diag_indices_from(b)] = 0.0
  return b.astype(np.float32)


class EASE(Baseline):
  """EASE^R fitted on ``dataset.train`` with L2 strength ``reg``."""

  iterative = False

  def __init__(self, dataset: RecDataset, reg: float = 500.0):
    self.x = binary_matrix(dataset.train, dataset.num_users, dataset.catalogue.num_items)
    self.weights = ease_weights(self.x, reg)

  def ranker(self) -> Ranker:
    # scores = x_u B: the user side is the user's train row, the item side is column j of B.
    return Ranker(user_reps=lambda users: {"emb": self.x[users]},
                  item_table={"emb": np.ascontiguousarray(self.weights.T)})
