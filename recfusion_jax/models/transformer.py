"""The Transformer trunk shared by every modality.

Parameter names and layouts follow Hugging Face BERT/ViT/CLIP closely (separate query/key/value
projections, two-layer MLP, LayerNorm placement switchable between post-LN and pre-LN) so that
`recfusion_jax.convert` can map pretrained checkpoints onto it one tensor at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),   # BERT/ViT use the exact erf form
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP
    "relu": jax.nn.relu,
}

# Finite instead of -inf: a row whose keys are all masked (an absent modality) then gets uniform
# attention and finite output, never NaN.
_MASK_VALUE = -1e9


class Attention(nnx.Module):
  """Multi-head self-attention with [width, width] projections (the HF layout)."""

  def __init__(self, width: int, num_heads: int, dropout: float, *, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.query = nnx.Linear(width, width, rngs=rngs)
    # No key bias: q.(k + b) = q.k + q.b shifts every logit of a query equally, and softmax
    # ignores that, so the bias has no effect and no gradient (pretrained key biases are
    # dropped on import with no change in outputs).
    self.key = nnx.Linear(width, width, use_bias=False, rngs=rngs)
    self.value = nnx.Linear(width, width, rngs=rngs)
    self.out = nnx.Linear(width, width, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array, causal: bool = False) -> jax.Array:
    b, n, width = x.shape
    head_dim = width // self.num_heads

    def heads(t):
      return t.reshape(b, n, self.num_heads, head_dim)

    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
    allowed = mask[:, None, None, :]
    if causal:
      allowed = allowed & jnp.tril(jnp.ones((n, n), dtype=bool))[None, None]
    logits = jnp.where(allowed, logits, _MASK_VALUE)
    probs = self.dropout(jax.nn.softmax(logits, axis=-1))
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, width)
    return self.out(out)


class Block(nnx.Module):
  """One Transformer layer; ``pre_ln`` picks ViT/CLIP (True) or BERT (False) ordering."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, pre_ln: bool, ln_eps: float,
               activation: str, dropout: float, rngs: nnx.Rngs):
    self.pre_ln = pre_ln
    self.activation = activation
    self.attention = Attention(width, num_heads, dropout, rngs=rngs)
    self.attention_norm = nnx.LayerNorm(width, epsilon=ln_eps, rngs=rngs)
    self.mlp_in = nnx.Linear(width, mlp_dim, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_dim, width, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(width, epsilon=ln_eps, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def _mlp(self, x):
    return self.dropout(self.mlp_out(ACTIVATIONS[self.activation](self.mlp_in(x))))

  def __call__(self, x: jax.Array, mask: jax.Array, causal: bool = False) -> jax.Array:
    if self.pre_ln:
      x = x + self.dropout(self.attention(self.attention_norm(x), mask, causal))
      return x + self._mlp(self.mlp_norm(x))
    x = self.attention_norm(x + self.dropout(self.attention(x, mask, causal)))
    return self.mlp_norm(x + self._mlp(x))


class Trunk(nnx.Module):
  """A stack of blocks; pre-LN trunks end with a final LayerNorm (ViT ``layernorm``)."""

  def __init__(self, *, width: int, depth: int, num_heads: int, mlp_dim: int, pre_ln: bool,
               ln_eps: float, activation: str, dropout: float, rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
    self.layers = nnx.List([
        Block(width, num_heads, mlp_dim, pre_ln=pre_ln, ln_eps=ln_eps, activation=activation,
              dropout=dropout, rngs=rngs)
        for _ in range(depth)
    ])
    # Post-LN blocks already end normalised; a pre-LN stack needs one more norm.
    self.final_norm = nnx.LayerNorm(width, epsilon=ln_eps, rngs=rngs) if pre_ln else None

  def __call__(self, x: jax.Array, mask: jax.Array, causal: bool = False) -> jax.Array:
    for layer in self.layers:
      x = layer(x, mask, causal)
    return self.final_norm(x) if self.final_norm is not None else x
