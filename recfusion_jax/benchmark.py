r"""Benchmark runner: the paper's protocols x baselines of its four classes x RecFusion ablations.

  python -m recfusion_jax.benchmark --suite movielens --workdir runs/bench \
      [--models ease,RecFusion] [--protocols warm_ratio,loo] [--seeds 0,1,2] [--steps N] [--quick]

Every model -- ID-only baselines (``recfusion_jax.baselines``) and RecFusion configs alike --
is turned into a ``baselines.common.Ranker`` (user representations, item table, pure
``score_fn``) and ranked by the same ``evaluate.evaluate_full_ranking`` (headline metrics) and
``evaluate.evaluate_sampled`` (``sampled_*``: each user's latest held-out item among 99 uniform
negatives). A user's items from the fit period are excluded from the ranking: by default every
rating of that period (``--exclude rated``, Cornac's protocol: with rating_threshold=4 the
items a user rated 1-3 are known and never a test positive), or only the positives the models
train on (``--exclude positives``, what ``train.evaluate_model`` does).

Protocols (data_prep/splits.py defines the MovieLens splits):
  warm_ratio        random 80/20 split, positives = ratings >= 4.
  loo               leave the last interaction out, per user.
  cold_items        held-out items never seen in training, ranked among the cold items only.
  cold_users        only the held-out users (3 training interactions each) are evaluated.
  missing_modality  warm_ratio's split, scored with the test-time masked catalogue
                    (``apply_presence(catalogue, load_test_presence(...))``); the items that
                    lack a modality naturally (``natural_missing_*``) and the items whose
                    modality was dropped (``dropped_*``) are also reported on their own.
  retrieval         text->image / image->text R@1/5/10 among the held-out (test) items of
                    cold_items -- items never trained on -- that have both, from each content
                    model's per-modality embeddings; uses the cold_items fit.

Protocol of every fit: hyper-parameters are chosen on ``valid`` with a train-only fit, then
(``--split test``) the final model is fitted on train + valid (``valid`` is carved out of the
training data) and scored on ``test``. ``--split valid`` scores the train-only fit on
``valid`` instead: the mode for tuning RecFusion configs without touching test. ``--no_refit``
keeps train-only final fits. Baselines tune their grid (and, if iterative, the number of
epochs); RecFusion configs train for ``config.num_steps`` (or ``--steps``) as configured.

Outputs in ``--workdir``: ``results.json`` ({protocol: {model: {metric: mean over seeds,
metric + "_std": sample std, "num_seeds", "wall_s"}}}), ``results_per_seed.jsonl``,
``RESULTS.md`` (tables, command, machine, wall times), ``curves_<protocol>.png`` (training
curves from each run's ``metrics.jsonl``) and ``ablation_ndcg.png``; each run's directory is
``runs/<split>/<protocol>/<model>/seed<k>`` (RecFusion checkpoints there are resumed, so an
interrupted benchmark continues where it stopped; use a fresh workdir for new settings).
Results are rewritten after every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import os
import platform
import shlex
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from recfusion_jax import evaluate, train
from recfusion_jax.baselines import bpr_mf, chance, ease, lightgcn, popularity, sasrec
from recfusion_jax.baselines.common import (Baseline, Ranker, merge_valid_into_train, rank_split,
                                            sampled_split, tune_and_fit)
from recfusion_jax.data import examples
from recfusion_jax.data.types import MODALITIES, Catalogue, Interactions, RecDataset
from recfusion_jax.recommend import Recommender

PROTOCOLS: tuple[str, ...] = ("warm_ratio", "loo", "cold_items", "cold_users",
                              "missing_modality", "retrieval")
RANKING_PROTOCOLS = PROTOCOLS[:-1]
HEADLINE = ("HR@10", "NDCG@10", "Recall@10", "Precision@10", "MRR@10")
SAMPLED = ("sampled_HR@10", "sampled_NDCG@10")
RETRIEVAL = tuple(f"{d}_R@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10))
SUBSETS = ("natural_missing", "dropped")   # missing_modality slices
SINGLE_SPLIT_PROTOCOLS = ("loo",)


@dataclasses.dataclass(frozen=True)
class BaselineSpec:
  """How the runner fits one baseline."""

  factory: Callable[..., Baseline]
  grid: tuple[dict[str, Any], ...] = ({},)
  max_epochs: int = 0            # iterative models: epochs are tuned up to this
  eval_every: int = 1
  protocols: tuple[str, ...] = ("warm_ratio", "loo", "cold_users", "missing_modality")


# ID-only models cannot score items they never saw, so cold_items is not theirs; SASRec is a
# next-item model, run on the sequential protocol.
BASELINES: dict[str, BaselineSpec] = {
    "random": BaselineSpec(chance.RandomScores, protocols=RANKING_PROTOCOLS),
    "popularity": BaselineSpec(popularity.Popularity),
    "ease": BaselineSpec(ease.EASE, tuple(ease.GRID)),
    "bpr_mf": BaselineSpec(bpr_mf.BPRMF, tuple(bpr_mf.GRID), bpr_mf.MAX_EPOCHS,
                           bpr_mf.EVAL_EVERY),
    "lightgcn": BaselineSpec(lightgcn.LightGCN, tuple(lightgcn.GRID), lightgcn.MAX_EPOCHS,
                             lightgcn.EVAL_EVERY),
    "sasrec": BaselineSpec(sasrec.SASRec, tuple(sasrec.GRID), sasrec.MAX_EPOCHS,
                           sasrec.EVAL_EVERY, protocols=("loo",)),
}


def _set_modalities(*modalities: str) -> Callable[[ml_collections.ConfigDict], None]:
  def apply(config):
    config.model.modalities = modalities
  return apply


def _concat(config: ml_collections.ConfigDict) -> None:
  # VBPR-style: the item ID embedding plus the concatenated content embeddings.
  config.model.fusion = "concat"


def _clip_two_tower(config: ml_collections.ConfigDict) -> None:
  config.model.encoder.unified = False
  config.model.fusion = "mean"
  if not config.contrastive_weight:
    config.contrastive_weight = 0.1


def _ablation(name: str) -> Callable[[ml_collections.ConfigDict], None]:
  from configs import tiny  # pylint: disable=import-outside-toplevel
  return functools.partial(tiny.apply_ablation, name=name)


# Content models: changes applied to the suite's RecFusion config.
CONTENT_MODELS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    "text_only": _set_modalities("text"),
    "image_only": _set_modalities("image"),
    "concat": _concat,
    "clip_two_tower": _clip_two_tower,
    "RecFusion": lambda config: None,
    "RecFusion-separate_towers": _ablation("separate_towers"),
    "RecFusion-mean_fusion": _ablation("mean_fusion"),
    "RecFusion-no_contrastive": _ablation("no_contrastive"),
}
ABLATION_GROUP = ("RecFusion", "RecFusion-separate_towers", "RecFusion-mean_fusion",
                  "RecFusion-no_contrastive")
ALL_MODELS = tuple(BASELINES) + tuple(CONTENT_MODELS)


@dataclasses.dataclass
class Options:
  suite: str
  workdir: str
  models: tuple[str, ...] = ALL_MODELS
  protocols: tuple[str, ...] = PROTOCOLS
  seeds: tuple[int, ...] = (0, 1, 2)
  baseline_seeds: tuple[int, ...] | None = None   # models outside ABLATION_GROUP (None: seeds)
  shard: tuple[int, int] = (0, 1)   # (k, n): this process runs the k-th of n job groups
  merge: bool = False               # only merge the shards' records in workdir into outputs
  steps: int | None = None          # RecFusion num_steps override
  overrides: tuple[str, ...] = ()   # "key.path=value" changes to every content model's config
  quick: bool = False
  split: str = "test"
  refit: bool = True
  exclude: str = "rated"            # rated: every training-period rating; positives: train only
  size: str = "small"               # configs/movielens.py size
  data_dir: str = "data_out/movielens"
  synthetic_items: int = 600
  synthetic_users: int = 400
  command: str = ""


@dataclasses.dataclass
class ProtocolData:
  """One protocol/seed, ready to fit and score."""

  protocol: str
  seed: int
  tune: RecDataset                  # train (fitted while tuning) + valid (scored while tuning)
  fit: RecDataset                   # data of the final fit
  heldout: Interactions             # what is ranked
  catalogue: Catalogue              # content scored at evaluation (masked: missing_modality)
  known: Interactions | None = None # excluded from each user's ranking (None: fit.train)
  tune_known: Interactions | None = None   # the same while tuning (None: tune.train)
  candidate_items: np.ndarray | None = None
  subsets: dict[str, Interactions] = dataclasses.field(default_factory=dict)


# ---- data -------------------------------------------------------------------------------------


def split_seed(protocol: str, seed: int) -> int:
  """The data split a run of ``seed`` uses: ``loo`` has one split (each user's last
  interaction), so its seeds vary only the model's initialisation and sampling."""
  return 0 if protocol in SINGLE_SPLIT_PROTOCOLS else seed


