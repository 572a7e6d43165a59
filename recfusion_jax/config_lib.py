"""Helpers that config files and the runner share (config files may import the library, never
the other way round).

  parse_switches   the ``arg`` of ``get_config(arg)``: ``size=small,protocol=loo``
  apply_ablation   the paper's three ablations, each switching off one module
  apply_recipe     a named scoring and training recipe, with its fields per protocol
  set_protocol     points a config at a protocol: its history rule and the recipe's fields
  history_for_protocol   which training history a protocol's task implies
"""

from __future__ import annotations

import difflib
from typing import Any, Collection, Mapping

from absl import logging

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


def apply_recipe(config: ml_collections.ConfigDict, name: str) -> None:
  """The scoring and training recipe of ``model``/``data`` (docs/TUNING.md measures both).

  paper  unit vectors under a convex gate, a Transformer user over interaction rows: the
         design as first written; the model defaults of configs/tiny.py, pod.py and mmrec.py.
  dot    configs/movielens.py's default; what the ladder of docs/TUNING.md kept: dot-product
         scoring with a per-item bias, the ID outside the gate (``residual``), untied history
         embeddings summed with projected content, per-user *cloze* rows on a pooled (linear)
         user over the latest 768 items (256 scored 7% lower on warm_ratio's valid split:
         every training item of all but a few users is in view), wide (512; 1024 overfit),
         history items excluded from the catalogue negatives; EASE's squared loss over the
         catalogue with weight decay 5 and the unobserved items at weight 0.3 (§10), the
         in-batch content term at 0.1 (§10), 500 steps.

  Not every protocol wins with the same fields, so the recipe also writes
  ``config.protocol_fields`` ({protocol: fields}), which ``set_protocol`` applies to a config
  pointed at that protocol (each chosen on that protocol's valid split, docs/TUNING.md §14):
  loo trains next-item rows on a causal pooled user with a recency kernel (§6, §10);
  cold_items, ranked from content alone, keeps the catalogue softmax (§12, §13) and weighs an
  item's sources uniformly (§18), so the mean-fusion ablation is RecFusion itself there;
  cold_users hides 99.5% of each cloze row, so training sees histories as short as its
  users' (§21).
  """
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}; known: {RECIPES}")
  config.recipe = name
  config.protocol_fields = ml_collections.ConfigDict()
  config.protocol_fields_for = ""   # the protocol set_protocol last applied
  if name == "paper":
    return
  m = config.model
  m.scoring, m.item_bias, m.fusion, m.history_fusion = "dot", True, "residual", "sum"
  m.item_id.separate_history, m.item_id.dropout = True, 0.0
  m.user.use_id = False
  m.user.kind, m.user.causal = "pool", False
  m.embed_dim, m.user.history_len = 512, 768
  config.data.example, config.data.target_share = "cloze", 0.2
  config.data.next_positions = 0   # next rows: every transition scored (§16)
  config.data.next_window = "latest"   # next rows: the timeline's latest window
  config.exclude_history = True
  config.catalogue_loss, config.catalogue_negative_weight = "squared", 0.3
  config.optimizer.weight_decay = 5.0
  config.in_batch_weight = 0.1
  config.num_steps = 500   # the valid curves' length (§10, §13; a schedule that long anneals)
  config.protocol_fields = ml_collections.ConfigDict({
      # Valid HR@10 0.186 against the cloze rows' 0.124 (ID only; TUNING §10). 32 random
      # transitions a row: valid HR@10 0.178 against 0.175 for all 200, a 3.0x faster step
      # (§16). The history read from item IDs only: RecFusion's valid HR@10 0.163 against
      # 0.147. The plain in-batch weight 0.1 (no longer 0): valid HR@10 0.192 against 0.178
      # (ID only) and 0.170 against 0.163 (RecFusion).
      # A Markov chain's term at scoring time, weight and decay chosen on valid: ID-only valid
      # NDCG@10 0.1045 against 0.1002 (seed 0), test HR@10 +0.03 on three seeds (§27).
      # EASE's closed form too, weighted on valid after training as on warm items: valid
      # NDCG@10 +0.002-0.005 at weight 0.25 on five seeds; on test no better than the chain
      # alone under the one-after-the-other choice (HR@10 0.177 against 0.182, §30), nor under
      # the joint choice with EASE's reg (0.176, §31: valid prefers reg 100-200, test 500).
      "loo": {"data": {"example": "next", "next_positions": 32}, "num_steps": 300,
              "model": {"history_fusion": "id", "transition": "markov",
                        "item_item": "ease_fixed",
                        "user": {"causal": True, "recent": 8, "history_len": 200}}},
      # Items never trained on: the softmax kept the encoder's ranking (valid NDCG@10 0.226
      # against 0.192 at best for the squared loss; test 0.205 against 0.130, §12-§13), with
      # the full in-batch term that trains the encoder to score items from content alone.
      # Uniform weights over an item's sources: 3-seed valid NDCG@10 0.280 against 0.264 for
      # the residual gate; the convex gate (0.257) and ID dropout 0.5 (0.264) no higher (§18).
      # The gate overfits the warm items it is trained on (~70 epochs of this small split).
      "cold_items": {"catalogue_loss": "softmax", "catalogue_negative_weight": 1.0,
                     "in_batch_weight": 1.0, "optimizer": {"weight_decay": 1.0},
                     "model": {"fusion": "mean"}},
      # Warm items: EASE's closed form beside the trained model, weighted on valid after
      # training (item_item=ease_fixed; trained jointly, §9, the softmax overfits it). Seed 0:
      # RecFusion's valid NDCG@10 0.2063 -> 0.2135 at weight 1, test 0.3716 -> 0.3790 (§28);
      # its weight and reg chosen jointly, five seeds: 0.3817 against EASE 0.3735 (§31).
      # missing_modality scores the warm_ratio fit: the same fields.
      "warm_ratio": {"model": {"item_item": "ease_fixed"}},
      "missing_modality": {"model": {"item_item": "ease_fixed"}},
      # Users known by their first 3 items, ranked against everything they rate later: cloze
      # rows that hide 99.5% of a window train on histories that short (one item kept per 200
      # of a window, on average; at least one target). ID-only valid NDCG@10 0.5061 / 0.4661
      # (seeds 0 / 1) against 0.4012 / 0.3513 for the plain 20% and popularity's 0.4845 /
      # 0.4500 (TUNING §21).
      "cold_users": {"data": {"target_share": 0.995}},
  })


