"""The benchmark runner end to end on tiny synthetic data (--quick), and its pieces."""

import json
import os

import numpy as np
import pytest

from recfusion_jax import benchmark
from recfusion_jax.data.types import MODALITIES

TINY = ["--suite", "synthetic", "--quick", "--synthetic_items", "120", "--synthetic_users", "48"]


def _run(tmp_path, name, *args):
  workdir = str(tmp_path / name)
  opts, cache = benchmark.parse_args(TINY + ["--workdir", workdir, *args])
  assert cache == os.path.join(workdir, "jax_cache")
  return workdir, benchmark.run_benchmark(opts)


def _check_shape(results, protocol, model, metrics, num_seeds):
  entry = results[protocol][model]
  for metric in metrics:
    assert np.isfinite(entry[metric]) and entry[metric + "_std"] >= 0.0, (protocol, model, metric)
  assert entry["num_seeds"] == num_seeds and entry["wall_s"] > 0


def test_id_baselines_two_seeds(tmp_path):
  workdir, results = _run(tmp_path, "ids", "--models", "random,ease,bpr_mf,sasrec",
                          "--protocols", "warm_ratio,missing_modality", "--seeds", "0,1")
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == json.loads(json.dumps(results))
  metrics = benchmark.HEADLINE + benchmark.SAMPLED
  for protocol in ("warm_ratio", "missing_modality"):
    for model in ("random", "ease", "bpr_mf"):
      _check_shape(results, protocol, model, metrics, num_seeds=2)
  # SASRec runs only on the sequential protocol (loo; its training is in test_baselines).
  assert all("sasrec" not in results[p] for p in results)
  # missing_modality reports the dropped-modality slice beside the headline numbers.
  assert "dropped_NDCG@10" in results["missing_modality"]["ease"]
  # A trained model beats the measured chance level on the planted synthetic structure.
  assert results["warm_ratio"]["ease"]["HR@10"] > results["warm_ratio"]["random"]["HR@10"]
  with open(os.path.join(workdir, "RESULTS.md")) as f:
    text = f.read()
  for snippet in ("## warm_ratio", "## missing_modality", "python -m recfusion_jax.benchmark",
                  "| ease |", "wall s / seed", "Not applicable: sasrec", "curves_warm_ratio.png"):
    assert snippet in text
  with open(os.path.join(workdir, "results_per_seed.jsonl")) as f:
    assert len(f.readlines()) == 2 * 3 * 2
  assert os.path.exists(os.path.join(workdir, "curves_warm_ratio.png"))


def test_content_model_cold_items_and_retrieval(tmp_path):
  # --steps 0: the initialised RecFusion goes through the whole content path (cache refresh,
  # item table, user encoding, candidate ranking, retrieval) without compiling a train step;
  # training itself is tested in test_train_loop.
  workdir, results = _run(tmp_path, "content", "--models", "random,ease,RecFusion",
                          "--protocols", "cold_items,retrieval", "--seeds", "0", "--steps", "0")
  _check_shape(results, "cold_items", "RecFusion", benchmark.HEADLINE + benchmark.SAMPLED, 1)
  _check_shape(results, "cold_items", "random", benchmark.HEADLINE, 1)
  assert "ease" not in results["cold_items"]       # ID-only models cannot rank unseen items
  _check_shape(results, "retrieval", "RecFusion", benchmark.RETRIEVAL, 1)
  assert set(results) == {"cold_items", "retrieval"}
  for name in ("RESULTS.md", "ablation_ndcg.png"):
    assert os.path.exists(os.path.join(workdir, name)), name


def test_protocol_data_missing_modality_and_cold_items():
  opts = benchmark.Options(suite="synthetic", workdir="", synthetic_items=120,
                           synthetic_users=48)
  mm = benchmark.load_protocol(opts, "missing_modality", 0)
  t, i = MODALITIES.index("text"), MODALITIES.index("image")
  dropped = np.unique(mm.subsets["dropped"].item)
  assert dropped.size > 0
  # A dropped modality is absent and zeroed in the evaluation catalogue, present in training.
  assert np.all(mm.fit.catalogue.presence[dropped][:, [t, i]])
  lost_text = dropped[~mm.catalogue.presence[dropped, t]]
  assert lost_text.size and not mm.catalogue.text_ids[lost_text].any()
  # Final fit = train + valid.
  assert len(mm.fit.train) == len(mm.tune.train) + len(mm.tune.valid)

  cold = benchmark.load_protocol(opts, "cold_items", 0)
  assert cold.candidate_items.size > 0
  assert not cold.fit.catalogue.has_id[cold.candidate_items].any()
  assert np.isin(cold.heldout.item, cold.candidate_items).all()