def _raw_protocol(opts: Options, protocol: str, seed: int
                  ) -> tuple[RecDataset, np.ndarray | None]:
  """(data set, test-time presence or None) of a ranking protocol in ``opts.suite``."""
  seed = split_seed(protocol, seed)
  if opts.suite == "movielens":
    from recfusion_jax.data import movielens  # pylint: disable=import-outside-toplevel
    dataset = movielens.load_movielens(opts.data_dir, protocol, seed)
    presence = (movielens.load_test_presence(opts.data_dir, seed)
                if protocol == "missing_modality" else None)
    return dataset, presence
  if opts.suite == "synthetic":
    return _synthetic_protocol(protocol, seed, opts.synthetic_items, opts.synthetic_users)
  raise ValueError(f"unknown suite {opts.suite!r}")


def _known(opts: Options, protocol: str, seed: int, labels: tuple[str, ...]
           ) -> Interactions | None:
  """Every rating of the fit period (``--exclude rated``); None: the fit's positives."""
  if opts.exclude == "positives" or opts.suite != "movielens":
    return None   # the synthetic data has no negative ratings
  from recfusion_jax.data import movielens  # pylint: disable=import-outside-toplevel
  return movielens.load_rated(opts.data_dir, protocol, split_seed(protocol, seed), labels)