def _flatten(section: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in section.items():
    if hasattr(value, "items"):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def protocol_field_values(config: ml_collections.ConfigDict, protocol: str) -> dict[str, Any]:
  """{dotted field: value} that ``config``'s recipe sets on ``protocol`` (may be empty)."""
  table = config.get("protocol_fields")
  if not table or protocol not in table:
    return {}
  return _flatten(table[protocol])


def set_protocol(config: ml_collections.ConfigDict, protocol: str, *,
                 keep: Collection[str] = ()) -> dict[str, Any]:
  """Points ``config`` (in place) at ``protocol``: ``data.protocol``, ``data.history`` and the
  recipe's fields for it (``protocol_fields[protocol]``), except the dotted names in ``keep``.

  ``keep``: the command line's ``--config.*`` overrides (``config_flags.get_override_values``),
  so an override wins over the recipe on every protocol, as it does over the config file.
  Returns {field: value} of what the recipe's table set. A table entry that names no field of
  the config is an error. ``get_config`` leaves the table unapplied (the command line may still
  override the protocol); ``main`` and the benchmark runner apply it. Once per config: the
  table's fields are not reset when a config is pointed at another protocol, so pointing one
  config at a second protocol is an error (copy the config as built, once per protocol).
  """
  applied = config.get("protocol_fields_for")
  if applied and applied != protocol:
    raise ValueError(f"the config already carries the recipe's {applied} fields; point a copy "
                     f"of the config as built at {protocol!r} instead")
  keep = set(keep)
  if "data.protocol" not in keep:
    config.data.protocol = protocol
  if "data.history" not in keep:
    config.data.history = history_for_protocol(protocol)
  changed = {}
  for dotted, value in protocol_field_values(config, protocol).items():
    parent, _, leaf = dotted.rpartition(".")
    node = config
    for part in parent.split(".") if parent else ():
      node = node.get(part) if hasattr(node, "get") else None
    if not hasattr(node, "keys") or leaf not in node:
      raise ValueError(f"protocol_fields.{protocol}.{dotted}: the config has no field {dotted!r}")
    if dotted in keep:
      continue
    node[leaf] = value
    changed[dotted] = value
  if "protocol_fields_for" in config:
    config.protocol_fields_for = protocol
  if changed:
    logging.info("recipe %r on %s sets %s", config.get("recipe"), protocol,
                 ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items())))
  return changed


def with_own_protocol(config: ml_collections.ConfigDict, *, keep: Collection[str] = ()
                      ) -> ml_collections.ConfigDict:
  """``config`` pointed at its own ``data.protocol`` (``set_protocol``), as a copy; ``config``
  itself when it has no protocol or already carries its fields. Every CLI that reads a
  training config runs this (``keep``: its ``--config`` overrides), so the model that export
  and recommend build is the one ``main`` trained."""
  data = config.get("data")
  if data is None or not data.get("protocol") or config.get("protocol_fields_for"):
    return config
  config = config.copy_and_resolve_references()
  set_protocol(config, config.data.protocol, keep=keep)
  return config


def config_from_flag(name: str = "config") -> ml_collections.ConfigDict:
  """A CLI's ``--<name>`` config (a ``config_flags`` flag) pointed at its own protocol, its
  ``--<name>.*`` overrides winning over the recipe's fields (``with_own_protocol``)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  holder = flags.FLAGS[name]
  return with_own_protocol(holder.value, keep=config_flags.get_override_values(holder))


def history_for_protocol(protocol: str) -> str:
  """``data.history`` for a protocol: next-item prediction (loo) trains on the items before the
  target; random hold-outs train on all the user's other items, as evaluation sees them."""
  return "earlier" if protocol == "loo" else "all_others"
