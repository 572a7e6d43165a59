"""Gradient caching through the content encoder and the user tower (GradCache, Gao et al.
2021).

The in-batch softmax and the contrastive term couple every row of the global batch, so the
batch cannot be cut into gradient-accumulation steps. But the parts whose activations grow with
the batch -- the content encoder and the user tower (``RecFusion.encode_users``: history
vectors, their gated fusion, the user Transformer) -- reach the loss only through their
outputs, the embeddings [B, M, d] and the users ({"emb": [B, d] or [B, L, d] per position,
"query": or None}). So a step (``config.micro_batch`` > 0) runs in three stages:

  1. encode every micro-batch of the batch's content, and of its users (``lax.scan``, nothing
     kept for a backward pass: only each micro-batch's outputs leave an iteration);
  2. the loss of the whole batch from those outputs (neither tower is run): its value, the
     gradient of every parameter used there directly, d loss / d embeddings and d loss / d users;
  3. re-run each micro-batch under ``jax.vjp`` and pull its slice of those gradients back to
     the parameters, summed over the micro-batches (``lax.scan``): the encoder's parameters
     from the embeddings, every parameter outside the encoder from the users (the user model,
     ID and history tables, history context, fusion query/gate/key ...), added to the direct
     gradients of stage 2.

The towers' activation memory is then that of one micro-batch; the price is a second forward
pass of each. What remains at the batch's size is O(B) vectors, plus the [B, B] logits unless
the losses are tiled (``config.loss_tile``).

Randomness: each tower's non-parameter state (the RNG streams of its dropout layers: the
encoder's, and the user model's dropout and history dropout -- the ID dropout is drawn in the
loss, not in ``encode_users``) is carried through the micro-batches of pass 1, and pass 2
restarts from the same state, so every micro-batch sees the same dropout masks in both passes;
the state after pass 1 is kept. The gradient is exactly that of the micro-batched forward
pass. With encoder and user dropout 0 (the defaults) that is the one-shot step's gradient;
with dropout > 0 the masks are drawn once per micro-batch instead of once per batch: the same
distribution, not the same numbers as the one-shot step.

Layout: with the batch's rows split over ``shards`` devices (row r on device r // (B/shards)),
micro-batch i is rows [i * mb_s, (i + 1) * mb_s) of every device's share (mb_s = micro_batch /
shards), so each device encodes its own rows and no row crosses devices.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

# (model, batch, content=(content_emb, presence), users=users) -> (loss, aux):
# ``train.compute_losses`` with its settings bound.
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def num_micro_batches(batch_size: int, micro_batch: int, shards: int = 1) -> int:
  """How many micro-batches a batch has; raises ValueError when they do not tile it."""
  if micro_batch < 1:
    raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
  if batch_size % micro_batch:
    raise ValueError(f"micro_batch {micro_batch} does not divide the batch of {batch_size}")
  if micro_batch % shards:
    raise ValueError(f"micro_batch {micro_batch} does not divide over the batch's {shards} "
                     "devices")
  return batch_size // micro_batch


def split_micro(x: jax.Array, num: int, shards: int = 1) -> jax.Array:
  """[B, ...] -> [num, B / num, ...] in the layout of the module docstring."""
  b, rest = x.shape[0], x.shape[1:]
  x = x.reshape((shards, num, b // (shards * num)) + rest)
  return jnp.swapaxes(x, 0, 1).reshape((num, b // num) + rest)


def merge_micro(x: jax.Array, shards: int = 1) -> jax.Array:
  """The inverse of ``split_micro``: [num, mb, ...] -> [num * mb, ...]."""
  num, mb, rest = x.shape[0], x.shape[1], x.shape[2:]
  x = x.reshape((num, shards, mb // shards) + rest)
  return jnp.swapaxes(x, 0, 1).reshape((num * mb,) + rest)


# A tower is ``(params, state, micro) -> (out, state after)``: the content encoder or the user
# tower on one micro-batch, ``state`` its non-parameter Variables (RNG streams). Both passes
# below scan a tower over the micro-batches, threading ``state``.


def _scan_forward(tower, params: nnx.State, state: nnx.State, xs: Any, num: int,
                  shards: int) -> tuple[Any, nnx.State]:
  """Pass 1: (the tower's outputs over the whole batch, its state after the last micro-batch)."""
  def body(state, micro):
    out, state = tower(params, state, micro)
    return state, out

  state, out = jax.lax.scan(body, state, jax.tree.map(lambda v: split_micro(v, num, shards), xs))
  return jax.tree.map(lambda x: merge_micro(x, shards), out), state


def _scan_vjp(tower, params: nnx.State, state: nnx.State, xs: Any, out_grad: Any, num: int,
              shards: int) -> nnx.State:
  """Pass 2: sum over micro-batches of (d out_i / d params)^T out_grad_i. ``state`` must be
  the one pass 1 started from: each micro-batch then draws the dropout masks it drew there."""
  split = lambda tree: jax.tree.map(lambda v: split_micro(v, num, shards), tree)

  def body(carry, x):
    total, state = carry
    micro, grad_out = x
    out, pullback, state = jax.vjp(lambda p: tower(p, state, micro), params, has_aux=True)
    (grad,) = pullback(jax.tree.map(lambda g, o: g.astype(o.dtype), grad_out, out))
    return (jax.tree.map(jnp.add, total, grad), state), None

  (total, _), _ = jax.lax.scan(body, (jax.tree.map(jnp.zeros_like, params), state),
                               (split(xs), split(out_grad)))
  return total


def _encoder_tower(graphdef: nnx.GraphDef, with_presence: bool = True):
  """The content encoder as a tower: out = (emb, presence), or emb alone (for pass 2)."""
  def tower(params, state, content):
    # Fresh Variables: pass 2 merges a scan carry inside jax.vjp, a deeper trace than the one
    # that made the carry's Variables, and nnx refuses to mutate (advance an RNG count of)
    # a Variable from another trace.
    encoder = nnx.merge(graphdef, params, state, copy=True)
    emb, presence = encoder(content)
    after = nnx.split(encoder, nnx.Param, ...)[2]
    return ((emb, presence) if with_presence else emb), after
  return tower


def encode_micro_batches(graphdef: nnx.GraphDef, params: nnx.State, other: nnx.State,
                         content: Mapping[str, jax.Array], num: int, shards: int = 1
                         ) -> tuple[jax.Array, jax.Array, nnx.State]:
  """Pass 1: (emb [B, M, d], presence [B, M], the encoder's state after the last micro-batch).

  Differentiable too (the tests take its gradient directly, as a reference for pass 2).
  """
  (emb, presence), other = _scan_forward(_encoder_tower(graphdef), params, other, content, num,
                                         shards)
  return emb, presence, other


def encoder_grads(graphdef: nnx.GraphDef, params: nnx.State, other: nnx.State,
                  content: Mapping[str, jax.Array], emb_grad: jax.Array, num: int,
                  shards: int = 1) -> nnx.State:
  """Pass 2 of the encoder; ``other`` as pass 1 started from it."""
  return _scan_vjp(_encoder_tower(graphdef, with_presence=False), params, other, content,
                   emb_grad, num, shards)


# The user tower: every parameter outside the content encoder (what ``encode_users`` reads
# is a subset; the rest get zero gradients from pass 2).
_USER_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("encoder")))
USER_KEYS = ("user_id", "user_has_id", "history", "history_mask")