def _synthetic_protocol(protocol: str, seed: int, num_items: int, num_users: int
                        ) -> tuple[RecDataset, np.ndarray | None]:
  """The synthetic data set (time-ordered leave-one-out + never-trained items) as a protocol."""
  from data_prep.synthetic import make_synthetic  # pylint: disable=import-outside-toplevel
  dataset = make_synthetic(seed=seed, num_items=num_items, num_users=num_users)
  warm = dataset.catalogue.has_id[dataset.test.item]
  if protocol in ("warm_ratio", "loo", "missing_modality"):
    dataset = dataclasses.replace(dataset, test=dataset.test.select(warm))
  elif protocol == "cold_items":
    dataset = dataclasses.replace(dataset, test=dataset.test.select(~warm))
  else:
    raise ValueError(f"the synthetic suite has no {protocol!r} protocol")
  if protocol != "missing_modality":
    return dataset, None
  # As data_prep/splits.py: 30% of the test items with text and image lose one of the two.
  rng = np.random.default_rng(seed)
  presence = dataset.catalogue.presence.copy()
  t, i = MODALITIES.index("text"), MODALITIES.index("image")
  items = np.unique(dataset.test.item)
  both = items[presence[items, t] & presence[items, i]]
  dropped = rng.permutation(both)[:int(round(0.3 * both.size))]
  presence[dropped, np.where(rng.random(dropped.size) < 0.5, t, i)] = False
  return dataset, presence


def load_protocol(opts: Options, protocol: str, seed: int) -> ProtocolData:
  """The fit/evaluation data of one ranking protocol and seed."""
  from recfusion_jax.data.movielens import apply_presence  # pylint: disable=import-outside-toplevel
  data, test_presence = _raw_protocol(opts, protocol, seed)
  if opts.split == "valid":
    fit, heldout = data, data.valid
  else:
    fit, heldout = (merge_valid_into_train(data) if opts.refit else data), data.test
  catalogue = fit.catalogue if test_presence is None else apply_presence(fit.catalogue,
                                                                         test_presence)
  labels = ("train", "valid") if len(fit.train) > len(data.train) else ("train",)
  pdata = ProtocolData(protocol, seed, data, fit, heldout, catalogue,
                       known=_known(opts, protocol, seed, labels),
                       tune_known=_known(opts, protocol, seed, ("train",)))
  if protocol == "cold_items":
    pdata.heldout = heldout.select(~fit.catalogue.has_id[heldout.item])
    pdata.candidate_items = np.unique(pdata.heldout.item).astype(np.int32)
  if test_presence is not None:
    cols = [MODALITIES.index(m) for m in ("text", "image")]
    complete = fit.catalogue.presence[:, cols].all(1)
    kept = catalogue.presence[:, cols].all(1)
    pdata.subsets = {"natural_missing": heldout.select(~complete[heldout.item]),
                     "dropped": heldout.select(complete[heldout.item] & ~kept[heldout.item])}
  return pdata


def _fingerprint(pdata: ProtocolData) -> str:
  """Hash of the interactions: identical splits (warm_ratio, missing_modality) share ID fits."""
  h = hashlib.sha1()
  for part in (pdata.tune.train, pdata.tune.valid, pdata.fit.train, pdata.heldout):
    for field in ("user", "item", "timestamp"):
      h.update(np.ascontiguousarray(getattr(part, field)).tobytes())
  return h.hexdigest()


# ---- models -----------------------------------------------------------------------------------


def evaluate_ranker(ranker: Ranker, pdata: ProtocolData) -> dict[str, float]:
  """Headline full-ranking metrics, the sampled protocol beside them, and subset slices."""
  out = rank_split(ranker, pdata.fit, pdata.heldout, candidate_items=pdata.candidate_items,
                   known=pdata.known)
  out.update(sampled_split(ranker, pdata.fit, pdata.heldout,
                           candidate_items=pdata.candidate_items, known=pdata.known))
  for name, part in pdata.subsets.items():
    if len(part):
      sub = rank_split(ranker, pdata.fit, part, known=pdata.known)
      out.update({f"{name}_{key}": value for key, value in sub.items()})
  return out


