"""Row and column log-sum-exp of a paired [B, B] logit matrix that is never materialised.

Row r and column c are examples r and c of one batch (pair (r, r) is the positive):

    logits[r, c] = scale * score_fn(row r, column c) - col_bias[c]   (row direction)
    logits[r, c] = scale * score_fn(row r, column c)                 (column direction)

A pair (r, c != r) is left out of both directions when the two examples share any of their
``ids`` (same item: an accidental hit; same user: another positive of that user). The row
direction also leaves out invalid columns, the column direction invalid rows; invalid rows
(columns) get a row (column) log-sum-exp of -inf.

Forward: an online log-sum-exp (running max and rescaled sum) over [row_tile, col_tile] tiles,
so one tile of logits exists at a time. Backward: a custom VJP that recomputes each tile from
the inputs and the saved log-sum-exps, so the [B, B] softmax is never stored either (XLA's
autodiff of the forward loop would stack every tile). Across devices (``mesh``): a ring over
the batch axes -- each device keeps its rows and passes its column block (with the column
statistics or gradients that belong to it) to the next device, n times, so per-device memory
is O(B/n * d + row_tile * col_tile).

``score_fn(rows, row_consts, cols, col_consts) -> [R, C]`` gets tiles of the pytrees (leading
axis = batch): ``rows``/``cols`` hold the differentiable float arrays, ``*_consts`` anything
else (masks). Any tile-local function works: a dot product, or the gated fusion score.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

ScoreFn = Callable[[Any, Any, Any, Any], jax.Array]

# Mesh axes a batch is split over (recfusion_jax.sharding.DATA_AXES; repeated here so that the
# ops package does not import the model-side sharding rules).
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one tiled computation (hashable: a custom_vjp nondiff argument)."""
  row_tile: int
  col_tile: int
  both: bool
  mesh: Mesh | None
  axes: tuple[str, ...]

  @property
  def ring_size(self) -> int:
    return 1 if self.mesh is None else math.prod(self.mesh.shape[a] for a in self.axes)


def paired_lse(score_fn: ScoreFn, rows: Any, row_consts: Any, cols: Any, col_consts: Any,
               scale: jax.Array, col_bias: jax.Array, valid: jax.Array, ids: jax.Array, *,
               tile: int | tuple[int, int] = 1024, both: bool = False, mesh: Mesh | None = None,
               axes: Sequence[str] = BATCH_AXES) -> tuple[jax.Array, jax.Array | None]:
  """Row (and with ``both`` column) log-sum-exps [B] of the masked paired logits.

  Args:
    score_fn: raw scores of a row tile against a column tile (see the module docstring).
    rows, cols: pytrees of float arrays with leading axis B (differentiable).
    row_consts, col_consts: pytrees with leading axis B passed through to ``score_fn``.
    scale: scalar multiplying the raw scores (an inverse temperature; differentiable).
    col_bias: [B] subtracted from the row-direction logits of each column (logQ; differentiable).
    valid: [B] bool, False for padding examples.
    ids: [B, K] int; examples sharing any of the K ids are not each other's negatives.
    tile: tile size, or (row_tile, col_tile); clipped to the (per-device) batch, which is
      padded up to a multiple of the tile (padding is invalid, so it changes nothing).
    both: also compute the column-direction log-sum-exp (symmetric losses).
    mesh: run as a ring over ``axes`` of this mesh (B must be divisible by their size);
      None computes on the arrays as given.

  Returns:
    (lse_rows, lse_cols); lse_cols is None unless ``both``.
  """
  batch = valid.shape[0]
  for name, tree in (("rows", rows), ("cols", cols), ("row_consts", row_consts),
                     ("col_consts", col_consts)):
    for leaf in jax.tree.leaves(tree):
      if leaf.shape[:1] != (batch,):
        raise ValueError(f"{name} leaf of shape {leaf.shape} does not lead with batch {batch}")
  for name, tree in (("rows", rows), ("cols", cols)):
    for leaf in jax.tree.leaves(tree):
      if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise ValueError(f"{name} must hold float arrays (put masks in *_consts): {leaf.dtype}")
  if ids.ndim != 2 or ids.shape[0] != batch:
    raise ValueError(f"ids must be [B={batch}, K], got {ids.shape}")
  row_tile, col_tile = (tile, tile) if isinstance(tile, int) else tile
  if row_tile < 1 or col_tile < 1:
    raise ValueError(f"tile sizes must be positive, got {tile}")
  axes = tuple(axes)
  if mesh is not None:
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
      raise ValueError(f"mesh {dict(mesh.shape)} has no axes {missing}")
  plan = _Plan(int(row_tile), int(col_tile), bool(both), mesh, axes)
  if batch % plan.ring_size:
    raise ValueError(f"batch {batch} is not divisible by the {plan.ring_size} devices of {axes}")
  scale = jnp.asarray(scale, jnp.float32)
  col_bias = jnp.asarray(col_bias, jnp.float32)
  consts = (row_consts, col_consts, jnp.asarray(valid, bool), jnp.asarray(ids, jnp.int32))
  lse_rows, lse_cols = _paired_lse(score_fn, plan, rows, cols, scale, col_bias, consts)
  return lse_rows, (lse_cols if both else None)


# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _paired_lse(score_fn, plan, rows, cols, scale, col_bias, consts):
  return _run(_device_forward, score_fn, plan, (rows, cols, scale, col_bias, consts), 2)


def _paired_lse_fwd(score_fn, plan, rows, cols, scale, col_bias, consts):
  lse = _run(_device_forward, score_fn, plan, (rows, cols, scale, col_bias, consts), 2)
  return lse, (rows, cols, scale, col_bias, consts, lse)


def _paired_lse_bwd(score_fn, plan, residuals, cotangents):
  rows, cols, scale, col_bias, consts, (lse_rows, lse_cols) = residuals
  g_rows, g_cols = cotangents
  d_rows, d_cols, d_scale, d_bias = _run(
      _device_backward, score_fn, plan,
      (rows, cols, scale, col_bias, consts, lse_rows, lse_cols, g_rows, g_cols), 4)
  return d_rows, d_cols, d_scale, d_bias, None


_paired_lse.defvjp(_paired_lse_fwd, _paired_lse_bwd)


def _run(device_fn, score_fn, plan: _Plan, args: tuple, num_out: int):
  """Calls ``device_fn`` on the whole arrays, or on each device's shard inside a shard_map."""
  if plan.mesh is None:
    return device_fn(score_fn, plan, None, *args)
  batch, replicated = P(plan.axes), P()
  in_specs = tuple(replicated if i == 2 else batch for i in range(len(args)))  # arg 2: scale
  out_specs = tuple(replicated if (device_fn is _device_backward and i == 2) else batch
                    for i in range(num_out))  # backward output 2: d_scale (psum-ed)
  # check_vma=False: the loop carries start device-invariant (zeros) and become device-varying
  # after the first ppermute; the ring is correct by construction and tested against 1 device.
  return jax.shard_map(functools.partial(device_fn, score_fn, plan, plan.axes),
                       mesh=plan.mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*args)


# ----------------------------------------------------------------------------- per device


def _pad(tree: Any, size: int, fill=0) -> Any:
  def pad(x):
    extra = size - x.shape[0]
    if extra == 0:
      return x
    return jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
  return jax.tree.map(pad, tree)


def _slice(tree: Any, start: jax.Array, size: int) -> Any:
  return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=0), tree)


def _add_at(tree: Any, update: Any, start: jax.Array) -> Any:
  def add(x, u):
    current = jax.lax.dynamic_slice_in_dim(x, start, u.shape[0], axis=0)
    return jax.lax.dynamic_update_slice_in_dim(x, current + u.astype(x.dtype), start, axis=0)
  return jax.tree.map(add, tree, update)


def _set_at(tree: Any, update: Any, start: jax.Array) -> Any:
  return jax.tree.map(lambda x, u: jax.lax.dynamic_update_slice_in_dim(x, u, start, axis=0),
                      tree, update)