def _user_tower(graphdef: nnx.GraphDef, rest: nnx.State, per_position: bool):
  """``encode_users`` as a tower whose state is the model's RNG streams."""
  def tower(params, rng, inputs):
    model = nnx.merge(graphdef, params, rng, rest, copy=True)  # fresh Variables, as above
    users = model.encode_users(*(inputs[k] for k in USER_KEYS), per_position=per_position,
                               fixed_terms=False)   # weight 0 in training
    return users, nnx.state(model, nnx.RngState)
  return tower


def encode_users_micro_batches(graphdef: nnx.GraphDef, params: nnx.State, rng: nnx.State,
                               rest: nnx.State, inputs: Mapping[str, jax.Array], num: int,
                               shards: int = 1, per_position: bool = False
                               ) -> tuple[dict[str, Any], nnx.State]:
  """User pass 1: (``encode_users`` of the batch, the RNG state after the last micro-batch)."""
  return _scan_forward(_user_tower(graphdef, rest, per_position), params, rng,
                       {k: inputs[k] for k in USER_KEYS}, num, shards)


def user_grads(graphdef: nnx.GraphDef, params: nnx.State, rng: nnx.State, rest: nnx.State,
               inputs: Mapping[str, jax.Array], users_grad: Mapping[str, Any], num: int,
               shards: int = 1, per_position: bool = False) -> nnx.State:
  """User pass 2; ``rng`` as user pass 1 started from it."""
  return _scan_vjp(_user_tower(graphdef, rest, per_position), params, rng,
                   {k: inputs[k] for k in USER_KEYS}, users_grad, num, shards)


