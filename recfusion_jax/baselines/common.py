"""What every baseline shares: the ranker interface, data helpers, the BPR trainer, tuning.

A baseline is fitted on ``dataset.train`` and exposes a ``Ranker``: user representations, an
item table and a pure ``score_fn`` -- exactly what ``evaluate.evaluate_full_ranking`` and
``evaluate.evaluate_sampled`` take -- so baselines and RecFusion are ranked by the same code.

Tuning protocol (``tune_and_fit``): every grid point is fitted on ``train`` and scored by
NDCG@10 on ``valid`` (full ranking, the user's train items excluded), iterative models every
``eval_every`` epochs, so the number of epochs is tuned too; the winner is then refitted on
the final fit data set (normally train + valid, see ``merge_valid_into_train``).
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recfusion_jax import evaluate
from recfusion_jax.data import examples
from recfusion_jax.data.types import Interactions, RecDataset

PyTree = Any
ScoreFn = Callable[[Any, Any], jax.Array]


def dot_scores(users: Mapping[str, jax.Array], items: Mapping[str, jax.Array]) -> jax.Array:
  """[Ub, I] inner products; the score_fn of every embedding baseline (one jit cache entry)."""
  return users["emb"] @ items["emb"].T


@dataclasses.dataclass
class Ranker:
  """A fitted model as the evaluator sees it."""

  user_reps: Callable[[np.ndarray], PyTree]   # user ids [U] -> pytree with leading dim U
  item_table: PyTree                          # pytree with leading dim num_items
  score_fn: ScoreFn = dot_scores              # pure (user_block, item_table) -> [Ub, I]


class Baseline(abc.ABC):
  """A model fitted on ``dataset.train``. Iterative models continue fitting in ``train``."""

  iterative: bool = False

  def train(self, epochs: int) -> list[float]:
    """Runs ``epochs`` more epochs; returns the mean training loss of each."""
    del epochs
    return []

  @abc.abstractmethod
  def ranker(self) -> Ranker:
    """The current model as a Ranker."""


class BprEmbeddings(Baseline):
  """User and item embeddings trained with BPR; scores are their dot products.

  Subclasses set ``self.params``, ``self.key``, ``self.pair_users``/``self.pair_items`` and call
  ``_init_bpr`` with ``embed(params) -> (user_emb, item_emb)`` (identity for MF, graph
  propagation for LightGCN).
  """

  iterative = True

  def _init_bpr(self, embed: Callable[[PyTree], tuple[jax.Array, jax.Array]], *,
                learning_rate: float, batch_size: int, reg: float, num_items: int) -> None:
    tx = optax.adam(learning_rate)
    self.opt_state = tx.init(self.params)
    self._embed = jax.jit(embed)
    self._epoch = make_bpr_epoch(embed, tx, num_pairs=self.pair_users.size,
                                 num_items=num_items, batch_size=batch_size, reg=reg)

  def train(self, epochs: int) -> list[float]:
    losses = []
    for _ in range(epochs):
      self.key, key = jax.random.split(self.key)
      self.params, self.opt_state, loss = self._epoch(self.params, self.opt_state, key,
                                                      self.pair_users, self.pair_items)
      losses.append(float(loss))
    return losses

  def ranker(self) -> Ranker:
    users, items = (np.asarray(x) for x in self._embed(self.params))
    return Ranker(user_reps=lambda u: {"emb": users[u]}, item_table={"emb": items})


# ---- data helpers ----------------------------------------------------------------------------


def merge_valid_into_train(dataset: RecDataset) -> RecDataset:
  """The final fit data: train + valid as ``train`` (time ordered), valid empty, ids refreshed.

  Every protocol carves ``valid`` out of what would otherwise be training data, so once the
  hyper-parameters are chosen the final model may learn from it too.
  """
  both = _concatenate(dataset.train, dataset.valid)
  num_items = dataset.catalogue.num_items
  has_id = np.zeros(num_items, bool)
  has_id[both.item] = True
  user_has_id = np.zeros(dataset.num_users, bool)
  user_has_id[both.user] = True
  empty = dataset.valid.select(np.zeros(len(dataset.valid), bool))
  known = None   # None stays None: known is then the merged train
  if dataset.known is not None or dataset.known_valid is not None:
    known = _concatenate(dataset.known_or_train(),
                         dataset.valid if dataset.known_valid is None else dataset.known_valid)
  return dataclasses.replace(
      dataset, catalogue=dataclasses.replace(dataset.catalogue, has_id=has_id), train=both,
      valid=empty, cold_items=np.flatnonzero(~has_id).astype(np.int32), user_has_id=user_has_id,
      name=dataset.name + "+valid", known=known, known_valid=None)


def _concatenate(first: Interactions, second: Interactions) -> Interactions:
  """Both sets in (user, time) order; a stable sort, so ties keep ``first``'s rows first."""
  both = Interactions(*(np.concatenate([getattr(first, f), getattr(second, f)])
                        for f in ("user", "item", "timestamp", "rating")))
  return both.select(np.lexsort((np.arange(len(both)), both.timestamp, both.user)))