class _Side(NamedTuple):
  """One side (rows or columns) of a device's block, padded to a multiple of its tile."""
  data: Any
  consts: Any
  index: jax.Array   # global example index; padding gets a negative one
  valid: jax.Array
  ids: jax.Array

  def tile(self, start: jax.Array, size: int) -> "_Side":
    return _Side(*(_slice(part, start, size) for part in self))


def _make_side(data, consts, valid, ids, offset, tile: int, pad_index: int) -> tuple[_Side, int]:
  n = valid.shape[0]
  tile = min(tile, n)
  size = -(-n // tile) * tile
  index = offset + jnp.arange(n, dtype=jnp.int32)
  side = _Side(_pad(data, size), _pad(consts, size), _pad(index, size, pad_index),
               _pad(valid, size, False), _pad(ids, size))
  return side, tile


def _layout(plan: _Plan, axis, rows, cols, consts):
  row_consts, col_consts, valid, ids = consts
  offset = 0 if axis is None else jax.lax.axis_index(axis) * valid.shape[0]
  # Distinct negative indices for row and column padding: a padded row never meets "itself".
  row_side, row_tile = _make_side(rows, row_consts, valid, ids, offset, plan.row_tile, -1)
  col_side, col_tile = _make_side(cols, col_consts, valid, ids, offset, plan.col_tile, -2)
  return row_side, col_side, row_tile, col_tile


def _allowed(r: _Side, c: _Side) -> jax.Array:
  """[R, C]: pairs that enter the softmax (of the row and of the column direction alike).

  The positive (same example) always does; another example sharing an id never does; an
  invalid row or column never does (so an invalid row's own lse is -inf).
  """
  same_example = r.index[:, None] == c.index[None, :]
  shares_id = jnp.any(r.ids[:, None, :] == c.ids[None, :, :], axis=-1)
  return (same_example | ~shares_id) & r.valid[:, None] & c.valid[None, :]


def _online_update(peak, total, logits, allowed, axis: int):
  """One step of the streaming log-sum-exp: (running max, sum of exp(x - max)) over ``axis``."""
  masked = jnp.where(allowed, logits, -jnp.inf)
  new_peak = jnp.maximum(peak, jnp.max(masked, axis=axis))
  shift = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)
  total = total * jnp.exp(peak - shift) + jnp.sum(
      jnp.exp(masked - jnp.expand_dims(shift, axis)), axis=axis)
  return new_peak, total


def _finish_lse(peak, total):
  return jnp.where(total > 0, peak + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)


def _ring_permute(tree, axis, ring_size: int):
  if axis is None:
    return tree
  perm = [(i, (i + 1) % ring_size) for i in range(ring_size)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, axis, perm), tree)


def _device_forward(score_fn, plan: _Plan, axis, rows, cols, scale, col_bias, consts):
  num_rows = consts[2].shape[0]
  row_side, col_side, tr, tc = _layout(plan, axis, rows, cols, consts)
  num_col_tiles = col_side.valid.shape[0] // tc
  num_tiles = (row_side.valid.shape[0] // tr) * num_col_tiles

  def tile_step(t, carry):
    row_acc, col_acc, side, side_bias = carry
    i, j = t // num_col_tiles, t % num_col_tiles
    r, c = row_side.tile(i * tr, tr), side.tile(j * tc, tc)
    logits = scale * score_fn(r.data, r.consts, c.data, c.consts).astype(jnp.float32)
    allowed = _allowed(r, c)
    bias = jax.lax.dynamic_slice_in_dim(side_bias, j * tc, tc)
    row_acc = _set_at(row_acc, _online_update(
        *_slice(row_acc, i * tr, tr), logits - bias[None, :], allowed, axis=1), i * tr)
    if plan.both:
      col_acc = _set_at(col_acc, _online_update(
          *_slice(col_acc, j * tc, tc), logits, allowed, axis=0), j * tc)
    return row_acc, col_acc, side, side_bias

  def ring_step(_, carry):
    row_acc, *travelling = jax.lax.fori_loop(0, num_tiles, tile_step, carry)
    # The column block moves on with its statistics; after ring_size moves it is home again.
    return (row_acc, *_ring_permute(tuple(travelling), axis, plan.ring_size))

  def empty(n):  # running (max, sum) of an empty set
    return jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32)

  row_acc, col_acc, _, _ = jax.lax.fori_loop(
      0, plan.ring_size, ring_step,
      (empty(row_side.valid.shape[0]), empty(col_side.valid.shape[0]), col_side,
       _pad(col_bias, col_side.valid.shape[0])))
  lse_rows = _finish_lse(*row_acc)[:num_rows]
  lse_cols = _finish_lse(*col_acc)[:num_rows] if plan.both else jnp.zeros_like(lse_rows)
  return lse_rows, lse_cols


