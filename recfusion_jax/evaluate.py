"""Model-agnostic offline evaluation: full ranking, sampled ranking, cross-modal retrieval.

The model enters only through ``score_fn(user_block, item_table) -> scores [Ub, I]``, a pure
jnp function of two pytrees whose leaves have leading dims Ub (users) and I (items); the
evaluator never looks inside them. Model parameters belong in those pytrees, not in the
function's closure (closed-over arrays would be baked into the compiled code as constants).
The same ``score_fn`` object should be passed on every call: it is a static jit argument,
so a fresh lambda per call recompiles.

Full ranking (``evaluate_full_ranking``): users are processed in fixed-size blocks from a
host loop (the last block is padded with copies of a real user, whose rows are then ignored).
Each block is one jitted call that scores the block against the whole catalogue, sets each
user's excluded (training) items to -inf with a per-row scatter -- no dense U x I mask ever
exists on the host -- takes the top k and reduces per-user metrics to block sums, which
stay on device until the loop ends. Averages are over users with >= 1 relevant item. The top
k is ``lax.top_k`` or, for large catalogues, the exact and equivalent ``chunked_top_k``
(max per chunk of items, then top k among the k best chunks), which XLA:CPU runs faster
(measured in docs/EVALUATION.md with perf/evaluator_throughput.py).

Conventions (and why):
* Ties count against the held-out item, in full ranking, sampled ranking and retrieval alike:
  among equal scores the irrelevant items rank first (``metrics.pessimistic_hits``), so a
  constant scorer gets nothing, whatever the item ids. Exact, without a full sort: after the
  top k, each user's items tied at the k-th score (and the relevant ones among them) are
  counted in one pass over the block's scores.
* Repeated ids in a row of ``relevant_items`` count once.
* A relevant item that is also excluded can never be ranked but still counts in |rel|,
  exactly as a naive "mask history, rank, compare" evaluation would; callers that want it
  dropped should remove it from ``relevant_items``.
* With ``candidate_items`` (e.g. the cold-item protocol: rank among cold items only), every
  non-candidate item is masked to -inf and relevant ids outside the candidate set are
  dropped, because the candidate set defines the task; users left with no relevant
  candidate are not averaged.
* Ranks that could not be filled with a rankable item (catalogue or candidate set smaller
  than k) are empty slots: they count in Precision's denominator k and are never hits.
* ``score_fn`` must not return NaN; an item scored -inf is treated as unrankable.

Sharding: with a ``mesh``, user blocks are split over the mesh axes not named in
``item_axes`` (by default all axes, e.g. ('data', 'fsdp')), and the item table is replicated,
so each device ranks its users against the whole catalogue with no communication except the
final metric sums. For catalogues too large to replicate, name mesh axes in ``item_axes``:
the item table is then sharded over them, each device takes a top-k over its item shard,
and the per-shard top-k lists are all-gathered and merged with a second top-k (exact: the
global top k is contained in the union of the shards' top k). Both may be combined, e.g.
users over 'data' and items over 'model'.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from recfusion_jax import metrics, sharding

ScoreFn = Callable[[Any, Any], jax.Array]
PyTree = Any


def _leading_dim(tree: PyTree, what: str) -> int:
  """Common leading dimension of all leaves of ``tree``."""
  dims = {int(np.shape(x)[0]) for x in jax.tree.leaves(tree)}
  if len(dims) != 1:
    raise ValueError(f"{what}: leaves must share one leading dimension, got {sorted(dims)}")
  return dims.pop()


def _spec(axes: tuple[str, ...]) -> P:
  """PartitionSpec splitting the leading dim over ``axes`` (replicated if empty)."""
  return P(axes) if axes else P()


def _axes_size(mesh: Mesh | None, axes: tuple[str, ...]) -> int:
  return int(np.prod([mesh.shape[a] for a in axes])) if mesh is not None and axes else 1


def _padded_ids(ids: np.ndarray | None, num_users: int, what: str) -> np.ndarray:
  """[U, X] int32 id matrix (X may be 0); None means no ids for anyone."""
  if ids is None:
    return np.full((num_users, 0), -1, np.int32)
  ids = np.asarray(ids, np.int32)
  if ids.ndim != 2 or ids.shape[0] != num_users:
    raise ValueError(f"{what}: expected [{num_users}, X], got {ids.shape}")
  return ids


def _dedupe_rows(ids: np.ndarray) -> np.ndarray:
  """Replaces repeated ids within a row by -1 (a re-consumed test item is relevant once)."""
  ids = np.sort(ids, axis=1)
  repeat = np.zeros(ids.shape, bool)
  repeat[:, 1:] = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)
  return np.where(repeat, -1, ids)


def _pad_rows(x: Any, num_rows: int) -> Any:
  """Pads the leading dim to ``num_rows`` by repeating the last row (keeps score_fn finite)."""
  extra = num_rows - x.shape[0]
  if extra == 0:
    return x
  lib = jnp if isinstance(x, jax.Array) else np
  return lib.concatenate([x, lib.repeat(x[-1:], extra, axis=0)], axis=0)


def _put(tree: PyTree, mesh: Mesh | None, spec: P) -> PyTree:
  """Host values (the same on every process) onto ``mesh`` by ``spec``; each process places
  its own devices' part (``sharding.put_global``), so a mesh may span processes."""
  if mesh is None:
    return jax.device_put(tree)
  placement = NamedSharding(mesh, spec)
  return sharding.put_global(tree, jax.tree.map(lambda _: placement, tree))


