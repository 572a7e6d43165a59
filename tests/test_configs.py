"""Every config file builds and passes the train loop's validation; recipes set what they say.

(Training each config at its real size is the multi-host issue's work; this catches a config
that no longer matches the loop or the model before anything compiles. Two real training steps
of every config file, CPU-sized, are tests/test_config_training.py.)
"""

import os
import subprocess
import sys

import pytest
from flax import nnx

from configs import mmrec, movielens, pod, tiny
from recfusion_jax import config_lib, config_validation
from recfusion_jax.models.recfusion import RecFusion


@pytest.mark.parametrize("module,arg", [
    (tiny, None), (tiny, "ablation=mean_fusion"),
    (movielens, "size=small"), (movielens, "size=small,recipe=paper"),
    (movielens, "size=base,protocol=cold_items"),
    (movielens, "size=small,recipe=dot"), (movielens, "size=small,protocol=loo,recipe=dot"),
    (movielens, "size=small,recipe=dot,ablation=no_contrastive"),
    (mmrec, None), (pod, None), (pod, "size=test"), (pod, "size=test,chips_per_replica=4")])
def test_config_validates(module, arg):
  config = module.get_config(arg)
  if config.data.get("protocol"):
    config_lib.set_protocol(config, config.data.protocol)   # as main does
  config_validation.validate(config, training=True)


def test_score_term_grid_is_checked():
  """Each entry of the score terms' grid is an increasing tuple of numbers >= 0, and only the
  terms' own entries may be set."""
  config = tiny.get_config()
  config.score_term_grid = {"item_item": {"reg": (100.0, 500.0)}}
  config_validation.validate(config)
  config.score_term_grid = {"item_item": {"reg": (500.0, 100.0), "decay": (0.5,)},
                            "transition": {"weight": ()}}
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate(config)
  for problem in ("score_term_grid.item_item.reg must be a non-empty increasing tuple",
                  "unknown key 'score_term_grid.item_item.decay'",
                  "score_term_grid.transition.weight must be a non-empty increasing tuple"):
    assert problem in str(error.value)


def test_dot_recipe_builds_its_model():
  config = movielens.get_config("size=small,recipe=dot")
  assert movielens.get_config("size=small").to_dict() == config.to_dict()   # the default
  assert config.data.example == "cloze" and config.model.user.kind == "pool"
  assert not config.model.user.causal
  model = nnx.eval_shape(lambda: RecFusion(config.model, num_users=5, num_items=7,
                                           rngs=nnx.Rngs(0)))
  assert model.scoring == "dot" and model.fusion.kind == "residual"
  assert model.item_bias is not None and model.history_embeddings is not None


def test_unknown_recipe_is_an_error():
  with pytest.raises(ValueError, match="recipe"):
    movielens.get_config("size=small,recipe=dott")
  with pytest.raises(ValueError, match="unknown recipe"):
    config_lib.apply_recipe(tiny.get_config(), "fancy")


def _fields(config):
  return (config.data.example, config.model.user.kind, config.model.user.causal,
          config.model.user.get("recent", 0), config.model.user.history_len, config.data.history,
          config.catalogue_loss, config.optimizer.weight_decay, config.in_batch_weight,
          config.num_steps, config.data.get("next_positions", 0), config.model.history_fusion,
          config.model.fusion)


def test_dot_recipe_sets_each_protocol_its_own_fields():
  """The runner points one base config at each protocol: loo gets next-item rows on a causal
  pooled user, cold_items the softmax and mean fusion, cold_users short cloze histories, the
  rest the plain fields; whatever the base was built for. Other fields are shared."""
  from recfusion_jax.benchmark.fit import content_config  # pylint: disable=import-outside-toplevel
  plain = ("cloze", "pool", False, 0, 768, "all_others", "squared", 5.0, 0.1, 500, 0, "sum",
           "residual")
  expected = {
      "warm_ratio": plain,
      "cold_users": plain,
      "loo": ("next", "pool", True, 8, 200, "earlier", "squared", 5.0, 0.1, 300, 32, "id",
              "residual"),
      "cold_items": ("cloze", "pool", False, 0, 768, "all_others", "softmax", 1.0, 1.0, 500, 0,
                     "sum", "mean"),
  }
  for built_for in ("warm_ratio", "loo", "cold_items"):
    base = movielens.get_config(f"size=small,protocol={built_for},recipe=dot")
    base.data.target_share = 0.5   # a field no recipe entry but cold_users' sets
    for protocol, fields in expected.items():
      config = content_config("RecFusion", base, protocol, 0)
      assert _fields(config) == fields, (built_for, protocol)
      assert config.data.protocol == protocol
      assert config.data.target_share == (0.995 if protocol == "cold_users" else 0.5), protocol
      config_validation.validate(config, training=True)
    assert base.protocol_fields_for == ""   # the base itself is never pointed anywhere
  paper = content_config("RecFusion", movielens.get_config("size=small,recipe=paper"), "loo", 0)
  assert paper.data.get("example", "interaction") == "interaction"
  assert paper.data.history == "earlier"


