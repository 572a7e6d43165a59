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


def test_choose_settings_takes_the_ease_weight_and_reg_that_valid_scores_best():
  """Items in blocks of 5 that users rate together: EASE's term names a user's unrated block
  mates, an untrained model does not, so a positive weight wins on valid; the first best
  grid point (weight, reg) is chosen, and the model's setting (weight 0) and matrix (reg 1)
  are left as they were."""
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
  grid = {"weight": score_terms.ITEM_ITEM_WEIGHTS, "reg": (1.0, 30.0)}
  chosen, points = score_terms.choose_settings(
      model, data, ["item_item"], history_len=config.model.user.history_len, metric="NDCG@10",
      grids={"item_item": grid})
  scores = {(s["item_item"]["weight"], s["item_item"]["reg"]): score for s, score in points}
  assert list(scores) == [(w, r) for w in grid["weight"] for r in grid["reg"]]
  best = max(scores.values())
  assert (chosen["item_item"]["weight"], chosen["item_item"]["reg"]) == next(
      point for point, score in scores.items() if score == best)
  assert chosen["item_item"]["weight"] > 0 and best > scores[0.0, 1.0] + 0.5
  # At weight 0 the matrix scores nothing: every reg scores the same.
  assert scores[0.0, 1.0] == scores[0.0, 30.0]
  np.testing.assert_array_equal(np.asarray(model.item_item_setting[...]), [0.0])
  np.testing.assert_allclose(np.asarray(model.item_item[...]),
                             item_item.ease_weights_of(data, 1.0))


def test_choose_settings_takes_the_transition_weight_that_valid_scores_best():
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
  chosen, points = score_terms.choose_settings(
      model, data, ["transition"], history_len=config.model.user.history_len, metric="NDCG@10")
  scores = {(s["transition"]["weight"], s["transition"]["decay"]): score for s, score in points}
  assert len(scores) == len(score_terms.TRANSITION_WEIGHTS) * len(score_terms.TRANSITION_DECAYS)
  best = max(scores.values())
  weight, decay = chosen["transition"]["weight"], chosen["transition"]["decay"]
  assert (weight, decay) == next(point for point, score in scores.items() if score == best)
  assert weight > 0 and best > scores[0.0, 0.5] + 0.5
  np.testing.assert_array_equal(np.asarray(model.transition_setting[...]), [0.0, 0.5])
  with pytest.raises(ValueError, match="valid split"):
    score_terms.choose_settings(model, dataclasses.replace(data, valid=data.test),
                                ["transition"], history_len=config.model.user.history_len,
                                metric="NDCG@10")


def test_choose_settings_matches_scoring_every_grid_point_on_its_own():
  """The joint choice against a naive reference: every point of both terms' grids set on the
  model (EASE's matrix refilled at its reg) and ranked from scratch gives the score
  ``choose_settings`` reports for it, and the choice is the first best point."""
  from recfusion_jax import model_eval   # pylint: disable=import-outside-toplevel
  from recfusion_jax.baselines.common import rank_split   # pylint: disable=import-outside-toplevel
  from tests.helpers import cyclic_walks, tiny_config   # pylint: disable=import-outside-toplevel

  config = tiny_config(**{"model.scoring": "dot", "model.item_bias": True,
                          "model.fusion": "residual", "model.user.kind": "pool",
                          "model.user.use_id": False, "model.history_fusion": "sum",
                          "model.item_id.dropout": 0.0, "model.item_item": "ease_fixed",
                          "model.item_item_reg": 1.0, "model.transition": "markov"})
  users, items, last = cyclic_walks(16, 30, 8)
  data, model = _valid_split_model(config, users, items, last, 30, 16)
  grids = {"item_item": {"weight": (0.0, 4.0), "reg": (1.0, 30.0)},
           "transition": {"weight": (0.0, 1.6), "decay": (0.5, 0.7)}}
  hist = config.model.user.history_len
  chosen, points = score_terms.choose_settings(model, data, ["item_item", "transition"],
                                               history_len=hist, metric="NDCG@10", grids=grids)
  assert len(points) == 16
  for setting, score in points:
    score_terms.fill_ease_matrix(model, data, setting["item_item"]["reg"])
    score_terms.set_score_term(model, "item_item", [setting["item_item"]["weight"]])
    score_terms.set_score_term(model, "transition", [setting["transition"]["weight"],
                                                     setting["transition"]["decay"]])
    ranker = model_eval.model_ranker(model, data, history_len=hist)
    np.testing.assert_allclose(rank_split(ranker, data, data.valid)["NDCG@10"], score,
                               atol=1e-6, err_msg=str(setting))
  index = lambda s: tuple(grids[k][n].index(s[k][n]) for k in grids for n in grids[k])
  best = max(score for _, score in points)
  assert chosen == min((s for s, score in points if score == best), key=index)


