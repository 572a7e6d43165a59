"""SASRec (Kang & McAuley, 2018): a causal Transformer over item-ID sequences, in Flax NNX.

Every position of a user's (time ordered) train sequence predicts the next item. The model is
item embeddings (shared between input and output, as in the paper) + learned positions ->
the project's pre-LN ``Trunk`` with a causal mask -> hidden states h_t; score(t, i) = <h_t, e_i>.
The user representation for ranking is h at the last position of the user's most recent
``max_len`` train items.

Training: each user's sequence is cut, from its end, into windows of ``max_len + 1`` items
(consecutive windows share one item so every transition is used once); a window gives
``max_len`` (input, next item) pairs, right-aligned and left-padded, the same alignment as at
ranking time. Loss: sampled softmax of the true next item against ``num_negatives`` items
drawn uniformly per step and shared by the whole batch (uniform sampling: no logQ term
needed; a negative equal to the target is masked). An epoch is one jitted ``lax.scan``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recfusion_jax.baselines.common import Baseline, Ranker
from recfusion_jax.data.examples import TrainExampleIndex
from recfusion_jax.data.types import RecDataset
from recfusion_jax.models.transformer import Trunk

# Tuned on valid: only the number of epochs (scored every EVAL_EVERY up to MAX_EPOCHS).
GRID = [{"dropout": 0.2}]
MAX_EPOCHS = 60
EVAL_EVERY = 10


class SASRecModel(nnx.Module):
  """Item ids are shifted by one inside the model: id 0 is padding."""

  def __init__(self, num_items: int, *, max_len: int, dim: int, depth: int, num_heads: int,
               dropout: float, rngs: nnx.Rngs):
    self.dim = dim
    self.item_embeddings = nnx.Embed(num_items + 1, dim,
                                     embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.position_embeddings = nnx.Embed(max_len, dim,
                                         embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.trunk = Trunk(width=dim, depth=depth, num_heads=num_heads, mlp_dim=dim, pre_ln=True,
                       ln_eps=1e-6, activation="relu", dropout=dropout, rngs=rngs)

  def __call__(self, seq: jax.Array) -> jax.Array:
    """Shifted item ids [B, L] (0 = padding) -> hidden states [B, L, d]."""
    mask = seq > 0
    x = self.item_embeddings(seq) * jnp.sqrt(self.dim).astype(jnp.float32)
    x = self.dropout(x + self.position_embeddings(jnp.arange(seq.shape[1]))[None])
    x = self.trunk(x * mask[..., None], mask, causal=True)
    return x * mask[..., None]

  def output_embeddings(self) -> jax.Array:
    """[num_items, d] embeddings of the real items (padding row dropped)."""
    return self.item_embeddings.embedding[...][1:]


def sampled_softmax_loss(hidden: jax.Array, targets: jax.Array, item_emb: jax.Array,
                         negatives: jax.Array) -> jax.Array:
  """Mean cross-entropy of ``targets`` [B, L] (shifted ids, 0 = no target) vs shared negatives.

  ``item_emb`` [I + 1, d] is indexed by shifted ids; ``negatives`` [N] are shifted ids.
  """
  pos = jnp.sum(hidden * item_emb[targets], axis=-1)                    # [B, L]
  neg = jnp.einsum("bld,nd->bln", hidden, item_emb[negatives])          # [B, L, N]
  neg = jnp.where(negatives[None, None, :] == targets[..., None], -jnp.inf, neg)
  loss = jax.nn.logsumexp(jnp.concatenate([pos[..., None], neg], -1), axis=-1) - pos
  valid = (targets > 0).astype(jnp.float32)
  return jnp.sum(loss * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def training_windows(dataset: RecDataset, max_len: int) -> np.ndarray:
  """[W, max_len + 1] shifted item ids, right-aligned, 0-padded (see the module docstring)."""
  index = TrainExampleIndex.build(dataset)
  rows = []
  for start, end in zip(index.user_start, index.user_end):
    seq = index.item[start:end] + 1
    b = seq.size
    while b >= 2:
      a = max(0, b - max_len - 1)
      row = np.zeros(max_len + 1, np.int32)
      row[max_len + 1 - (b - a):] = seq[a:b]
      rows.append(row)
      b = a + 1 if a > 0 else 0
  if not rows:
    raise ValueError(f"{dataset.name}: no user has two train items")
  return np.stack(rows)


class SASRec(Baseline):
  """SASRec on ``dataset.train`` (sequences in time order)."""

  iterative = True

  def __init__(self, dataset: RecDataset, *, max_len: int = 50, dim: int = 64, depth: int = 2,
               num_heads: int = 1, dropout: float = 0.2, learning_rate: float = 1e-3,
               batch_size: int = 128, num_negatives: int = 256, seed: int = 0):
    self.dataset = dataset
    self.max_len = max_len
    self.num_items = dataset.catalogue.num_items
    self.windows = jnp.asarray(training_windows(dataset, max_len))
    self.key = jax.random.key(seed)
    model = SASRecModel(self.num_items, max_len=max_len, dim=dim, depth=depth,
                        num_heads=num_heads, dropout=dropout, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
    self.graphdef, self.state = nnx.split((model, optimizer))
    num_windows = int(self.windows.shape[0])
    steps = -(-num_windows // batch_size)
    num_negatives = min(num_negatives, self.num_items)

    def step(carry, xs):
      state, windows = carry
      rows, key = xs
      model, optimizer = nnx.merge(self.graphdef, state)
      batch = windows[rows]
      negatives = jax.random.randint(key, (num_negatives,), 1, self.num_items + 1)

      def loss_fn(model):
        hidden = model(batch[:, :-1])
        return sampled_softmax_loss(hidden, batch[:, 1:], model.item_embeddings.embedding[...],
                                    negatives)

      loss, grads = nnx.value_and_grad(loss_fn)(model)
      optimizer.update(model, grads)
      return (nnx.state((model, optimizer)), windows), loss

    @jax.jit
    def epoch(state, windows, key):
      k_perm, k_steps = jax.random.split(key)
      # The last batch is topped up by repeating the permutation (fewer windows than one
      # batch repeat it several times).
      order = jnp.tile(jax.random.permutation(k_perm, num_windows),
                       -(-steps * batch_size // num_windows))[:steps * batch_size]
      (state, _), losses = jax.lax.scan(
          step, (state, windows),
          (order.reshape(steps, batch_size), jax.random.split(k_steps, steps)))
      return state, jnp.mean(losses)

    self._epoch = epoch

    def encode(state, seq):
      model, _ = nnx.merge(self.graphdef, state)
      model.eval()
      return model(seq)[:, -1], model.output_embeddings()

    self._encode = jax.jit(encode)

  def train(self, epochs: int) -> list[float]:
    losses = []
    for _ in range(epochs):
      self.key, key = jax.random.split(self.key)
      self.state, loss = self._epoch(self.state, self.windows, key)
      losses.append(float(loss))
    return losses

  def ranker(self) -> Ranker:
    index = TrainExampleIndex.build(self.dataset)
    history, mask = index.user_history(np.arange(self.dataset.num_users), self.max_len)
    users, items = (np.asarray(x) for x in self._encode(self.state,
                                                        np.where(mask, history + 1, 0)))
    return Ranker(user_reps=lambda u: {"emb": users[u]}, item_table={"emb": items})
