r"""Training-step speed as ``train.py`` runs it, normalised by this host's matmul peak.

Timings on a shared machine drift between runs, so the figure of merit is a ratio measured in
one process: examples/s of the step divided by the float32 matmul peak (GFLOP/s) measured
just before and just after it (the mean of the two; their spread is reported as the drift).
Each ``--variant`` is the config with more ``KEY=VALUE`` overrides, timed in the same process,
so variants compare on the same footing:

  python perf/step_speed.py --config configs/movielens.py:size=small \
      --variant fp32: --variant bf16:model.encoder.compute_dtype=bfloat16

The step's FLOPs come from XLA's cost analysis of the compiled step (the step exactly as the
train loop builds it: sharded state, full-catalogue term, tiles, micro-batches), so the
report also says what share of the measured peak the step reaches. The bfloat16 peak (bf16
operands, float32 accumulation) is reported beside: on CPUs with AMX it is several times the
float32 one, so a bf16 step can pass 100% of the float32 peak.

Issue 9's targets in these units (examples/s per GFLOP/s of the float32 peak): ``size=small``
>= 7, ``size=base`` >= 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from perf import contrastive_scaling  # noqa: E402  (the matmul peak)
from perf import pipeline_vs_step  # noqa: E402  (config loading, the step as train.py builds it)
from recfusion_jax import sharding  # noqa: E402
from recfusion_jax.data import examples, sources  # noqa: E402


def matmul_peak(dtype: str, dim: int) -> float:
  """FLOP/s of this host's best matmul in ``dtype`` (float32 accumulation), one device."""
  return contrastive_scaling.matmul_peak(jax, 1, dim, dtype)["flops_per_s"]


def _parse_variant(text: str) -> tuple[str, list[str]]:
  name, sep, rest = text.partition(":")
  if not sep or not name:
    raise argparse.ArgumentTypeError(f"--variant needs NAME:[KEY=VALUE,...], got {text!r}")
  return name, [s for s in rest.split(",") if s]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/movielens.py:size=small")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override applied to every variant (repeatable)")
  parser.add_argument("--variant", action="append", type=_parse_variant, default=None,
                      metavar="NAME:KEY=VALUE,...", help="a config to time (repeatable); "
                      "default one variant 'config' with no further overrides")
  parser.add_argument("--data_dir", default=None, help="overrides config.data.dir")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
  parser.add_argument("--warmup_steps", type=int, default=2)
  parser.add_argument("--peak_dim", type=int, default=2048,
                      help="side of the square matmul that measures the peak")
  parser.add_argument("--json_out", default=None)
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup_steps < 0:
    parser.error("--steps must be >= 1 and --warmup_steps >= 0")
  return args


def time_variant(config, steps: int, warmup: int, peak_dim: int = 2048) -> dict[str, Any]:
  """The step of ``config``: its FLOPs (compiled cost analysis) and examples/s."""
  dataset = sources.load_dataset(config)
  index = examples.TrainExampleIndex.build(dataset)
  log_q = examples.item_log_q(dataset)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices=jax.local_devices())
  step_fn, state, batches, params = pipeline_vs_step.step_state_and_batches(
      dataset, config, mesh, index, log_q, min(4, steps))
  # Timed as compiled here: the jitted function would compile the same step a second time.
  compiled = step_fn.lower(state, batches[0]).compile()
  flops = pipeline_vs_step.compiled_flops(compiled)
  peak_before = matmul_peak("float32", peak_dim)
  timed = pipeline_vs_step.time_step_with(compiled, state, batches, config.batch_size, steps,
                                          warmup)
  peak_after = matmul_peak("float32", peak_dim)
  peak = (peak_before + peak_after) / 2
  ex_per_s = timed["examples_per_s"]
  return {"batch_size": config.batch_size, "params": params, "step_flops": flops,
          "gflop_per_example": flops / config.batch_size / 1e9,
          "examples_per_s": ex_per_s, "s_per_step_median": timed["s_per_step_median"],
          "fp32_peak_gflop_s": peak / 1e9,
          "fp32_peak_drift": abs(peak_before - peak_after) / peak,
          "share_of_fp32_peak": ex_per_s * flops / config.batch_size / peak,
          "examples_per_s_per_gflop_s": ex_per_s / (peak / 1e9),
          "last_total_loss": timed["last_total_loss"]}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = _parse_args(argv)
  variants = args.variant or [("config", [])]
  report: dict[str, Any] = {"command": " ".join([sys.executable] + sys.argv),
                            "machine": pipeline_vs_step.machine_info(),
                            "bf16_peak_gflop_s": matmul_peak("bfloat16", args.peak_dim) / 1e9,
                            "variants": {}}
  print("command:", report["command"])
  for name, overrides in variants:
    config = pipeline_vs_step.load_config(args.config, list(args.set) + overrides)
    config.init_from = ""  # a pretrained checkpoint changes values, not speed
    if args.data_dir:
      config.data.dir = args.data_dir
    r = time_variant(config, args.steps, args.warmup_steps, args.peak_dim)
    report["variants"][name] = {"overrides": overrides, **r}
    print(f"{name:>12}: {r['examples_per_s']:8.1f} examples/s, "
          f"{r['gflop_per_example']:.3f} GFLOP/example, {r['share_of_fp32_peak']:6.1%} of the "
          f"fp32 peak ({r['fp32_peak_gflop_s']:.0f} GFLOP/s, drift {r['fp32_peak_drift']:.0%})"
          f" -> {r['examples_per_s_per_gflop_s']:.2f} examples/s per GFLOP/s", flush=True)
  print(f"bf16 matmul peak (float32 accumulation) in this process: "
        f"{report['bf16_peak_gflop_s']:.0f} GFLOP/s")
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
