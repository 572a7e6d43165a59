"""The benchmark runner: a planted case with known answers, the synthetic suite end to end
(--quick), the protocol data, sharding and the CLI."""

import dataclasses
import json
import math
import os
import sys
import types

from absl import flags
import numpy as np
import pytest

from configs import tiny
from recfusion_jax.benchmark import __main__ as cli
from recfusion_jax.benchmark import protocols, registry, report, runner
from recfusion_jax.data.types import MODALITIES, Catalogue, Interactions, RecDataset


def _tiny_suite_config(num_items=120, num_users=48):
  config = tiny.get_config()
  config.data.synthetic.num_items = num_items
  config.data.synthetic.num_users = num_users
  return config


def _options(workdir, **kwargs):
  return runner.Options(suite="synthetic", workdir=str(workdir), config=_tiny_suite_config(),
                        quick=True, **kwargs)


# ---- a planted case: popularity's ranking and every metric are known by hand -----------------

NUM_ITEMS, GROUP_A, GROUP_B = 40, 6, 12


def _planted() -> RecDataset:
  """Popularity (distinct train users): item j < 10 has 12 - j, items 10..15 have 1, the
  rest 0.

  Group A (users 0..5) rated item 0 low (known, not a positive), trained on item 10 + u and
  holds out item 1: with item 0 excluded, item 1 is the most popular candidate -> rank 0.
  Excluding only the train positives would put item 0 first and item 1 at rank 1.
  Group B (users 6..17) holds out item 16, tied at 0 with 23 other items: it ranks after
  them, past rank 10 (lowest id first would put it at rank 6 to 9 for the first users).
  """
  rows = []   # (user, item, rating, time)
  for u in range(GROUP_A):
    rows += [(u, 0, 2.0, 1), (u, 10 + u, 5.0, 2)]
  for k in range(GROUP_B):
    rows += [(GROUP_A + k, j, 5.0, 1 + j) for j in range(min(9, 11 - k) + 1)]
  known = Interactions(np.asarray([r[0] for r in rows], np.int32),
                       np.asarray([r[1] for r in rows], np.int32),
                       np.asarray([r[3] for r in rows], np.int64),
                       np.asarray([r[2] for r in rows], np.float32))
  train = known.select(known.rating >= 4)
  num_users = GROUP_A + GROUP_B
  test = Interactions(np.arange(num_users, dtype=np.int32),
                      np.asarray([1] * GROUP_A + [16] * GROUP_B, np.int32),
                      np.full(num_users, 100, np.int64), np.full(num_users, 5.0, np.float32))
  has_id = np.bincount(train.item, minlength=NUM_ITEMS) > 0
  catalogue = Catalogue(None, None, None, None, np.zeros((NUM_ITEMS, 3), bool), has_id)
  return RecDataset(catalogue, num_users, train, test.select(np.zeros(num_users, bool)), test,
                    np.flatnonzero(~has_id).astype(np.int32), np.ones(num_users, bool),
                    name="planted", known=known)


def test_planted_case_gives_the_known_metrics(tmp_path, monkeypatch):
  planted = _planted()
  counts = np.bincount(planted.train.item, minlength=NUM_ITEMS)
  assert counts[:10].tolist() == list(range(12, 2, -1)) and counts[10:16].tolist() == [1] * 6
  monkeypatch.setattr(protocols, "_raw_protocol", lambda config, protocol, seed: (planted, None))
  opts = _options(tmp_path, models=("popularity",), protocols=("warm_ratio",), seeds=(0,))
  got = runner.run_benchmark(opts)["warm_ratio"]["popularity"]
  third = GROUP_A / (GROUP_A + GROUP_B)
  want = {"HR@10": third, "NDCG@10": third, "MRR@10": third, "Recall@10": third,
          "Precision@10": third / 10, "num_users": GROUP_A + GROUP_B,
          # The sampled protocol: A's positive outscores every negative; B's ties with all.
          "sampled_HR@10": third, "sampled_NDCG@10": third}
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-6), key
  with open(os.path.join(tmp_path, "results.json")) as f:
    assert json.load(f)["warm_ratio"]["popularity"]["NDCG@10"] == pytest.approx(third)