def _write_jsonl(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def fit_baseline(name: str, pdata: ProtocolData, opts: Options, run_dir: str
                 ) -> tuple[Ranker, dict[str, Any]]:
  """Tunes on valid, refits, writes the final fit's loss curve; returns (ranker, info)."""
  spec = BASELINES[name]
  grid, max_epochs, eval_every = spec.grid, spec.max_epochs, spec.eval_every
  if opts.quick:
    grid, max_epochs, eval_every = grid[:2], min(max_epochs, 2), 1
  factory = spec.factory
  if factory.iterative or factory is chance.RandomScores:
    factory = functools.partial(factory, seed=pdata.seed)
  model, tuned = tune_and_fit(factory, pdata.tune, pdata.fit, grid, max_epochs=max_epochs,
                              eval_every=eval_every, known=pdata.tune_known)
  os.makedirs(run_dir, exist_ok=True)
  _write_jsonl(os.path.join(run_dir, "metrics.jsonl"),
               [{"step": e + 1, "loss": loss} for e, loss in enumerate(tuned.losses)])
  info = {"params": tuned.params, "epochs": tuned.epochs, "valid_NDCG@10": tuned.valid_ndcg}
  with open(os.path.join(run_dir, "tune.json"), "w", encoding="utf-8") as f:
    json.dump({**info, "log": tuned.log}, f, indent=1)
  return model.ranker(), info


def content_config(name: str, opts: Options, protocol: str, seed: int
                   ) -> ml_collections.ConfigDict:
  """The RecFusion config of content model ``name`` in ``opts.suite``."""
  from configs import movielens as movielens_config, tiny  # pylint: disable=import-outside-toplevel
  if opts.suite == "movielens":
    config = movielens_config.get_config(
        f"size={opts.size},protocol={protocol},seed={split_seed(protocol, seed)}")
    config.data.dir = opts.data_dir
  else:
    config = tiny.get_config()
    config.data.synthetic = ml_collections.ConfigDict(dict(
        num_items=opts.synthetic_items, num_users=opts.synthetic_users))
  config.seed = seed
  CONTENT_MODELS[name](config)
  if opts.quick:
    # Smoke test: a handful of steps of a smaller batch; the synthetic suite also shrinks the
    # model to the test configuration's size.
    config.num_steps, config.batch_size = 4, 32
    config.optimizer.warmup_steps = 1
    if opts.suite == "synthetic":
      m = config.model
      m.embed_dim, m.encoder.width, m.encoder.mlp_dim, m.encoder.depth = 16, 16, 32, 1
      m.user.history_len = 6
  if opts.steps is not None:
    config.num_steps = opts.steps   # 0: evaluates the initialised model (a pipeline check)
  for override in opts.overrides:
    apply_override(config, override)
  config.log_every = max(1, min(config.log_every, config.num_steps // 5))
  config.checkpoint_every = max(1, config.num_steps)
  return config


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
  """Sets ``a.b.c=value`` in ``config``; the value is parsed as the field's current type."""
  key, sep, value = override.partition("=")
  if not sep:
    raise ValueError(f"--set expects key=value, got {override!r}")
  *parents, leaf = key.split(".")
  node = config
  for name in parents:
    node = node[name]
  if leaf not in node:
    raise KeyError(f"--set {key}: the config has no such field")
  current = node[leaf]
  if isinstance(current, bool):
    if value not in ("true", "false", "True", "False"):
      raise ValueError(f"--set {key}: expected true/false, got {value!r}")
    node[leaf] = value.lower() == "true"
  elif isinstance(current, (int, float, str)):
    node[leaf] = type(current)(value)
  else:
    raise ValueError(f"--set {key}: only bool/int/float/str fields can be set")


def _with_catalogue(dataset: RecDataset, catalogue: Catalogue, text_len: int | None
                    ) -> RecDataset:
  return train.truncate_text(dataclasses.replace(dataset, catalogue=catalogue), text_len)


def fit_content_model(name: str, pdata: ProtocolData, opts: Options, run_dir: str
                      ) -> tuple[Ranker, Any, Catalogue, dict[str, Any]]:
  """Trains (or resumes) a RecFusion config; returns (ranker, model, eval catalogue, info)."""
  config = content_config(name, opts, pdata.protocol, pdata.seed)
  text_len = config.data.get("text_len")
  fit = _with_catalogue(pdata.fit, pdata.fit.catalogue, text_len)
  trained = train.train_model(config, run_dir, dataset=fit)
  model = trained.model
  catalogue = _with_catalogue(fit, pdata.catalogue, text_len).catalogue
  # History items are read from the item cache: re-encode it with the final model from the
  # evaluation catalogue, so a dropped modality cannot leak in through users' histories.
  emb, presence = Recommender(model, chunk=config.eval_block_size).encode_catalogue(catalogue)
  model.cache_embeddings.set_value(emb)   # a whole new (host) array: the old one is read-only
  model.cache_presence.set_value(presence)
  rec = Recommender(model, chunk=config.eval_block_size)
  history_len = config.model.user.history_len
  index = examples.TrainExampleIndex.build(fit)
  ranker = Ranker(
      user_reps=lambda users: rec.encode_users(
          examples.user_eval_inputs(fit, users, history_len, index)),
      item_table=rec.item_table(catalogue, emb, presence), score_fn=rec.score_fn())
  info = {"num_steps": config.num_steps, "batch_size": config.batch_size}
  return ranker, model, catalogue, info


def retrieval_metrics(model: Any, catalogue: Catalogue, items: np.ndarray,
                      chunk: int = 256) -> dict[str, float]:
  """text->image and image->text R@1/5/10 among ``items`` that have both modalities."""
  t, i = model.modalities.index("text"), model.modalities.index("image")
  emb, presence = Recommender(model, chunk=chunk).encode_catalogue(catalogue, items)
  both = presence[:, t] & presence[:, i]
  if not both.any():
    raise ValueError("no held-out item has both text and image")
  out = {"num_items": float(both.sum())}
  for direction, (q, k) in {"text_to_image": (t, i), "image_to_text": (i, t)}.items():
    scores = evaluate.cross_modal_retrieval(emb[both, q], emb[both, k])
    out.update({f"{direction}_{key}": value for key, value in scores.items()})
  return out


def fit_protocol(protocol: str, model: str) -> str:
  """The protocol whose fitted model a run scores.

  ``retrieval`` scores the cold_items fit. A content model's ``missing_modality`` run scores
  its ``warm_ratio`` fit: the two protocols share the split (checked by fingerprint at run
  time) and differ only in the test-time catalogue mask, which the model never sees in
  training. ID baselines share fits the same way, through the fingerprint.
  """
  if protocol == "retrieval":
    return "cold_items"
  if protocol == "missing_modality" and model not in BASELINES:
    return "warm_ratio"
  return protocol


def seeds_of(opts: Options, model: str) -> tuple[int, ...]:
  if model in ABLATION_GROUP or opts.baseline_seeds is None:
    return opts.seeds
  return opts.baseline_seeds


def applies(model: str, protocol: str) -> bool:
  if model in BASELINES:
    return protocol in BASELINES[model].protocols
  if protocol == "retrieval":
    return model not in ("text_only", "image_only")
  return True


# ---- results ----------------------------------------------------------------------------------


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
  """{protocol: {model: {metric: mean, metric_std: sample std, num_seeds, wall_s}}}."""
  grouped: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  for r in records:
    grouped.setdefault((r["protocol"], r["model"]), []).append(r)
  out: dict[str, dict[str, dict[str, float]]] = {}
  for (protocol, model), rows in grouped.items():
    entry: dict[str, float] = {}
    keys = sorted({key for row in rows for key in row["metrics"]})
    for key in keys:
      values = np.asarray([row["metrics"][key] for row in rows if key in row["metrics"]],
                          np.float64)
      entry[key] = float(np.mean(values))
      entry[key + "_std"] = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
    entry["num_seeds"] = len(rows)
    entry["wall_s"] = float(np.mean([row["wall_s"] for row in rows]))
    out.setdefault(protocol, {})[model] = entry
  return out


def machine_description() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                 cpu)
  except OSError:
    pass
  devices = jax.devices()
  return (f"{cpu}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}; "
          f"JAX {jax.__version__} on {len(devices)} x {devices[0].device_kind} "
          f"({devices[0].platform})")


def _cell(entry: Mapping[str, float], key: str) -> str:
  if key not in entry:
    return "-"
  std = entry.get(key + "_std", 0.0)
  return f"{entry[key]:.4f} ± {std:.4f}" if entry.get("num_seeds", 1) > 1 else f"{entry[key]:.4f}"


def _table(results: Mapping[str, Mapping[str, float]], models: Sequence[str],
           columns: Sequence[str]) -> list[str]:
  lines = ["| model | " + " | ".join(columns) + " | seeds | wall s / seed |",
           "|---" * (len(columns) + 3) + "|"]
  for model in models:
    if model in results:
      e = results[model]
      lines.append(f"| {model} | " + " | ".join(_cell(e, c) for c in columns)
                   + f" | {int(e['num_seeds'])} | {e['wall_s']:.1f} |")
  return lines


def write_markdown(path: str, results: Mapping[str, Any], opts: Options, machine: str,
                   total_wall_s: float, plots: Sequence[str]) -> None:
  """RESULTS.md: command, machine, protocol notes and one table per protocol."""
  lines = [f"# RecFusion-JAX benchmark: {opts.suite}", "",
           f"- command: `{opts.command}`",
           f"- machine: {machine}",
           f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; total wall time "
           f"{total_wall_s / 60:.1f} min",
           f"- scored on `{opts.split}`; "
           + ("hyper-parameters tuned on `valid` with train-only fits, final fits on "
              "train + valid" if opts.split == "test" and opts.refit else
              "final fits on train only"),
           f"- headline metrics: full ranking over the catalogue, excluding each user's "
           + ("ratings of any value" if opts.exclude == "rated" else "positives")
           + " from the fit period; "
           "`sampled_*`: each user's latest held-out item among 99 uniform negatives "
           "(not comparable to full ranking)",
           "- mean ± sample std over seeds; wall time per seed covers tuning, fitting and "
           "evaluation" + (" (**--quick smoke test: numbers are not results**)"
                           if opts.quick else ""),
           ""]
  models = [m for m in opts.models]
  for protocol in opts.protocols:
    if protocol not in results:
      continue
    lines.append(f"## {protocol}")
    lines.append("")
    if protocol == "retrieval":
      lines += _table(results[protocol], models, RETRIEVAL)
      lines.append("")
      lines.append("Among the cold_items protocol's held-out items that have both text and "
                   "poster, from the model fitted for cold_items.")
    else:
      lines += _table(results[protocol], models, HEADLINE + SAMPLED)
      if protocol == "cold_items":
        lines += ["", "Ranked among the held-out cold items only (the candidate set)."]
      if protocol == "missing_modality":
        lines += ["", "Slices of the test set: items missing a modality naturally, and items "
                  "whose modality was dropped by the test-time mask (full ranking):", ""]
        lines += _table(results[protocol], models,
                        [f"{s}_{m}" for s in SUBSETS for m in ("HR@10", "NDCG@10")])
    skipped = [m for m in models if not applies(m, protocol)]
    if skipped:
      lines += ["", f"Not applicable: {', '.join(skipped)}."]
    lines.append("")
  if plots:
    lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                 for p in plots] + [""]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


def _read_curve(run_dir: str) -> tuple[list[float], list[float], str]:
  """(steps, values, name) of the loss in a run's metrics.jsonl (rec_loss for RecFusion)."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return [], [], ""
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  key = "rec_loss" if rows and "rec_loss" in rows[0] else "loss"
  last = {int(r["step"]): float(r[key]) for r in rows if key in r}  # a resumed run repeats steps
  return sorted(last), [last[s] for s in sorted(last)], key


def write_plots(workdir: str, results: Mapping[str, Any], opts: Options,
                records: Sequence[Mapping[str, Any]]) -> list[str]:
  """Training curves per protocol and ablation bars of NDCG@10; returns the PNG paths."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  paths = []
  for protocol in opts.protocols:
    if protocol == "retrieval" or protocol not in results:
      continue
    models = [m for m in opts.models if m in results[protocol]]
    curves = {m: [(r["seed"], *_read_curve(os.path.join(workdir, r["run_dir"])))
                  for r in records if r["protocol"] == protocol and r["model"] == m
                  and "run_dir" in r] for m in models}
    curves = {m: c for m, c in curves.items() if any(steps for _, steps, _, _ in c)}
    if not curves:
      continue
    cols = min(4, len(curves))
    rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, (model, runs) in zip(axes.flat, curves.items()):
      for seed, steps, values, key in runs:
        if steps:
          ax.plot(steps, values, label=f"seed {seed}")
          ax.set_ylabel(key)
      ax.set_title(model, fontsize=9)
      ax.set_xlabel("epoch" if model in BASELINES else "step")
    for ax in list(axes.flat)[len(curves):]:
      ax.axis("off")
    fig.suptitle(f"training curves: {protocol}")
    fig.tight_layout()
    path = os.path.join(workdir, f"curves_{protocol}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)

  groups = [(p, "text_to_image_R@10" if p == "retrieval" else "NDCG@10") for p in opts.protocols
            if p in results and any(m in results[p] for m in ABLATION_GROUP)]
  if groups:
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.2), squeeze=False)
    for ax, (protocol, metric) in zip(axes.flat, groups):
      names = [m for m in ABLATION_GROUP if m in results[protocol]]
      means = [results[protocol][m][metric] for m in names]
      stds = [results[protocol][m].get(metric + "_std", 0.0) for m in names]
      ax.bar(range(len(names)), means, yerr=stds, color=[f"C{k}" for k in range(len(names))])
      ax.set_xticks(range(len(names)))
      ax.set_xticklabels([m.replace("RecFusion-", "-") for m in names], rotation=45,
                         ha="right", fontsize=8)
      ax.set_title(f"{protocol}: {metric}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(workdir, "ablation_ndcg.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)
  return paths


