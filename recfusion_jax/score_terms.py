"""Terms of RecFusion's score that training leaves at weight 0 and that are weighed after it.

``model.transition="markov"`` (a first-order chain) and ``model.item_item="ease_fixed"`` (EASE's
closed form) are fixed, not trained: their weights ``{key}_setting`` are 0 in training, so the
trained model is the one without them, and are chosen here on a valid split afterwards, jointly
and with EASE's L2 strength and the chain's decay (docs/TUNING.md §27, §28, §31). Every path
that trains uses this module -- ``train.train_and_evaluate`` (``main``) and the benchmark
runner -- and writes the choice to ``score_terms.json`` in the run directory, which
``recommend`` and ``export`` apply on restore: the checkpoint holds what was trained, the file
what was chosen after it.
"""

from __future__ import annotations

import functools
import itertools
import json
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from recfusion_jax import model_eval, sharding
from recfusion_jax.baselines.common import Ranker, rank_split
from recfusion_jax.data.types import RecDataset
from recfusion_jax.models import item_item

FILE = "score_terms.json"

# {the term's key: {its setting's entries, the weight first: the values to try}}. All of them
# are chosen jointly: the best weight of one term depends on the other's (on loo, EASE's best
# weight beside the chain is a fifth of its best alone), and EASE's best weight on its L2
# strength (docs/TUNING.md §30, §31). Weights are in the trained model's logit units, whose
# scale a fit sets: hence grids over 1.5-3 decades. The transition's scores are probabilities
# (<= 1 an item), EASE's a regression onto 0/1 (§27, §28). EASE's weights reach 32 because the
# weaker ablations' valid score still rose at 8 (§29), and start at 0.05 because beside the
# chain valid chose 0.05-0.15 on every loo seed (§30); its regs are the EASE baseline's grid
# bar 50, which no probe came near.
TRANSITION_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
TRANSITION_DECAYS = (0.5, 0.7)
ITEM_ITEM_WEIGHTS = (0.0, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
ITEM_ITEM_REGS = (100.0, 200.0, 500.0, 1000.0, 2000.0)
SCORE_TERMS: dict[str, dict[str, tuple[float, ...]]] = {
    "item_item": {"weight": ITEM_ITEM_WEIGHTS, "reg": ITEM_ITEM_REGS},
    "transition": {"weight": TRANSITION_WEIGHTS, "decay": TRANSITION_DECAYS},
}
# Entries that say how a term's fixed matrix is filled, not what its setting variable holds:
# setting one refills the matrix from the data the model was fit on.
MATRIX_ENTRIES = {"item_item": ("reg",)}

Setting = Mapping[str, float]   # one term's entries by name (``setting_names``)
Grids = Mapping[str, Mapping[str, Sequence[float]]]


def needs_score_terms(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config``'s model has a term whose weight is chosen on valid after training."""
  return (config.model.get("transition", "off") != "off"
          or config.model.get("item_item", "off") == "ease_fixed")


def setting_names(key: str) -> tuple[str, ...]:
  """The names of term ``key``'s setting entries, in order: the weight, then the others."""
  return tuple(SCORE_TERMS[key])


def _variable_names(key: str) -> tuple[str, ...]:
  return tuple(n for n in setting_names(key) if n not in MATRIX_ENTRIES.get(key, ()))


def score_terms(model: Any) -> list[str]:
  """The keys of ``SCORE_TERMS`` that ``model`` carries (a ``{key}_setting`` variable)."""
  return [key for key in SCORE_TERMS if getattr(model, f"{key}_setting", None) is not None]


def set_score_term(model: Any, key: str, values: Sequence[float]) -> None:
  """Sets ``model.{key}_setting`` to ``values`` (the weight, then the variable's other entries:
  the transition's decay), placed as it lies."""
  variable = getattr(model, f"{key}_setting")
  variable[...] = jax.device_put(np.asarray(values, np.float32), variable[...].sharding)


def fill_ease_matrix(model: Any, dataset: RecDataset, reg: float) -> None:
  """``model.item_item`` := EASE's weights with L2 strength ``reg`` on ``dataset.train``, placed
  as the variable lies (split over a mesh when it is)."""
  variable = model.item_item
  variable[...] = sharding.put_global(
      np.asarray(item_item.ease_weights_of(dataset, reg), np.float32), variable[...].sharding)


def configured_matrix(key: str, config: ml_collections.ConfigDict) -> dict[str, float]:
  """The matrix entries of term ``key`` that ``config`` fills its model with (training, restore)."""
  return {"reg": float(config.model.item_item_reg)} if key == "item_item" else {}


def apply_setting(model: Any, key: str, setting: Setting, dataset: RecDataset,
                  config: ml_collections.ConfigDict) -> None:
  """Sets term ``key`` of ``model`` (built or restored from ``config``, fit on ``dataset``) to
  ``setting``: the variable's entries, and the matrix refilled from ``dataset`` where the
  setting's matrix entries differ from the ones ``config`` filled it with."""
  matrix = {name: float(setting[name]) for name in MATRIX_ENTRIES.get(key, ())}
  if matrix and matrix != configured_matrix(key, config):
    logging.info("score term %s: matrix refilled with %s from %s", key, matrix, dataset.name)
    fill_ease_matrix(model, dataset, **matrix)
  set_score_term(model, key, [setting[name] for name in _variable_names(key)])


def choose_settings(model: Any, dataset: RecDataset, keys: Sequence[str], *, history_len: int,
                    metric: str, chunk: int = 256, grids: Grids | None = None, mesh: Any = None,
                    item_axes: tuple[str, ...] = ()
                    ) -> tuple[dict[str, dict[str, float]], list[tuple[dict, float]]]:
  """(settings, scores): the point of the product of the ``keys`` terms' grids (``SCORE_TERMS``
  or ``grids``) at which ``model``, fit on ``dataset.train``, scores best on ``dataset.valid``,
  ranked on ``mesh`` as the train loop's validation ranks; and every point with its score.
  Ties go to the smallest grid indices, term by term in ``keys`` order, the weight first: the
  smallest weights. The model's settings and matrices are left as they were.

  Each term is linear in its weight, so users are encoded once for each value of the other
  entries (EASE's matrix refilled per reg), with every weight at 1, and the weights scale.
  A term at weight 0 scores the same whatever its other entries: ranked once.
  """
  if len(dataset.valid) == 0:
    raise ValueError(f"{dataset.name}: choosing the {list(keys)} weights needs a valid split")
  grids = {key: dict((grids or SCORE_TERMS)[key]) for key in keys}
  names = {key: list(grids[key]) for key in keys}
  # Grid indices of each term's other entries, and of its weights.
  others = {key: list(itertools.product(*(range(len(grids[key][n])) for n in names[key][1:])))
            for key in keys}
  value = lambda key, name, i: float(grids[key][name][i])
  saved = {key: getattr(model, f"{key}_setting")[...] for key in keys}
  saved_matrix = {key: getattr(model, key)[...] for key in keys if MATRIX_ENTRIES.get(key)}
  scores: dict[tuple, float] = {}
  filled: dict[str, tuple] = {}
  try:
    for variant in itertools.product(*(others[key] for key in keys)):
      for key, rest in zip(keys, variant):
        entries = {n: value(key, n, i) for n, i in zip(names[key][1:], rest)}
        matrix = {n: entries[n] for n in MATRIX_ENTRIES.get(key, ())}
        if matrix and filled.get(key) != rest:
          fill_ease_matrix(model, dataset, **matrix)
          filled[key] = rest
        set_score_term(model, key, [1.0 if n == "weight" else entries[n]
                                    for n in _variable_names(key)])
      ranker = model_eval.model_ranker(model, dataset, history_len=history_len, chunk=chunk)
      cache: dict[str, Any] = {}

      def reps(users, weights, ranker=ranker, cache=cache):
        users_key = np.asarray(users).tobytes()
        if users_key not in cache:
          cache.clear()
          cache[users_key] = ranker.user_reps(users)
        return {**cache[users_key], **{key: cache[users_key][key] * w
                                       for key, w in zip(keys, weights)}}

      for weight_index in itertools.product(*(range(len(grids[key]["weight"])) for key in keys)):
        point = tuple((w, *rest) for w, rest in zip(weight_index, variant))
        # A term at weight 0: its other entries change nothing, so its first point stands in.
        same = tuple((0, *others[key][0]) if index[0] == 0 else index
                     for key, index in zip(keys, point))
        if same not in scores:
          weights = [value(key, "weight", w) for key, w in zip(keys, weight_index)]
          scaled = Ranker(user_reps=functools.partial(reps, weights=weights),
                          item_table=ranker.item_table, score_fn=ranker.score_fn)
          scores[same] = float(rank_split(scaled, dataset, dataset.valid, block_size=chunk,
                                          mesh=mesh, item_axes=item_axes)[metric])
        scores[point] = scores[same]
  finally:
    for key, matrix in saved_matrix.items():
      getattr(model, key)[...] = matrix
    for key, setting in saved.items():
      getattr(model, f"{key}_setting")[...] = setting
  top = max(scores.values())
  best = min(point for point, score in scores.items() if score == top)
  named = lambda point: {key: {n: value(key, n, i) for n, i in zip(names[key], index)}
                         for key, index in zip(keys, point)}
  return named(best), [(named(point), scores[point]) for point in sorted(scores)]


def grids_of(config: ml_collections.ConfigDict) -> dict[str, dict[str, tuple[float, ...]]]:
  """``SCORE_TERMS`` with the entries ``config.score_term_grid`` overrides."""
  override = config.get("score_term_grid")
  override = override.to_dict() if override is not None else {}
  return {key: {**grid, **{name: tuple(map(float, values))
                           for name, values in override.get(key, {}).items()}}
          for key, grid in SCORE_TERMS.items()}


def choose_all(model: Any, dataset: RecDataset, config: ml_collections.ConfigDict, *,
               chooser: Any = None, model_dataset: RecDataset | None = None, mesh: Any = None
               ) -> dict[str, dict[str, Any]]:
  """Chooses every term ``model`` carries jointly on ``dataset.valid`` (``choose_settings``) and
  sets them on ``model``, whose matrices are refilled from ``model_dataset`` (default
  ``dataset``) where the choice differs from ``config``'s. ``chooser`` ranks valid in its place:
  a train-only twin where ``model`` was fit on train + valid. Returns {key: {weight, reg |
  decay, metric, valid_log}}, what ``save`` writes; each term's valid_log is the slice of the
  joint grid through the choice (the other terms at their chosen settings)."""
  chooser = model if chooser is None else chooser
  model_dataset = dataset if model_dataset is None else model_dataset
  metric = str(config.validation.metric)
  keys = score_terms(model)
  chosen, points = choose_settings(chooser, dataset, keys, metric=metric,
                                   history_len=config.model.user.history_len,
                                   chunk=config.eval_block_size, grids=grids_of(config),
                                   mesh=mesh, item_axes=tuple(config.get("eval_item_axes", ())))
  info: dict[str, dict[str, Any]] = {}
  for key in keys:
    apply_setting(model, key, chosen[key], model_dataset, config)
    log = [{**setting[key], metric: score} for setting, score in points
           if all(setting[other] == chosen[other] for other in keys if other != key)]
    info[key] = {**chosen[key], "metric": metric, "valid_log": log}
  logging.info("score terms %s chosen jointly on %s valid %s (%d grid points)", chosen,
               dataset.name, metric, len(points))
  return info


def save(workdir: str | epath.Path, info: dict[str, dict[str, Any]]) -> None:
  """Writes ``choose_all``'s result beside the checkpoints (process 0)."""
  if jax.process_index() == 0:
    (epath.Path(workdir) / FILE).write_text(json.dumps(info, indent=2))


def apply_saved(model: Any, workdir: str | epath.Path, dataset: RecDataset,
                config: ml_collections.ConfigDict) -> dict[str, tuple[float, ...]]:
  """Sets the terms ``score_terms.json`` of ``workdir`` chose on ``model`` (restored from
  ``config``, fit on ``dataset``: its matrices are refilled from it where the file's choice
  differs); returns them, in ``setting_names`` order.

  A model that carries terms but has no such file keeps them at weight 0, and says so in the
  log: a run stopped between its last checkpoint and the choice, or trained before the file."""
  terms = score_terms(model)
  if not terms:
    return {}
  path = epath.Path(workdir) / FILE
  if not path.exists():
    logging.warning("%s: no %s, so the score terms %s stay at weight 0 (choose them on valid: "
                    "train.train_and_evaluate or the benchmark runner)", workdir, FILE, terms)
    return {}
  info = json.loads(path.read_text())
  missing = sorted(set(terms) - set(info))
  if missing:
    raise ValueError(f"{path} sets {sorted(info)}, the model carries {terms}: no {missing}")
  applied = {}
  for key in terms:
    # A file written before the matrix entries were chosen was chosen at the configured ones.
    setting = {**configured_matrix(key, config), **info[key]}
    apply_setting(model, key, setting, dataset, config)
    applied[key] = tuple(float(setting[name]) for name in setting_names(key))
  return applied
