"""The Transformer trunk shared by every modality.

Parameter names and layouts follow Hugging Face BERT/ViT/CLIP closely (separate query/key/value
projections, two-layer MLP, LayerNorm placement switchable between post-LN and pre-LN) so that
`recfusion_jax.convert` can map pretrained checkpoints onto it one tensor at a time.

Memory options (none changes a parameter's name, shape or dtype):
  ``remat``          recompute each block's activations in the backward pass (``nnx.remat``):
                     activation memory of one block instead of ``depth`` blocks;
  ``compute_dtype``  "bfloat16": activations and matmuls in bf16, parameters stay float32 (so
                     do optimizer states); LayerNorm statistics and attention softmax in float32;
  ``attention``      "dot_product": ``jax.nn.dot_product_attention`` (fused kernels on GPU)
                     instead of the explicit einsum; it has no attention-probability dropout.

``experts`` makes a Multiway trunk (BEiT-3, VLMo): attention shared by every token, LayerNorms
and MLPs of their own for the named modalities' tokens (``Block``).
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

ATTENTIONS = ("einsum", "dot_product")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(name: str):
  """The jnp dtype of a ``compute_dtype`` config string."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype={name!r}; choose from {sorted(COMPUTE_DTYPES)}")
  return COMPUTE_DTYPES[name]


def _dense_f32_accumulate(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32).astype(x.dtype)


# Why by hand: XLA:CPU sends a bf16 x bf16 -> bf16 matmul to a slow generic loop, and bf16
# inputs with a float32 result to oneDNN's AMX kernels (~3.5x the float32 peak on this CPU,
# perf/step_speed.py). ``preferred_element_type`` alone does not reach the backward pass: the
# cotangent arriving through the cast back to bf16 is float32, so the input-gradient matmul
# would run in float32. The VJP below keeps both of its operands bf16 and accumulates in f32.
@jax.custom_vjp
def dense_bf16(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``x @ kernel`` over x's last axis for bf16 operands, float32 accumulation, bf16 result."""
  return _dense_f32_accumulate(x, kernel)


def _dense_bf16_fwd(x, kernel):
  return _dense_f32_accumulate(x, kernel), (x, kernel)


def _dense_bf16_bwd(residuals, g):
  x, kernel = residuals
  g = g.astype(x.dtype)
  dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32).astype(x.dtype)
  lead = tuple(range(x.ndim - 1))
  dkernel = jax.lax.dot_general(x, g, ((lead, lead), ((), ())),
                                preferred_element_type=jnp.float32).astype(kernel.dtype)
  return dx, dkernel


dense_bf16.defvjp(_dense_bf16_fwd, _dense_bf16_bwd)


def amx_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                    out_sharding=None):
  """``nnx.Linear``'s ``dot_general`` in bf16 compute: ``dense_bf16`` for its one contraction
  (lhs's last axis with the kernel's first), ``lax.dot_general`` for anything else."""
  (lhs_contract, rhs_contract), batch = dimension_numbers
  is_linear_bf16 = (lhs.dtype == jnp.bfloat16 and rhs.dtype == jnp.bfloat16 and rhs.ndim == 2
           and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
           and batch == ((), ()) and preferred_element_type is None and out_sharding is None)
  if is_linear_bf16:
    return dense_bf16(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type,
                             out_sharding=out_sharding)


def linear(in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs,
           **kwargs) -> nnx.Linear:
  """``nnx.Linear`` whose bf16 matmuls take ``dense_bf16`` (float32 parameters either way)."""
  if dtype == jnp.bfloat16:
    kwargs["dot_general"] = amx_dot_general
  return nnx.Linear(in_features, out_features, dtype=dtype, rngs=rngs, **kwargs)


class Attention(nnx.Module):
  """Multi-head self-attention with [width, width] projections (the HF layout)."""

  def __init__(self, width: int, num_heads: int, dropout: float, *, implementation: str = "einsum",
               dtype=jnp.float32, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    if implementation not in ATTENTIONS:
      raise ValueError(f"attention={implementation!r}; choose from {ATTENTIONS}")
    if implementation == "dot_product" and dropout > 0:
      raise ValueError("attention='dot_product' has no attention-probability dropout; set "
                       f"dropout=0 or attention='einsum' (dropout={dropout})")
    self.num_heads = num_heads
    self.implementation = implementation
    self.dtype = dtype
    projection = lambda **kw: linear(width, width, dtype=dtype, rngs=rngs, **kw)
    self.query = projection()
    # No key bias: q.(k + b) = q.k + q.b shifts every logit of a query equally, and softmax
    # ignores that, so the bias has no effect and no gradient (pretrained key biases are
    # dropped on import with no change in outputs).
    self.key = projection(use_bias=False)
    self.value = projection()
    self.out = projection()
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array, causal: bool = False) -> jax.Array:
    b, n, width = x.shape
    head_dim = width // self.num_heads

    def heads(t):
      return t.reshape(b, n, self.num_heads, head_dim)

    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    allowed = mask[:, None, None, :]
    if self.implementation == "dot_product":
      out = jax.nn.dot_product_attention(q, k, v, mask=allowed, is_causal=causal)
      return self.out(out.reshape(b, n, width))
    # Logits and softmax in float32 whatever the compute dtype (exp of bf16 logits loses bits).
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(head_dim))
    if causal:
      allowed = allowed & jnp.tril(jnp.ones((n, n), dtype=bool))[None, None]
    logits = jnp.where(allowed, logits, _MASK_VALUE)
    probs = self.dropout(jax.nn.softmax(logits, axis=-1)).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, width)
    return self.out(out)


