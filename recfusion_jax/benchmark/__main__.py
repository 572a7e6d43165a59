r"""CLI of the benchmark runner (see ``recfusion_jax.benchmark.runner`` for what it runs).

  python -m recfusion_jax.benchmark --suite movielens --workdir runs/bench \
      [--config configs/movielens.py:size=small] [--config.optimizer.learning_rate=1e-3] \
      [--models ease,RecFusion] [--protocols warm_ratio,loo] [--seeds 0,1,2] [--steps N] \
      [--quick] [--split valid] [--no_refit] [--shard K/N | --merge]

Run from the repository root: ``--config`` defaults to ``configs/movielens.py:size=small``
(movielens suite) or ``configs/tiny.py`` (synthetic suite), and ``--config.<field>=value``
overrides any field of it (e.g. ``--config.data.dir=...``, ``--config.data.synthetic.num_items=120``).
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Sequence

from absl import app
from absl import flags
from etils import epath
import jax
from ml_collections import config_flags

from recfusion_jax import writers
from recfusion_jax.benchmark import registry
from recfusion_jax.benchmark.runner import Options, run_benchmark

DEFAULT_CONFIGS = {"movielens": "configs/movielens.py:size=small", "synthetic": "configs/tiny.py"}

_SUITE = flags.DEFINE_enum("suite", None, sorted(DEFAULT_CONFIGS), "Data suite; required.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; required.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "RecFusion config of the content models (default: the suite's, see above).")
_MODELS = flags.DEFINE_list("models", list(registry.ALL_MODELS),
                            f"Comma separated, from {','.join(registry.ALL_MODELS)}.")
_PROTOCOLS = flags.DEFINE_list("protocols", list(registry.PROTOCOLS),
                               f"Comma separated, from {','.join(registry.PROTOCOLS)}.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_BASELINE_SEEDS = flags.DEFINE_list(
    "baseline_seeds", None, "Seeds of the models outside RecFusion's ablation group "
    "(default: --seeds).")
_SHARD = flags.DEFINE_string(
    "shard", "0/1", "K/N: run the K-th of N groups of runs (start N processes side by side, "
    "then one with --merge).")
_MERGE = flags.DEFINE_bool("merge", False, "Merge the shards' results in --workdir into "
                           "results.json, RESULTS.md and the plots.")
_STEPS = flags.DEFINE_integer("steps", None, "RecFusion training steps (default: the "
                              "config's; 0 = untrained); wins over --config.num_steps.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke test: a few steps / epochs per model.")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "valid"], "Split that is scored.")
_NO_REFIT = flags.DEFINE_bool("no_refit", False,
                              "Final fits on train only (default: train + valid).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "JAX persistent compilation cache (default WORKDIR/jax_cache; "
    "'' = off): runs of one model on different protocols then compile once.")


def _with_default_config(argv: Sequence[str]) -> list[str]:
  """``argv`` with the suite's default ``--config`` inserted when none is given, so that
  ``--config.<field>=value`` overrides also work on the default."""
  argv = list(argv)
  if any(a in ("--config", "-config") or a.startswith(("--config=", "-config="))
         for a in argv[1:]):
    return argv
  suite = None
  for k, a in enumerate(argv[1:], 1):
    if a.startswith("--suite="):
      suite = a.split("=", 1)[1]
    elif a == "--suite" and k + 1 < len(argv):
      suite = argv[k + 1]
  if suite not in DEFAULT_CONFIGS:
    return argv   # flag parsing then reports the missing or unknown --suite
  return [argv[0], f"--config={DEFAULT_CONFIGS[suite]}"] + argv[1:]


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl ``flags_parser``: the flags of ``argv`` (plus the suite's default config)."""
  argv = _with_default_config(argv)
  sys.argv = argv   # config_flags reads the --config.<field> overrides from sys.argv
  return flags.FLAGS(argv)


def options_from_flags(argv: Sequence[str]) -> tuple[Options, str]:
  """(options, compilation cache directory or '') from parsed flags; ``argv`` as typed."""
  # Checked here, not with required=True: a required flag would fail the flag parsing of
  # any other CLI imported into the same process (the tests parse several).
  if not _SUITE.value or not _WORKDIR.value:
    raise app.UsageError("--suite and --workdir are required")
  k, n = (int(x) for x in _SHARD.value.split("/"))
  command = " ".join(["python -m recfusion_jax.benchmark"] + [shlex.quote(a) for a in argv[1:]])
  opts = Options(
      suite=_SUITE.value, workdir=_WORKDIR.value, config=_CONFIG.value,
      models=tuple(_MODELS.value), protocols=tuple(_PROTOCOLS.value),
      seeds=tuple(int(s) for s in _SEEDS.value),
      baseline_seeds=(None if _BASELINE_SEEDS.value is None
                      else tuple(int(s) for s in _BASELINE_SEEDS.value)),
      shard=(k, n), merge=_MERGE.value, steps=_STEPS.value, quick=_QUICK.value,
      split=_SPLIT.value, refit=not _NO_REFIT.value, command=command,
      config_overrides=tuple(sorted(config_flags.get_override_values(flags.FLAGS["config"]))))
  cache = _COMPILATION_CACHE.value
  # JAX's compilation cache goes through etils.epath itself, so a gs:// cache works too.
  return opts, os.fspath(epath.Path(opts.workdir) / "jax_cache") if cache is None else cache


def main(argv: Sequence[str]) -> None:
  del argv  # the flags; the command line as typed is recorded in RESULTS.md
  writers.setup_logging()
  opts, cache = options_from_flags(sys.argv)
  if cache:
    # Process-wide, hence set here and not in run_benchmark (which tests call directly).
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  run_benchmark(opts)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