# ---- the runner -------------------------------------------------------------------------------


def _summary(metrics: Mapping[str, float]) -> str:
  keys = [k for k in ("NDCG@10", "HR@10", "sampled_NDCG@10", "text_to_image_R@10",
                      "image_to_text_R@10") if k in metrics]
  return " ".join(f"{k}={metrics[k]:.4f}" for k in keys)


def run_benchmark(opts: Options) -> dict[str, Any]:
  """Runs every (protocol, seed, model) of ``opts``; returns the aggregated results."""
  unknown = sorted(set(opts.models) - set(ALL_MODELS))
  if unknown:
    raise ValueError(f"unknown models {unknown}; known: {ALL_MODELS}")
  unknown = sorted(set(opts.protocols) - set(PROTOCOLS))
  if unknown:
    raise ValueError(f"unknown protocols {unknown}; known: {PROTOCOLS}")
  if opts.split not in ("test", "valid"):
    raise ValueError(f"split must be test or valid, got {opts.split!r}")
  os.makedirs(opts.workdir, exist_ok=True)
  machine = machine_description()
  if opts.merge:
    return _merge_shards(opts, machine)
  start = time.perf_counter()
  records: list[dict[str, Any]] = []
  id_fits: dict[tuple[str, int, str], Ranker] = {}
  jobs = shard_jobs(opts)
  k, n_shards = opts.shard
  if n_shards > 1:
    with open(os.path.join(opts.workdir, f"command.{_shard_name(opts)}.txt"), "w",
              encoding="utf-8") as f:
      f.write(opts.command + "\n")
  print(f"benchmark {opts.suite}: {len(jobs)} runs"
        + (f" (shard {k} of {n_shards})" if n_shards > 1 else "") + f" on {machine}", flush=True)
  data_cache: dict[tuple[str, int], ProtocolData | None] = {}
  fingerprints: dict[tuple[str, int], str] = {}

  def protocol_data(protocol: str, seed: int) -> ProtocolData | None:
    if (protocol, seed) not in data_cache:
      try:
        data_cache.clear()  # one protocol/seed in memory at a time (catalogue images)
        data_cache[(protocol, seed)] = load_protocol(opts, protocol, seed)
        fingerprints[(protocol, seed)] = _fingerprint(data_cache[(protocol, seed)])
      except FileNotFoundError as e:
        print(f"  skipped {protocol} seed {seed}: {e}", flush=True)
        data_cache[(protocol, seed)] = None
    return data_cache[(protocol, seed)]

  for n, (protocol, seed, model) in enumerate(jobs, 1):
    data_protocol = "cold_items" if protocol == "retrieval" else protocol
    pdata = protocol_data(data_protocol, seed)
    if pdata is None:
      continue
    fitted_on = fit_protocol(protocol, model)
    if fitted_on not in (protocol, data_protocol) and (
        fingerprints.get((fitted_on, seed)) != fingerprints[(data_protocol, seed)]):
      fitted_on = data_protocol   # not shown to be the same split: fit it separately
    run_dir = os.path.join(opts.workdir, "runs", opts.split, fitted_on, model, f"seed{seed}")
    tick = time.perf_counter()
    print(f"[{n}/{len(jobs)}] {protocol} seed {seed} {model} ...", flush=True)
    if model in BASELINES:
      key = (model, seed, _fingerprint(pdata))
      info: dict[str, Any] = {}
      if key not in id_fits:  # content-free models: identical splits give identical fits
        id_fits[key], info = fit_baseline(model, pdata, opts, run_dir)
      else:
        info = {"fit": "reused (identical split)"}
      metrics = evaluate_ranker(id_fits[key], pdata)
    else:
      ranker, fitted, catalogue, info = fit_content_model(model, pdata, opts, run_dir)
      if fitted_on != data_protocol:
        info["fit"] = f"the {fitted_on} fit (identical split)"
      if protocol == "retrieval":
        metrics = retrieval_metrics(fitted, catalogue, np.unique(pdata.heldout.item))
      else:
        metrics = evaluate_ranker(ranker, pdata)
    wall = time.perf_counter() - tick
    print(f"[{n}/{len(jobs)}] {protocol} seed {seed} {model}: {_summary(metrics)} "
          f"({wall:.1f} s)", flush=True)
    records.append({"protocol": protocol, "model": model, "seed": seed, "metrics": metrics,
                    "wall_s": wall, "info": info, "run_dir": os.path.relpath(run_dir,
                                                                             opts.workdir)})
    _write_outputs(opts, records, machine, time.perf_counter() - start, plots=False)
  results = _write_outputs(opts, records, machine, time.perf_counter() - start, plots=True)
  print(f"done in {(time.perf_counter() - start) / 60:.1f} min: "
        f"{os.path.join(opts.workdir, 'RESULTS.md')}", flush=True)
  return results


