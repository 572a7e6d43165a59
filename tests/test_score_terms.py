"""The fixed score terms weighed after training (``score_terms``): the chooser against valid,
and the path every trained model takes -- chosen by ``train.train_and_evaluate``, saved beside
the checkpoints, applied when a workdir is restored for recommend and export."""

import dataclasses
import json
import logging
import os

import numpy as np
import pytest

from recfusion_jax import export, score_terms, train
from recfusion_jax.data.types import Interactions


def _valid_split_model(config, users, items, last, num_items, num_users):
  """(data, untrained model): the rows ``last`` are valid, the rest train, test is empty; the
  model marks the items with a trained ID, as training does (the terms read only those)."""
  from recfusion_jax import train   # pylint: disable=import-outside-toplevel
  from recfusion_jax.data.synthetic import make_synthetic   # pylint: disable=import-outside-toplevel
  data = make_synthetic(config.data.synthetic, num_items=num_items, num_users=num_users,
                        min_interactions=4, max_interactions=8)
  part = lambda keep: Interactions(users[keep], items[keep], np.arange(users.size)[keep],
                                   np.ones(int(keep.sum()), np.float32))
  data = dataclasses.replace(data, train=part(~last), valid=part(last), test=part(last & False),
                             known=None)
  model = train.create_model(config, data)
  model.cache_has_id[...] = np.isin(np.arange(num_items), data.train.item)
  return data, model


