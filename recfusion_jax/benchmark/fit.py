"""Fitting one model on one protocol/seed into a ``baselines.common.Ranker``, and scoring it."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Collection, Mapping, Sequence

import ml_collections
import numpy as np
from etils import epath

from recfusion_jax import config_lib, evaluate, model_eval, score_terms, train
from recfusion_jax.baselines import chance
from recfusion_jax.baselines.common import Ranker, rank_split, sampled_split, tune_and_fit
from recfusion_jax.benchmark import registry
from recfusion_jax.benchmark.protocols import ProtocolData, split_seed
from recfusion_jax.data import examples, pipeline, sources
from recfusion_jax.data.types import Catalogue, RecDataset
from recfusion_jax.recommend import Recommender


def evaluate_ranker(ranker: Ranker, pdata: ProtocolData) -> dict[str, float]:
  """Headline full-ranking metrics, the sampled protocol beside them, and subset slices."""
  out = rank_split(ranker, pdata.fit, pdata.heldout, candidate_items=pdata.candidate_items)
  out.update(sampled_split(ranker, pdata.fit, pdata.heldout,
                           candidate_items=pdata.candidate_items))
  for name, part in pdata.subsets.items():
    if len(part):
      sub = rank_split(ranker, pdata.fit, part)
      out.update({f"{name}_{key}": value for key, value in sub.items()})
  return out


def write_jsonl(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
  epath.Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))


def fit_baseline(name: str, pdata: ProtocolData, run_dir: str | os.PathLike, *,
                 quick: bool = False) -> tuple[Ranker, dict[str, Any]]:
  """Tunes on valid, refits, writes the final fit's loss curve; returns (ranker, info)."""
  spec = registry.BASELINES[name]
  grid, max_epochs, eval_every = spec.grid, spec.max_epochs, spec.eval_every
  if quick:
    grid, max_epochs, eval_every = grid[:2], min(max_epochs, 2), 1
  factory = spec.factory
  if factory.iterative or factory is chance.RandomScores:
    factory = functools.partial(factory, seed=pdata.seed)
  model, tuned = tune_and_fit(factory, pdata.tune, pdata.fit, grid, max_epochs=max_epochs,
                              eval_every=eval_every)
  run_dir = epath.Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  write_jsonl(run_dir / "metrics.jsonl",
              [{"step": e + 1, "loss": loss} for e, loss in enumerate(tuned.losses)])
  info = {"params": tuned.params, "epochs": tuned.epochs, "valid_NDCG@10": tuned.valid_ndcg}
  chosen = [row for row in tuned.log if all(row.get(k) == v for k, v in tuned.params.items())]
  if len(chosen) > 1:   # an iterative model's valid curve at the chosen grid point
    info["valid_curve"] = [{"epoch": row["epochs"], "NDCG@10": row["NDCG@10"]} for row in chosen]
  (run_dir / "tune.json").write_text(json.dumps({**info, "log": tuned.log}, indent=1))
  return model.ranker(), info