def shard_jobs(opts: Options) -> list[tuple[str, int, str]]:
  """This shard's (protocol, seed, model) runs, in order.

  Runs that share a fit (``fit_protocol``) or a data set form one group, kept in one shard
  and in ``opts.protocols`` order so the fit is trained once and then reused. Groups go to
  shards greedily by their number of content-model trainings, the runs that cost minutes.
  """
  jobs = [(p, s, m) for p in opts.protocols for m in opts.models for s in seeds_of(opts, m)
          if applies(m, p)]
  group_of = lambda job: (fit_protocol(job[0], "RecFusion"), job[1])
  groups: dict[tuple[str, int], list[tuple[str, int, str]]] = {}
  for job in jobs:
    groups.setdefault(group_of(job), []).append(job)
  k, n = opts.shard
  if not 0 <= k < n:
    raise ValueError(f"shard {k} of {n} does not exist")
  cost = lambda group: sum(1 for p, _, m in group if m not in BASELINES and
                           fit_protocol(p, m) == p) + 0.1 * len(group)
  load, mine = [0.0] * n, []
  for key in sorted(groups, key=lambda g: (-cost(groups[g]), g)):
    target = int(np.argmin(load))
    load[target] += cost(groups[key])
    if target == k:
      mine.append(key)
  order = {p: i for i, p in enumerate(opts.protocols)}
  return sorted((job for key in mine for job in groups[key]),
                key=lambda j: (j[1], order[fit_protocol(j[0], "RecFusion")], order[j[0]]))


