"""Checks a training config before anything is loaded or compiled.

``validate(config)`` reports every problem at once, on one line, in a ``ConfigError``: unknown
keys of the sections the train loop reads (each with the closest valid name), intervals and
sizes that must be positive, choices, and (given the device and process counts) whether the
batch divides over them. The model section belongs to the model, which rejects what it cannot
build; only the sizes the loop itself uses are checked here.

``parse_flags(argv)`` is an absl ``flags_parser`` for CLIs with a ``config_flags`` config: a
``--config.<field>=...`` override of a field that does not exist, or with a value of the wrong
type, becomes one line (with the closest valid field) instead of a chained traceback.
"""

from __future__ import annotations

import difflib
import math
import sys
from typing import Any, Callable, Mapping, Sequence

import ml_collections

NONFINITE_MODES = ("stop", "skip")


class ConfigError(ValueError):
  """A config the train loop cannot run; the message lists every problem found."""


# Checkers: (value) -> problem text or None.
def _int(minimum: int) -> Callable[[Any], str | None]:
  def check(value):
    if isinstance(value, bool) or not isinstance(value, int):
      return f"must be an integer, got {value!r}"
    if value < minimum:
      return f"must be >= {minimum}, got {value}"
    return None
  return check


def _number(minimum: float | None = None, *, strict: bool = False,
            maximum: float | None = None) -> Callable[[Any], str | None]:
  def check(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      return f"must be a finite number, got {value!r}"
    if minimum is not None and (value <= minimum if strict else value < minimum):
      return f"must be {'>' if strict else '>='} {minimum}, got {value}"
    if maximum is not None and value >= maximum:
      return f"must be < {maximum}, got {value}"
    return None
  return check


def _unset_or(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
  return lambda value: None if value is None else check(value)


def _choice(*choices: Any) -> Callable[[Any], str | None]:
  def check(value):
    return None if value in choices else f"must be one of {list(choices)}, got {value!r}"
  return check


def _axis(value: Any) -> str | None:
  if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
    return f"must be -1 (all remaining devices) or >= 1, got {value!r}"
  return None


def _mesh_axes(value: Any) -> str | None:
  if not isinstance(value, (tuple, list)) or any(a not in ("data", "fsdp") for a in value) or (
      len(set(value)) != len(value)):
    return f"must be a tuple of distinct mesh axes from ('data', 'fsdp'), got {value!r}"
  return None


def _prefixes(value: Any) -> str | None:
  if (isinstance(value, (tuple, list)) and value
      and all(isinstance(p, str) and p for p in value)):
    return None
  return f"must be a non-empty tuple of parameter path prefixes such as ('encoder/',), not {value!r}"


def _grid(minimum: float) -> Callable[[Any], str | None]:
  """A non-empty tuple of distinct finite numbers >= ``minimum``, in increasing order."""
  number = _number(minimum)
  def check(value):
    if (not isinstance(value, (tuple, list)) or not value or any(number(v) for v in value)
        or list(value) != sorted(set(value))):
      return f"must be a non-empty increasing tuple of finite numbers >= {minimum}, got {value!r}"
    return None
  return check


def _anything(value: Any) -> None:
  del value
  return None


# The sections the train loop reads. A dict is a sub-section; "model" and "data.synthetic" are
# checked by their owners (the model and ``data.synthetic.resolve_config``).
SCHEMA: dict[str, Any] = {
    "seed": _int(0),
    "data": {
        "source": _choice("synthetic", "movielens", "tfds", "mmrec"),
        "name": _anything, "filter_cold_users": _choice(True, False),   # mmrec
        "synthetic": None,
        "num_workers": _int(0),
        "streaming": _choice(True, False),   # content read record by record (data/records.py)
        "history": _choice("earlier", "all_others"),
        "example": _choice("interaction", "cloze", "next"),
        "target_share": _number(0.0, strict=True, maximum=1.0),
        "next_positions": _int(0),   # next rows: transitions scored a row; 0: all
        "next_window": _choice("latest", "random"),   # next rows: which window of a timeline
        "dir": _anything, "protocol": _anything, "split_seed": _int(0), "text_len": _int(1),
    },
    "model": None,
    "batch_size": _int(1),
    "micro_batch": _int(0),   # gradient caching: encoder and user tower (gradcache.py); 0: off
    "loss_tile": _int(0),     # in-batch losses in [tile, tile] blocks (tiled_losses.py); 0: off
    "num_steps": _int(0),   # 0: the benchmark's pipeline check; validate(training=True) wants 1
    "contrastive_weight": _number(0.0),
    "rec_loss": _choice("sampled", "full"),
    "logq_weight": _number(),
    "in_batch_weight": _number(0.0),
    "exclude_history": _choice(True, False),
    "catalogue_loss": _choice("softmax", "squared"),
    "catalogue_negative_weight": _number(0.0),
    "cache_refresh_every": _int(1),
    "optimizer": {
        "learning_rate": _number(0.0, strict=True),
        "warmup_steps": _int(0),
        "weight_decay": _number(0.0),
        "encoder_weight_decay": _unset_or(_number(0.0)),
        "encoder_lr_scale": _number(0.0),
        "encoder_lr_scale_paths": _prefixes,
        "clip_norm": _number(0.0, strict=True),
        "b2": _number(0.0, strict=True, maximum=1.0),
    },
    "mesh": {"data": _axis, "fsdp": _int(1)},
    "log_every": _int(1),
    "checkpoint_every": _int(1),
    "keep_checkpoints": _int(1),
    "eval_block_size": _int(1),
    # Mesh axes the evaluation splits the item table over (per-shard top-k, merged); () keeps
    # it whole on every device and splits only the users.
    "eval_item_axes": _mesh_axes,
    "eval_split": _choice("valid", "test"),
    "validation": {"every": _int(0), "patience": _int(0),
                   "metric": _choice("NDCG@10", "HR@10", "Recall@10", "MRR@10")},
    "nonfinite": _choice(*NONFINITE_MODES),
    # Grids of the score terms weighed after training, each entry overriding
    # score_terms.SCORE_TERMS's (say one reg where refilling EASE's matrix is costly).
    "score_term_grid": {"item_item": {"weight": _grid(0.0), "reg": _grid(0.0)},
                        "transition": {"weight": _grid(0.0), "decay": _grid(0.0)}},
    "init_from": _anything,
    "recipe": _choice("paper", "dot"),
    # {protocol: fields} of the recipe (config_lib.set_protocol), checked in validate().
    "protocol_fields": None,
    "protocol_fields_for": _anything,
}
# Keys every config must have (the others are optional, with the loop's defaults).
REQUIRED = ("seed", "data.source", "batch_size", "num_steps", "optimizer.learning_rate",
            "optimizer.warmup_steps", "optimizer.clip_norm", "mesh.data", "mesh.fsdp",
            "log_every", "checkpoint_every", "keep_checkpoints", "eval_block_size",
            "cache_refresh_every", "model.user.history_len",
            # No fallback values in the loop: configs/tiny.py's are the defaults.
            "validation.every", "validation.patience", "validation.metric")


def _closest(name: str, known: Sequence[str]) -> str:
  close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _walk(section: Any, schema: Mapping[str, Any], prefix: str, problems: list[str]) -> None:
  for key in section.keys():
    name = prefix + key
    if key not in schema:
      problems.append(f"unknown key {name!r}{_closest(key, list(schema))}")
      continue
    rule = schema[key]
    value = section[key]
    if rule is None:
      continue
    if isinstance(rule, dict):
      if not hasattr(value, "keys"):
        problems.append(f"{name} must be a section, got {value!r}")
      else:
        _walk(value, rule, name + ".", problems)
      continue
    problem = rule(value)
    if problem:
      problems.append(f"{name} {problem}")


def _get(config: Any, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      raise KeyError(dotted)
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             num_processes: int | None = None, training: bool = False) -> None:
  """Raises ``ConfigError`` listing every problem of ``config`` (see the module docstring).

  ``training``: the config must train (num_steps >= 1; the API allows 0, which evaluates the
  initialised model, the benchmark's pipeline check).
  """
  problems: list[str] = []
  _walk(config, SCHEMA, "", problems)
  steps = config.get("num_steps")
  if training and isinstance(steps, int) and not isinstance(steps, bool) and steps == 0:
    problems.append("num_steps must be >= 1, got 0")
  for dotted in REQUIRED:
    try:
      _get(config, dotted)
    except KeyError:
      problems.append(f"missing key {dotted!r}")
  try:
    if _get(config, "model.user.history_len") < 1:
      problems.append("model.user.history_len must be >= 1")
  except (KeyError, TypeError):
    pass
  _check_protocol_fields(config, problems)
  if config.get("data") is not None and config.data.get("source") == "synthetic":
    from recfusion_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    try:
      synthetic.resolve_config(config.data.get("synthetic"))
    except (TypeError, ValueError) as e:
      problems.append(f"data.synthetic: {e}")
  batch = config.get("batch_size")
  mesh = config.get("mesh")
  if isinstance(batch, int) and batch >= 1 and mesh is not None and num_devices:
    data, fsdp = mesh.get("data", -1), mesh.get("fsdp", 1)
    if not _axis(data) and not _int(1)(fsdp):
      if num_devices % fsdp:
        problems.append(f"mesh.fsdp={fsdp} does not divide the {num_devices} devices")
      elif data != -1 and data * fsdp != num_devices:
        problems.append(f"mesh {data} x {fsdp} does not match the {num_devices} devices")
      elif batch % num_devices:
        problems.append(f"batch_size {batch} does not divide over the {num_devices} devices")
  if isinstance(batch, int) and batch >= 1 and num_processes and batch % num_processes:
    problems.append(f"batch_size {batch} does not divide over the {num_processes} processes")
  _check_micro_batch(config, batch, num_devices, problems)
  if problems:
    raise ConfigError("invalid config: " + "; ".join(problems))


def _check_protocol_fields(config: Any, problems: list[str]) -> None:
  """Every field the recipe's per-protocol table names exists, and the table of the config's
  own protocol was applied: a config built by ``get_config`` and trained without
  ``config_lib.set_protocol`` would silently train the other protocols' fields."""
  table = config.get("protocol_fields")
  if not table:
    return
  for protocol, section in table.items():
    for dotted in _flat_fields(section):
      try:
        _get(config, dotted)
      except KeyError:
        problems.append(f"protocol_fields.{protocol}.{dotted}: no such field "
                        f"{dotted!r}{_closest(dotted, _flat_fields(config))}")
  data = config.get("data")
  protocol = data.get("protocol") if data is not None and hasattr(data, "get") else None
  if protocol in table and config.get("protocol_fields_for") != protocol:
    problems.append(f"protocol_fields.{protocol} was not applied: point the config at its "
                    "protocol with config_lib.set_protocol (main and the runner do)")


def _check_micro_batch(config: Any, batch: Any, num_devices: int | None,
                       problems: list[str]) -> None:
  """``micro_batch`` must tile the global batch and split evenly over the devices (each one
  encodes micro_batch / devices of its own rows at a time), and needs a content encoder."""
  micro = config.get("micro_batch", 0)
  if _int(1)(micro) or _int(1)(batch):
    return   # off, or already reported as not an integer
  if batch % micro:
    problems.append(f"micro_batch {micro} does not divide batch_size {batch}")
  elif num_devices and micro % num_devices:
    problems.append(f"micro_batch {micro} does not divide over the {num_devices} devices")
  model = config.get("model")
  if model is not None and hasattr(model, "keys") and not model.get("modalities", ("?",)):
    problems.append("micro_batch > 0 needs a content encoder; the model has no modalities "
                    "(set micro_batch=0)")


def _flat_fields(config: Any, prefix: str = "") -> list[str]:
  out = []
  for key in config.keys():
    out.append(prefix + key)
    if hasattr(config[key], "keys"):
      out += _flat_fields(config[key], prefix + key + ".")
  return out


def override_error_line(argv: Sequence[str], error: BaseException,
                        config: Any | None) -> str:
  """One line for a failed ``--config.<field>=value`` override (see ``parse_flags``)."""
  overrides = [a.split("=", 1)[0].lstrip("-") for a in argv[1:] if a.startswith(("--config.",
                                                                                 "-config."))]
  if config is not None:
    known = _flat_fields(config)
    for flag in overrides:
      field = flag[len("config."):]
      if field not in known:
        parent, _, leaf = field.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
        hint = _closest(leaf, siblings)
        return f"--{flag}: the config has no field {field!r}{hint}"
  text = " ".join(str(error).replace("\\n", " ").split()).strip("'\"")
  return f"flag error: {text}"


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl ``flags_parser``: ``flags.FLAGS(argv)``, every flag error reported on one line.

  A ``--config.<field>=...`` override of a field the config lacks names the closest valid
  field. Exits with status 2 on any flag error.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return flags.FLAGS(list(argv))
  except Exception as e:  # pylint: disable=broad-except
    # config_flags raises plain AttributeError/KeyError for unknown override fields; absl
    # wraps the rest in flags.Error. Either way: one line, no traceback.
    config = _load_config_file_quietly(argv)
    print(override_error_line(argv, e, config), file=sys.stderr)
    sys.exit(2)


def _load_config_file_quietly(argv: Sequence[str]) -> Any | None:
  """The config named by ``--config=PATH[:arg]`` without its overrides, or None."""
  from ml_collections.config_flags import config_flags  # pylint: disable=import-outside-toplevel
  for k, a in enumerate(argv[1:], 1):
    spec = None
    if a.startswith(("--config=", "-config=")):
      spec = a.split("=", 1)[1]
    elif a in ("--config", "-config") and k + 1 < len(argv):
      spec = argv[k + 1]
    if spec:
      try:
        return config_flags.ConfigFileFlagParser("config", lock_config=False).parse(spec)
      except Exception:  # pylint: disable=broad-except
        return None   # the file itself does not load: the flag error says why
  return None
