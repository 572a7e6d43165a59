#!/usr/bin/env bash
# Issue 5: effect of all-MiniLM-L6-v2 initialisation vs random on the movielens (base) losses.
# Needs data_out/movielens and data_out/minilm (made by `SIZE=base bash launch/movielens.sh`).
# One seed, 200 steps of batch 32 each: a first measurement, not a tuned comparison.
set -u
cd "$(dirname "$0")/.."
COMMON="--config.num_steps=200 --config.batch_size=32 --config.log_every=20 --config.cache_refresh_every=1000 --config.checkpoint_every=1000 --config.optimizer.warmup_steps=20"
rm -rf runs/init_minilm runs/init_random && mkdir -p runs
python -m recfusion_jax.main --config configs/movielens.py:size=base --workdir runs/init_minilm $COMMON > runs/init_minilm.log 2>&1
python -m recfusion_jax.main --config configs/movielens.py:size=base --workdir runs/init_random $COMMON --config.init_from= > runs/init_random.log 2>&1
python - <<PY
import json
for name in ("init_minilm", "init_random"):
  rows = [r for r in map(json.loads, open(f"runs/{name}/metrics.jsonl")) if "rec_loss" in r][-5:]
  res = json.load(open(f"runs/{name}/results.json"))["warm"]
  print(name, "rec_loss(last 5 logs) %.3f" % (sum(r["rec_loss"] for r in rows) / 5),
        "contrastive %.3f" % (sum(r["contrastive_loss"] for r in rows) / 5),
        "HR@10 %.4f NDCG@10 %.4f" % (res["HR@10"], res["NDCG@10"]))
PY