# ---- the synthetic suite end to end ----------------------------------------------------------


def test_synthetic_suite_end_to_end(tmp_path):
  opts = _options(tmp_path, models=("random", "ease", "sasrec", "RecFusion"),
                  protocols=("warm_ratio", "missing_modality", "cold_items", "retrieval"),
                  seeds=(0,))
  results = runner.run_benchmark(opts)
  with open(os.path.join(tmp_path, "results.json")) as f:
    assert json.load(f) == json.loads(json.dumps(results))
  metrics = registry.HEADLINE + registry.SAMPLED
  for protocol, model in (("warm_ratio", "ease"), ("warm_ratio", "random"),
                          ("missing_modality", "ease"), ("cold_items", "RecFusion"),
                          ("warm_ratio", "RecFusion")):
    assert all(np.isfinite(results[protocol][model][m]) for m in metrics), (protocol, model)
  # A trained model beats the measured chance level on the planted synthetic structure.
  assert results["warm_ratio"]["ease"]["NDCG@10"] > 2 * results["warm_ratio"]["random"]["NDCG@10"]
  # ID-only models cannot rank unseen items; SASRec runs only on loo.
  assert "ease" not in results["cold_items"] and all("sasrec" not in r for r in results.values())
  assert "dropped_NDCG@10" in results["missing_modality"]["ease"]
  assert all(np.isfinite(results["retrieval"]["RecFusion"][m]) for m in registry.RETRIEVAL)
  with open(os.path.join(tmp_path, "paired.json")) as f:
    paired = json.load(f)
  assert paired["warm_ratio"]["ease"]["mean"] == pytest.approx(
      results["warm_ratio"]["ease"]["NDCG@10"] - results["warm_ratio"]["RecFusion"]["NDCG@10"])
  assert "RecFusion text_to_image_R@10" in paired["retrieval"]
  with open(os.path.join(tmp_path, "RESULTS.md")) as f:
    text = f.read()
  for snippet in ("## warm_ratio", "## missing_modality", "| ease |", "wall s / seed",
                  "Not applicable: sasrec", "curves_warm_ratio.png", "ablation_ndcg.png",
                  "## Paired differences", "| ease | NDCG@10 - RecFusion |"):
    assert snippet in text, snippet
  # RecFusion's training curve comes from its run's metrics.jsonl (clu writers).
  steps, values, key = report._read_curve(
      os.path.join(tmp_path, "runs", "test", "warm_ratio", "RecFusion", "seed0"))
  assert key == "rec_loss" and steps == [1, 2, 3, 4] and all(np.isfinite(values))


