r"""Benchmark runner: the paper's protocols x baselines of its four classes x RecFusion ablations.

  python -m recfusion_jax.benchmark --suite movielens --workdir runs/bench \
      [--config configs/movielens.py:size=small] [--config.optimizer.learning_rate=1e-3] \
      [--models ease,RecFusion] [--protocols warm_ratio,loo] [--seeds 0,1,2] [--steps N] [--quick]

Every model -- ID-only baselines (``recfusion_jax.baselines``) and RecFusion configs alike --
is turned into a ``baselines.common.Ranker`` (user representations, item table, pure
``score_fn``) and ranked by the same ``evaluate.evaluate_full_ranking`` (headline metrics) and
``evaluate.evaluate_sampled`` (``sampled_*``: each user's latest held-out item among 99 uniform
negatives). A user's known items of the fit period are excluded from the ranking
(``RecDataset.known``: in MovieLens every rating of that period, Cornac's protocol: with
rating_threshold=4 the items a user rated 1-3 are known and never a test positive); ties count
against the held-out item.

The content models' config is ``--config`` (default ``configs/movielens.py:size=small`` for the
movielens suite, ``configs/tiny.py`` for the synthetic one) with its overrides; each content
model of ``registry.CONTENT_MODELS`` changes it, and the runner sets the protocol, seed and
training history (``config_lib.history_for_protocol``) of each run. The synthetic suite's data
are ``config.data.synthetic``, MovieLens is read from ``config.data.dir``.

Protocols (recfusion_jax/data/splits.py defines the MovieLens splits):
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
metric + "_std": sample std, "num_seeds", "wall_s"}}}), ``paired.json`` (per protocol, each
model minus RecFusion by seed with a 95% t interval; retrieval against chance:
``report.paired_differences``), ``results_per_seed.jsonl``,
``RESULTS.md`` (tables, command, machine, wall times), ``curves_<protocol>.png`` (training
curves from each run's ``metrics.jsonl``) and ``ablation_ndcg.png``; each run's directory is
``runs/<split>/<protocol>/<model>/seed<k>`` (RecFusion checkpoints there are resumed, so an
interrupted benchmark continues where it stopped; use a fresh workdir for new settings).
Results are rewritten after every run. Content models whose configs resolve to the same one
on a protocol and seed (an ablation that the recipe's fields already apply there) are trained
once; the later name's record carries ``info.same_as``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np
from etils import epath

from recfusion_jax.baselines.common import Ranker
from recfusion_jax.benchmark import fit, protocols, report
from recfusion_jax.benchmark.protocols import ProtocolData
from recfusion_jax.benchmark.registry import (ABLATION_GROUP, ALL_MODELS, BASELINES, PROTOCOLS,
                                              applies, fit_protocol)


@dataclasses.dataclass
class Options:
  """One benchmark invocation (the CLI's flags)."""

  suite: str                        # movielens | synthetic: must match config.data.source
  workdir: str
  config: ml_collections.ConfigDict  # the content models' RecFusion config (and the data)
  models: tuple[str, ...] = ALL_MODELS
  protocols: tuple[str, ...] = PROTOCOLS
  seeds: tuple[int, ...] = (0, 1, 2)
  baseline_seeds: tuple[int, ...] | None = None   # models outside ABLATION_GROUP (None: seeds)
  shard: tuple[int, int] = (0, 1)   # (k, n): this process runs the k-th of n job groups
  merge: bool = False               # only merge the shards' records in workdir into outputs
  steps: int | None = None          # RecFusion num_steps override
  quick: bool = False
  split: str = "test"
  refit: bool = True
  command: str = ""
  # Dotted names of the --config.* overrides: they win over the recipe's per-protocol fields
  # (config_lib.set_protocol), as they win over the config file.
  config_overrides: tuple[str, ...] = ()


def seeds_of(opts: Options, model: str) -> tuple[int, ...]:
  if model in ABLATION_GROUP or opts.baseline_seeds is None:
    return opts.seeds
  return opts.baseline_seeds


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
  if opts.config.data.source != opts.suite:
    raise ValueError(f"--suite {opts.suite} needs a config whose data.source is {opts.suite}, "
                     f"got {opts.config.data.source!r}")
  workdir = epath.Path(opts.workdir)   # local or gs://
  workdir.mkdir(parents=True, exist_ok=True)
  machine = report.machine_description()
  if opts.merge:
    return _merge_shards(opts, machine)
  start = time.perf_counter()
  records: list[dict[str, Any]] = []
  id_fits: dict[tuple[str, int, str], Ranker] = {}
  jobs = shard_jobs(opts)
  k, n_shards = opts.shard
  if n_shards > 1:
    (workdir / f"command.{_shard_name(opts)}.txt").write_text(opts.command + "\n")
  logging.info("benchmark %s: %d runs%s on %s", opts.suite, len(jobs),
               f" (shard {k} of {n_shards})" if n_shards > 1 else "", machine)
  data_cache: dict[tuple[str, int], ProtocolData | None] = {}
  fingerprints: dict[tuple[str, int], str] = {}
  # Content models whose resolved configs are equal on one fit are one model (say the
  # mean-fusion ablation where the recipe's fields already weigh sources uniformly): trained
  # once, and each later name's record says which model it repeats. Holds one fit's models.
  content_fits: dict[str, tuple[str, tuple[Ranker, Any, Any, dict[str, Any]]]] = {}
  content_fit_of: tuple[str, int] | None = None

  def protocol_data(protocol: str, seed: int) -> ProtocolData | None:
    if (protocol, seed) not in data_cache:
      try:
        data_cache.clear()  # one protocol/seed in memory at a time (catalogue images)
        data_cache[(protocol, seed)] = protocols.load_protocol(
            opts.config, protocol, seed, split=opts.split, refit=opts.refit)
        fingerprints[(protocol, seed)] = protocols.fingerprint(data_cache[(protocol, seed)])
      except FileNotFoundError as e:
        logging.warning("skipped %s seed %d: %s", protocol, seed, e)
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
    run_dir = workdir / "runs" / opts.split / fitted_on / model / f"seed{seed}"
    tick, started_at = time.perf_counter(), time.time()
    logging.info("[%d/%d] %s seed %d %s ...", n, len(jobs), protocol, seed, model)
    if model in BASELINES:
      key = (model, seed, fingerprints[(data_protocol, seed)])
      info: dict[str, Any] = {}
      if key not in id_fits:  # content-free models: identical splits give identical fits
        id_fits[key], info = fit.fit_baseline(model, pdata, run_dir, quick=opts.quick)
      else:
        info = {"fit": "reused (identical split)"}
      metrics = fit.evaluate_ranker(id_fits[key], pdata)
    else:
      if content_fit_of != (fitted_on, seed):
        content_fits.clear()
        content_fit_of = (fitted_on, seed)
      digest = fit.content_config_digest(model, pdata, opts.config, steps=opts.steps,
                                         quick=opts.quick, keep=opts.config_overrides)
      if digest not in content_fits:
        content_fits[digest] = (model, fit.fit_content_model(
            model, pdata, opts.config, run_dir, steps=opts.steps, quick=opts.quick,
            keep=opts.config_overrides))
      first, (ranker, fitted, catalogue, info) = content_fits[digest]
      info = dict(info)
      if first != model:
        info["same_as"] = first
        logging.info("%s on %s seed %d: the same config as %s, whose fit is reused", model,
                     fitted_on, seed, first)
      if fitted_on != data_protocol:
        info["fit"] = f"the {fitted_on} fit (identical split)"
      if protocol == "retrieval":
        metrics = fit.retrieval_metrics(fitted, catalogue, np.unique(pdata.heldout.item))
      else:
        metrics = fit.evaluate_ranker(ranker, pdata)
    wall = time.perf_counter() - tick
    logging.info("[%d/%d] %s seed %d %s: %s (%.1f s)", n, len(jobs), protocol, seed, model,
                 report.summary(metrics), wall)
    records.append({"protocol": protocol, "model": model, "seed": seed, "metrics": metrics,
                    "wall_s": wall, "started_at": started_at, "finished_at": time.time(),
                    "info": info,
                    "run_dir": os.fspath(run_dir.relative_to(workdir))})
    _write_outputs(opts, records, machine, time.perf_counter() - start, plots=False)
  results = _write_outputs(opts, records, machine, time.perf_counter() - start, plots=True)
  logging.info("done in %.1f min: %s", (time.perf_counter() - start) / 60,
               workdir / "RESULTS.md")
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
  # A run whose fit protocol is not asked for (``--protocols retrieval`` alone rescoring the
  # cold_items checkpoints) sorts by its own protocol.
  fit_order = lambda p: order.get(fit_protocol(p, "RecFusion"), order[p])
  return sorted((job for key in mine for job in groups[key]),
                key=lambda j: (j[1], fit_order(j[0]), order[j[0]]))


def _shard_name(opts: Options) -> str:
  """``shard<k>of<n>.<digest of the run set>``: shard sets of different invocations (say
  three seeds on some protocols, one on others) can share a workdir and one --merge."""
  k, n = opts.shard
  key = json.dumps([opts.models, opts.protocols, opts.seeds, opts.baseline_seeds, opts.steps,
                    opts.config.to_json_best_effort(sort_keys=True), opts.split, opts.refit,
                    opts.config_overrides])
  return f"shard{k}of{n}.{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _records_path(opts: Options) -> epath.Path:
  if opts.shard[1] == 1:
    return epath.Path(opts.workdir) / "results_per_seed.jsonl"
  return epath.Path(opts.workdir) / f"results_per_seed.{_shard_name(opts)}.jsonl"


def _merge_shards(opts: Options, machine: str) -> dict[str, Any]:
  """Combines every ``results_per_seed.shard*.jsonl`` in workdir into the outputs."""
  workdir = epath.Path(opts.workdir)
  paths = sorted(workdir.glob("results_per_seed.shard*.jsonl"))
  if not paths:
    raise FileNotFoundError(f"no results_per_seed.shard*.jsonl in {opts.workdir}")
  records: list[dict[str, Any]] = []
  for path in paths:
    records += [dict(json.loads(line), shard_file=path.name)
                for line in path.read_text().splitlines() if line.strip()]
  records, repeated = drop_repeated_records(records)
  wall_s, wall_note = merged_wall_time(records)
  if repeated:
    note = f"{repeated} records repeated in two shard files with equal metrics, counted once"
    logging.warning("merge: %s", note)
    wall_note += f"; {note}"
  commands = []
  for path in sorted(workdir.glob("command.shard*.txt")):
    commands.append(path.read_text().strip())
  logging.info("merged %d runs from %d shards", len(records), len(paths))
  merged = dataclasses.replace(opts, shard=(0, 1),
                               command=" & ".join(commands + [opts.command]))
  return _write_outputs(merged, records, machine, wall_s, plots=True, wall_note=wall_note)


def drop_repeated_records(records: Sequence[Mapping[str, Any]],
                          atol: float = 1e-6) -> tuple[list[Mapping[str, Any]], int]:
  """(records with each (protocol, model, seed) once, how many repeats were dropped).

  Shard files gathered from several workdirs can hold the same run twice (say the reference
  model restored in two invocations). Counting both would add a seed to the mean and to the
  paired interval, so a repeat with the same metrics (to ``atol``) is dropped and counted,
  and one whose metrics differ is an error: which of the two is the result is not ours to pick.
  """
  kept: dict[tuple[str, str, int], Mapping[str, Any]] = {}
  repeated = 0
  for record in records:
    key = (record["protocol"], record["model"], record["seed"])
    if key not in kept:
      kept[key] = record
      continue
    first, second = kept[key]["metrics"], record["metrics"]
    if first.keys() != second.keys() or any(
        not np.isclose(first[k], second[k], rtol=0.0, atol=atol, equal_nan=True) for k in first):
      raise ValueError(
          f"{key} appears twice with different metrics ({kept[key].get('shard_file', '?')}, "
          f"{record.get('shard_file', '?')}): remove one of the two records before merging")
    repeated += 1
  return list(kept.values()), repeated


def merged_wall_time(records: Sequence[Mapping[str, Any]]) -> tuple[float, str]:
  """(seconds, how they were counted) that the runs of ``records`` took on the clock.

  Shards and invocations merged into one workdir may have run side by side, one after
  another or days apart, so neither the sum of their times nor first start to last end is
  the suite's cost: the union of the runs' [start, end] intervals is (time with at least one
  run in progress). Records written before runs carried timestamps cannot be placed on the
  clock; their wall times are then summed, and the note says so.
  """
  untimed = [r for r in records if "started_at" not in r or "finished_at" not in r]
  if untimed:
    return (float(sum(r["wall_s"] for r in records)),
            f"the sum of every run's time: {len(untimed)} of {len(records)} runs carry no "
            "start and end times, so runs that overlapped count twice")
  wall_s, covered_until = 0.0, -np.inf
  for start, end in sorted((r["started_at"], r["finished_at"]) for r in records):
    if end > covered_until:
      wall_s += end - max(start, covered_until)
      covered_until = end
  first = min(r["started_at"] for r in records)
  last = max(r["finished_at"] for r in records)
  return wall_s, (f"time with at least one run in progress; runs that overlapped count once; "
                  f"first start to last end {(last - first) / 60:.1f} min")


def _write_outputs(opts: Options, records: Sequence[Mapping[str, Any]], machine: str,
                   wall_s: float, plots: bool, wall_note: str = "") -> dict[str, Any]:
  results = report.aggregate(records)
  fit.write_jsonl(_records_path(opts), records)
  if opts.shard[1] > 1:
    return results   # the shards' records are merged by a final --merge run
  workdir = epath.Path(opts.workdir)
  (workdir / "results.json").write_text(json.dumps(results, indent=1))
  paired = report.paired_differences(records)
  (workdir / "paired.json").write_text(json.dumps(paired, indent=1))
  paths = report.write_plots(workdir, results, opts, records) if plots else []
  report.write_markdown(workdir / "RESULTS.md", results, opts, machine, wall_s, paths, paired,
                        records, wall_note=wall_note)
  return results
