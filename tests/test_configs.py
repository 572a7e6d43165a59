"""Every config file builds and passes the train loop's validation; recipes set what they say.

(Training each config at its real size is the multi-host issue's work; this catches a config
that no longer matches the loop or the model before anything compiles. Two real training steps
of every config file, CPU-sized, are tests/test_config_training.py.)
"""

import pytest
from flax import nnx

from configs import mmrec, movielens, pod, tiny
from recfusion_jax import config_lib, config_validation
from recfusion_jax.models.recfusion import RecFusion


@pytest.mark.parametrize("module,arg", [
    (tiny, None), (tiny, "ablation=mean_fusion"),
    (movielens, "size=small"), (movielens, "size=base,protocol=cold_items"),
    (movielens, "size=small,recipe=dot"), (movielens, "size=small,protocol=loo,recipe=dot"),
    (movielens, "size=small,recipe=dot,ablation=no_contrastive"),
    (mmrec, None), (pod, None), (pod, "size=test"), (pod, "size=test,chips_per_replica=4")])
def test_config_validates(module, arg):
  config = module.get_config(arg)
  config_validation.validate(config, training=True)


@pytest.mark.parametrize("protocol", ["warm_ratio", "loo"])
def test_dot_recipe_builds_its_model(protocol):
  config = movielens.get_config(f"size=small,protocol={protocol},recipe=dot")
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
    config_lib.apply_recipe(tiny.get_config(), "fancy", "warm_ratio")


def test_runner_keeps_the_recipe_and_overrides_and_sets_the_history_rule():
  """A base config built for warm_ratio gets loo's history rule on loo fits (and back); the
  recipe's fields come from the config, so a --config override of one of them holds."""
  from recfusion_jax.benchmark.fit import content_config  # pylint: disable=import-outside-toplevel
  base = movielens.get_config("size=small,recipe=dot")
  base.data.target_share = 0.5   # as --config.data.target_share=0.5 would
  loo = content_config("RecFusion", base, "loo", 0)
  assert (loo.data.example, loo.model.user.kind, loo.data.history,
          loo.data.target_share) == ("cloze", "pool", "earlier", 0.5)
  warm = content_config("RecFusion", movielens.get_config("size=small,protocol=loo,recipe=dot"),
                        "warm_ratio", 0)
  assert (warm.data.example, warm.model.user.kind, warm.exclude_history, warm.data.history,
          warm.model.user.history_len) == ("cloze", "pool", True, "all_others", 768)
  paper = content_config("RecFusion", movielens.get_config("size=small"), "loo", 0)
  assert paper.data.get("example", "interaction") == "interaction"
