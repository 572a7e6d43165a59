"""Inference: encode the catalogue, encode users, score. Shared by evaluation, the train loop's
item-cache refresh and export.

Everything here runs the model in eval mode (no dropout, no ID dropout) through jitted pure
functions of the model's split state, so it can be called with a state straight out of the
train step or out of a checkpoint.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from recfusion_jax.data.types import Catalogue
from recfusion_jax.models.fusion import fused_scores
from recfusion_jax.models.recfusion import RecFusion

# Inputs of the content encoder and of the user encoder (also the serving programs' inputs).
CONTENT_KEYS = ("text_ids", "text_mask", "image", "video", "presence")
USER_KEYS = ("user_id", "user_has_id", "history", "history_mask")


def _pad_rows(arrays: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  out = {}
  for key, value in arrays.items():
    pad = rows - value.shape[0]
    out[key] = np.concatenate([value, np.zeros((pad,) + value.shape[1:], value.dtype)]) if pad else value
  return out


def chunked(fn, arrays: Mapping[str, np.ndarray], chunk: int) -> Any:
  """Applies ``fn`` to fixed-size row chunks (last one padded: one compilation) and concatenates."""
  n = next(iter(arrays.values())).shape[0]
  outs = []
  for start in range(0, n, chunk):
    part = {k: v[start:start + chunk] for k, v in arrays.items()}
    rows = next(iter(part.values())).shape[0]
    out = fn(_pad_rows(part, chunk))
    outs.append(jax.tree.map(lambda x, rows=rows: np.asarray(x)[:rows], out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


class Recommender:
  """Eval-mode view of a RecFusion model: ``graphdef`` + a state (model state only)."""

  def __init__(self, model: RecFusion, chunk: int = 256):
    # An eval-mode view sharing the model's arrays, so the caller's model keeps its own mode.
    view = nnx.merge(*nnx.split(model))
    view.eval()
    self.graphdef, self.state = nnx.split(view)
    self.kind = model.fusion.kind
    self.gate_dim = model.fusion.gate_dim
    self.chunk = chunk
    self._encode = jax.jit(functools.partial(_encode_content, self.graphdef))
    self._table = jax.jit(functools.partial(_item_table, self.graphdef))
    self._users = jax.jit(functools.partial(_encode_users, self.graphdef))

  def encode_catalogue(self, catalogue: Catalogue,
                       item_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-modality embeddings [N, M, d] and presence [N, M] of (a subset of) the catalogue."""
    ids = np.arange(catalogue.num_items) if item_ids is None else np.asarray(item_ids)
    content = catalogue.content(ids)
    content = {k: content[k] for k in CONTENT_KEYS if k in content}
    return chunked(lambda c: self._encode(self.state, c), content, self.chunk)

  def item_table(self, catalogue: Catalogue, content_emb: np.ndarray | None = None,
                 presence: np.ndarray | None = None,
                 has_id: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Fusion table of every item. ``has_id`` defaults to the catalogue's (cold items: False)."""
    if content_emb is None:
      content_emb, presence = self.encode_catalogue(catalogue)
    has_id = catalogue.has_id if has_id is None else has_id
    inputs = {"item_id": np.arange(catalogue.num_items, dtype=np.int32), "has_id": has_id,
              "emb": content_emb, "presence": presence}
    return chunked(lambda x: self._table(self.state, x), inputs, self.chunk)

  def encode_users(self, user_inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{'emb': [U, d], 'query': [U, h] or absent} from user_id/user_has_id/history/history_mask."""
    return chunked(lambda x: self._users(self.state, x), dict(user_inputs), self.chunk)

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


__all__ = ["CONTENT_KEYS", "USER_KEYS", "Recommender", "chunked"]