def test_command_line_overrides_win_over_the_recipes_protocol_fields():
  from recfusion_jax.benchmark.fit import content_config  # pylint: disable=import-outside-toplevel
  base = movielens.get_config("size=small,recipe=dot")
  base.catalogue_loss = "squared"   # --config.catalogue_loss=squared
  cold = content_config("RecFusion", base, "cold_items", 0, keep=["catalogue_loss"])
  assert (cold.catalogue_loss, cold.optimizer.weight_decay, cold.in_batch_weight) == (
      "squared", 1.0, 1.0)
  # The table itself can be overridden like any field.
  base.protocol_fields.cold_items.in_batch_weight = 0.5
  assert content_config("RecFusion", base, "cold_items", 0).in_batch_weight == 0.5


def test_protocol_fields_are_checked():
  config = movielens.get_config("size=small,protocol=loo,recipe=dot")
  # Built for loo but never pointed at it: training would silently miss loo's fields.
  with pytest.raises(config_validation.ConfigError, match="protocol_fields.loo was not applied"):
    config_validation.validate(config, training=True)
  config_lib.set_protocol(config, "loo")
  config_validation.validate(config, training=True)
  with pytest.raises(ValueError, match="already carries the recipe's loo fields"):
    config_lib.set_protocol(config, "warm_ratio")
  config_lib.set_protocol(config, "loo")   # the same protocol again changes nothing
  assert _fields(config)[:3] == ("next", "pool", True)

  bad = movielens.get_config("size=small,recipe=dot")
  bad.protocol_fields.cold_items.optimizer.weight_dacay = 2.0
  with pytest.raises(config_validation.ConfigError,
                     match=r"protocol_fields.cold_items.optimizer.weight_dacay: no such field "
                           r"'optimizer.weight_dacay' \(did you mean 'optimizer.weight_decay'"):
    config_validation.validate(bad, training=True)
  with pytest.raises(ValueError, match="the config has no field 'optimizer.weight_dacay'"):
    config_lib.set_protocol(bad, "cold_items")


@pytest.mark.parametrize("extra, present, absent", [
    # The table's (bad) value reaches data.example: main applied loo's fields...
    ([], "data.example must be one of", None),
    # ... unless the command line sets the field itself.
    (["--config.data.example=cloze"], "num_steps must be >= 1", "data.example"),
])
def test_main_applies_the_protocol_fields_after_the_command_line(tmp_path, extra, present,
                                                                 absent):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "recfusion_jax.main",
       "--config=configs/movielens.py:size=small,protocol=loo,recipe=dot",
       f"--workdir={tmp_path}", "--config.num_steps=0",
       "--config.protocol_fields.loo.data.example=bogus", *extra],
      cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root},
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert present in result.stderr, result.stderr[-3000:]
  if absent:
    assert absent not in result.stderr.split("invalid config:")[-1], result.stderr[-3000:]


def test_with_own_protocol_is_what_every_cli_reads():
  """main, export and recommend build the model from the config pointed at its own protocol."""
  built = movielens.get_config("size=small,protocol=loo,recipe=dot")
  config = config_lib.with_own_protocol(built, keep=["model.user.history_len"])
  assert config is not built and built.protocol_fields_for == ""
  assert _fields(config)[:5] == ("next", "pool", True, 8, 768)   # the kept field stays
  assert config_lib.with_own_protocol(config) is config          # already pointed: unchanged
  config_validation.validate(config, training=True)
  plain = tiny.get_config()
  assert config_lib.with_own_protocol(plain) is plain              # no protocol, no table
