"""Probe (docs/TUNING.md §31): on loo, test HR@10/NDCG@10 of the runner's final RecFusion fit at
each EASE reg, with the weights chosen jointly on valid (by the train-only twin) at that reg; the
joint choice over every reg is the runner's. Restores only (no training).
usage, from the repository root: PYTHONPATH=. python docs/results_loo_joint/reg_probe.py \
    WORKDIR SEEDS OUT.json   (WORKDIR: the runner's loo workdir; SEEDS: 0,2,4)"""
import sys, json
from absl import logging
from etils import epath
from configs import movielens
from recfusion_jax.benchmark import fit, protocols
from recfusion_jax import train, model_eval, score_terms

workdir, seeds, out_path = sys.argv[1:4]
logging.set_verbosity(logging.WARNING)
base = movielens.get_config("size=small")
out = {}
for seed in [int(s) for s in seeds.split(",")]:
  pdata = protocols.load_protocol(base, "loo", seed)
  config = fit.content_config("RecFusion", base, "loo", seed)
  tl = config.data.get("text_len")
  hl, chunk = config.model.user.history_len, config.eval_block_size
  run_dir = epath.Path(workdir) / "runs/test/loo/RecFusion" / f"seed{seed}"
  fitd = fit._with_catalogue(pdata.fit, pdata.fit.catalogue, tl)
  tune = fit._with_catalogue(pdata.tune, pdata.tune.catalogue, tl)
  catalogue = fit._with_catalogue(fitd, pdata.catalogue, tl).catalogue
  twin = train.train_model(config, run_dir / "select", dataset=tune).model
  final = train.train_model(config, run_dir, dataset=fitd).model
  keys = score_terms.score_terms(final)
  chosen, points = score_terms.choose_settings(twin, tune, keys, history_len=hl, metric="NDCG@10",
                                               chunk=chunk)
  res = {}
  for reg in score_terms.ITEM_ITEM_REGS:
    at = [(s, v) for s, v in points if s["item_item"]["reg"] == reg]
    top = max(v for _, v in at)
    best = next(s for s, v in at if v == top)
    score_terms.fill_ease_matrix(final, fitd, reg)   # the final fit's matrix at this reg
    score_terms.set_score_term(final, "item_item", [best["item_item"]["weight"]])
    score_terms.set_score_term(final, "transition", [best["transition"]["weight"],
                                                     best["transition"]["decay"]])
    t = fit.evaluate_ranker(model_eval.model_ranker(final, fitd, catalogue, history_len=hl,
                                                    chunk=chunk), pdata)
    res[str(reg)] = {"setting": best, "valid": top, "test_HR@10": t["HR@10"],
                     "test_NDCG@10": t["NDCG@10"]}
    print("SEED", seed, reg, res[str(reg)], flush=True)
  out[seed] = {"chosen": chosen, "per_reg": res}
  json.dump(out, open(out_path, "w"), indent=1)
