"""Inference: encode the catalogue, encode users, score, rank. Shared by evaluation, the train
loop's item-cache refresh, the recommend CLI and export.

Everything here runs the model in eval mode (no dropout, no ID dropout) through jitted pure
functions of the model's split state, so it can be called with a state straight out of the
train step or out of a checkpoint. The model is used through its public methods only
(``encode_content``, ``item_table``, ``encode_users``, ``score``, ``fusion.row_weights`` /
``pair_weights``), so this module does not depend on how they are computed.

``ServingFunctions`` are the serving programs as pure functions of a flat ``{name: array}``
parameter dict (a plain pytree): the recommend CLI jits them, ``export`` exports the very same
functions with ``jax.export``, so the in-process and the exported answers come from one
definition.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recfusion_jax import serving, sharding
from recfusion_jax.data.types import MODALITIES, Catalogue, feature_key
from recfusion_jax.models.fusion import fused_scores
from recfusion_jax.models.recfusion import RecFusion, source_names

# Inputs of the content encoder and of the user encoder (also the serving programs' inputs).
CONTENT_KEYS = ("text_ids", "text_mask", "image", "video",
                *(feature_key(m) for m in MODALITIES), "presence")
USER_KEYS = ("user_id", "user_has_id", "history", "history_mask")


def chunked(fn, arrays: Mapping[str, np.ndarray], chunk: int) -> Any:
  """Applies ``fn`` to fixed-size row chunks (last one padded: one compilation) and concatenates."""
  n = next(iter(arrays.values())).shape[0]
  outs = []
  for start in range(0, n, chunk):
    part = {k: v[start:start + chunk] for k, v in arrays.items()}
    rows = next(iter(part.values())).shape[0]
    out = fn(serving.pad_rows(part, chunk))
    outs.append(jax.tree.map(lambda x, rows=rows: np.asarray(x)[:rows], out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def content_inputs(catalogue: Catalogue, item_ids: np.ndarray) -> dict[str, np.ndarray]:
  """The encoder's inputs (CONTENT_KEYS present in the catalogue) of ``item_ids``."""
  content = catalogue.content(np.asarray(item_ids))
  return {k: content[k] for k in CONTENT_KEYS if k in content}


