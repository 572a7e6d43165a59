"""A trained RecFusion as a ``baselines.common.Ranker``, and its evaluation during and after
training.

The train loop (``make_validator`` during training, ``train.train_and_evaluate`` after it) and
the benchmark runner rank a RecFusion model through ``model_ranker`` +
``baselines.common.rank_split``, the path every baseline takes: one exclusion rule (the data
set's ``known`` items) and one tie rule for all. (``train`` imports this module, never the
reverse.)
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from recfusion_jax import sharding
from recfusion_jax.baselines import chance
from recfusion_jax.baselines.common import Ranker, rank_split
from recfusion_jax.data import examples
from recfusion_jax.data.types import Catalogue, RecDataset
from recfusion_jax.models.recfusion import RecFusion
from recfusion_jax.recommend import Recommender


def model_ranker(model: RecFusion, dataset: RecDataset, catalogue: Catalogue | None = None, *,
                 history_len: int, chunk: int = 256) -> Ranker:
  """``model`` scoring ``catalogue`` (default: the data set's) for users whose histories come
  from ``dataset.train``.

  Users' histories are read from the model's item cache, so the cache is first re-encoded from
  ``catalogue`` with the final parameters: eval-mode encodings, and a modality masked at test
  time (missing_modality) cannot leak in through the histories. That cache belongs to a model
  of the ranker's own: the caller's model (a train loop's state, say) keeps its cache.

  The model's arrays stay where they are (``Recommender``): a model on a mesh is encoded and
  ranked there with its parameters split as training split them, never gathered.
  """
  catalogue = dataset.catalogue if catalogue is None else catalogue
  # New Variables holding the same arrays: replacing the cache below touches no one else's.
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
  emb, presence = model.to_cache_width(
      *Recommender(model, chunk=chunk).encode_catalogue(catalogue))
  for variable, value in ((model.cache_embeddings, emb), (model.cache_presence, presence)):
    old = variable.get_value()
    if isinstance(old, jax.Array):   # placed as the cache it replaces lies: split on a mesh
      value = sharding.put_global(np.asarray(value), old.sharding)
    variable.set_value(value)
  rec = Recommender(model, chunk=chunk)
  index = examples.TrainExampleIndex.build(dataset)
  return Ranker(
      user_reps=lambda users: rec.encode_users(
          examples.user_eval_inputs(dataset, users, history_len, index)),
      item_table=rec.item_table(catalogue, emb, presence), score_fn=rec.score_fn())


def make_validator(dataset: RecDataset, config: ml_collections.ConfigDict, graphdef: Any,
                   mesh: Any):
  """(state) -> full-ranking metrics on ``dataset.valid`` (train items excluded), the path
  ``benchmark --split valid`` scores. ``graphdef`` and the states are those of the train loop's
  (model, optimizer) pair, possibly sharded over ``mesh``: the model is encoded and its users
  ranked on ``mesh`` from those very arrays (no copy of the state is made; its cache is left
  as training wrote it)."""
  if len(dataset.valid) == 0:
    raise ValueError(f"validation.every={config.validation.every} needs a valid split; "
                     f"{dataset.name} has none")

  def validate(state: Any) -> dict[str, float]:
    model, _ = nnx.merge(graphdef, state)
    ranker = model_ranker(model, dataset, history_len=config.model.user.history_len,
                          chunk=config.eval_block_size)
    return rank_split(ranker, dataset, dataset.valid, block_size=config.eval_block_size,
                      mesh=mesh, item_axes=config.get("eval_item_axes", ()))

  return validate


def evaluate_model(model: RecFusion, dataset: RecDataset, config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh | None = None, split: str = "test"
                   ) -> dict[str, Any]:
  """Full-ranking metrics on ``split``: warm items among the whole catalogue and cold items
  among the cold items only (scored from content alone), each beside the chance level measured
  with ``baselines.chance.RandomScores`` in the same evaluator.

  Returns {"warm", "warm_random", "cold_items", "cold_items_random"}: metric dicts (a group
  with no held-out interaction is left out).
  """
  heldout = getattr(dataset, split)
  cold = np.zeros(dataset.catalogue.num_items, bool)
  cold[dataset.cold_items] = True
  groups = {"warm": (heldout.select(~cold[heldout.item]), None),
            "cold_items": (heldout.select(cold[heldout.item]), dataset.cold_items)}
  ranker = model_ranker(model, dataset, history_len=config.model.user.history_len,
                        chunk=config.eval_block_size)
  random = chance.RandomScores(dataset).ranker()
  out: dict[str, Any] = {}
  for name, (part, candidates) in groups.items():
    if len(part) == 0:
      continue
    for key, scorer in ((name, ranker), (name + "_random", random)):
      out[key] = rank_split(scorer, dataset, part, candidate_items=candidates,
                            block_size=config.eval_block_size, mesh=mesh,
                            item_axes=config.get("eval_item_axes", ()))
  return out