def test_choose_score_term_takes_the_ease_weight_that_valid_scores_best():
  """Items in blocks of 5 that users rate together: EASE's term names a user's unrated block
  mates, an untrained model does not, so a positive weight wins on valid; the first best
  grid point is chosen and the model's setting (weight 0) is left as it was."""
  from recfusion_jax.models import item_item   # pylint: disable=import-outside-toplevel
  from tests.helpers import tiny_config   # pylint: disable=import-outside-toplevel

  config = tiny_config(**{"model.scoring": "dot", "model.item_bias": True,
                          "model.fusion": "residual", "model.user.kind": "pool",
                          "model.user.use_id": False, "model.history_fusion": "sum",
                          "model.item_id.dropout": 0.0, "model.item_item": "ease_fixed",
                          "model.item_item_reg": 1.0})
  num_items, num_users, block = 30, 24, 5
  # User u rates the 5 items of block u % 6; one of them (item u // 6 of the block, so each
  # block's users hold out different items) is held out for valid.
  users = np.repeat(np.arange(num_users), block).astype(np.int32)
  position = np.tile(np.arange(block), num_users)
  items = ((users % (num_items // block)) * block + position).astype(np.int32)
  last = position == users // (num_items // block)
  data, model = _valid_split_model(config, users, items, last, num_items, num_users)
  np.testing.assert_allclose(np.asarray(model.item_item[...]),
                             item_item.ease_weights_of(data, 1.0))
  (weight,), log = score_terms.choose_score_term(
      model, data, "item_item", history_len=config.model.user.history_len, metric="NDCG@10")
  scores = {row["weight"]: row["NDCG@10"] for row in log}
  assert list(scores) == list(score_terms.ITEM_ITEM_WEIGHTS)
  best = max(scores.values())
  assert weight == next(w for w, score in scores.items() if score == best)
  assert weight > 0 and best > scores[0.0] + 0.5
  np.testing.assert_array_equal(np.asarray(model.item_item_setting[...]), [0.0])


def test_choose_score_term_takes_the_transition_weight_that_valid_scores_best():
  """A cyclic walk (item i followed by i + 1): the Markov term names each valid item, an
  untrained model does not, so a positive weight wins on valid by far; the first best grid
  point is chosen; the model's own setting is left as it was; the chain is the data's."""
  from recfusion_jax.baselines import markov   # pylint: disable=import-outside-toplevel
  from recfusion_jax.data.examples import TrainExampleIndex   # pylint: disable=import-outside-toplevel
  from tests.helpers import cyclic_walks, tiny_config   # pylint: disable=import-outside-toplevel

  config = tiny_config(**{"model.scoring": "dot", "model.item_bias": True,
                          "model.fusion": "residual", "model.user.kind": "pool",
                          "model.user.use_id": False, "model.history_fusion": "sum",
                          "model.item_id.dropout": 0.0, "model.transition": "markov"})
  num_items, num_users, length = 30, 16, 8
  users, items, last = cyclic_walks(num_users, num_items, length)
  data, model = _valid_split_model(config, users, items, last, num_items, num_users)
  np.testing.assert_allclose(
      np.asarray(model.transition[...]),
      markov.transition_probabilities(TrainExampleIndex.build(data), num_items))
  (weight, decay), log = score_terms.choose_score_term(
      model, data, "transition", history_len=config.model.user.history_len, metric="NDCG@10")
  scores = {(row["weight"], row["decay"]): row["NDCG@10"] for row in log}
  assert len(log) == len(score_terms.TRANSITION_WEIGHTS) * len(score_terms.TRANSITION_DECAYS)
  best = max(scores.values())
  assert (weight, decay) == next(point for point, score in scores.items() if score == best)
  assert weight > 0 and best > scores[0.0, 0.5] + 0.5
  np.testing.assert_array_equal(np.asarray(model.transition_setting[...]), [0.0, 0.5])
  with pytest.raises(ValueError, match="valid split"):
    score_terms.choose_score_term(model, dataclasses.replace(data, valid=data.test),
                                  "transition", history_len=config.model.user.history_len,
                          metric="NDCG@10")


def test_train_and_evaluate_chooses_the_terms_on_valid_and_restore_applies_them(tmp_path, caplog):
  """main's path: both terms chosen on the synthetic valid split after training (each the first
  best grid point of its log), written to score_terms.json, used by the evaluation, and set on
  the model ``recommend``/``export`` restore; without the file they stay at weight 0, logged."""
  from recfusion_jax.recommend import __main__ as recommend_cli   # pylint: disable=import-outside-toplevel
  from tests.helpers import tiny_config   # pylint: disable=import-outside-toplevel
  config = tiny_config(**{"model.scoring": "dot", "model.item_bias": True,
                          "model.fusion": "residual", "model.history_fusion": "sum",
                          "model.item_id.dropout": 0.0, "model.item_item": "ease_fixed",
                          "model.transition": "markov", "num_steps": 20, "batch_size": 32,
                          "checkpoint_every": 20, "eval_block_size": 64})
  workdir = tmp_path / "run"
  results = train.train_and_evaluate(config, workdir)
  chosen = results["score_terms"]
  assert set(chosen) == {"item_item", "transition"}
  for key, names in (("item_item", ("weight",)), ("transition", ("weight", "decay"))):
    log = chosen[key]["valid_log"]
    best = max(row["NDCG@10"] for row in log)
    first_best = next(row for row in log if row["NDCG@10"] == best)
    assert all(chosen[key][name] == first_best[name] for name in names)
  with open(workdir / score_terms.FILE) as f:
    assert json.load(f) == chosen
  with open(workdir / "results.json") as f:
    assert json.load(f)["score_terms"] == chosen

  model, trained_data, _, context = recommend_cli.load_workdir(config, workdir)
  expected = {"item_item": (chosen["item_item"]["weight"],),
              "transition": (chosen["transition"]["weight"], chosen["transition"]["decay"])}
  assert context["source"]["score_terms"] == expected
  for key, setting in expected.items():
    np.testing.assert_allclose(np.asarray(getattr(model, f"{key}_setting")[...]), setting)
  # The text output names them too, and an export carries them into its manifest and answers.
  named = (f"score terms chosen on valid: item_item weight {expected['item_item'][0]:g}, "
           f"transition weight {expected['transition'][0]:g} "
           f"decay {expected['transition'][1]:g}")
  text = recommend_cli.format_text({"source": context["source"], "sources": ["id"]})
  assert text.splitlines()[1] == named
  export.export_for_serving(model, trained_data, tmp_path / "export",
                            history_len=config.model.user.history_len, k=5)
  _, export_context = recommend_cli.from_export(str(tmp_path / "export"))
  np.testing.assert_allclose(export_context["source"]["score_terms"]["item_item"],
                             expected["item_item"])
  np.testing.assert_allclose(export_context["source"]["score_terms"]["transition"],
                             expected["transition"])

  os.remove(workdir / score_terms.FILE)
  with caplog.at_level(logging.WARNING):
    model, _, _, context = recommend_cli.load_workdir(config, workdir)
  assert "stay at weight 0" in caplog.text and "score_terms" not in context["source"]
  assert float(np.asarray(model.item_item_setting[...])[0]) == 0.0
  assert float(np.asarray(model.transition_setting[...])[0]) == 0.0


def test_apply_saved_refuses_a_file_that_misses_a_term(tmp_path):
  """A score_terms.json written for another configuration (one term of two) is an error, not
  a half-applied model."""
  from tests.helpers import tiny_config   # pylint: disable=import-outside-toplevel
  from recfusion_jax.data.synthetic import make_synthetic   # pylint: disable=import-outside-toplevel
  config = tiny_config(**{"model.scoring": "dot", "model.fusion": "residual",
                          "model.history_fusion": "sum", "model.item_item": "ease_fixed",
                          "model.transition": "markov"})
  data = make_synthetic(config.data.synthetic, num_items=20, num_users=8, min_interactions=4,
                        max_interactions=6)
  model = train.create_model(config, data)
  score_terms.save(tmp_path, {"item_item": {"weight": 2.0, "valid_log": []}})
  with pytest.raises(ValueError, match="no \\['transition'\\]"):
    score_terms.apply_saved(model, tmp_path)