def _shard_name(opts: Options) -> str:
  """``shard<k>of<n>.<digest of the run set>``: shard sets of different invocations (say
  three seeds on some protocols, one on others) can share a workdir and one --merge."""
  k, n = opts.shard
  key = json.dumps([opts.models, opts.protocols, opts.seeds, opts.baseline_seeds, opts.steps,
                    opts.overrides, opts.split, opts.exclude, opts.size])
  return f"shard{k}of{n}.{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _records_path(opts: Options) -> str:
  if opts.shard[1] == 1:
    return os.path.join(opts.workdir, "results_per_seed.jsonl")
  return os.path.join(opts.workdir, f"results_per_seed.{_shard_name(opts)}.jsonl")


def _merge_shards(opts: Options, machine: str) -> dict[str, Any]:
  """Combines every ``results_per_seed.shard*.jsonl`` in workdir into the outputs."""
  import glob  # pylint: disable=import-outside-toplevel
  paths = sorted(glob.glob(os.path.join(opts.workdir, "results_per_seed.shard*.jsonl")))
  if not paths:
    raise FileNotFoundError(f"no results_per_seed.shard*.jsonl in {opts.workdir}")
  # The suite's wall time: the shards of one invocation run side by side (its longest shard
  # counts), separate invocations one after another (they add up).
  records: list[dict[str, Any]] = []
  shard_sums: dict[str, list[float]] = {}
  for path in paths:
    with open(path, encoding="utf-8") as f:
      shard = [json.loads(line) for line in f if line.strip()]
    records += shard
    digest = path.rsplit(".", 2)[-2]
    shard_sums.setdefault(digest, []).append(sum(r["wall_s"] for r in shard))
  wall_s = sum(max(sums) for sums in shard_sums.values())
  commands = []
  for path in sorted(glob.glob(os.path.join(opts.workdir, "command.shard*.txt"))):
    with open(path, encoding="utf-8") as f:
      commands.append(f.read().strip())
  print(f"merged {len(records)} runs from {len(paths)} shards", flush=True)
  merged = dataclasses.replace(opts, shard=(0, 1),
                               command=" & ".join(commands + [opts.command]))
  return _write_outputs(merged, records, machine, wall_s, plots=True)