class Recommender:
  """Eval-mode view of a RecFusion model: ``graphdef`` + a state (model state only).

  The state's arrays stay where they are. When they lie on a mesh (``sharding.mesh_of``: a
  model out of training or a checkpoint restore, split as ``sharding.PARAM_RULES`` split it),
  each chunk's rows are split over the mesh's batch axes and every program runs on the mesh
  with the parameters as they are: no device ever holds more of them than training gave it.
  Otherwise (one device, host arrays) the programs run on the default device.

  Every method returns host arrays (NumPy). On a mesh each chunk's outputs are gathered onto
  every device inside the program (``out_shardings`` replicated), so every process reads the
  whole chunk from its own devices: these are activations (encodings, user vectors) that the
  evaluator indexes on the host on every process, never parameters.
  """

  def __init__(self, model: RecFusion, chunk: int = 256):
    # An eval-mode view sharing the model's arrays, so the caller's model keeps its own mode.
    view = nnx.merge(*nnx.split(model))
    view.eval()
    self.graphdef, self.state = nnx.split(view)
    self.kind = model.fusion.kind
    self.gate_dim = model.fusion.gate_dim
    self.mesh = sharding.mesh_of(self.state)
    self.chunk = sharding.whole_rows(chunk, self.mesh)
    jit = jax.jit
    if self.mesh is not None:
      jit = functools.partial(jax.jit, out_shardings=sharding.replicated(self.mesh))
    self._encode = jit(functools.partial(_encode_content, self.graphdef))
    self._table = jit(functools.partial(_item_table, self.graphdef))
    self._users = jit(functools.partial(_encode_users, self.graphdef))

  def _run(self, program, inputs: Mapping[str, np.ndarray]) -> Any:
    """``program(state, inputs)`` on one (padded) chunk, its rows split over the mesh."""
    if self.mesh is not None:
      inputs = sharding.put_rows(dict(inputs), self.mesh)
    return program(self.state, inputs)

  def encode_catalogue(self, catalogue: Catalogue,
                       item_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-modality embeddings [N, M, d] and presence [N, M] of (a subset of) the catalogue."""
    ids = np.arange(catalogue.num_items) if item_ids is None else np.asarray(item_ids)
    # Content is gathered chunk by chunk: a catalogue's images are never copied all at once.
    parts = [chunked(lambda c: self._run(self._encode, c),
                     content_inputs(catalogue, ids[start:start + self.chunk]), self.chunk)
             for start in range(0, len(ids), self.chunk)]
    return tuple(np.concatenate(xs) for xs in zip(*parts))

  def item_table(self, catalogue: Catalogue, content_emb: np.ndarray | None = None,
                 presence: np.ndarray | None = None,
                 has_id: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Fusion table of every item. ``has_id`` defaults to the catalogue's (cold items: False)."""
    if content_emb is None:
      content_emb, presence = self.encode_catalogue(catalogue)
    has_id = catalogue.has_id if has_id is None else has_id
    inputs = {"item_id": np.arange(catalogue.num_items, dtype=np.int32), "has_id": has_id,
              "emb": content_emb, "presence": presence}
    return chunked(lambda x: self._run(self._table, x), inputs, self.chunk)

  def encode_users(self, user_inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{'emb': [U, d], 'query': [U, h] or absent} from user_id/user_has_id/history/history_mask."""
    return chunked(lambda x: self._run(self._users, x), dict(user_inputs), self.chunk)

  def score_fn(self):
    """Pure ``(user_block, item_table) -> scores [Ub, I]`` for the evaluator (ranking only:
    the temperature is left out, it does not change any order)."""
    return functools.partial(fused_scores, kind=self.kind, gate_dim=self.gate_dim)


def _encode_content(graphdef, state, content):
  model = nnx.merge(graphdef, state)
  return model.encode_content(content)


def _item_table(graphdef, state, x):
  model = nnx.merge(graphdef, state)
  return model.item_table(x["item_id"], x["has_id"], x["emb"], x["presence"])


def _encode_users(graphdef, state, x):
  model = nnx.merge(graphdef, state)
  users = model.encode_users(*(x[key] for key in USER_KEYS))
  return {k: v for k, v in users.items() if v is not None}


def refresh_item_cache(model: RecFusion, catalogue: Catalogue, chunk: int = 256
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Re-encodes ``catalogue`` into the model's item cache with eval-mode encodings (in place);
  returns them (per-modality embeddings [N, M, d], presence [N, M]).

  Users' histories are read from the cache; after training it holds encodings written with
  dropout and with parameters of earlier steps, so inference refreshes it first, as the
  evaluation does (``model_eval.model_ranker``).
  """
  emb, presence = Recommender(model, chunk=chunk).encode_catalogue(catalogue)
  ids = np.arange(catalogue.num_items, dtype=np.int32)
  model.write_cache(ids, emb, presence, np.ones(ids.shape, bool), catalogue.has_id)
  return emb, presence


def param_name(path: tuple[Any, ...]) -> str:
  """'encoder/trunk/layers/0/mlp_in/kernel': the flat name of a state leaf."""
  return "/".join(str(key) for key in path)


def placeholder_like(value: Any) -> jax.Array:
  """A value of ``value``'s shape and dtype (PRNG keys included)."""
  if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
    return jnp.broadcast_to(jax.random.key(0), value.shape)
  return jnp.zeros(value.shape, value.dtype)


class ServingFunctions:
  """The serving programs as pure functions of ``params``, a flat {name: array} dict.

  ``params`` holds every array of the model's state (parameters and the item cache) except its
  PRNG streams, which eval mode never draws from: they are rebuilt as placeholders inside each
  function, so no key array has to be saved or passed. Works on an abstract model as well
  (``nnx.eval_shape``): ``params`` is then a dict of ``jax.ShapeDtypeStruct``.

  Functions (all batch dimensions free):
    encode_items(params, content)       -> {'emb' [B, M, d], 'presence' [B, M]}
    item_table(params, items)           -> the fusion table of items {item_id, has_id, emb, presence}
    encode_users(params, users)         -> {'emb' [U, d], 'query' [U, h] (gated fusion)}
    rank_items(params, users, table, exclude, k)  -> {'items', 'scores', 'weights'}: top-k items
        per user (``exclude`` [U, E] item ids, -1 = padding, never returned unless nothing else
        is left) with the gate's weights over the sources of each [U, k, S]
    rank_users(params, users, table, k) -> {'users', 'scores', 'weights'}: the top-k users of
        each item of ``table`` [J, k] (cold start: who would want a new item)
  Scores are the model's logits (``RecFusion.score``, temperature included).
  """

  def __init__(self, model: RecFusion):
    view = nnx.merge(*nnx.split(model))
    view.eval()
    self.graphdef, rng_state, arrays = nnx.split(view, nnx.RngState, ...)
    self._rng_state = list(nnx.to_flat_state(rng_state))
    flat = list(nnx.to_flat_state(arrays))
    self._paths = [path for path, _ in flat]
    self._variables = [variable for _, variable in flat]
    self.names = [param_name(path) for path in self._paths]
    self.params = {name: v.get_value() for name, v in zip(self.names, self._variables)}
    self.sources = source_names(model)
    self.modalities = tuple(model.modalities)

  def model(self, params: Mapping[str, Any]) -> RecFusion:
    """The eval-mode model holding ``params`` (inside a traced function: tracers)."""
    missing = [n for n in self.names if n not in params]
    if missing:
      raise KeyError(f"{len(missing)} parameters missing, e.g. {missing[:3]}")
    flat = [(path, variable.replace(params[name]))
            for path, variable, name in zip(self._paths, self._variables, self.names)]
    rngs = [(path, variable.replace(placeholder_like(variable.get_value())))
            for path, variable in self._rng_state]
    return nnx.merge(self.graphdef, nnx.from_flat_state(rngs), nnx.from_flat_state(flat))

  def encode_items(self, params, content):
    emb, presence = self.model(params).encode_content(content)
    return {"emb": emb, "presence": presence}

  def item_table(self, params, items):
    return self.model(params).item_table(items["item_id"], items["has_id"], items["emb"],
                                         items["presence"])

  def encode_users(self, params, users):
    reps = self.model(params).encode_users(*(users[key] for key in USER_KEYS))
    return {key: value for key, value in reps.items() if value is not None}

  def rank_items(self, params, users, table, exclude, *, k: int):
    model = self.model(params)
    scores = model.score(users, table)
    rows = jnp.arange(scores.shape[0])[:, None]
    # -1 padding -> an out-of-range index, which mode="drop" ignores.
    columns = jnp.where(exclude >= 0, exclude, scores.shape[1])
    scores = scores.at[rows, columns].set(-jnp.inf, mode="drop")
    top_scores, top_items = jax.lax.top_k(scores, k)
    picked = jax.tree.map(lambda x: x[top_items], table)      # [U, k, ...]: row u is user u's
    weights = model.fusion.row_weights(users.get("query"), picked)
    return {"items": top_items.astype(jnp.int32), "scores": top_scores, "weights": weights}

  def rank_users(self, params, users, table, *, k: int):
    model = self.model(params)
    top_scores, top_users = jax.lax.top_k(model.score(users, table).T, k)   # [J, k]
    weights = model.fusion.pair_weights(users.get("query"), table)          # [U, J, S]
    weights = weights[top_users, jnp.arange(top_users.shape[0])[:, None]]  # [J, k, S]
    return {"users": top_users.astype(jnp.int32), "scores": top_scores, "weights": weights}


__all__ = ["CONTENT_KEYS", "USER_KEYS", "Recommender", "ServingFunctions", "chunked",
           "content_inputs", "param_name", "placeholder_like", "refresh_item_cache"]
