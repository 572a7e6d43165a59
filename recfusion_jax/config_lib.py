"""Helpers that config files and the runner share (config files may import the library, never
the other way round).

  parse_switches   the ``arg`` of ``get_config(arg)``: ``size=small,protocol=loo``
  apply_ablation   the paper's three ablations, each switching off one module
  history_for_protocol   which training history a protocol's task implies
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import ml_collections

ABLATIONS: tuple[str, ...] = ("separate_towers", "mean_fusion", "no_contrastive")


def parse_switches(arg: str | None, allowed: Mapping[str, Any]) -> dict[str, Any]:
  """``"a=1,b=x"`` -> {name: value} over ``allowed`` ({name: default}), defaults filled in.

  A value is converted to its default's type (int, float, bool, str); a default of None keeps
  the string. Unknown switch names and malformed items are errors that name the closest valid
  switch, so a typo never silently falls back to a default.
  """
  out = dict(allowed)
  for item in (arg or "").split(","):
    if not item.strip():
      continue
    name, sep, value = item.partition("=")
    name = name.strip()
    if not sep:
      raise ValueError(f"config switch {item!r}: expected name=value")
    if name not in allowed:
      close = difflib.get_close_matches(name, list(allowed), n=1)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"unknown config switch {name!r}{hint} (known: {sorted(allowed)})")
    out[name] = _convert(name, value.strip(), allowed[name])
  return out


def _convert(name: str, value: str, default: Any) -> Any:
  if default is None or isinstance(default, str):
    return value
  if isinstance(default, bool):
    if value.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"config switch {name}={value!r}: expected true or false")
    return value.lower() in ("true", "1")
  try:
    return type(default)(value)
  except ValueError as e:
    raise ValueError(f"config switch {name}={value!r}: expected {type(default).__name__}") from e


def apply_ablation(config: ml_collections.ConfigDict, name: str) -> None:
  """The paper's three ablations, each switching off one module; '' changes nothing."""
  if name == "separate_towers":
    config.model.encoder.unified = False
  elif name == "mean_fusion":
    config.model.fusion = "mean"
  elif name == "no_contrastive":
    config.contrastive_weight = 0.0
  elif name:
    raise ValueError(f"unknown ablation {name!r}; known: {ABLATIONS}")


RECIPES = ("paper", "dot")


def apply_recipe(config: ml_collections.ConfigDict, name: str, protocol: str) -> None:
  """The scoring and training recipe of ``model``/``data`` (docs/TUNING.md measures both).

  paper  unit vectors under a convex gate, a Transformer user over interaction rows: the
         design as first written; the configs' defaults.
  dot    what the ladder of docs/TUNING.md kept: dot-product scoring with a per-item bias, the
         ID outside the gate (``residual``), untied history embeddings summed with projected
         content, and weight decay doing the regularising that ID dropout did; per-user *cloze*
         rows on a pooled (linear) user over the latest 768 items (256 scored 7% lower on
         warm_ratio's valid split: every training item of all but a few users is in view),
         wide (512; 1024 overfit), history items excluded from the catalogue negatives.

  The same fields on every protocol: next-item training (loo) with a causal Transformer user
  (``data.example="next"``, ``user.causal``, as SASRec) stays available as config fields, but
  on loo's valid split it scored half of the cloze form (id_only, 600 steps: HR@10 0.068
  against 0.143; docs/TUNING.md). The recipe is applied once, when the config is built, so
  ``--config.*`` overrides of its fields hold in the runner and the valid curve too.
  """
  del protocol   # no field depends on it today; a protocol-specific one would go here
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}; known: {RECIPES}")
  config.recipe = name
  if name == "paper":
    return
  m = config.model
  m.scoring, m.item_bias, m.fusion, m.history_fusion = "dot", True, "residual", "sum"
  m.item_id.separate_history, m.item_id.dropout = True, 0.0
  m.user.use_id = False
  m.user.kind, m.user.causal = "pool", False
  m.embed_dim, m.user.history_len = 512, 768
  config.optimizer.weight_decay = 1.0
  config.data.example, config.data.target_share = "cloze", 0.2
  config.exclude_history = True


def history_for_protocol(protocol: str) -> str:
  """``data.history`` for a protocol: next-item prediction (loo) trains on the items before the
  target; random hold-outs train on all the user's other items, as evaluation sees them."""
  return "earlier" if protocol == "loo" else "all_others"