def _user_block(tree: PyTree, rows: np.ndarray) -> PyTree:
  """Rows ``rows`` of every leaf (works for NumPy and device arrays)."""
  return jax.tree.map(lambda x: x[rows], tree)


# --------------------------------------------------------------------------------------------
# Full ranking.
# --------------------------------------------------------------------------------------------


def chunked_top_k(scores: jax.Array, k: int, chunk: int) -> tuple[jax.Array, jax.Array]:
  """Exact ``lax.top_k`` over the last axis (same values, ids and tie-breaking), faster on CPU.

  The row is split into chunks of ``chunk``; the k chunks with the largest maxima hold every
  top-k element (an element of any other chunk is preceded by the maxima of k chosen chunks,
  which rank before it, ties included, since chunk ties go to the lower chunk). So a cheap
  max-reduction pass plus a top-k over the k * chunk gathered scores replaces a top-k over
  the full row, which XLA:CPU runs as a much slower selection.

  Args:
    scores: [B, n] with n divisible by ``chunk`` and n // chunk >= k.
    k: number of results.
    chunk: chunk length.

  Returns:
    ([B, k] values, [B, k] int32 indices), like ``jax.lax.top_k``.
  """
  rows, n = scores.shape
  num_chunks = n // chunk
  if n % chunk or num_chunks < k:
    raise ValueError(f"chunked_top_k: n={n} must be a multiple of chunk={chunk} with at "
                     f"least k={k} chunks")
  x = scores.reshape(rows, num_chunks, chunk)
  _, best = jax.lax.top_k(jnp.max(x, axis=-1), k)
  # Ascending chunk order keeps top_k's lowest-index tie-break equal to the global one.
  best = jnp.sort(best, axis=-1)  # [B, k]
  sub = jnp.take_along_axis(x, best[:, :, None], axis=1).reshape(rows, k * chunk)
  values, pos = jax.lax.top_k(sub, k)
  ids = jnp.take_along_axis(best, pos // chunk, axis=1) * chunk + pos % chunk
  return values, ids.astype(jnp.int32)


def _auto_chunk(num_items: int, k: int) -> int:
  """Chunk length for ``chunked_top_k``: about sqrt(items / k), so the max pass, the chunk
  top-k and the final top-k over k * chunk stay balanced; 0 (plain top-k) when small."""
  if num_items < 64 * k:
    return 0
  return int(2 ** np.round(np.log2(np.sqrt(num_items / k))))


def _local_topk(score_fn: ScoreFn, k: int, num_items: int, max_padding: int, chunk: int,
                user_block: PyTree, item_table: PyTree, exclude: jax.Array,
                cand_mask: jax.Array | None,
                item_offset: jax.Array | int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k (values, global ids) of one user block against one (shard of the) item table,
  and the block's masked scores [B, I_local] (unrankable items at -inf).

  ``item_offset`` is the global id of the table's first row. Rows with ids >= ``num_items``
  pad the table to whole item shards and top-k chunks; only the last ``max_padding`` columns
  can be such rows.
  """
  scores = score_fn(user_block, item_table).astype(jnp.float32)  # [B, I_local]
  num_local = scores.shape[1]
  if cand_mask is not None:  # cold-item style protocols; a full masking pass is fine there
    scores = jnp.where(cand_mask[None, :], scores, -jnp.inf)
  tail = min(max_padding, num_local)
  if tail:
    # Padding rows sit at the end: rewrite only the tail columns instead of masking all I.
    tail_ids = item_offset + jnp.arange(num_local - tail, num_local, dtype=jnp.int32)
    scores = scores.at[:, num_local - tail:].set(
        jnp.where(tail_ids[None, :] < num_items, scores[:, num_local - tail:], -jnp.inf))
  # Per-row scatter of -inf at the excluded ids; -1 padding and ids owned by other shards
  # are sent out of bounds and dropped. vmap makes the user dim a scatter batch dim.
  local = exclude - item_offset
  local = jnp.where((exclude >= 0) & (local >= 0) & (local < num_local), local, num_local)
  scores = jax.vmap(lambda s, e: s.at[e].set(-jnp.inf, mode="drop"))(scores, local)
  if chunk and num_local % chunk == 0 and num_local // chunk >= k:
    values, idx = chunked_top_k(scores, k, chunk)
  else:
    values, idx = jax.lax.top_k(scores, min(k, num_local))
  ids = jnp.where(values > -jnp.inf, idx.astype(jnp.int32) + item_offset, -1)
  return values, ids, scores


def _tie_counts(scores: jax.Array, relevant: jax.Array, kth: jax.Array,
                item_offset: jax.Array | int) -> tuple[jax.Array, jax.Array]:
  """[B] items of this (shard of the) row scoring exactly ``kth``, and how many are relevant.

  One pass over the scores for the count; the relevant items' scores are gathered (ids owned
  by another shard, and -1 padding, count nowhere here).
  """
  tied = jnp.sum(scores == kth[:, None], axis=1)
  local = relevant - item_offset
  mine = (relevant >= 0) & (local >= 0) & (local < scores.shape[1])
  rel_scores = jnp.take_along_axis(scores, jnp.where(mine, local, 0), axis=1)
  return tied, jnp.sum(mine & (rel_scores == kth[:, None]), axis=1)


@functools.partial(
    jax.jit, static_argnames=("score_fn", "k", "num_items", "max_padding", "chunk", "mesh",
                              "user_axes", "item_axes"))
def _full_ranking_block(user_block: PyTree, exclude: jax.Array, relevant: jax.Array,
                        item_table: PyTree, cand_mask: jax.Array | None, *,
                        score_fn: ScoreFn, k: int, num_items: int, max_padding: int,
                        chunk: int, mesh: Mesh | None,
                        user_axes: tuple[str, ...],
                        item_axes: tuple[str, ...]) -> dict[str, jax.Array]:
  """Metric sums over the valid users of one block (plus their count)."""

  def per_user(user_block, item_table, exclude, relevant, cand_mask):
    offset = 0
    if item_axes:
      num_local = _leading_dim(item_table, "item_table")
      offset = jax.lax.axis_index(item_axes).astype(jnp.int32) * num_local
    values, ids, scores = _local_topk(score_fn, k, num_items, max_padding, chunk, user_block,
                                      item_table, exclude, cand_mask, offset)
    if item_axes:
      # Exact merge: the global top k lies in the union of the per-shard top k.
      values = jax.lax.all_gather(values, item_axes, axis=1, tiled=True, to="invarying")
      ids = jax.lax.all_gather(ids, item_axes, axis=1, tiled=True, to="invarying")
      values, pos = jax.lax.top_k(values, min(k, values.shape[1]))
      ids = jnp.where(values > -jnp.inf, jnp.take_along_axis(ids, pos, axis=1), -1)
    if ids.shape[1] < k:  # fewer items than k: the missing ranks are empty slots
      values = jnp.pad(values, ((0, 0), (0, k - ids.shape[1])), constant_values=-jnp.inf)
      ids = jnp.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)
    # Ties count against the relevant items: top_k's order among equal scores (lowest id
    # first) is replaced by the pessimistic one, counted over the whole row.
    tied, relevant_tied = _tie_counts(scores, relevant, values[:, -1], offset)
    if item_axes:
      tied = jax.lax.psum(tied, item_axes)
      relevant_tied = jax.lax.psum(relevant_tied, item_axes)
    hit = metrics.pessimistic_hits(values, metrics.hits(ids, relevant), tied, relevant_tied)
    return metrics.metrics_from_hits(hit, metrics.num_relevant(relevant))

  if mesh is not None:
    users, items = _spec(user_axes), _spec(item_axes)
    per_user = jax.shard_map(per_user, mesh=mesh, in_specs=(users, items, users, users, items),
                             out_specs=users)
  return _sums_over_valid_users(per_user(user_block, item_table, exclude, relevant, cand_mask))


def _sums_over_valid_users(values: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-user metric values -> block sums over users with a relevant item, plus their count."""
  valid = values.pop("valid")
  sums = {name: jnp.sum(jnp.where(valid, v, 0.0)) for name, v in values.items()}
  sums["num_users"] = jnp.sum(valid).astype(jnp.float32)
  return sums


def evaluate_full_ranking(score_fn: ScoreFn, user_reps: PyTree, item_table: PyTree,
                          exclude_items: np.ndarray | None, relevant_items: np.ndarray, *,
                          k: int = 10, block_size: int = 1024, mesh: Mesh | None = None,
                          candidate_items: np.ndarray | None = None,
                          item_axes: Sequence[str] = (),
                          topk_chunk: int | None = None) -> dict[str, float]:
  """Full-catalogue ranking metrics, averaged over users with >= 1 relevant item.

  Args:
    score_fn: pure ``(user_block, item_table) -> [Ub, I]`` scores; higher is better.
    user_reps: pytree of arrays with leading dim U (NumPy or device arrays).
    item_table: pytree of arrays with leading dim I; put on device once per call.
    exclude_items: [U, E] int32, -1 padded: items masked out of each user's ranking
      (normally the training items). None: nothing excluded.
    relevant_items: [U, R] int32, -1 padded: each user's held-out items.
    k: cut-off for all metrics.
    block_size: users per jitted call; rounded up to a multiple of the number of devices
      the users are split over. Results do not depend on it.
    mesh: optional mesh; users are sharded over its axes not in ``item_axes``.
    candidate_items: optional 1-D item ids; rank only among these (others masked, relevant
      ids outside the set dropped).
    item_axes: mesh axes to shard the item table over (top-k merged across them).
    topk_chunk: chunk length for the exact ``chunked_top_k`` (None: automatic, 0: plain
      ``lax.top_k``). A speed knob only; results are identical.

  Returns:
    {"HR@k", "NDCG@k", "Recall@k", "Precision@k", "MRR@k": mean over evaluated users,
     "num_users": number of evaluated users}. Metrics are NaN if no user is evaluated.
  """
  num_users = _leading_dim(user_reps, "user_reps")
  num_items = _leading_dim(item_table, "item_table")
  if num_users == 0 or num_items == 0:
    raise ValueError(f"need at least one user and one item, got {num_users} and {num_items}")
  exclude = _padded_ids(exclude_items, num_users, "exclude_items")
  relevant = _dedupe_rows(_padded_ids(relevant_items, num_users, "relevant_items"))
  item_axes = tuple(item_axes)
  user_axes = tuple(a for a in mesh.axis_names if a not in item_axes) if mesh else ()
  if mesh is not None and any(a not in mesh.axis_names for a in item_axes):
    raise ValueError(f"item_axes {item_axes} not all in mesh axes {mesh.axis_names}")

  cand_mask = None
  if candidate_items is not None:
    candidates = np.asarray(candidate_items, np.int32).reshape(-1)
    cand_mask = np.zeros((num_items,), bool)
    cand_mask[candidates[(candidates >= 0) & (candidates < num_items)]] = True
    relevant = np.where((relevant >= 0) & cand_mask[np.clip(relevant, 0, num_items - 1)],
                        relevant, -1)

  # Items: pad so each item shard is a whole number of top-k chunks (padding rows are
  # masked by id), and place the table once.
  item_shards = _axes_size(mesh, item_axes)
  per_shard = -(-num_items // item_shards)
  chunk = _auto_chunk(per_shard, k) if topk_chunk is None else topk_chunk
  if chunk:
    per_shard = -(-per_shard // chunk) * chunk
  padded_items = per_shard * item_shards
  table = jax.tree.map(lambda x: _pad_rows(x, padded_items), item_table)
  table = _put(table, mesh, _spec(item_axes))
  if cand_mask is not None:
    cand_mask = _put(np.pad(cand_mask, (0, padded_items - num_items)), mesh, _spec(item_axes))

  user_shards = _axes_size(mesh, user_axes)
  block = -(-max(1, min(block_size, num_users)) // user_shards) * user_shards
  user_spec = _spec(user_axes)
  block_sums = []
  for start in range(0, num_users, block):
    rows = np.arange(start, start + block)
    real = rows < num_users
    rows = np.minimum(rows, num_users - 1)  # pad with copies of the last user...
    rel = np.where(real[:, None], relevant[rows], -1)  # ...who then has nothing relevant
    args = _put((_user_block(user_reps, rows), exclude[rows], rel), mesh, user_spec)
    block_sums.append(_full_ranking_block(
        *args, table, cand_mask, score_fn=score_fn, k=k, num_items=num_items,
        max_padding=padded_items - num_items, chunk=chunk, mesh=mesh,
        user_axes=user_axes, item_axes=item_axes))
  return _average(block_sums)


def _average(block_sums: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Adds per-block sums in float64 on the host (one transfer) and divides by the count."""
  host = jax.device_get(block_sums)
  totals = {name: float(np.sum([np.float64(b[name]) for b in host])) for name in host[0]}
  count = totals.pop("num_users")
  out = {name: (value / count if count > 0 else float("nan")) for name, value in totals.items()}
  out["num_users"] = count
  return out


# --------------------------------------------------------------------------------------------
# Sampled ranking (labelled "sampled"; the positive among N uniformly drawn negatives).
# --------------------------------------------------------------------------------------------


def _sample_negatives(key: jax.Array, banned: jax.Array, num_items: int,
                      num_negatives: int) -> jax.Array:
  """[N] distinct items drawn uniformly from ``range(num_items)`` minus ``banned``.

  Cost is O(N^2 + E log E) per user instead of O(num_items): Floyd's algorithm draws N
  distinct ranks among the n allowed items, and a searchsorted over the sorted banned ids
  maps allowed-rank v to its item id. Slots that cannot be filled (n < N) are -1.

  Args:
    key: this user's key.
    banned: [E] ids to avoid (excluded items and the positive); -1 / out-of-range ignored.
    num_items: catalogue size.
    num_negatives: N.
  """
  big = num_items  # sentinel that sorts after every real id
  x = jnp.sort(jnp.where((banned >= 0) & (banned < num_items), banned, big))
  dup = jnp.concatenate([jnp.zeros((1,), bool), x[1:] == x[:-1]])
  x = jnp.sort(jnp.where(dup, big, x))
  real = x < big
  num_allowed = num_items - jnp.sum(real)
  # y_j = x_j - j counts the allowed ids below x_j, so allowed-rank v maps to
  # v + #{j : y_j <= v}.
  y = jnp.where(real, x - jnp.arange(x.shape[0]), jnp.iinfo(jnp.int32).max)

  def floyd_step(i, chosen):
    j = num_allowed - num_negatives + i
    t = jax.random.randint(jax.random.fold_in(key, i), (), 0, jnp.maximum(j + 1, 1))
    pick = jnp.where(jnp.any(chosen == t), j, t)
    return chosen.at[i].set(jnp.where(j >= 0, pick, -1))

  ranks = jax.lax.fori_loop(0, num_negatives, floyd_step,
                            jnp.full((num_negatives,), -1, jnp.int32))
  items = ranks + jnp.searchsorted(y, ranks, side="right").astype(jnp.int32)
  return jnp.where(ranks >= 0, items, -1)


def _negatives_for_users(user_ids: jax.Array, exclude: jax.Array, positive: jax.Array,
                         num_items: int, num_negatives: int, seed: int) -> jax.Array:
  """[B, N] negatives of users ``user_ids`` (see ``sample_negatives``)."""
  base = jax.random.key(seed)
  # One key per global user id: the negatives do not depend on block size or sharding.
  keys = jax.vmap(lambda u: jax.random.fold_in(base, u))(user_ids)
  banned = jnp.concatenate([exclude, positive[:, None]], axis=1)
  return jax.vmap(_sample_negatives, in_axes=(0, 0, None, None))(
      keys, banned, num_items, num_negatives)


_negatives_for_users_jit = jax.jit(_negatives_for_users, static_argnums=(3, 4, 5))


def sample_negatives(exclude_items: np.ndarray | None, positive_item: np.ndarray,
                     num_items: int, num_negatives: int = 99, seed: int = 0) -> np.ndarray:
  """[U, N] int32: the negatives ``evaluate_sampled`` ranks each user's positive against.

  Distinct, uniform over ``range(num_items)`` minus the user's excluded items and positive;
  -1 where fewer than N items are allowed. Exposed so the drawn lists can be inspected,
  saved alongside results, or reused by another evaluator.
  """
  positive = np.asarray(positive_item, np.int32).reshape(-1)
  exclude = _padded_ids(exclude_items, positive.shape[0], "exclude_items")
  user_ids = np.arange(positive.shape[0], dtype=np.int32)
  return np.asarray(_negatives_for_users_jit(user_ids, exclude, positive, num_items,
                                             num_negatives, seed))


@functools.partial(
    jax.jit, static_argnames=("score_fn", "k", "num_items", "num_negatives", "seed", "mesh"))
def _sampled_block(user_block: PyTree, user_ids: jax.Array, exclude: jax.Array,
                   positive: jax.Array, item_table: PyTree, *, score_fn: ScoreFn, k: int,
                   num_items: int, num_negatives: int, seed: int,
                   mesh: Mesh | None) -> dict[str, jax.Array]:
  """Sampled-metric sums over the valid users of one block (plus their count)."""

  def per_user(user_block, user_ids, exclude, positive, item_table):
    negatives = _negatives_for_users(user_ids, exclude, positive, num_items, num_negatives,
                                     seed)
    valid = positive >= 0
    ranked = jnp.concatenate([jnp.where(valid, positive, 0)[:, None],
                              jnp.maximum(negatives, 0)], axis=1)  # [B, 1 + N]
    # Each user scores its own 1 + N items: a per-user table through a vmapped score_fn.
    items = jax.tree.map(lambda t: t[ranked], item_table)
    scores = jax.vmap(lambda u, it: score_fn(jax.tree.map(lambda a: a[None], u), it)[0])(
        user_block, items).astype(jnp.float32)
    out = metrics.sampled_metrics(scores[:, 0], scores[:, 1:], k, neg_mask=negatives >= 0)
    out["valid"] = valid
    return out

  if mesh is not None:
    users = _spec(tuple(mesh.axis_names))
    # No collectives inside; check_vma off because the sampler's fori_loop starts from a
    # replicated constant carry that becomes per-device, which the checker rejects.
    per_user = jax.shard_map(per_user, mesh=mesh, in_specs=(users, users, users, users, P()),
                             out_specs=users, check_vma=False)
  return _sums_over_valid_users(per_user(user_block, user_ids, exclude, positive, item_table))


def evaluate_sampled(score_fn: ScoreFn, user_reps: PyTree, item_table: PyTree,
                     exclude_items: np.ndarray | None, positive_item: np.ndarray,
                     num_negatives: int = 99, seed: int = 0, *, k: int = 10,
                     block_size: int = 1024, mesh: Mesh | None = None) -> dict[str, float]:
  """Sampled protocol: rank each user's positive among ``num_negatives`` random negatives.

  Negatives are distinct items drawn uniformly from the catalogue minus the user's excluded
  items and the positive, from ``jax.random.key(seed)`` folded with the user id, so they are
  reproducible and independent of ``block_size`` and ``mesh``. Ties count against the
  positive. Results are labelled "sampled_*" because they are not comparable to (and much
  more optimistic than) full-ranking numbers.

  ``score_fn`` is vmapped over users with a per-user item table of 1 + N rows, so it must be
  a pure per-(user, item) scorer -- true of any function valid for the full-ranking path.

  Args:
    score_fn: pure ``(user_block, item_table) -> [Ub, I]`` scores.
    user_reps: pytree, leading dim U.
    item_table: pytree, leading dim I; replicated over the mesh.
    exclude_items: [U, E] int32, -1 padded, never drawn as negatives. None: nothing.
    positive_item: [U] int32; -1 = no positive (user not evaluated).
    num_negatives: N (99 gives the usual list of 100).
    seed: sampling seed.
    k: cut-off.
    block_size: users per jitted call (rounded up to a multiple of the mesh size).
    mesh: optional mesh; users sharded over all its axes.

  Returns:
    {"sampled_HR@k", "sampled_NDCG@k", "num_users"}.
  """
  num_users = _leading_dim(user_reps, "user_reps")
  num_items = _leading_dim(item_table, "item_table")
  if num_users == 0 or num_items == 0:
    raise ValueError(f"need at least one user and one item, got {num_users} and {num_items}")
  exclude = _padded_ids(exclude_items, num_users, "exclude_items")
  positive = np.asarray(positive_item, np.int32).reshape(-1)
  if positive.shape[0] != num_users:
    raise ValueError(f"positive_item: expected [{num_users}], got {positive.shape}")
  positive = np.where(positive < num_items, positive, -1)

  table = _put(item_table, mesh, P())
  shards = int(np.prod(list(mesh.shape.values()))) if mesh is not None else 1
  block = -(-max(1, min(block_size, num_users)) // shards) * shards
  user_spec = _spec(tuple(mesh.axis_names)) if mesh is not None else P()
  block_sums = []
  for start in range(0, num_users, block):
    rows = np.arange(start, start + block)
    real = rows < num_users
    rows = np.minimum(rows, num_users - 1)
    args = _put((_user_block(user_reps, rows), rows.astype(np.int32), exclude[rows],
                 np.where(real, positive[rows], -1)), mesh, user_spec)
    block_sums.append(_sampled_block(
        *args, table, score_fn=score_fn, k=k, num_items=num_items,
        num_negatives=num_negatives, seed=seed, mesh=mesh))
  return _average(block_sums)


# --------------------------------------------------------------------------------------------
# Cross-modal retrieval.
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("ks",))
def _retrieval_block(query: jax.Array, target: jax.Array, rows: jax.Array, valid: jax.Array, *,
                     ks: tuple[int, ...]) -> jax.Array:
  """[len(ks)] number of valid queries in the block whose target ranks within each k."""
  # Both L2-normalised: cosine similarity. Full precision, since a bf16 matmul (the TPU/GPU
  # default) would create ties and flips around the correct target.
  sims = jnp.matmul(query, target.T, precision=jax.lax.Precision.HIGHEST)
  correct = jnp.take_along_axis(sims, rows[:, None], axis=1)
  # Other targets scoring >= the correct one rank above it (ties count against the query);
  # the correct target itself is always counted once, hence the -1.
  rank = jnp.sum(sims >= correct, axis=1) - 1
  return jnp.stack([jnp.sum(valid & (rank < kk)) for kk in ks]).astype(jnp.float32)


def _l2_normalize(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cross_modal_retrieval(query_emb: jax.Array | np.ndarray, target_emb: jax.Array | np.ndarray,
                          ks: Sequence[int] = (1, 5, 10), *,
                          block_size: int = 1024) -> dict[str, float]:
  """Recall@k of query -> target retrieval where row i's correct target is row i.

  Similarity is cosine; ties with the correct target count against it. The N x N similarity
  matrix is built ``block_size`` queries at a time so large N fits in memory.

  Args:
    query_emb: [N, d] query embeddings (e.g. text).
    target_emb: [N, d] target embeddings (e.g. image), row-aligned with the queries.
    ks: cut-offs.
    block_size: queries per jitted call.

  Returns:
    {"R@k": fraction of queries whose target ranks in the top k, for each k in ks}.
  """
  n = int(np.shape(query_emb)[0])
  if np.shape(target_emb)[0] != n or n == 0:
    raise ValueError(f"need N >= 1 row-aligned pairs, got {np.shape(query_emb)} and "
                     f"{np.shape(target_emb)}")
  ks = tuple(int(kk) for kk in ks)
  query, target = _l2_normalize(query_emb), _l2_normalize(target_emb)
  block = max(1, min(block_size, n))
  counts = []
  for start in range(0, n, block):
    rows = np.arange(start, start + block)
    valid = rows < n
    rows = np.minimum(rows, n - 1)
    counts.append(_retrieval_block(query[rows], target, rows.astype(np.int32), valid, ks=ks))
  total = np.sum(np.asarray(jax.device_get(counts), np.float64), axis=0)
  return {f"R@{kk}": float(total[i] / n) for i, kk in enumerate(ks)}