def _device_backward(score_fn, plan: _Plan, axis, rows, cols, scale, col_bias, consts,
                     lse_rows, lse_cols, g_rows, g_cols):
  num_rows = consts[2].shape[0]
  row_side, col_side, tr, tc = _layout(plan, axis, rows, cols, consts)
  num_col_tiles = col_side.valid.shape[0] // tc
  num_tiles = (row_side.valid.shape[0] // tr) * num_col_tiles
  # Padding gets a zero cotangent; its probabilities are masked anyway.
  row_stats = _pad((lse_rows, g_rows), row_side.valid.shape[0])
  col_stats = _pad((col_bias, lse_cols, g_cols), col_side.valid.shape[0])

  def tile_step(t, carry):
    d_rows, d_scale, side, side_stats, d_cols, d_bias = carry
    i, j = t // num_col_tiles, t % num_col_tiles
    r, c = row_side.tile(i * tr, tr), side.tile(j * tc, tc)
    lse_r, g_r = _slice(row_stats, i * tr, tr)
    bias, lse_c, g_c = _slice(side_stats, j * tc, tc)
    raw, score_vjp = jax.vjp(lambda rd, cd: score_fn(rd, r.consts, cd, c.consts), r.data, c.data)
    logits = scale * raw.astype(jnp.float32)
    allowed = _allowed(r, c)
    # d loss / d logits = g * softmax, per direction (the -1 at the positive is the caller's).
    p_rows = jnp.exp(jnp.where(allowed, logits - bias[None, :] - lse_r[:, None], -jnp.inf))
    d_logits = g_r[:, None] * p_rows
    d_bias = _add_at(d_bias, -jnp.sum(d_logits, axis=0), j * tc)
    if plan.both:
      p_cols = jnp.exp(jnp.where(allowed, logits - lse_c[None, :], -jnp.inf))
      d_logits = d_logits + g_c[None, :] * p_cols
    d_scale = d_scale + jnp.sum(d_logits * raw.astype(jnp.float32))
    d_r, d_c = score_vjp((scale * d_logits).astype(raw.dtype))
    d_rows = _add_at(d_rows, d_r, i * tr)
    d_cols = _add_at(d_cols, d_c, j * tc)
    return d_rows, d_scale, side, side_stats, d_cols, d_bias

  def ring_step(_, carry):
    d_rows, d_scale, *travelling = jax.lax.fori_loop(0, num_tiles, tile_step, carry)
    # The column block's gradient travels with it and is home after ring_size moves.
    return (d_rows, d_scale, *_ring_permute(tuple(travelling), axis, plan.ring_size))

  # Gradients accumulate over tiles and ring steps in float32 whatever the inputs' dtype.
  zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
  d_rows, d_scale, _, _, d_cols, d_bias = jax.lax.fori_loop(
      0, plan.ring_size, ring_step,
      (zeros(row_side.data), jnp.zeros((), jnp.float32), col_side, col_stats,
       zeros(col_side.data), jnp.zeros((col_side.valid.shape[0],), jnp.float32)))
  if axis is not None:
    d_scale = jax.lax.psum(d_scale, axis)
  unpad = lambda tree, like: jax.tree.map(lambda x, y: x[:num_rows].astype(y.dtype), tree, like)
  return unpad(d_rows, rows), unpad(d_cols, cols), d_scale, d_bias[:num_rows]