def binary_matrix(interactions: Interactions, num_users: int, num_items: int) -> np.ndarray:
  """[U, I] float32 0/1 matrix of the (deduplicated) pairs."""
  x = np.zeros((num_users, num_items), np.float32)
  x[interactions.user, interactions.item] = 1.0
  return x


def unique_pairs(interactions: Interactions) -> tuple[np.ndarray, np.ndarray]:
  """Distinct (user, item) pairs as two int32 arrays (re-consumed items count once)."""
  pairs = np.unique(np.stack([interactions.user, interactions.item], 1).astype(np.int64), axis=0)
  return pairs[:, 0].astype(np.int32), pairs[:, 1].astype(np.int32)


# ---- evaluation on one split -----------------------------------------------------------------


def _pad_width(ids: np.ndarray) -> np.ndarray:
  """-1 pads the columns to a power of two: fewer distinct shapes, fewer evaluator compiles."""
  width = 1 << max(0, int(ids.shape[1]) - 1).bit_length()
  return np.pad(ids, ((0, 0), (0, width - ids.shape[1])), constant_values=-1)



def rank_split(ranker: Ranker, dataset: RecDataset, heldout: Interactions, *, k: int = 10,
               candidate_items: np.ndarray | None = None, block_size: int = 256,
               mesh: Any = None, item_axes: tuple[str, ...] = ()) -> dict[str, float]:
  """Full-ranking metrics of ``heldout`` over the users with >= 1 held-out item.

  Each user's known items (``dataset.known``, default ``dataset.train``) are excluded from the
  ranking; ``mesh`` shards the user blocks, and the item table over ``item_axes``
  (``evaluate.evaluate_full_ranking``).
  """
  users = np.unique(heldout.user)
  if users.size == 0:
    raise ValueError(f"{dataset.name}: nothing held out to rank")
  return evaluate.evaluate_full_ranking(
      ranker.score_fn, ranker.user_reps(users), ranker.item_table,
      _pad_width(examples.known_items_of(dataset, users)),
      _pad_width(examples.heldout_items_of(heldout, users, dataset.num_users)), k=k,
      block_size=block_size, candidate_items=candidate_items, mesh=mesh,
      item_axes=tuple(item_axes) if mesh is not None else ())


def sampled_split(ranker: Ranker, dataset: RecDataset, heldout: Interactions, *, k: int = 10,
                  candidate_items: np.ndarray | None = None, num_negatives: int = 99,
                  seed: int = 0, block_size: int = 128) -> dict[str, float]:
  """The sampled protocol on ``heldout``: each user's latest held-out item among N negatives.

  Negatives are uniform over the items (or ``candidate_items``) minus the user's known
  (``dataset.known``, default train) and held-out items. With candidates, the item table is cut
  down to them and ids are remapped, so the negatives come from the candidate set; held-out
  items outside it are dropped.
  """
  table, num_items = ranker.item_table, dataset.catalogue.num_items
  position = np.arange(num_items)
  if candidate_items is not None:
    candidate_items = np.unique(np.asarray(candidate_items, np.int64))
    position = np.full(num_items, -1, np.int64)
    position[candidate_items] = np.arange(candidate_items.size)
    heldout = heldout.select(position[heldout.item] >= 0)
    table = jax.tree.map(lambda x: x[candidate_items], table)
  users = np.unique(heldout.user)
  if users.size == 0:
    raise ValueError(f"{dataset.name}: nothing held out to rank")
  latest = np.lexsort((np.arange(len(heldout)), heldout.timestamp, heldout.user))
  last_row = latest[np.searchsorted(heldout.user[latest], users, side="right") - 1]
  positive = position[heldout.item[last_row]].astype(np.int32)

  def remap(ids: np.ndarray) -> np.ndarray:
    return np.where(ids >= 0, position[np.maximum(ids, 0)], -1).astype(np.int32)

  # The user's other held-out items are not negatives either (they are not wrong answers).
  exclude = _pad_width(np.concatenate(
      [remap(examples.known_items_of(dataset, users)),
       remap(examples.heldout_items_of(heldout, users, dataset.num_users))], axis=1))
  return evaluate.evaluate_sampled(ranker.score_fn, ranker.user_reps(users), table, exclude,
                                   positive, num_negatives=num_negatives, seed=seed, k=k,
                                   block_size=block_size)


# ---- BPR training shared by BPR-MF and LightGCN ------------------------------------------------


def bpr_loss(user: jax.Array, pos: jax.Array, neg: jax.Array) -> jax.Array:
  """Mean of -log sigmoid(<u, i> - <u, j>) over the batch."""
  margin = jnp.sum(user * (pos - neg), axis=-1)
  return -jnp.mean(jax.nn.log_sigmoid(margin))


