"""LightGCN (He et al., 2020): linear propagation of ID embeddings over the user-item graph.

With A the (U + I) x (U + I) adjacency of the train pairs and D its degrees, the normalised
adjacency is A_hat = D^-1/2 A D^-1/2; the layers are E_{k+1} = A_hat E_k and the final
embedding is the mean of E_0..E_K. A_hat is applied as a sparse matrix product over the edge
list (gather the neighbours, scale by 1 / sqrt(d_u d_i), ``segment_sum`` into the targets):
O(edges x d) per layer instead of the dense O(nodes^2 x d). Trained with BPR (uniform
negatives) and an L2 penalty on the batch rows of E_0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from recfusion_jax.baselines.common import BprEmbeddings, unique_pairs
from recfusion_jax.data.types import RecDataset

# Large batches: every step propagates the whole graph, so steps (not examples) cost time.
GRID = [{"learning_rate": 3e-2, "reg": reg} for reg in (1e-4, 1e-3)]
MAX_EPOCHS = 80
EVAL_EVERY = 10


def normalized_edges(users: np.ndarray, items: np.ndarray, num_users: int,
                     num_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The non-zeros of A_hat as (source node, target node, weight), both edge directions.

  Nodes are users 0..U-1 then items U..U+I-1. ``users``/``items`` must be distinct pairs.
  """
  item_nodes = items.astype(np.int64) + num_users
  degree = np.bincount(np.concatenate([users, item_nodes]), minlength=num_users + num_items)
  weight = 1.0 / np.sqrt(degree[users] * degree[item_nodes])
  src = np.concatenate([users, item_nodes]).astype(np.int32)
  dst = np.concatenate([item_nodes, users]).astype(np.int32)
  return src, dst, np.concatenate([weight, weight]).astype(np.float32)


def propagate(e0: jax.Array, src: jax.Array, dst: jax.Array, weight: jax.Array,
              num_layers: int) -> jax.Array:
  """mean(E_0, A_hat E_0, ..., A_hat^K E_0) for node embeddings ``e0`` [N, d]."""
  layers = [e0]
  for _ in range(num_layers):
    layers.append(jax.ops.segment_sum(weight[:, None] * layers[-1][src], dst,
                                      num_segments=e0.shape[0]))
  return jnp.mean(jnp.stack(layers), axis=0)


class LightGCN(BprEmbeddings):
  """LightGCN on ``dataset.train``: ``num_layers`` propagation layers of ``dim``-d embeddings."""


  def __init__(self, dataset: RecDataset, *, dim: int = 64, num_layers: int = 3,
               learning_rate: float = 3e-2, reg: float = 1e-3, batch_size: int = 8192,
               seed: int = 0):
    self.num_users, num_items = dataset.num_users, dataset.catalogue.num_items
    self.pair_users, self.pair_items = unique_pairs(dataset.train)
    graph = tuple(jnp.asarray(a) for a in normalized_edges(
        self.pair_users, self.pair_items, self.num_users, num_items))
    k_user, k_item, self.key = jax.random.split(jax.random.key(seed), 3)
    self.params = {"user": 0.1 * jax.random.normal(k_user, (self.num_users, dim)),
                   "item": 0.1 * jax.random.normal(k_item, (num_items, dim))}

    def embed(params):
      nodes = propagate(jnp.concatenate([params["user"], params["item"]]), *graph, num_layers)
      return nodes[:self.num_users], nodes[self.num_users:]

    self._init_bpr(embed, learning_rate=learning_rate, batch_size=batch_size, reg=reg,
                   num_items=num_items)