def test_aggregate_mean_and_sample_std():
  records = [{"protocol": "p", "model": "m", "seed": s, "metrics": {"HR@10": v}, "wall_s": w}
             for s, v, w in ((0, 0.2, 1.0), (1, 0.4, 3.0))]
  entry = benchmark.aggregate(records)["p"]["m"]
  assert entry["HR@10"] == pytest.approx(0.3)
  assert entry["HR@10_std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
  assert entry["num_seeds"] == 2 and entry["wall_s"] == pytest.approx(2.0)


ML_DIR = "data_out/movielens"


@pytest.mark.skipif(not os.path.exists(os.path.join(ML_DIR, "manifest.json")),
                    reason="MovieLens build not present")
def test_movielens_exclusions_cover_every_training_rating():
  from recfusion_jax.data import movielens
  rated = movielens.load_rated(ML_DIR, "warm_ratio", 0)
  opts = benchmark.Options(suite="movielens", workdir="", data_dir=ML_DIR)
  pdata = benchmark.load_protocol(opts, "warm_ratio", 0)
  # The models learn from positives (ratings >= 4); the ranking excludes every rating of the
  # fit period (train + valid), and no held-out positive is among them.
  pairs = lambda x: set(zip(x.user.tolist(), x.item.tolist()))
  assert (rated.rating < 4).any() and pairs(pdata.tune.train) < pairs(rated)
  assert pairs(pdata.fit.train) < pairs(pdata.known) and len(pdata.known) > len(rated)
  assert not pairs(pdata.heldout) & pairs(pdata.known)
  assert pairs(pdata.tune_known) == pairs(rated)


def test_shards_partition_the_runs_and_keep_shared_fits_together():
  opts = benchmark.Options(suite="movielens", workdir="", seeds=(0, 1, 2), baseline_seeds=(0,))
  every = benchmark.shard_jobs(opts)
  parts = [benchmark.shard_jobs(benchmark.dataclasses.replace(opts, shard=(k, 3)))
           for k in range(3)]
  assert sorted(every) == sorted(job for part in parts for job in part)
  assert sum(len(part) for part in parts) == len(every)
  for part in parts:
    # A run that reuses another protocol's fit is in the same shard, after that fit.
    for protocol, seed, model in part:
      fitted_on = benchmark.fit_protocol(protocol, model)
      if fitted_on != protocol:
        assert part.index((fitted_on, seed, model)) < part.index((protocol, seed, model))
  # Ablation-group models run every seed, the others only --baseline_seeds.
  assert {s for p, s, m in every if m == "RecFusion" and p == "loo"} == {0, 1, 2}
  assert {s for p, s, m in every if m in ("ease", "text_only")} == {0}
  assert benchmark.split_seed("loo", 2) == 0 and benchmark.split_seed("cold_items", 2) == 2


def test_sharded_run_merges_into_the_unsharded_result(tmp_path):
  args = ["--models", "popularity,RecFusion", "--protocols", "warm_ratio,missing_modality",
          "--seeds", "0,1", "--baseline_seeds", "0", "--steps", "0"]
  _, whole = _run(tmp_path, "whole", *args)
  workdir = str(tmp_path / "sharded")
  for k in range(2):
    opts, _ = benchmark.parse_args(TINY + ["--workdir", workdir, "--shard", f"{k}/2", *args])
    benchmark.run_benchmark(opts)
  assert not os.path.exists(os.path.join(workdir, "results.json"))   # only after the merge
  opts, _ = benchmark.parse_args(TINY + ["--workdir", workdir, "--merge", *args])
  merged = benchmark.run_benchmark(opts)
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
  with open(os.path.join(workdir, "RESULTS.md")) as f:
    assert "--shard 1/2" in f.read()