def _write_outputs(opts: Options, records: Sequence[Mapping[str, Any]], machine: str,
                   wall_s: float, plots: bool) -> dict[str, Any]:
  results = aggregate(records)
  _write_jsonl(_records_path(opts), records)
  if opts.shard[1] > 1:
    return results   # the shards' records are merged by a final --merge run
  with open(os.path.join(opts.workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  paths = write_plots(opts.workdir, results, opts, records) if plots else []
  write_markdown(os.path.join(opts.workdir, "RESULTS.md"), results, opts, machine, wall_s,
                 paths)
  return results


def _csv(value: str) -> tuple[str, ...]:
  return tuple(v.strip() for v in value.split(",") if v.strip())


def parse_args(argv: Sequence[str]) -> tuple[Options, str]:
  """(options, compilation cache directory or '') from the command line."""
  parser = argparse.ArgumentParser(prog="python -m recfusion_jax.benchmark",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--suite", required=True, choices=("movielens", "synthetic"))
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--models", type=_csv, default=ALL_MODELS,
                      help=f"comma separated, from {','.join(ALL_MODELS)}")
  parser.add_argument("--protocols", type=_csv, default=PROTOCOLS,
                      help=f"comma separated, from {','.join(PROTOCOLS)}")
  parser.add_argument("--seeds", type=lambda v: tuple(int(s) for s in _csv(v)),
                      default=(0, 1, 2))
  parser.add_argument("--baseline_seeds", type=lambda v: tuple(int(s) for s in _csv(v)),
                      default=None, help="seeds of the models outside RecFusion's ablation "
                      "group (default: --seeds)")
  parser.add_argument("--shard", type=lambda v: tuple(int(x) for x in v.split("/")),
                      default=(0, 1), help="K/N: run the K-th of N groups of runs (start N "
                      "processes side by side, then one with --merge)")
  parser.add_argument("--merge", action="store_true",
                      help="merge the shards' results in --workdir into results.json, "
                      "RESULTS.md and the plots")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      help="key.path=value, applied to every content model's config "
                      "(repeatable), e.g. --set optimizer.learning_rate=1e-3")
  parser.add_argument("--steps", type=int, default=None,
                      help="RecFusion training steps (default: the config's; 0 = untrained)")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: a few steps / epochs per model")
  parser.add_argument("--split", choices=("test", "valid"), default="test")
  parser.add_argument("--no_refit", dest="refit", action="store_false",
                      help="final fits on train only (default: train + valid)")
  parser.add_argument("--exclude", choices=("rated", "positives"), default="rated",
                      help="items excluded from a user's ranking: every rating of the fit "
                      "period (Cornac's protocol) or only its positives (train.evaluate_model)")
  parser.add_argument("--size", default="small", help="configs/movielens.py size")
  parser.add_argument("--data_dir", default="data_out/movielens")
  parser.add_argument("--synthetic_items", type=int, default=600)
  parser.add_argument("--synthetic_users", type=int, default=400)
  parser.add_argument("--compilation_cache", default=None,
                      help="JAX persistent compilation cache (default WORKDIR/jax_cache; '' = "
                      "off): runs of one model on different protocols then compile once")
  args = vars(parser.parse_args(argv))
  cache = args.pop("compilation_cache")
  command = " ".join(["python -m recfusion_jax.benchmark"] + [shlex.quote(a) for a in argv])
  args["overrides"] = tuple(args["overrides"])
  opts = Options(command=command, **args)
  return opts, os.path.join(opts.workdir, "jax_cache") if cache is None else cache


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  opts, cache = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if cache:
    # Process-wide, hence set here and not in run_benchmark (which tests call directly).
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return run_benchmark(opts)


if __name__ == "__main__":
  main()