def test_train_and_evaluate_chooses_the_terms_on_valid_and_restore_applies_them(tmp_path, caplog):
  """main's path: both terms chosen on the synthetic valid split after training (each the first
  best grid point of its log), written to score_terms.json, used by the evaluation, and set on
  the model ``recommend``/``export`` restore; without the file they stay at weight 0, logged."""
  from recfusion_jax.models import item_item   # pylint: disable=import-outside-toplevel
  from recfusion_jax.recommend import __main__ as recommend_cli   # pylint: disable=import-outside-toplevel
  from tests.helpers import tiny_config   # pylint: disable=import-outside-toplevel
  config = tiny_config(**{"model.scoring": "dot", "model.item_bias": True,
                          "model.fusion": "residual", "model.history_fusion": "sum",
                          "model.item_id.dropout": 0.0, "model.item_item": "ease_fixed",
                          "model.transition": "markov", "num_steps": 20, "batch_size": 32,
                          "checkpoint_every": 20, "eval_block_size": 64})
  # A small grid (the path is under test, not the grid) without the configured reg (500), so
  # the restored matrix is always refilled.
  config.score_term_grid = {"item_item": {"weight": (0.0, 1.0, 8.0), "reg": (100.0, 2000.0)},
                            "transition": {"weight": (0.0, 0.4)}}
  workdir = tmp_path / "run"
  results = train.train_and_evaluate(config, workdir)
  chosen = results["score_terms"]
  assert set(chosen) == {"item_item", "transition"}
  # Each term's log is the slice of the joint grid through the choice: the choice is its first
  # best point.
  for key, names in (("item_item", ("weight", "reg")), ("transition", ("weight", "decay"))):
    log = chosen[key]["valid_log"]
    assert len(log) == np.prod([len(score_terms.grids_of(config)[key][n]) for n in names])
    best = max(row["NDCG@10"] for row in log)
    first_best = next(row for row in log if row["NDCG@10"] == best)
    assert all(chosen[key][name] == first_best[name] for name in names)
  with open(workdir / score_terms.FILE) as f:
    assert json.load(f) == chosen
  with open(workdir / "results.json") as f:
    assert json.load(f)["score_terms"] == chosen

  model, trained_data, _, context = recommend_cli.load_workdir(config, workdir)
  expected = {"item_item": (chosen["item_item"]["weight"], chosen["item_item"]["reg"]),
              "transition": (chosen["transition"]["weight"], chosen["transition"]["decay"])}
  assert context["source"]["score_terms"] == expected
  np.testing.assert_allclose(np.asarray(model.item_item_setting[...]), expected["item_item"][:1])
  np.testing.assert_allclose(np.asarray(model.transition_setting[...]), expected["transition"])
  # EASE's matrix at the chosen reg, refilled from the training data where it is not the
  # configured one.
  np.testing.assert_allclose(np.asarray(model.item_item[...]),
                             item_item.ease_weights_of(trained_data, expected["item_item"][1]),
                             rtol=1e-5, atol=1e-6)
  # The text output names them too, and an export carries them into its manifest and answers.
  named = (f"score terms chosen on valid: item_item weight {expected['item_item'][0]:g} "
           f"reg {expected['item_item'][1]:g}, "
           f"transition weight {expected['transition'][0]:g} "
           f"decay {expected['transition'][1]:g}")
  text = recommend_cli.format_text({"source": context["source"], "sources": ["id"]})
  assert text.splitlines()[1] == named
  export.export_for_serving(model, trained_data, tmp_path / "export",
                            history_len=config.model.user.history_len, k=5,
                            chosen_terms=context["source"]["score_terms"])
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


def test_apply_saved_refills_ease_at_the_chosen_reg_and_refuses_a_file_that_misses_a_term(
    tmp_path):
  """A chosen reg other than the configured one refills EASE's matrix from the data set; a file
  without a reg (written before it was chosen) keeps the configured one; a score_terms.json
  written for another configuration (one term of two) is an error, not a half-applied model."""
  from recfusion_jax.models import item_item   # pylint: disable=import-outside-toplevel
  from tests.helpers import tiny_config   # pylint: disable=import-outside-toplevel
  from recfusion_jax.data.synthetic import make_synthetic   # pylint: disable=import-outside-toplevel
  config = tiny_config(**{"model.scoring": "dot", "model.fusion": "residual",
                          "model.history_fusion": "sum", "model.item_item": "ease_fixed",
                          "model.transition": "markov"})
  data = make_synthetic(config.data.synthetic, num_items=20, num_users=8, min_interactions=4,
                        max_interactions=6)
  model = train.create_model(config, data)
  configured = item_item.ease_weights_of(data, config.model.item_item_reg)
  np.testing.assert_allclose(np.asarray(model.item_item[...]), configured)
  transition = {"weight": 0.2, "decay": 0.7}
  score_terms.save(tmp_path, {"item_item": {"weight": 2.0, "reg": 100.0},
                              "transition": transition})
  assert score_terms.apply_saved(model, tmp_path, data, config) == {
      "item_item": (2.0, 100.0), "transition": (0.2, 0.7)}
  np.testing.assert_allclose(np.asarray(model.item_item[...]),
                             item_item.ease_weights_of(data, 100.0), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(model.item_item[...]), configured)
  np.testing.assert_allclose(np.asarray(model.transition_setting[...]), [0.2, 0.7])
  model = train.create_model(config, data)
  score_terms.save(tmp_path, {"item_item": {"weight": 2.0}, "transition": transition})
  assert score_terms.apply_saved(model, tmp_path, data, config)["item_item"] == (
      2.0, config.model.item_item_reg)
  np.testing.assert_allclose(np.asarray(model.item_item[...]), configured)
  score_terms.save(tmp_path, {"item_item": {"weight": 2.0, "valid_log": []}})
  with pytest.raises(ValueError, match="no \\['transition'\\]"):
    score_terms.apply_saved(model, tmp_path, data, config)
