"""Results of a benchmark run: aggregation over seeds, RESULTS.md, training-curve and ablation
plots."""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import jax
import numpy as np
import scipy.stats
from etils import epath

from recfusion_jax import score_terms
from recfusion_jax.benchmark import registry
from recfusion_jax.benchmark.registry import (ABLATION_GROUP, BASELINES, HEADLINE, RETRIEVAL,
                                              SAMPLED, SUBSETS)

if TYPE_CHECKING:
  from recfusion_jax.benchmark.runner import Options


FIT_LENGTH_KEYS = ("epochs", "epochs_to_best")


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
    # How long each fit trained (epochs; epochs_to_best where validation chose the length).
    for key in FIT_LENGTH_KEYS:
      values = [row.get("info", {}).get(key) for row in rows]
      if values and all(isinstance(v, (int, float)) for v in values):
        entry[key] = float(np.mean(values))
        entry[key + "_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    entry["num_seeds"] = len(rows)
    entry["wall_s"] = float(np.mean([row["wall_s"] for row in rows]))
    out.setdefault(protocol, {})[model] = entry
  return out


PAIRED_REFERENCE = "RecFusion"
PAIRED_CONFIDENCE = 0.95
RETRIEVAL_CHANCE_KEYS = ("text_to_image_R@10", "image_to_text_R@10")


def _interval(diffs: Sequence[float]) -> dict[str, Any]:
  """Mean of paired differences and its Student-t interval (None with fewer than 2 pairs)."""
  d = np.asarray(diffs, np.float64)
  entry: dict[str, Any] = {"mean": float(d.mean()), "num_seeds": int(d.size),
                           "diffs": [float(x) for x in d], "ci_low": None, "ci_high": None}
  if d.size > 1:
    half = (scipy.stats.t.ppf(0.5 + PAIRED_CONFIDENCE / 2, d.size - 1)
            * np.std(d, ddof=1) / np.sqrt(d.size))
    entry["ci_low"], entry["ci_high"] = float(d.mean() - half), float(d.mean() + half)
  return entry


def paired_differences(records: Sequence[Mapping[str, Any]], reference: str = PAIRED_REFERENCE,
                       metric: str = "NDCG@10") -> dict[str, dict[str, dict[str, Any]]]:
  """{protocol: {model: {metric, mean, ci_low, ci_high, num_seeds, diffs}}}: per seed, the model's
  metric minus ``reference``'s on the same split, with a t interval (PAIRED_CONFIDENCE) of the mean.

  Pairing by seed removes the split-to-split spread that both models share (it is several times
  the difference between close models on MovieLens). Only seeds both models ran are paired. On
  ``retrieval`` every model is compared with chance instead (R@10 - 10 / number of candidates).
  """
  by_key = {(r["protocol"], r["model"], r["seed"]): r["metrics"] for r in records}
  # A run that repeats the reference's fit (the same config) differs from it by 0 by
  # construction: it is not a comparison (write_markdown names such runs).
  repeats = {(r["protocol"], r["model"], r["seed"]) for r in records
             if r.get("info", {}).get("same_as") == reference}
  out: dict[str, dict[str, dict[str, Any]]] = {}
  for protocol, model in dict.fromkeys((r["protocol"], r["model"]) for r in records):
    seeds = sorted(s for p, m, s in by_key if (p, m) == (protocol, model)
                   and (protocol == "retrieval" or (p, m, s) not in repeats))
    if protocol == "retrieval":
      runs = [by_key[protocol, model, s] for s in seeds]
      for key in RETRIEVAL_CHANCE_KEYS:
        diffs = [m[key] - 10.0 / m["num_items"] for m in runs if key in m]
        if diffs:
          out.setdefault(protocol, {})[f"{model} {key}"] = {
              "metric": f"{key} - chance", **_interval(diffs)}
      continue
    if model == reference:
      continue
    diffs = [by_key[protocol, model, s][metric] - by_key[protocol, reference, s][metric]
             for s in seeds if (protocol, reference, s) in by_key
             and metric in by_key[protocol, model, s]
             and metric in by_key[protocol, reference, s]]
    if diffs:
      out.setdefault(protocol, {})[model] = {"metric": f"{metric} - {reference}",
                                             **_interval(diffs)}
  return out


def _paired_lines(paired: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
  lines = ["## Paired differences", "",
           f"Per seed, each model minus {PAIRED_REFERENCE} on the same split (retrieval: minus "
           f"chance), mean and {PAIRED_CONFIDENCE:.0%} t interval over the seeds both ran; "
           "`differs` when the interval excludes 0.", ""]
  for protocol, rows in paired.items():
    lines += [f"### {protocol}", "",
              f"| model | difference | mean | {PAIRED_CONFIDENCE:.0%} CI | seeds | differs |",
              "|---|---|---|---|---|---|"]
    for model, e in rows.items():
      ci = ("-" if e["ci_low"] is None else f"[{e['ci_low']:+.4f}, {e['ci_high']:+.4f}]")
      differs = ("-" if e["ci_low"] is None else
                 "yes" if e["ci_low"] > 0 or e["ci_high"] < 0 else "no")
      lines.append(f"| {model} | {e['metric']} | {e['mean']:+.4f} | {ci} | {e['num_seeds']} "
                   f"| {differs} |")
    lines.append("")
  return lines


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


def _repeated_fits(records: Sequence[Mapping[str, Any]], protocol: str
                   ) -> dict[tuple[str, str], list[int]]:
  """{(model, the model it repeats): seeds} of ``protocol``'s runs that reused a fit."""
  out: dict[tuple[str, str], list[int]] = {}
  for r in records:
    first = r.get("info", {}).get("same_as")
    if r["protocol"] == protocol and first:
      out.setdefault((r["model"], first), []).append(r["seed"])
  return out


def _chosen_terms(records: Sequence[Mapping[str, Any]], protocol: str) -> list[str]:
  """One line per model of ``protocol`` whose fits chose score terms on valid after training:
  each seed's settings (``score_terms.choose_all``), so the page says what its numbers used."""
  by_model: dict[str, list[str]] = {}
  for r in sorted(records, key=lambda r: (r["model"], r["seed"])):
    info = r.get("info", {})
    terms = [key for key in score_terms.SCORE_TERMS if isinstance(info.get(key), Mapping)]
    if r["protocol"] == protocol and terms and not info.get("same_as"):
      by_model.setdefault(r["model"], []).append(f"seed {r['seed']} " + ", ".join(
          f"{key} " + " ".join(f"{name} {info[key][name]:g}"
                               for name in score_terms.setting_names(key) if name in info[key])
          for key in terms))
  return [f"- {model}: " + "; ".join(seeds) for model, seeds in by_model.items()]


def write_markdown(path: str | os.PathLike, results: Mapping[str, Any], opts: "Options",
                   machine: str, total_wall_s: float, plots: Sequence[str | os.PathLike],
                   paired: Mapping[str, Any] | None = None,
                   records: Sequence[Mapping[str, Any]] = (), wall_note: str = "") -> None:
  """RESULTS.md: command, machine, protocol notes, one table per protocol and the paired
  differences. ``wall_note`` says how a merged run's total wall time was counted."""
  lines = [f"# RecFusion-JAX benchmark: {opts.suite}", "",
           f"- command: `{opts.command}`",
           f"- machine: {machine}",
           f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; total wall time "
           f"{total_wall_s / 60:.1f} min" + (f" ({wall_note})" if wall_note else ""),
           f"- scored on `{opts.split}`; "
           + ("hyper-parameters tuned on `valid` with train-only fits, final fits on "
              "train + valid" if opts.split == "test" and opts.refit else
              "final fits on train only"),
           "- headline metrics: full ranking over the catalogue, excluding each user's "
           "known items of the fit period (MovieLens: every rating, whatever its value), "
           "ties counted against the held-out item; "
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
    skipped = [m for m in models if not registry.applies(m, protocol)]
    if skipped:
      lines += ["", f"Not applicable: {', '.join(skipped)}."]
    chosen = _chosen_terms(records, protocol)
    if chosen:
      lines += ["", "Score terms chosen on valid after training (jointly, by the train-only "
                "fit where the final fit has no valid split):", ""] + chosen
    repeats = _repeated_fits(records, protocol)
    if repeats:
      lines += ["", "The same config as another model here, trained once (its row repeats that "
                "model's; not in the paired differences to it): " + "; ".join(
                    f"{model} = {first} (seeds {', '.join(map(str, seeds))})"
                    for (model, first), seeds in repeats.items()) + "."]
    lines.append("")
  if paired:
    lines += _paired_lines(paired)
  if plots:
    names = [epath.Path(p).name for p in plots]
    lines += ["## Plots", ""] + [f"![{name}]({name})" for name in names] + [""]
  epath.Path(path).write_text("\n".join(lines))


def _read_curve(run_dir: str | os.PathLike) -> tuple[list[float], list[float], str]:
  """(steps, values, name) of the loss in a run's metrics.jsonl (rec_loss for RecFusion)."""
  path = epath.Path(run_dir) / "metrics.jsonl"
  if not path.exists():
    return [], [], ""
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  key = "rec_loss" if any("rec_loss" in r for r in rows) else "loss"
  last = {int(r["step"]): float(r[key]) for r in rows if key in r}  # a resumed run repeats steps
  return sorted(last), [last[s] for s in sorted(last)], key


def write_plots(workdir: str | os.PathLike, results: Mapping[str, Any], opts: "Options",
                records: Sequence[Mapping[str, Any]]) -> list[str]:
  """Training curves per protocol and ablation bars of NDCG@10; returns the PNG paths."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  workdir = epath.Path(workdir)
  paths = []

  def save(fig: Any, name: str) -> None:
    # Through a file object: matplotlib writes local paths only, epath also writes gs://.
    with (workdir / name).open("wb") as f:
      fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
    paths.append(os.fspath(workdir / name))

  for protocol in opts.protocols:
    if protocol == "retrieval" or protocol not in results:
      continue
    models = [m for m in opts.models if m in results[protocol]]
    curves = {m: [(r["seed"], *_read_curve(workdir / r["run_dir"]))
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
    save(fig, f"curves_{protocol}.png")

  for protocol in opts.protocols:
    runs = [r for r in records if r["protocol"] == protocol and r.get("info", {}).get("valid_curve")]
    if not runs:
      continue
    models = list(dict.fromkeys(r["model"] for r in runs))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for k, model in enumerate(models):
      for n, r in enumerate(rr for rr in runs if rr["model"] == model):
        curve = r["info"]["valid_curve"]
        metric = next(key for key in curve[0] if key not in ("step", "epoch"))
        ax.plot([c["epoch"] for c in curve], [c[metric] for c in curve], color=f"C{k % 10}",
                alpha=0.8, label=model if n == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"valid {metric}")
    ax.set_title(f"valid curves (train-only fits): {protocol}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, f"valid_{protocol}.png")

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
    save(fig, "ablation_ndcg.png")
  return paths


def summary(metrics: Mapping[str, float]) -> str:
  keys = [k for k in ("NDCG@10", "HR@10", "sampled_NDCG@10", "text_to_image_R@10",
                      "image_to_text_R@10") if k in metrics]
  return " ".join(f"{k}={metrics[k]:.4f}" for k in keys)
