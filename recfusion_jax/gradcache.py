"""Gradient caching through the content encoder (GradCache, Gao et al. 2021).

The in-batch softmax and the contrastive term couple every row of the global batch, so the
batch cannot be cut into gradient-accumulation steps. But the part whose activations grow with
the batch -- the content encoder -- reaches the loss only through its output, the embeddings
[B, M, d]. So a step (``config.micro_batch`` > 0) runs in three stages:

  1. encode every micro-batch of the batch's content (``lax.scan``, nothing kept for a
     backward pass: only each micro-batch's [mb, M, d] embeddings leave an iteration);
  2. the loss of the whole batch from those embeddings (the encoder is not run): its value,
     the gradient of every parameter outside the encoder, and d loss / d embeddings;
  3. re-encode each micro-batch under ``jax.vjp`` and pull its slice of d loss / d embeddings
     back to the encoder's parameters, summed over the micro-batches (``lax.scan``).

The encoder's activation memory is then that of one micro-batch; the price is a second
forward pass of the encoder. The user model, fusion and losses still run on the whole batch
(their activations are O(B) vectors and the [B, B] logits).

Randomness: the encoder's non-parameter state (the RNG streams of its dropout layers) is
carried through the micro-batches of pass 1, and pass 2 restarts from the same state, so
every micro-batch sees the same dropout masks in both passes; the state after pass 1 is kept.
The gradient is exactly that of the micro-batched forward pass. With encoder dropout 0 (the
default) that is the one-shot step's gradient; with dropout > 0 the masks are drawn once per
micro-batch instead of once per batch: the same distribution, not the same numbers as the
one-shot step.

Layout: with the batch's rows split over ``shards`` devices (row r on device r // (B/shards)),
micro-batch i is rows [i * mb_s, (i + 1) * mb_s) of every device's share (mb_s = micro_batch /
shards), so each device encodes its own rows and no row crosses devices.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

# (model, batch, content=(content_emb, presence)) -> (loss, aux): ``train.compute_losses``
# with its settings bound.
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


def _encode(graphdef: nnx.GraphDef, params: nnx.State, other: nnx.State,
            content: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, nnx.State]:
  """One micro-batch through the encoder: (emb, presence, its non-parameter state after)."""
  # Fresh Variables: pass 2 merges a scan carry inside jax.vjp, a deeper trace than the one
  # that made the carry's Variables, and nnx refuses to mutate (advance an RNG count of)
  # a Variable from another trace.
  encoder = nnx.merge(graphdef, params, other, copy=True)
  emb, presence = encoder(content)
  return emb, presence, nnx.split(encoder, nnx.Param, ...)[2]


def encode_micro_batches(graphdef: nnx.GraphDef, params: nnx.State, other: nnx.State,
                         content: Mapping[str, jax.Array], num: int, shards: int = 1
                         ) -> tuple[jax.Array, jax.Array, nnx.State]:
  """Pass 1: (emb [B, M, d], presence [B, M], the encoder's state after the last micro-batch).

  Differentiable too (the tests take its gradient directly, as a reference for pass 2).
  """
  xs = {k: split_micro(v, num, shards) for k, v in content.items()}

  def body(state, micro):
    emb, presence, state = _encode(graphdef, params, state, micro)
    return state, (emb, presence)

  other, (emb, presence) = jax.lax.scan(body, other, xs)
  return merge_micro(emb, shards), merge_micro(presence, shards), other


def encoder_grads(graphdef: nnx.GraphDef, params: nnx.State, other: nnx.State,
                  content: Mapping[str, jax.Array], emb_grad: jax.Array, num: int,
                  shards: int = 1) -> nnx.State:
  """Pass 2: sum over micro-batches of (d emb_i / d params)^T (d loss / d emb_i).

  ``other`` must be the state pass 1 started from: each micro-batch then draws the same
  dropout masks as it did there.
  """
  xs = ({k: split_micro(v, num, shards) for k, v in content.items()},
        split_micro(emb_grad, num, shards))

  def body(carry, x):
    total, state = carry
    micro, grad_out = x

    def forward(p):
      emb, _, after = _encode(graphdef, p, state, micro)
      return emb, after

    emb, pullback, state = jax.vjp(forward, params, has_aux=True)
    (grad,) = pullback(grad_out.astype(emb.dtype))
    return (jax.tree.map(jnp.add, total, grad), state), None

  (total, _), _ = jax.lax.scan(body, (jax.tree.map(jnp.zeros_like, params), other), xs)
  return total


def loss_and_grads(model: Any, batch: Mapping[str, jax.Array], loss_fn: LossFn, *,
                   micro_batch: int, shards: int = 1
                   ) -> tuple[tuple[jax.Array, dict[str, jax.Array]], nnx.State]:
  """((loss, aux), grads of every ``nnx.Param`` of ``model``) by gradient caching.

  What ``nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)``
  gives for ``(model, batch)`` (see the module docstring for dropout), with the encoder run
  ``micro_batch`` rows at a time. ``shards``: how many devices the batch's rows are split
  over (the layout). Updates the model's RNG state as the one-shot step would.
  """
  if not model.modalities:
    raise ValueError("micro_batch > 0 needs a content encoder; this model has no modalities "
                     "(an ID-only model has no encoder activations to save: set micro_batch=0)")
  encoder = model.encoder
  graphdef, params, other = nnx.split(encoder, nnx.Param, ...)
  content = {k: batch[k] for k in encoder.input_keys()}
  num = num_micro_batches(batch["item_id"].shape[0], micro_batch, shards)

  emb, presence, other_after = encode_micro_batches(graphdef, params, other, content, num,
                                                    shards)

  def batch_loss(model, emb):
    return loss_fn(model, batch, content=(emb, presence))

  # The encoder is not run here: its parameters get zero gradients, filled in by pass 2.
  grad_fn = nnx.value_and_grad(batch_loss, argnums=(nnx.DiffState(0, nnx.Param), 1),
                               has_aux=True)
  (loss, aux), (grads, emb_grad) = grad_fn(model, emb)
  enc_grads = encoder_grads(graphdef, params, other, content, emb_grad, num, shards)
  grads["encoder"] = jax.tree.map(jnp.add, grads["encoder"], enc_grads)
  nnx.update(encoder, other_after)
  return (loss, aux), grads