def content_config(name: str, base: ml_collections.ConfigDict, protocol: str, seed: int, *,
                   steps: int | None = None, quick: bool = False,
                   keep: Collection[str] = ()) -> ml_collections.ConfigDict:
  """The RecFusion config of content model ``name``: the suite's ``base`` config (from
  ``--config``, overrides included), pointed at ``protocol`` (its history rule and the recipe's
  fields for it, except the ``--config`` overrides named in ``keep``), with the model's change
  applied."""
  config = base.copy_and_resolve_references()
  if config.data.source == "movielens":
    config_lib.set_protocol(config, protocol, keep=keep)
    config.data.split_seed = split_seed(protocol, seed)
  config.seed = seed
  registry.CONTENT_MODELS[name](config)
  if quick:
    # Smoke test: a handful of steps of a smaller batch; the synthetic suite also shrinks the
    # model to the test configuration's size.
    config.num_steps, config.batch_size = 4, 32
    config.optimizer.warmup_steps = 1
    if config.data.source == "synthetic":
      m = config.model
      m.embed_dim, m.encoder.width, m.encoder.mlp_dim, m.encoder.depth = 16, 16, 32, 1
      m.user.history_len = 6
  if steps is not None:
    config.num_steps = steps   # 0: evaluates the initialised model (a pipeline check)
  config.log_every = max(1, min(config.log_every, config.num_steps // 5))
  config.checkpoint_every = max(1, config.num_steps)
  return config


def content_config_digest(name: str, pdata: ProtocolData, base: ml_collections.ConfigDict, *,
                          steps: int | None = None, quick: bool = False,
                          keep: Collection[str] = ()) -> str:
  """A digest of the config ``fit_content_model`` trains for ``name`` on ``pdata``: two
  models with equal digests train the same model on the same split."""
  config = content_config(name, base, pdata.protocol, pdata.seed, steps=steps, quick=quick,
                          keep=keep)
  return hashlib.sha1(config.to_json_best_effort(sort_keys=True).encode()).hexdigest()


def _with_catalogue(dataset: RecDataset, catalogue: Catalogue, text_len: int | None
                    ) -> RecDataset:
  return sources.truncate_text(dataclasses.replace(dataset, catalogue=catalogue), text_len)


def fit_content_model(name: str, pdata: ProtocolData, base: ml_collections.ConfigDict,
                      run_dir: str | os.PathLike, *, steps: int | None = None,
                      quick: bool = False, keep: Collection[str] = ()
                      ) -> tuple[Ranker, Any, Catalogue, dict[str, Any]]:
  """Trains (or resumes) a RecFusion config; returns (ranker, model, eval catalogue, info).
  ``keep``: the --config overrides, which win over the recipe's per-protocol fields."""
  config = content_config(name, base, pdata.protocol, pdata.seed, steps=steps, quick=quick,
                          keep=keep)
  text_len = config.data.get("text_len")
  fit = _with_catalogue(pdata.fit, pdata.fit.catalogue, text_len)
  info: dict[str, Any] = {"num_steps": config.num_steps, "batch_size": config.batch_size}
  settings = train.ValidationSettings.from_config(config)
  metric = settings.metric
  fit_rows = _rows_per_epoch(config, fit)   # an index of fit's train split: build it once
  selected = None
  if settings.every and len(fit.valid) == 0:
    # The final fit has no valid split (train + valid merged): choose its length on valid with
    # a train-only fit first, then refit for the same number of epochs (how the baselines
    # choose their epochs) on a schedule of that length, annealed to its end. Stopping the
    # refit at the best step of the long schedule instead leaves it at a high learning rate:
    # measured on MovieLens warm_ratio, test NDCG@10 0.281 against 0.340 for an annealed
    # schedule of the same length (docs/TUNING.md §4).
    tune = _with_catalogue(pdata.tune, pdata.tune.catalogue, text_len)
    selected = train.train_model(config, epath.Path(run_dir) / "select", dataset=tune)
    ratio = fit_rows / _rows_per_epoch(config, tune)
    config.num_steps = max(1, round(selected.best["step"] * ratio))
    config.validation.every = 0
    info.update(_selection_info(selected, metric), refit_steps=config.num_steps,
                num_steps=config.num_steps)
  elif score_terms.needs_score_terms(config) and len(fit.valid) == 0:
    # A fixed-length fit still needs a train-only twin: the score terms' weights are chosen on
    # valid, by a model that never saw the valid items.
    tune = _with_catalogue(pdata.tune, pdata.tune.catalogue, text_len)
    selected = train.train_model(config, epath.Path(run_dir) / "select", dataset=tune)
  trained = train.train_model(config, run_dir, dataset=fit)
  if trained.best is not None:
    info.update(_selection_info(trained, metric))
  info["epochs"] = pipeline.epochs(trained.last_step, config.batch_size, fit_rows)
  # Chosen on valid (by the train-only fit when the final fit has no valid split), and saved
  # beside the checkpoints for recommend and export.
  if score_terms.score_terms(trained.model):
    chooser, data = (None, fit) if len(fit.valid) else (selected.model, tune)
    chosen = score_terms.choose_all(trained.model, data, config, chooser=chooser,
                                    model_dataset=fit)
    score_terms.save(run_dir, chosen)
    info.update(chosen)
  catalogue = _with_catalogue(fit, pdata.catalogue, text_len).catalogue
  ranker = model_eval.model_ranker(trained.model, fit, catalogue,
                                   history_len=config.model.user.history_len,
                                   chunk=config.eval_block_size)
  return ranker, trained.model, catalogue, info


def _rows_per_epoch(config: ml_collections.ConfigDict, dataset: RecDataset) -> int:
  # The train loop's count (train_model builds its own index; it does not return it).
  return pipeline.examples_per_epoch(examples.TrainExampleIndex.build(dataset),
                                     config.data.get("example", "interaction"))


def _selection_info(trained: train.TrainedModel, metric: str) -> dict[str, Any]:
  """What validation chose: the best step, its epochs and scores, and the whole valid curve."""
  return {"best_step": trained.best["step"], "epochs_to_best": trained.best["epoch"],
          f"valid_{metric}": trained.best[metric], "stopped_at": trained.last_step,
          "valid_curve": [{k: row[k] for k in ("step", "epoch", metric)}
                          for row in trained.valid_history]}


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
