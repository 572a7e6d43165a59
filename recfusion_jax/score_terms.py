"""Terms of RecFusion's score that training leaves at weight 0 and that are weighed after it.

``model.transition="markov"`` (a first-order chain) and ``model.item_item="ease_fixed"`` (EASE's
closed form) are fixed, not trained: their weights ``{key}_setting`` are 0 in training, so the
trained model is the one without them, and are chosen here on a valid split afterwards
(docs/TUNING.md §27, §28). Every path that trains uses this module -- ``train.train_and_evaluate``
(``main``) and the benchmark runner -- and writes the choice to ``score_terms.json`` in the run
directory, which ``recommend`` and ``export`` apply on restore: the checkpoint holds what was
trained, the file what was chosen after it.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from recfusion_jax import model_eval
from recfusion_jax.baselines.common import Ranker, rank_split
from recfusion_jax.data.types import RecDataset

FILE = "score_terms.json"

# {the users' key: (weights, the setting's other entries' names, their values to try)}.
# Weights are in the trained model's logit units, whose scale a fit sets: hence grids over 1.5-2
# decades. The transition's scores are probabilities (<= 1 an item), EASE's a regression onto
# 0/1 (docs/TUNING.md §27, §28). EASE's grid reaches 32 because the weaker ablations' valid
# score still rose at 8 (§29).
TRANSITION_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
TRANSITION_DECAYS = (0.5, 0.7)
ITEM_ITEM_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
SCORE_TERMS: dict[str, tuple[tuple[float, ...], tuple[str, ...], tuple[tuple[float, ...], ...]]] = {
    "item_item": (ITEM_ITEM_WEIGHTS, (), ((),)),
    "transition": (TRANSITION_WEIGHTS, ("decay",), tuple((d,) for d in TRANSITION_DECAYS)),
}


def needs_score_terms(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config``'s model has a term whose weight is chosen on valid after training."""
  return (config.model.get("transition", "off") != "off"
          or config.model.get("item_item", "off") == "ease_fixed")


def setting_names(key: str) -> tuple[str, ...]:
  """The names of term ``key``'s setting entries, in order: the weight, then the others."""
  return ("weight", *SCORE_TERMS[key][1])


def score_terms(model: Any) -> list[str]:
  """The keys of ``SCORE_TERMS`` that ``model`` carries (a ``{key}_setting`` variable)."""
  return [key for key in SCORE_TERMS if getattr(model, f"{key}_setting", None) is not None]


def set_score_term(model: Any, key: str, setting: Sequence[float]) -> None:
  """Sets ``model.{key}_setting`` (weight, then the other entries), placed as it lies."""
  variable = getattr(model, f"{key}_setting")
  variable[...] = jax.device_put(np.asarray(setting, np.float32), variable[...].sharding)


def choose_score_term(model: Any, dataset: RecDataset, key: str, *, history_len: int,
                      metric: str, chunk: int = 256,
                      weights: Sequence[float] | None = None,
                      others: Sequence[Sequence[float]] | None = None,
                      mesh: Any = None, item_axes: tuple[str, ...] = ()
                      ) -> tuple[tuple[float, ...], list[dict[str, float]]]:
  """(setting, log): the grid point of ``model``'s ``key`` term (``SCORE_TERMS``) that scores
  best on ``dataset.valid`` (ties: the first, so the smallest weight), and every point's
  score, ranked on ``mesh`` as the train loop's validation ranks. The term is linear in its
  weight, so each value of the other entries encodes users once, at weight 1, and scales. The
  model's setting is left as it was."""
  if len(dataset.valid) == 0:
    raise ValueError(f"{dataset.name}: choosing the {key} weight needs a valid split")
  default_weights, names, default_others = SCORE_TERMS[key]
  weights = default_weights if weights is None else weights
  others = default_others if others is None else others
  saved = np.asarray(getattr(model, f"{key}_setting")[...])
  log, best = [], None
  try:
    for rest in others:
      set_score_term(model, key, (1.0, *rest))
      ranker = model_eval.model_ranker(model, dataset, history_len=history_len, chunk=chunk)
      cache: dict[str, Any] = {}

      def reps(users, weight, ranker=ranker, cache=cache):
        users_key = np.asarray(users).tobytes()
        if users_key not in cache:
          cache.clear()
          cache[users_key] = ranker.user_reps(users)
        return {**cache[users_key], key: cache[users_key][key] * weight}

      for weight in weights:
        scaled = Ranker(user_reps=functools.partial(reps, weight=weight),
                        item_table=ranker.item_table, score_fn=ranker.score_fn)
        score = float(rank_split(scaled, dataset, dataset.valid, block_size=chunk, mesh=mesh,
                                 item_axes=item_axes)[metric])
        point = (float(weight), *map(float, rest))
        log.append({**dict(zip(("weight", *names), point)), metric: score})
        if best is None or score > best[0]:
          best = (score, point)
  finally:
    set_score_term(model, key, saved)
  return best[1], log


def choose_all(model: Any, dataset: RecDataset, config: ml_collections.ConfigDict, *,
               chooser: Any = None, mesh: Any = None) -> dict[str, dict[str, Any]]:
  """Chooses every term ``model`` carries on ``dataset.valid``, one after the other (each beside
  the ones already set), and sets them on ``model``. ``chooser`` ranks valid in its place: a
  train-only twin where ``model`` was fit on train + valid. Returns {key: {weight, [decay],
  metric, valid_log}}, what ``save`` writes."""
  chooser = model if chooser is None else chooser
  metric = str(config.validation.metric)
  info: dict[str, dict[str, Any]] = {}
  for key in score_terms(model):
    setting, log = choose_score_term(chooser, dataset, key, metric=metric,
                                     history_len=config.model.user.history_len,
                                     chunk=config.eval_block_size, mesh=mesh,
                                     item_axes=tuple(config.get("eval_item_axes", ())))
    set_score_term(model, key, setting)
    if chooser is not model:   # the twin chooses the next term beside this one
      set_score_term(chooser, key, setting)
    named = dict(zip(setting_names(key), setting))
    info[key] = {**named, "metric": metric, "valid_log": log}
    logging.info("score term %s: %s chosen on %s valid %s", key, named,
                 dataset.name, metric)
  return info


def save(workdir: str | epath.Path, info: dict[str, dict[str, Any]]) -> None:
  """Writes ``choose_all``'s result beside the checkpoints (process 0)."""
  if jax.process_index() == 0:
    (epath.Path(workdir) / FILE).write_text(json.dumps(info, indent=2))


def apply_saved(model: Any, workdir: str | epath.Path) -> dict[str, tuple[float, ...]]:
  """Sets the terms ``score_terms.json`` of ``workdir`` chose on ``model``; returns them.

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
    applied[key] = tuple(float(info[key][name]) for name in setting_names(key))
    set_score_term(model, key, applied[key])
  return applied