class FeedForward(nnx.Module):
  """A block's per-token half: both LayerNorms and the two-layer MLP (attention excluded).

  A Multiway block keeps one of these per modality that has its own; the names match the
  block's own (``mlp_in``...), so a pretrained block's tensors can start each one."""

  def __init__(self, width: int, mlp_dim: int, *, ln_eps: float, dtype, rngs: nnx.Rngs):
    # LayerNorm statistics are float32 whatever ``dtype`` (flax promotes them).
    self.attention_norm = nnx.LayerNorm(width, epsilon=ln_eps, dtype=dtype, rngs=rngs)
    self.mlp_in = linear(width, mlp_dim, dtype=dtype, rngs=rngs)
    self.mlp_out = linear(mlp_dim, width, dtype=dtype, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(width, epsilon=ln_eps, dtype=dtype, rngs=rngs)


class Block(FeedForward):
  """One Transformer layer; ``pre_ln`` picks ViT/CLIP (True) or BERT (False) ordering.

  Its own LayerNorms and MLP are the ``FeedForward`` it extends. ``experts`` (modality names):
  a Multiway layer (BEiT-3): self-attention is shared, and each named modality has its own
  LayerNorms and MLP (``experts/<m>``), picked by ``expert=`` in the call; tokens of any other
  modality (and ``expert=None``) use the block's own.
  """

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, pre_ln: bool, ln_eps: float,
               activation: str, dropout: float, attention: str = "einsum", dtype=jnp.float32,
               experts: tuple[str, ...] = (), rngs: nnx.Rngs):
    self.pre_ln = pre_ln
    self.activation = activation
    self.attention = Attention(width, num_heads, dropout, implementation=attention, dtype=dtype,
                               rngs=rngs)
    # After the attention, so the random draws (and initial weights) keep their order.
    super().__init__(width, mlp_dim, ln_eps=ln_eps, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.expert_names = tuple(experts)
    self.experts = nnx.Dict({m: FeedForward(width, mlp_dim, ln_eps=ln_eps, dtype=dtype, rngs=rngs)
                             for m in experts}) if experts else None

  def __call__(self, x: jax.Array, mask: jax.Array, causal: bool = False,
               expert: str | None = None) -> jax.Array:
    own = self.experts[expert] if expert in self.expert_names else self
    mlp = lambda x: self.dropout(own.mlp_out(ACTIVATIONS[self.activation](own.mlp_in(x))))
    if self.pre_ln:
      x = x + self.dropout(self.attention(own.attention_norm(x), mask, causal))
      return x + mlp(own.mlp_norm(x))
    x = own.attention_norm(x + self.dropout(self.attention(x, mask, causal)))
    return own.mlp_norm(x + mlp(x))


class Trunk(nnx.Module):
  """A stack of blocks; pre-LN trunks end with a final LayerNorm (ViT ``layernorm``).

  Takes and returns activations in the caller's dtype; computes in ``compute_dtype``.
  """

  def __init__(self, *, width: int, depth: int, num_heads: int, mlp_dim: int, pre_ln: bool,
               ln_eps: float, activation: str, dropout: float, remat: bool = False,
               compute_dtype: str = "float32", attention: str = "einsum",
               experts: tuple[str, ...] = (), rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
    dtype = resolve_dtype(compute_dtype)
    self.dtype = dtype
    self.remat = bool(remat)
    self.layers = nnx.List([
        Block(width, num_heads, mlp_dim, pre_ln=pre_ln, ln_eps=ln_eps, activation=activation,
              dropout=dropout, attention=attention, dtype=dtype, experts=experts, rngs=rngs)
        for _ in range(depth)
    ])
    # Post-LN blocks already end normalised; a pre-LN stack needs one more norm (one per
    # Multiway expert too: it normalises that modality's tokens).
    norm = lambda: nnx.LayerNorm(width, epsilon=ln_eps, dtype=dtype, rngs=rngs)
    self.final_norm = norm() if pre_ln else None
    self.expert_names = tuple(experts)
    self.expert_final_norms = (nnx.Dict({m: norm() for m in experts})
                               if pre_ln and experts else None)

  def __call__(self, x: jax.Array, mask: jax.Array, causal: bool = False,
               expert: str | None = None) -> jax.Array:
    """``expert``: the modality whose Multiway LayerNorms and MLPs these tokens take (None, or
    a modality without its own: the trunk's shared ones)."""
    out_dtype = x.dtype
    x = x.astype(self.dtype)
    apply = lambda layer, x, mask: layer(x, mask, causal, expert)
    if self.remat:
      # Saves only each block's input; the backward pass re-runs the block (same dropout draw:
      # the RNG state is an input of the rematerialised function).
      apply = nnx.remat(apply)
    for layer in self.layers:
      x = apply(layer, x, mask)
    if self.final_norm is not None:
      x = (self.expert_final_norms[expert] if expert in self.expert_names
           else self.final_norm)(x)
    return x.astype(out_dtype)