def make_bpr_epoch(embed_fn: Callable[[PyTree], tuple[jax.Array, jax.Array]],
                   tx: optax.GradientTransformation, *, num_pairs: int, num_items: int,
                   batch_size: int, reg: float):
  """A jitted ``(params, opt_state, key, pair_users, pair_items) -> (params, opt_state, loss)``.

  One epoch is ``ceil(num_pairs / batch_size)`` steps, all inside one ``lax.scan`` (no host
  round trip per step). Each step draws positives uniformly (with replacement) from the train
  pairs and one negative per positive uniformly from the catalogue. ``embed_fn(params)`` gives
  the (user, item) embeddings that are scored; the L2 penalty ``reg`` is on the batch rows of
  the raw parameters ``params['user']`` / ``params['item']`` (the LightGCN convention, and for
  MF the same thing).
  """
  steps = -(-num_pairs // batch_size)

  def loss_fn(params, u, i, j):
    users, items = embed_fn(params)
    loss = bpr_loss(users[u], items[i], items[j])
    penalty = (jnp.sum(params["user"][u] ** 2) + jnp.sum(params["item"][i] ** 2)
               + jnp.sum(params["item"][j] ** 2)) / (2 * batch_size)
    return loss + reg * penalty, loss

  def step(carry, key):
    params, opt_state, pair_users, pair_items = carry
    k_pos, k_neg = jax.random.split(key)
    idx = jax.random.randint(k_pos, (batch_size,), 0, num_pairs)
    neg = jax.random.randint(k_neg, (batch_size,), 0, num_items)
    grads, loss = jax.grad(loss_fn, has_aux=True)(params, pair_users[idx], pair_items[idx], neg)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, pair_users, pair_items), loss

  @jax.jit
  def epoch(params, opt_state, key, pair_users, pair_items):
    (params, opt_state, _, _), losses = jax.lax.scan(
        step, (params, opt_state, pair_users, pair_items), jax.random.split(key, steps))
    return params, opt_state, jnp.mean(losses)

  return epoch


# ---- tuning -----------------------------------------------------------------------------------


@dataclasses.dataclass
class TuneResult:
  params: dict[str, Any]          # the chosen grid point
  epochs: int                     # chosen number of epochs (0 for closed-form models)
  valid_ndcg: float               # its NDCG@10 on valid
  log: list[dict[str, Any]]       # every (grid point, epochs, NDCG@10) tried
  losses: list[float]             # training loss per epoch of the final fit


def tune_and_fit(factory: Callable[..., Baseline], tune_data: RecDataset, fit_data: RecDataset,
                 grid: Sequence[Mapping[str, Any]], *, max_epochs: int = 0, eval_every: int = 1,
                 metric: str = "NDCG@10") -> tuple[Baseline, TuneResult]:
  """Chooses the grid point (and epoch count) by ``metric`` on ``tune_data.valid``; refits.

  Args:
    factory: ``factory(dataset, **grid_point)`` builds an unfitted (iterative) or fitted
      (closed-form) Baseline on ``dataset.train``; its ``iterative`` attribute says which.
    tune_data: data set whose ``train`` is fitted and ``valid`` scored while tuning.
    fit_data: data set of the final fit (e.g. ``merge_valid_into_train(tune_data)``).
    grid: grid points (keyword arguments of ``factory``); one point skips tuning when the
      model is closed-form.
    max_epochs, eval_every: iterative models are scored every ``eval_every`` epochs up to
      ``max_epochs``.
    metric: key of the evaluator's output to maximise (the valid rankings exclude
      ``tune_data``'s known items, as every evaluation does).

  Returns:
    (the refitted model, the TuneResult).
  """
  log: list[dict[str, Any]] = []
  best: tuple[float, int, int] | None = None   # (score, grid index, epochs)
  # functools.partial(cls, ...) hides the class attribute; look through it.
  if len(grid) > 1 or getattr(getattr(factory, "func", factory), "iterative", True):
    if len(tune_data.valid) == 0:
      raise ValueError(f"{tune_data.name}: tuning needs a valid split")
    for g, point in enumerate(grid):
      model = factory(tune_data, **point)
      if model.iterative and max_epochs < eval_every:
        raise ValueError(f"max_epochs={max_epochs} < eval_every={eval_every}: nothing to score")
      epoch_list = range(eval_every, max_epochs + 1, eval_every) if model.iterative else [0]
      done = 0
      for epochs in epoch_list:
        model.train(epochs - done)
        done = epochs
        score = rank_split(model.ranker(), tune_data, tune_data.valid)[metric]
        log.append({**point, "epochs": epochs, metric: score})
        logging.info("tune %s epochs=%d: valid %s=%.4f", point, epochs, metric, score)
        if best is None or score > best[0]:
          best = (score, g, epochs)
  else:
    best = (float("nan"), 0, 0)
  score, g, epochs = best
  model = factory(fit_data, **grid[g])
  losses = model.train(epochs)
  return model, TuneResult(dict(grid[g]), epochs, score, log, losses)


__all__ = ["Baseline", "Ranker", "TuneResult", "binary_matrix", "bpr_loss", "dot_scores",
           "make_bpr_epoch", "merge_valid_into_train", "rank_split", "sampled_split",
           "tune_and_fit", "unique_pairs"]