def loss_and_grads(model: Any, batch: Mapping[str, jax.Array], loss_fn: LossFn, *,
                   micro_batch: int, shards: int = 1
                   ) -> tuple[tuple[jax.Array, dict[str, jax.Array]], nnx.State]:
  """((loss, aux), grads of every ``nnx.Param`` of ``model``) by gradient caching.

  What ``nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)``
  gives for ``(model, batch)`` (see the module docstring for dropout), with the encoder and
  the user tower run ``micro_batch`` rows at a time. ``shards``: how many devices the batch's
  rows are split over (the layout). Updates the model's RNG state as the one-shot step would.
  """
  if not model.modalities:
    raise ValueError("micro_batch > 0 needs a content encoder; this model has no modalities "
                     "(an ID-only model has no encoder activations to save: set micro_batch=0)")
  encoder = model.encoder
  # Copies (tree.map makes new Variables): split states share the model's Variables, which
  # the updates below change, and pass 2 must restart from the states pass 1 started from.
  graphdef, params, other = jax.tree.map(lambda x: x, nnx.split(encoder, nnx.Param, ...))
  model_def, user_params, rng, rest = jax.tree.map(
      lambda x: x, nnx.split(model, _USER_PARAMS, nnx.RngState, ...))
  content = {k: batch[k] for k in encoder.input_keys()}
  inputs = {k: batch[k] for k in USER_KEYS}
  per_position = "targets" in batch and model.user_encoder.causal
  num = num_micro_batches(batch["item_id"].shape[0], micro_batch, shards)

  emb, presence, other_after = encode_micro_batches(graphdef, params, other, content, num,
                                                    shards)
  users, rng_after = encode_users_micro_batches(model_def, user_params, rng, rest, inputs, num,
                                                shards, per_position)
  # The user tower's streams where user pass 1 left them (the encoder's as they were; the
  # loss below draws the rest, e.g. the ID dropout, from where they stand).
  nnx.update(model, rng_after)

  def batch_loss(model, emb, users):
    return loss_fn(model, batch, content=(emb, presence), users=users)

  # Neither the encoder nor the user tower runs here: their parameters get zero gradients
  # (or only their direct ones), completed by the passes 2.
  grad_fn = nnx.value_and_grad(batch_loss, argnums=(nnx.DiffState(0, nnx.Param), 1, 2),
                               has_aux=True)
  (loss, aux), (grads, emb_grad, users_grad) = grad_fn(model, emb, users)
  enc_grads = encoder_grads(graphdef, params, other, content, emb_grad, num, shards)
  grads["encoder"] = jax.tree.map(jnp.add, grads["encoder"], enc_grads)
  from_users = user_grads(model_def, user_params, rng, rest, inputs, users_grad, num, shards,
                          per_position)
  grads = nnx.merge_state(grads, jax.tree.map(jnp.add, nnx.filter_state(grads, _USER_PARAMS), from_users))
  nnx.update(encoder, other_after)
  return (loss, aux), grads
