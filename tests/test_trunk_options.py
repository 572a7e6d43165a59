"""The trunk's memory options against the plain path.

remat and dot_product attention must give the same outputs and gradients (1e-5); bf16 compute
must stay close (bf16 keeps 8 mantissa bits, so 'close' is the stated tolerance below) while
parameters, gradients and optimizer state stay float32 and the matmuls really run in bf16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recfusion_jax import sharding
from recfusion_jax.models.encoder import ContentEncoder
from recfusion_jax.models.transformer import Trunk, dense_bf16

from helpers import random_batch, tiny_config

_RTOL = 1e-5
# bf16 against float32 on unit-scale LayerNorm outputs of a 2-block trunk: the error of a few
# roundings to 8 mantissa bits (2^-8 = 0.004 each), with margin.
_BF16_ATOL = 0.05
_BF16_MIN_GRAD_COSINE = 0.999


def _trunk(seed=0, **options):
  return Trunk(width=16, depth=2, num_heads=2, mlp_dim=32, pre_ln=options.pop("pre_ln", True),
               ln_eps=1e-6, activation="gelu", dropout=options.pop("dropout", 0.0),
               rngs=nnx.Rngs(seed), **options)


def _inputs(b=3, n=7, width=16):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, n, width)).astype(np.float32)
  mask = np.ones((b, n), bool)
  mask[0, 4:] = False   # padding
  mask[2] = False       # an absent modality: no valid key at all
  return jnp.asarray(x), jnp.asarray(mask)


def _loss(trunk, x, mask, causal):
  out = trunk(x, mask, causal)
  return jnp.sum(jnp.sin(out) * jnp.arange(out.shape[-1])), out


@nnx.jit(static_argnums=3)
def _value_and_grads(trunk, x, mask, causal):
  grad_fn = nnx.value_and_grad(_loss, argnums=(0, 1), has_aux=True)
  (loss, out), (g_params, g_x) = grad_fn(trunk, x, mask, causal)
  return loss, out, g_params, g_x


def _assert_same(got, want, rtol=_RTOL):
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol,
                               atol=rtol * max(float(np.abs(np.asarray(w)).max()), 1e-3),
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("option,pre_ln,causal,dropout", [
    ({"remat": True}, True, False, 0.3),         # same dropout draw in both passes
    ({"remat": True}, False, True, 0.0),
    ({"attention": "dot_product"}, True, False, 0.0),
    ({"attention": "dot_product"}, False, True, 0.0),
])
def test_option_equals_plain_trunk(option, pre_ln, causal, dropout):
  x, mask = _inputs()
  plain = _value_and_grads(_trunk(pre_ln=pre_ln, dropout=dropout), x, mask, causal)
  other = _value_and_grads(_trunk(pre_ln=pre_ln, dropout=dropout, **option), x, mask, causal)
  assert np.all(np.isfinite(np.asarray(other[1])))
  _assert_same(other, plain)
  if dropout:  # the comparison did involve a dropout draw
    no_dropout = _value_and_grads(_trunk(pre_ln=pre_ln, **option), x, mask, causal)[1]
    assert np.abs(np.asarray(other[1]) - np.asarray(no_dropout)).max() > 1e-2


def test_bfloat16_is_close_and_keeps_float32_state():
  x, mask = _inputs()
  plain = _value_and_grads(_trunk(), x, mask, True)
  trunk = _trunk(compute_dtype="bfloat16")
  loss, out, g_params, g_x = _value_and_grads(trunk, x, mask, True)
  assert out.dtype == jnp.float32 and g_x.dtype == jnp.float32  # the caller's dtype
  np.testing.assert_allclose(np.asarray(out), np.asarray(plain[1]), atol=_BF16_ATOL)
  assert np.abs(np.asarray(out) - np.asarray(plain[1])).max() > 1e-4  # really not float32
  for got, want in zip(jax.tree.leaves(g_params), jax.tree.leaves(plain[2])):
    got, want = np.asarray(got).ravel(), np.asarray(want).ravel()
    cosine = got @ want / (np.linalg.norm(got) * np.linalg.norm(want))
    assert cosine > _BF16_MIN_GRAD_COSINE
  # Parameters and their gradients are float32 ...
  for leaf in jax.tree.leaves(nnx.state(trunk, nnx.Param)) + jax.tree.leaves(g_params):
    assert leaf.dtype == jnp.float32
  # ... and so is the optimizer state after an update.
  optimizer = nnx.Optimizer(trunk, optax.adamw(1e-3), wrt=nnx.Param)
  optimizer.update(trunk, g_params)
  for leaf in jax.tree.leaves(nnx.state(optimizer.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  for leaf in jax.tree.leaves(nnx.state(trunk, nnx.Param)):
    assert leaf.dtype == jnp.float32
  # The matmuls do run in bf16 (the plain trunk has none).
  graphdef, state = nnx.split(trunk)
  jaxpr = str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x, mask))(state, x))
  assert "dot_general" in jaxpr and "bf16[3,7,16]" in jaxpr
  graphdef, state = nnx.split(_trunk())
  assert "bf16" not in str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x, mask))(state, x))


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match="compute_dtype"):
    _trunk(compute_dtype="float16")
  with pytest.raises(ValueError, match="attention"):
    _trunk(attention="flash")
  with pytest.raises(ValueError, match="dropout"):
    _trunk(attention="dot_product", dropout=0.1)


def test_encoder_config_switches_reach_the_trunk():
  config = tiny_config()
  config.model.modalities = ("text",)  # one stem is enough to check the threading
  batch = {k: jnp.asarray(v) for k, v in random_batch(config, 4, 10, 20).items()}
  cfg = config.model.encoder
  assert (cfg.remat, cfg.compute_dtype, cfg.attention) == (False, "float32", "einsum")

  @nnx.jit
  def encode(encoder, batch):
    return encoder(batch)

  def build(**switches):
    e = cfg.copy_and_resolve_references()
    for key, value in switches.items():
      e[key] = value
    return ContentEncoder(e, tuple(config.model.modalities), config.model.embed_dim,
                          rngs=nnx.Rngs(0))

  plain = build()
  switched = build(remat=True, attention="dot_product", compute_dtype="bfloat16")
  block = switched.trunk.layers[0]
  assert switched.trunk.remat and block.attention.implementation == "dot_product"
  assert block.mlp_in.dtype == jnp.bfloat16 and block.mlp_in.kernel[...].dtype == jnp.float32
  emb, _ = encode(switched, batch)
  want, _ = encode(plain, batch)
  assert emb.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(emb), np.asarray(want), atol=_BF16_ATOL)


def test_bf16_dense_matches_autodiff_and_accumulates_in_float32():
  """``dense_bf16`` (the trunk's bf16 Linear matmul, a custom VJP for XLA:CPU's AMX path)
  against autodiff of the same product computed in float32 from the bf16 operands."""
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (3, 5, 64)).astype(jnp.bfloat16)
  w = (jax.random.normal(kw, (64, 48)) / 8).astype(jnp.bfloat16)
  probe = jax.random.normal(kg, (3, 5, 48))

  def reference(x, w):  # the exact product of the bf16 values, rounded once at the end
    return (x.astype(jnp.float32) @ w.astype(jnp.float32)).astype(jnp.bfloat16)

  out, vjp = jax.vjp(dense_bf16, x, w)
  want, want_vjp = jax.vjp(reference, x, w)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
  cotangent = probe.astype(jnp.bfloat16)
  for got, expected in zip(vjp(cotangent), want_vjp(cotangent)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                               rtol=1e-2, atol=1e-2)
  # Every matmul of the forward and backward pass takes bf16 operands to a float32 result.
  jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(dense_bf16(x, w).astype(jnp.float32)
                                                       * probe), argnums=(0, 1)))(x, w)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 3
  for e in dots:
    assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16, jnp.bfloat16]
    assert e.outvars[0].aval.dtype == jnp.float32


def test_bf16_trunk_linears_take_the_float32_accumulating_matmul():
  trunk = _trunk(compute_dtype="bfloat16")
  x, mask = _inputs()
  jaxpr = jax.make_jaxpr(lambda x: trunk(x, mask))(x)
  # 6 Linear layers a block (q, k, v, out, mlp_in, mlp_out) x 2 blocks.
  assert str(jaxpr).count("custom_vjp_call") == 12


def test_trunk_gradient_scale_scales_one_modalitys_share_of_the_trunk_gradient():
  """encoder.<m>.trunk_gradient_scale: same outputs; the trunk's gradient from m's tokens is
  scaled (0: none), every other gradient (m's stem, the other modality's share) unchanged."""
  config = tiny_config()
  config.model.modalities = ("text", "image")
  batch = {k: jnp.asarray(v) for k, v in random_batch(config, 4, 10, 20).items()}

  def build(image_scale, dropout=0.0):
    e = config.model.encoder.copy_and_resolve_references()
    e.image.trunk_gradient_scale, e.dropout = image_scale, dropout
    return ContentEncoder(e, ("text", "image"), config.model.embed_dim, rngs=nnx.Rngs(0))

  @nnx.jit(static_argnums=2)
  def grads(encoder, batch, modality):
    def loss(encoder):
      emb = encoder.pooled(modality, batch)
      return jnp.sum(jnp.sin(emb) * jnp.arange(emb.shape[-1])), emb
    return nnx.grad(loss, has_aux=True)(encoder)

  trunk_grad = lambda g: jax.tree.leaves(g["trunk"])
  for scale in (0.0, 0.5):
    for modality, factor in (("image", scale), ("text", 1.0)):
      want, want_emb = grads(build(1.0), batch, modality)
      got, got_emb = grads(build(scale), batch, modality)
      np.testing.assert_array_equal(np.asarray(got_emb), np.asarray(want_emb))
      for g, w in zip(trunk_grad(got), trunk_grad(want)):
        np.testing.assert_allclose(np.asarray(g), factor * np.asarray(w), rtol=1e-5, atol=1e-8)
      stem = f"{modality}_stem"
      assert max(float(np.abs(np.asarray(w)).max()) for w in jax.tree.leaves(want[stem])) > 0
      _assert_same(got[stem], want[stem])
  assert max(float(np.abs(np.asarray(w)).max()) for w in trunk_grad(want)) > 0

  # With dropout the view advances the trunk's RNG state: two calls draw different masks.
  encoder = build(0.0, dropout=0.5)
  first, second = (np.asarray(encoder.pooled("image", batch)) for _ in range(2))
  assert np.abs(first - second).max() > 1e-3
  with pytest.raises(ValueError, match="trunk_gradient_scale"):
    build(1.5)


def _copy_params(target, source_params: dict[str, jax.Array]) -> None:
  """Sets every parameter of ``target`` from ``source_params`` (flat '/' names)."""
  state = nnx.state(target, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  nnx.update(target, jax.tree_util.tree_unflatten(
      treedef, [source_params[sharding.path_name(p)] for p, _ in leaves]))


@pytest.mark.parametrize("pre_ln", [True, False])
def test_multiway_trunk_is_a_plain_trunk_per_modality(pre_ln):
  """A Multiway trunk: tokens of an expert modality compute what a plain trunk with the shared
  attention and that expert's LayerNorms and MLPs computes; other tokens what the plain trunk
  with the shared weights computes. The expert's tokens leave the shared MLP's gradient at 0."""
  x, mask = _inputs()
  multiway = _trunk(seed=1, pre_ln=pre_ln, experts=("image",))
  params = {sharding.path_name(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(nnx.state(multiway, nnx.Param))[0]}
  shared, as_image = {}, {}
  for name, value in params.items():
    if "/experts/" in name or name.startswith("expert_final_norms/"):
      continue
    shared[name] = value
    parts = name.split("/")
    if parts[0] == "layers" and parts[2] != "attention":
      layer_expert = "/".join(parts[:2] + ["experts", "image"] + parts[2:])
    elif parts[0] == "final_norm":
      layer_expert = "/".join(["expert_final_norms", "image"] + parts[1:])
    else:
      layer_expert = name
    as_image[name] = params[layer_expert]
  assert any(n.endswith("experts/image/mlp_in/kernel") for n in params)
  reference = _trunk(seed=2, pre_ln=pre_ln)
  for want_params, expert in ((shared, None), (shared, "text"), (as_image, "image")):
    _copy_params(reference, want_params)
    want = reference(x, mask)
    got = multiway(x, mask, False, expert)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=_RTOL, atol=1e-6)
  # The image expert differs from the shared path (the test compares two different things).
  assert np.abs(np.asarray(multiway(x, mask, False, "image") - multiway(x, mask))).max() > 1e-2

  grads = nnx.grad(lambda t: jnp.sum(jnp.sin(t(x, mask, False, "image"))))(multiway)
  grads = {sharding.path_name(p): v for p, v in
           jax.tree_util.tree_flatten_with_path(grads)[0]}
  assert float(jnp.abs(grads["layers/0/mlp_in/kernel"]).max()) == 0.0
  assert float(jnp.abs(grads["layers/0/experts/image/mlp_in/kernel"]).max()) > 0.0
  assert float(jnp.abs(grads["layers/0/attention/query/kernel"]).max()) > 0.0


def test_encoder_experts_route_each_modality_and_refuse_unknown_names():
  config = tiny_config()
  e = config.model.encoder
  e.experts = ("image",)
  encoder = ContentEncoder(e, ("text", "image"), 8, rngs=nnx.Rngs(0))
  assert encoder.experts == ("image",)
  assert set(encoder.trunk.layers[0].experts) == {"image"}
  # Separate towers already give each modality its own trunk: nothing to add.
  e.unified = False
  assert ContentEncoder(e, ("text", "image"), 8, rngs=nnx.Rngs(0)).experts == ()
  e.unified = True
  assert ContentEncoder(e, ("text",), 8, rngs=nnx.Rngs(0)).experts == ()
  e.experts = ("poster",)
  with pytest.raises(ValueError, match="encoder.experts names unknown modalities"):
    ContentEncoder(e, ("text", "image"), 8, rngs=nnx.Rngs(0))
