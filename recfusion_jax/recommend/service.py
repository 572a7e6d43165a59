"""Recommendations from a model in this process: the same ``serving.Recommendations`` an export
directory loads, with the ``ServingFunctions`` jitted instead of deserialized.

``compute_tables`` is also what ``export`` saves, so an export answers exactly as the model it
came from.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from recfusion_jax import serving
from recfusion_jax.data import examples
from recfusion_jax.data.types import RecDataset
from recfusion_jax.models.recfusion import RecFusion
from recfusion_jax.recommend.inference import ServingFunctions, chunked, refresh_item_cache


def program_k(k: int, dataset: RecDataset) -> int:
  """``k`` capped by the catalogue and the users (top-k needs that many candidates)."""
  return max(1, min(int(k), dataset.catalogue.num_items, dataset.num_users))


def jit_programs(functions: ServingFunctions, k: int) -> dict[str, Callable[..., Any]]:
  """The serving programs (``serving.PROGRAMS``), jitted."""
  return {"encode_items": jax.jit(functions.encode_items),
          "item_table": jax.jit(functions.item_table),
          "encode_users": jax.jit(functions.encode_users),
          "rank_items": jax.jit(functools.partial(functions.rank_items, k=k)),
          "rank_users": jax.jit(functools.partial(functions.rank_users, k=k))}


def prepare_model(model: RecFusion, dataset: RecDataset, chunk: int = 256
                  ) -> tuple[ServingFunctions, dict[str, np.ndarray]]:
  """(serving functions of ``model`` with a fresh item cache, the catalogue's encodings).

  Users' histories are read from the item cache, which after training holds encodings made
  with dropout and older parameters; it is rewritten with eval-mode encodings of ``dataset``'s
  catalogue first (as ``model_eval.model_ranker`` does before evaluating). In place.
  """
  emb, presence = refresh_item_cache(model, dataset.catalogue, chunk)
  return ServingFunctions(model), {"emb": emb, "presence": presence}


def compute_tables(programs: Mapping[str, Callable[..., Any]], params: Any,
                   dataset: RecDataset, encoded: Mapping[str, np.ndarray], *, history_len: int,
                   chunk: int = 256) -> dict[str, Any]:
  """The precomputed arrays of ``serving.Recommendations``: item table, user table, content
  vectors and known items of ``dataset``."""
  cat = dataset.catalogue
  table = chunked(lambda x: programs["item_table"](params, x), {
      "item_id": np.arange(cat.num_items, dtype=np.int32), "has_id": cat.has_id,
      "emb": encoded["emb"], "presence": encoded["presence"]}, chunk)
  index = examples.TrainExampleIndex.build(dataset)
  users = examples.user_eval_inputs(dataset, np.arange(dataset.num_users), history_len, index)
  user_table = chunked(lambda x: programs["encode_users"](params, x), users, chunk)
  known = dataset.known_or_train()
  indptr, items = serving.known_csr(known.user, known.item, dataset.num_users)
  return {"item_table": table, "user_table": user_table,
          "content_vector": serving.content_vectors(encoded["emb"], encoded["presence"]),
          "known_indptr": indptr, "known_items": items}


def recommendations(model: RecFusion, dataset: RecDataset, *, history_len: int, k: int = 10,
                    item_names: Sequence[str] | None = None,
                    chunk: int = 256) -> serving.Recommendations:
  """``serving.Recommendations`` of a model in this process (its item cache is refreshed)."""
  functions, encoded = prepare_model(model, dataset, chunk)
  k = program_k(k, dataset)
  programs = jit_programs(functions, k)
  tables = compute_tables(programs, functions.params, dataset, encoded,
                          history_len=history_len, chunk=chunk)
  return serving.Recommendations(programs, functions.params, **tables, k=k,
                                 history_len=history_len, sources=functions.sources,
                                 item_names=item_names)