def test_models_with_one_config_are_fitted_once(tmp_path):
  """Where the base config already weighs sources uniformly, the mean-fusion ablation is
  RecFusion itself: trained once, its records say so, and it is no paired comparison."""
  base = _tiny_suite_config()
  digest = runner.fit.content_config_digest
  pdata = types.SimpleNamespace(protocol="cold_items", seed=0)   # all the digest reads
  assert base.model.fusion != "mean"
  assert digest("RecFusion", pdata, base) != digest("RecFusion-mean_fusion", pdata, base)
  base.model.fusion = "mean"
  assert digest("RecFusion", pdata, base) == digest("RecFusion-mean_fusion", pdata, base)

  opts = dataclasses.replace(_options(tmp_path, models=("RecFusion", "RecFusion-mean_fusion"),
                                      protocols=("cold_items", "retrieval"), seeds=(0,)),
                             config=base)
  results = runner.run_benchmark(opts)
  for protocol in ("cold_items", "retrieval"):
    assert results[protocol]["RecFusion-mean_fusion"] == {
        **results[protocol]["RecFusion"],
        "wall_s": results[protocol]["RecFusion-mean_fusion"]["wall_s"]}
  with open(os.path.join(tmp_path, "results_per_seed.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [(r["protocol"], r["model"], r["info"].get("same_as")) for r in records] == [
      ("cold_items", "RecFusion", None), ("cold_items", "RecFusion-mean_fusion", "RecFusion"),
      ("retrieval", "RecFusion", None), ("retrieval", "RecFusion-mean_fusion", "RecFusion")]
  runs = os.path.join(tmp_path, "runs", "test", "cold_items")
  assert sorted(os.listdir(runs)) == ["RecFusion"]
  with open(os.path.join(tmp_path, "paired.json")) as f:
    paired = json.load(f)
  assert "RecFusion-mean_fusion" not in paired.get("cold_items", {})
  assert "RecFusion-mean_fusion text_to_image_R@10" in paired["retrieval"]
  with open(os.path.join(tmp_path, "RESULTS.md")) as f:
    assert "RecFusion-mean_fusion = RecFusion (seeds 0)" in f.read()


def test_protocol_data_missing_modality_and_cold_items():
  config = _tiny_suite_config()
  mm = protocols.load_protocol(config, "missing_modality", 0)
  t, i = MODALITIES.index("text"), MODALITIES.index("image")
  dropped = np.unique(mm.subsets["dropped"].item)
  assert dropped.size > 0
  # A dropped modality is absent and zeroed in the evaluation catalogue, present in training.
  assert np.all(mm.fit.catalogue.presence[dropped][:, [t, i]])
  lost_text = dropped[~mm.catalogue.presence[dropped, t]]
  assert lost_text.size and not mm.catalogue.text_ids[lost_text].any()
  # Final fit = train + valid.
  assert len(mm.fit.train) == len(mm.tune.train) + len(mm.tune.valid)

  cold = protocols.load_protocol(config, "cold_items", 0)
  assert cold.candidate_items.size > 0
  assert not cold.fit.catalogue.has_id[cold.candidate_items].any()
  assert np.isin(cold.heldout.item, cold.candidate_items).all()


def test_aggregate_mean_and_sample_std():
  records = [{"protocol": "p", "model": "m", "seed": s, "metrics": {"HR@10": v}, "wall_s": w}
             for s, v, w in ((0, 0.2, 1.0), (1, 0.4, 3.0))]
  entry = report.aggregate(records)["p"]["m"]
  assert entry["HR@10"] == pytest.approx(0.3)
  assert entry["HR@10_std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
  assert entry["num_seeds"] == 2 and entry["wall_s"] == pytest.approx(2.0)


def test_merged_wall_time_counts_overlapping_runs_once():
  """The union of the runs' [start, end] intervals, against a count of the covered seconds
  (integer times, so a one-second grid is exact); untimed records fall back to the sum and
  say so."""
  rng = np.random.default_rng(0)
  for _ in range(20):
    starts = rng.integers(0, 200, size=8)
    ends = starts + rng.integers(1, 40, size=8)
    records = [{"wall_s": float(e - s), "started_at": float(s), "finished_at": float(e)}
               for s, e in zip(starts, ends)]
    covered = np.zeros(300, bool)
    for s, e in zip(starts, ends):
      covered[s:e] = True
    wall_s, note = runner.merged_wall_time(records)
    assert wall_s == pytest.approx(covered.sum())
    assert f"first start to last end {(ends.max() - starts.min()) / 60:.1f} min" in note
  # Two invocations side by side and a third a day later: 10 + 5 s, not 10 + 8 + 5.
  side_by_side = [{"wall_s": 10.0, "started_at": 0.0, "finished_at": 10.0},
                  {"wall_s": 8.0, "started_at": 1.0, "finished_at": 9.0},
                  {"wall_s": 5.0, "started_at": 86400.0, "finished_at": 86405.0}]
  assert runner.merged_wall_time(side_by_side)[0] == pytest.approx(15.0)
  untimed = side_by_side + [{"wall_s": 2.0}]
  wall_s, note = runner.merged_wall_time(untimed)
  assert wall_s == pytest.approx(25.0) and "1 of 4 runs carry no start and end times" in note


def test_merge_counts_a_repeated_record_once_and_refuses_a_conflicting_one(tmp_path):
  """Shard files gathered from two workdirs may both hold a run: the merge's means and seed
  counts are those of the files without the repeat, the page says how many were dropped, and
  a repeat whose metrics differ stops the merge."""
  def record(model, seed, ndcg):
    return {"protocol": "warm_ratio", "model": model, "seed": seed,
            "metrics": {"NDCG@10": ndcg, "HR@10": 2 * ndcg}, "wall_s": 1.0,
            "started_at": 10.0 * seed, "finished_at": 10.0 * seed + 1.0, "info": {}}
  first = [record("popularity", s, 0.1 + s / 100) for s in range(3)]
  second = [record("RecFusion", s, 0.3 + s / 100) for s in range(3)]
  args = ["--models", "popularity,RecFusion", "--protocols", "warm_ratio", "--seeds", "0,1,2"]

  def merge(name, *shards):
    workdir = tmp_path / name
    workdir.mkdir()
    for k, rows in enumerate(shards):
      (workdir / f"results_per_seed.shard{k}of{len(shards)}.x.jsonl").write_text(
          "".join(json.dumps(r) + "\n" for r in rows))
    return runner.run_benchmark(_cli(str(workdir), "--merge", *args)[0]), workdir

  alone, _ = merge("alone", first, second)
  # A third file repeating popularity's seed 1 (equal up to float noise) and RecFusion's seed 2.
  repeat = [dict(first[1], metrics={k: v + 1e-9 for k, v in first[1]["metrics"].items()}),
            second[2]]
  merged, workdir = merge("repeated", first, second, repeat)
  assert merged == alone
  assert merged["warm_ratio"]["popularity"]["num_seeds"] == 3
  assert merged["warm_ratio"]["popularity"]["NDCG@10"] == pytest.approx(0.11)
  assert "2 records repeated in two shard files" in (workdir / "RESULTS.md").read_text()
  with open(workdir / "results_per_seed.jsonl") as f:
    assert len(f.readlines()) == 6
  conflict = [dict(second[0], metrics={"NDCG@10": 0.5, "HR@10": 1.0})]
  with pytest.raises(ValueError, match=r"'RecFusion', 0\) appears twice with different"):
    merge("conflict", first, second, conflict)


def test_results_page_lists_the_score_terms_each_seed_chose():
  """RESULTS.md's line of chosen score terms: per model and seed, in setting order, for the
  protocol's own runs only; a run that reuses another model's fit is not listed twice."""
  info = {"item_item": {"weight": 0.1, "reg": 200.0, "metric": "NDCG@10", "valid_log": []},
          "transition": {"weight": 0.4, "decay": 0.7, "metric": "NDCG@10", "valid_log": []}}
  records = [{"protocol": "loo", "model": "RecFusion", "seed": 1, "info": info},
             {"protocol": "loo", "model": "RecFusion", "seed": 0,
              "info": {"item_item": {"weight": 0.0, "reg": 100.0}}},
             {"protocol": "loo", "model": "RecFusion-x", "seed": 0,
              "info": {**info, "same_as": "RecFusion"}},
             {"protocol": "loo", "model": "ease", "seed": 0, "info": {}},
             {"protocol": "warm_ratio", "model": "RecFusion", "seed": 0, "info": info}]
  assert report._chosen_terms(records, "loo") == [
      "- RecFusion: seed 0 item_item weight 0 reg 100; seed 1 item_item weight 0.1 reg 200, "
      "transition weight 0.4 decay 0.7"]


def test_paired_differences_match_a_hand_computed_t_interval():
  """Each model minus RecFusion per seed (only seeds both ran), the t interval from tabulated
  critical values; retrieval against chance, 10 / candidates; one seed gives no interval."""
  ndcg = {("RecFusion", 0): 0.30, ("RecFusion", 1): 0.32, ("RecFusion", 2): 0.31,
          ("RecFusion", 3): 0.29, ("RecFusion", 4): 0.33,
          ("ease", 0): 0.33, ("ease", 1): 0.34, ("ease", 2): 0.30, ("ease", 3): 0.31,
          ("ease", 4): 0.36, ("ease", 9): 0.90,      # seed 9: no RecFusion run to pair with
          ("RecFusion-mean_fusion", 0): 0.28}
  records = [{"protocol": "warm_ratio", "model": m, "seed": s, "metrics": {"NDCG@10": v}}
             for (m, s), v in ndcg.items()]
  records += [{"protocol": "retrieval", "model": "RecFusion", "seed": s,
               "metrics": {"text_to_image_R@10": r, "num_items": 200.0}}
              for s, r in enumerate((0.10, 0.07, 0.08, 0.09))]
  paired = report.paired_differences(records)

  diffs = [0.03, 0.02, -0.01, 0.02, 0.03]
  mean = sum(diffs) / 5
  sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
  half = 2.7764451051977987 * sd / math.sqrt(5)      # t(0.975, 4 degrees of freedom)
  ease = paired["warm_ratio"]["ease"]
  assert ease["num_seeds"] == 5 and ease["diffs"] == pytest.approx(diffs)
  assert (ease["mean"], ease["ci_low"], ease["ci_high"]) == pytest.approx(
      (mean, mean - half, mean + half))
  single = paired["warm_ratio"]["RecFusion-mean_fusion"]
  assert single["mean"] == pytest.approx(-0.02) and single["ci_low"] is None
  assert "RecFusion" not in paired["warm_ratio"]

  chance = [r - 10 / 200 for r in (0.10, 0.07, 0.08, 0.09)]
  mean = sum(chance) / 4
  sd = math.sqrt(sum((d - mean) ** 2 for d in chance) / 3)
  half = 3.182446305284263 * sd / math.sqrt(4)       # t(0.975, 3)
  got = paired["retrieval"]["RecFusion text_to_image_R@10"]
  assert (got["mean"], got["ci_low"], got["ci_high"]) == pytest.approx(
      (mean, mean - half, mean + half))

  text = "\n".join(report._paired_lines(paired))
  assert "| ease | NDCG@10 - RecFusion | +0.0180 |" in text
  assert "| RecFusion-mean_fusion | NDCG@10 - RecFusion | -0.0200 | - | 1 | - |" in text
  assert "| RecFusion text_to_image_R@10 | text_to_image_R@10 - chance | +0.0350 |" in text


ML_DIR = "data_out/movielens"


@pytest.mark.skipif(not os.path.exists(os.path.join(ML_DIR, "manifest.json")),
                    reason="MovieLens build not present")
def test_movielens_exclusions_cover_every_training_rating():
  from configs import movielens as movielens_config
  config = movielens_config.get_config("size=small")
  pdata = protocols.load_protocol(config, "warm_ratio", 0)
  rated = pdata.tune.known
  # The models learn from positives (ratings >= 4); the ranking excludes every rating of the
  # fit period (train + valid for the final fit), and no held-out positive is among them.
  pairs = lambda x: set(zip(x.user.tolist(), x.item.tolist()))
  assert (rated.rating < 4).any() and pairs(pdata.tune.train) < pairs(rated)
  assert pairs(pdata.fit.train) < pairs(pdata.fit.known) and len(pdata.fit.known) > len(rated)
  assert not pairs(pdata.heldout) & pairs(pdata.fit.known)
  assert pairs(pdata.fit.known) == pairs(rated) | pairs(pdata.tune.known_valid)


def test_shards_partition_the_runs_and_keep_shared_fits_together():
  opts = runner.Options(suite="movielens", workdir="", config=_tiny_suite_config(),
                        seeds=(0, 1, 2), baseline_seeds=(0,))
  every = runner.shard_jobs(opts)
  parts = [runner.shard_jobs(dataclasses.replace(opts, shard=(k, 3))) for k in range(3)]
  assert sorted(every) == sorted(job for part in parts for job in part)
  assert sum(len(part) for part in parts) == len(every)
  for part in parts:
    # A run that reuses another protocol's fit is in the same shard, after that fit.
    for protocol, seed, model in part:
      fitted_on = registry.fit_protocol(protocol, model)
      if fitted_on != protocol:
        assert part.index((fitted_on, seed, model)) < part.index((protocol, seed, model))
  # Ablation-group models run every seed, the others only --baseline_seeds.
  assert {s for p, s, m in every if m == "RecFusion" and p == "loo"} == {0, 1, 2}
  assert {s for p, s, m in every if m in ("ease", "text_only")} == {0}
  assert protocols.split_seed("loo", 2) == 0 and protocols.split_seed("cold_items", 2) == 2
  # Retrieval alone (rescoring cold_items checkpoints): its fit protocol is not in the list.
  alone = dataclasses.replace(opts, protocols=("retrieval",), models=("RecFusion",))
  assert runner.shard_jobs(alone) == [("retrieval", s, "RecFusion") for s in (0, 1, 2)]


def _cli(workdir, *args):
  """Options as ``python -m recfusion_jax.benchmark`` builds them (absl + config_flags)."""
  argv = ["recfusion_jax.benchmark", "--suite", "synthetic", "--quick", "--workdir", workdir,
          "--config.data.synthetic.num_items=120", "--config.data.synthetic.num_users=48",
          *args]
  saved = sys.argv
  try:
    cli.parse_flags(argv)
    return cli.options_from_flags(argv)
  finally:
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)   # config_flags registers the overrides on every parse
    sys.argv = saved


def test_cli_sharded_run_merges_into_the_unsharded_result(tmp_path):
  args = ["--models", "popularity,RecFusion", "--protocols", "warm_ratio,missing_modality",
          "--seeds", "0,1", "--baseline_seeds", "0", "--steps", "0"]
  opts, cache = _cli(str(tmp_path / "whole"), *args)
  # The suite's default config, with the command line's overrides applied.
  assert opts.config.data.source == "synthetic" and opts.config.data.synthetic.num_items == 120
  # ... named, so that they also win over a recipe's per-protocol fields (content_config).
  assert opts.config_overrides == ("data.synthetic.num_items", "data.synthetic.num_users")
  assert cache == os.path.join(str(tmp_path / "whole"), "jax_cache") and opts.steps == 0
  whole = runner.run_benchmark(opts)
  workdir = str(tmp_path / "sharded")
  for k in range(2):
    runner.run_benchmark(_cli(workdir, "--shard", f"{k}/2", *args)[0])
  assert not os.path.exists(os.path.join(workdir, "results.json"))   # only after the merge
  merged = runner.run_benchmark(_cli(workdir, "--merge", *args)[0])
  flat = lambda r: {(p, m, k): v for p, ms in r.items() for m, e in ms.items()
                    for k, v in e.items() if k != "wall_s"}
  assert flat(merged) == pytest.approx(flat(whole))
  assert merged["warm_ratio"]["RecFusion"]["num_seeds"] == 2
  assert merged["warm_ratio"]["popularity"]["num_seeds"] == 1
  with open(os.path.join(workdir, "results_per_seed.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  # The content model's missing_modality run scored its warm_ratio fit (the same split).
  mm = next(r for r in rows if r["model"] == "RecFusion" and r["protocol"] == "missing_modality")
  assert mm["run_dir"] == os.path.join("runs", "test", "warm_ratio", "RecFusion", "seed0")
  assert all(r["finished_at"] >= r["started_at"] for r in rows)
  with open(os.path.join(workdir, "RESULTS.md")) as f:
    text = f.read()
  assert "--shard 1/2" in text and "runs that overlapped count once" in text


def test_valid_curve_scores_valid_as_the_runner_does(tmp_path):
  """The tuning curve's last row is the runner's valid score of the same fit (same steps)."""
  from recfusion_jax.benchmark import curve  # pylint: disable=import-outside-toplevel
  base = _tiny_suite_config()
  base.optimizer.warmup_steps = 1
  rows = curve.valid_curve("id_only", base, "warm_ratio", 0, steps=4, eval_every=2)
  assert [r["step"] for r in rows] == [2, 4]
  assert all(0.0 <= r["NDCG@10"] <= r["HR@10"] <= 1.0 for r in rows)
  opts = runner.Options(suite="synthetic", workdir=str(tmp_path), config=base,
                        models=("id_only",), protocols=("warm_ratio",), seeds=(0,),
                        split="valid", steps=4)
  score = runner.run_benchmark(opts)["warm_ratio"]["id_only"]["NDCG@10"]
  np.testing.assert_allclose(rows[-1]["NDCG@10"], score, atol=5e-5)   # the curve rounds to 4 places


def test_valid_curve_scores_with_a_source_hidden():
  """--score_without: hiding content from an ID-only model changes nothing (it has none); hiding
  the ID from RecFusion scores its items from content alone, as cold items are scored."""
  from recfusion_jax.benchmark import curve  # pylint: disable=import-outside-toplevel
  base = _tiny_suite_config()
  base.optimizer.warmup_steps = 1
  (row,) = curve.valid_curve("id_only", base, "warm_ratio", 0, steps=2, eval_every=2,
                             score_without=("content",))
  assert row["NDCG@10 without content"] == row["NDCG@10"]
  assert row["HR@10 without content"] == row["HR@10"]
  (row,) = curve.valid_curve("RecFusion", base, "warm_ratio", 0, steps=2, eval_every=2,
                             score_without=("id", "content"))
  assert all(0.0 <= row[f"NDCG@10 without {s}"] <= row[f"HR@10 without {s}"] <= 1.0
             for s in ("id", "content"))
  catalogue = protocols.load_protocol(base, "warm_ratio", 0, split="valid").fit.catalogue
  no_content = curve.catalogue_without(catalogue, "content")
  assert not no_content.presence.any() and np.array_equal(no_content.has_id, catalogue.has_id)
  assert not np.any(no_content.text_ids) and not np.any(no_content.image)
  no_id = curve.catalogue_without(catalogue, "id")
  assert not no_id.has_id.any() and np.array_equal(no_id.presence, catalogue.presence)
  with pytest.raises(ValueError, match="score_without"):
    curve.catalogue_without(catalogue, "text")


def test_staged_curve_holds_the_id_side_it_starts_from():
  """--staged: the second fit starts from the ID-only fit's shared parameters and keeps them
  exactly (no update, no weight decay), while the content side trains."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from recfusion_jax.benchmark import curve  # pylint: disable=import-outside-toplevel
  from recfusion_jax import train  # pylint: disable=import-outside-toplevel
  from recfusion_jax.benchmark.fit import _with_catalogue, content_config  # pylint: disable=import-outside-toplevel
  base = _tiny_suite_config()
  base.optimizer.warmup_steps = 1
  base.optimizer.weight_decay = 0.5
  rows = curve.valid_curve("RecFusion", base, "warm_ratio", 0, steps=2, eval_every=2,
                           staged=True)
  assert [r.get("stage") for r in rows] == ["id_only", None]
  pdata = protocols.load_protocol(base, "warm_ratio", 0, split="valid")
  fit = _with_catalogue(pdata.fit, pdata.fit.catalogue, base.data.get("text_len"))
  id_config = content_config("id_only", base, "warm_ratio", 0, steps=2)
  _, id_model = curve._train_and_score(id_config, pdata, fit, 2, 2, {})
  held = nnx.to_flat_state(nnx.state(id_model, nnx.Param))
  config = content_config("RecFusion", base, "warm_ratio", 0, steps=2)
  _, model = curve._train_and_score(config, pdata, fit, 2, 2, {}, start_from=held)
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  id_side = [path for path, _ in held if path[0] in curve.ID_SIDE]
  assert ("item_embeddings", "embedding") in id_side and any(
      p[0] == "user_encoder" for p in id_side)
  for path, variable in held:
    if path[0] in curve.ID_SIDE:
      np.testing.assert_array_equal(params[path].get_value(), variable.get_value())
  # The held values are the ID-only fit's, not the init's; the content side trains from its init.
  init = dict(nnx.to_flat_state(nnx.state(train.create_model(config, fit), nnx.Param)))
  moved = lambda p: np.abs(np.asarray(params[p].get_value()) - init[p].get_value()).max() > 1e-4
  assert moved(("item_embeddings", "embedding"))
  assert any(moved(p) for p in params if p[0] == "encoder")


def test_content_fit_length_is_chosen_on_valid_then_refit(tmp_path):
  config = _tiny_suite_config()
  config.validation.every = 2
  opts = runner.Options(suite="synthetic", workdir=str(tmp_path), config=config, quick=True,
                        models=("RecFusion",), protocols=("warm_ratio",), seeds=(0,))
  results = runner.run_benchmark(opts)
  with open(runner._records_path(opts)) as f:
    (record,) = [json.loads(line) for line in f]
  info = record["info"]
  # The train-only fit was scored on valid at steps 2 and 4 (--quick trains 4 steps) ...
  assert [row["step"] for row in info["valid_curve"]] == [2, 4]
  best = max(info["valid_curve"], key=lambda row: row["NDCG@10"])
  assert info["best_step"] == best["step"] and info["epochs_to_best"] == best["epoch"]
  assert info["valid_NDCG@10"] == best["NDCG@10"]
  # ... and the train + valid refit ran that many epochs (more rows: at least as many steps)
  # on a schedule of its own length (annealed to its end, not cut in the middle).
  run_dir = os.path.join(tmp_path, record["run_dir"])
  refit_steps = report._read_curve(run_dir)[0]
  assert info["refit_steps"] >= info["best_step"] and refit_steps[-1] == info["refit_steps"]
  assert info["num_steps"] == info["refit_steps"]
  assert os.path.isdir(os.path.join(run_dir, "select", "checkpoints"))
  entry = results["warm_ratio"]["RecFusion"]
  assert entry["epochs_to_best"] == info["epochs_to_best"] and entry["epochs"] == info["epochs"]
  assert os.path.exists(os.path.join(tmp_path, "valid_warm_ratio.png"))


def test_score_terms_are_chosen_on_a_train_only_twin(tmp_path):
  """A fixed-length fit (no valid split in the final fit, no length selection) with both
  post-training terms: a train-only twin is trained, the terms' joint grid is scored on valid
  (each term's log: the slice through the choice), and the final model carries the chosen
  settings, its EASE matrix refilled from its own data at the chosen reg."""
  from recfusion_jax import score_terms   # pylint: disable=import-outside-toplevel
  from recfusion_jax.benchmark import fit   # pylint: disable=import-outside-toplevel
  config = _tiny_suite_config()
  for key, value in {"model.scoring": "dot", "model.item_bias": True,
                     "model.fusion": "residual", "model.history_fusion": "sum",
                     "model.item_id.dropout": 0.0, "model.item_item": "ease_fixed",
                     "model.transition": "markov",
                     # A small grid: the path is under test, not the grid.
                     "score_term_grid": {"item_item": {"weight": (0.0, 1.0, 8.0),
                                                       "reg": (100.0, 2000.0)},
                                         "transition": {"weight": (0.0, 0.4)}}}.items():
    node, *path = config, *key.split(".")
    for name in path[:-1]:
      node = node[name]
    node[path[-1]] = value
  config.validation.every = 0
  pdata = protocols.load_protocol(config, "warm_ratio", 0)
  assert len(pdata.fit.valid) == 0
  _, model, _, info = fit.fit_content_model("RecFusion", pdata, config, tmp_path, quick=True)
  assert os.path.isdir(os.path.join(tmp_path, "select", "checkpoints"))
  assert [(row["weight"], row["reg"]) for row in info["item_item"]["valid_log"]] == [
      (w, r) for w in (0.0, 1.0, 8.0) for r in (100.0, 2000.0)]
  assert [(row["weight"], row["decay"]) for row in info["transition"]["valid_log"]] == [
      (w, d) for w in (0.0, 0.4) for d in score_terms.TRANSITION_DECAYS]
  # Saved beside the final fit's checkpoints, for recommend and export.
  with open(os.path.join(tmp_path, score_terms.FILE)) as f:
    assert json.load(f) == {key: info[key] for key in ("item_item", "transition")}
  for key, names in (("item_item", ("weight", "reg")), ("transition", ("weight", "decay"))):
    log = info[key]["valid_log"]
    best = max(row["NDCG@10"] for row in log)
    chosen = next(row for row in log if row["NDCG@10"] == best)
    assert all(info[key][name] == chosen[name] for name in names)
    np.testing.assert_allclose(np.asarray(getattr(model, f"{key}_setting")[...]),
                               [chosen[name] for name in names if name != "reg"])
  from recfusion_jax.models import item_item   # pylint: disable=import-outside-toplevel
  np.testing.assert_allclose(np.asarray(model.item_item[...]),
                             item_item.ease_weights_of(pdata.fit, info["item_item"]["reg"]),
                             rtol=1e-5, atol=1e-6)
