r"""Input pipeline throughput vs. training-step consumption, at any config of ``configs/``.

Two numbers, both in examples/s at ``--config`` (``config.batch_size`` per batch):

  pipeline  -- ``pipeline.make_train_iterator`` + ``pipeline.make_global_batch`` on the mesh of
               all local devices: ``--batches`` batches timed after ``--warmup_batches`` (worker
               start-up excluded), once per ``--workers`` value. Each global batch is blocked on,
               so the host -> device copy is inside the time. The split into ``next`` and
               ``make_global_batch`` is indicative only: batches are built ahead by a read
               thread (or by workers), so ``next`` is mostly waiting and that thread's work
               shows up wherever it contends for the GIL and cores.
  step      -- ``train.jit_train_step`` on the same mesh: ``--steps`` steps timed after the
               compile step and ``--warmup_steps`` more, ``jax.block_until_ready`` on the
               outputs of every step. Batches are assembled before timing, so the step number
               excludes the pipeline. The periodic item-cache refresh is not included.

The pipeline should produce at least ``TARGET_RATIO`` x what the step consumes, so that a
slower-than-measured host (shared cores, a loaded worker) never starves the step.

With ``data.streaming`` (``configs/pod.py``) every batch reads its rows' records from the
ArrayRecord files (``data/records.py``: protobuf parse, PNG decode of the image, a copy of the
raw video); otherwise (``configs/movielens.py``: posters decoded at build time) the pipeline
gathers decoded rows from the in-memory catalogue.

The model is built without ``init_from`` (random weights): speed does not depend on them.

  python perf/pipeline_vs_step.py --config configs/movielens.py:size=small
  python perf/pipeline_vs_step.py --config configs/movielens.py:size=base --steps 3 --batches 100
  # pod-shaped: 224 px images, 16-frame videos, the ViT-B-sized trunk (data_prep.synthetic_pod)
  python perf/pipeline_vs_step.py --config configs/pod.py --set batch_size=4 --set mesh.fsdp=1 \
      --data_dir data_out/synthetic_pod --step_mode bound --batches 30

At pod shapes the step does not fit this CPU (XLA asks for 31 GiB at batch 4), so
``--step_mode bound`` compiles it without running and compares the pipeline with a step at the
host's measured float32 matmul peak: a faster step than the real one, so the ratio is a floor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import ast  # noqa: E402
import importlib.util  # noqa: E402

from perf import contrastive_scaling  # noqa: E402  (its float32 matmul peak)
from recfusion_jax import config_lib, sharding, train  # noqa: E402
from recfusion_jax.data import examples, pipeline, sources  # noqa: E402
from recfusion_jax.data.types import RecDataset  # noqa: E402

TARGET_RATIO = 5.0


def _parse_workers(text: str) -> list[int]:
  workers = [int(w) for w in text.split(",") if w.strip()]
  if not workers or min(workers) < 0:
    raise argparse.ArgumentTypeError(f"--workers needs non-negative integers, got {text!r}")
  return workers


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/movielens.py:size=small",
                      help="config file and its arg, e.g. configs/movielens.py:size=base or "
                           "configs/pod.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override (repeatable), e.g. batch_size=8; the value is "
                           "parsed as a Python literal where it is one")
  parser.add_argument("--data_dir", default=None, help="overrides config.data.dir")
  parser.add_argument("--steps", type=int, default=10, help="timed train steps")
  parser.add_argument("--warmup_steps", type=int, default=1,
                      help="untimed steps after the compile step")
  parser.add_argument("--batches", type=int, default=200, help="timed pipeline batches")
  parser.add_argument("--warmup_batches", type=int, default=10,
                      help="untimed batches first (worker start-up, first-touch of the data)")
  parser.add_argument("--workers", type=_parse_workers, default=[0, 2],
                      help="comma-separated num_workers values to time, e.g. 0,2")
  parser.add_argument("--step_mode", choices=("run", "bound"), default="run",
                      help="run: time the jitted step; bound: compile it only and take the "
                           "rate of a step running at this host's float32 matmul peak (its "
                           "FLOPs from XLA's cost analysis): for models this CPU cannot run")
  parser.add_argument("--json_out", default=None, help="also write the report here")
  args = parser.parse_args(argv)
  for name in ("steps", "batches"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1")
  for name in ("warmup_steps", "warmup_batches"):
    if getattr(args, name) < 0:
      parser.error(f"--{name} must be >= 0")
  return args


def step_state_and_batches(dataset: RecDataset, config: ml_collections.ConfigDict, mesh,
                            index: examples.TrainExampleIndex, log_q: np.ndarray,
                            num_batches: int) -> tuple[Any, Any, list[Any], int]:
  """(jitted step, state, ``num_batches`` global batches, parameter count), the step exactly
  as train.py builds and runs it: state born sharded on ``mesh``, its step settings
  (full-catalogue term, tiles, micro-batches) from ``train.step_settings``."""
  tx, schedule = train.make_optimizer(config, config.num_steps)
  graphdef, state, state_shardings = train.create_sharded_state(config, dataset, mesh, tx)
  step_fn = train.jit_train_step(graphdef, state_shardings, mesh, schedule=schedule,
                                 **train.step_settings(config))
  params = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.merge(graphdef, state)[0],
                                                          nnx.Param)))
  it = _new_iterator(dataset, config, 0, index, log_q)
  try:
    batches = [pipeline.make_global_batch(next(it), mesh) for _ in range(num_batches)]
  finally:
    it.close()
  return step_fn, state, batches, int(params)


def step_bound(dataset: RecDataset, config: ml_collections.ConfigDict, mesh,
               index: examples.TrainExampleIndex, log_q: np.ndarray) -> dict[str, Any]:
  """The step compiled, not run: its FLOPs (XLA cost analysis) and the examples/s of a step
  at this host's float32 matmul peak, an upper bound on what the real step consumes here."""
  step_fn, state, (batch,), params = step_state_and_batches(dataset, config, mesh, index,
                                                             log_q, 1)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  flops = compiled_flops(compiled)
  peak = contrastive_scaling.matmul_peak(jax, 1, 2048)["flops_per_s"]
  return {"mode": "bound", "step_flops": flops, "flops_per_example": flops / config.batch_size,
          "matmul_peak_flops_per_s": peak, "compile_s": compile_s,
          "examples_per_s": peak * config.batch_size / flops, "params": int(params),
          "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled computation (XLA's cost analysis)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def load_config(spec: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """``path[:arg]`` -> that file's ``get_config(arg)`` with ``KEY=VALUE`` overrides applied
  (the script is not an absl program, so config_flags' parser is not available here), pointed
  at its own protocol as ``main`` trains it (``config_lib.with_own_protocol``: the recipe's
  fields for that protocol, the overrides winning)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("perf_config", path)
  if module_spec is None or module_spec.loader is None:
    raise ValueError(f"--config {spec!r}: {path} is not a Python file")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected KEY=VALUE")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    parent = config
    *head, leaf = key.split(".")
    for name in head:
      parent = parent[name]
    if leaf not in parent:
      raise ValueError(f"--set {item!r}: {key} is not a field of the config")
    parent[leaf] = value
  return config_lib.with_own_protocol(
      config, keep=[item.partition("=")[0] for item in overrides])


def machine_info() -> dict[str, Any]:
  affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  return {"platform": platform.platform(), "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "cpus_usable": affinity,
          # Other jobs on a shared machine slow both numbers; the load says how much.
          "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
          "jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()],
          "local_devices": [str(d) for d in jax.local_devices()]}


def _batch_bytes(batch: dict[str, np.ndarray]) -> dict[str, Any]:
  return {"total": int(sum(v.nbytes for v in batch.values())),
          "image": int(batch["image"].nbytes) if "image" in batch else 0,
          "fields": {k: [str(v.dtype), list(v.shape)] for k, v in batch.items()}}


def _new_iterator(dataset: RecDataset, config: ml_collections.ConfigDict, num_workers: int,
                  index: examples.TrainExampleIndex, log_q: np.ndarray):
  # Exactly what train_and_evaluate builds (one process: local batch = global batch).
  return pipeline.train_iterator_from_config(config, dataset, num_workers=num_workers,
                                             index=index, log_q=log_q)


def time_pipeline(dataset: RecDataset, config: ml_collections.ConfigDict, mesh,
                  num_workers: int, batches: int, warmup: int,
                  index: examples.TrainExampleIndex, log_q: np.ndarray) -> dict[str, Any]:
  """Examples/s of iterator + global-batch assembly, worker start-up excluded."""
  t_build = time.perf_counter()
  it = _new_iterator(dataset, config, num_workers, index, log_q)
  try:
    for _ in range(warmup):
      jax.block_until_ready(pipeline.make_global_batch(next(it), mesh))
    startup_s = time.perf_counter() - t_build
    next_s = assemble_s = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
      ta = time.perf_counter()
      local = next(it)
      tb = time.perf_counter()
      jax.block_until_ready(pipeline.make_global_batch(local, mesh))
      tc = time.perf_counter()
      next_s += tb - ta
      assemble_s += tc - tb
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
  finally:
    it.close()  # stops worker processes before the next measurement
  return {"num_workers": num_workers, "batches": batches, "warmup_batches": warmup,
          "seconds": wall, "examples_per_s": batches * config.batch_size / wall,
          "ms_per_batch": 1e3 * wall / batches,
          "ms_per_batch_next": 1e3 * next_s / batches,
          "ms_per_batch_make_global_batch": 1e3 * assemble_s / batches,
          # Main process only: with workers, their CPU time is not in here.
          "main_process_cpu_seconds": cpu,
          "startup_and_warmup_s": startup_s}


def time_step(dataset: RecDataset, config: ml_collections.ConfigDict, mesh, steps: int,
              warmup: int, index: examples.TrainExampleIndex,
              log_q: np.ndarray) -> dict[str, Any]:
  """Examples/s of the jitted train step, compile and warm-up excluded."""
  # A few distinct real batches, assembled up front: the step is timed alone.
  step_fn, state, batches, params = step_state_and_batches(dataset, config, mesh, index,
                                                            log_q, min(4, steps))
  return {**time_step_with(step_fn, state, batches, config.batch_size, steps, warmup),
          "params": int(params)}


def time_step_with(step_fn, state, batches: list[Any], batch_size: int, steps: int,
                   warmup: int) -> dict[str, Any]:
  """Times ``steps`` calls of a built step on ``batches`` (cycled), compile excluded."""
  jax.block_until_ready(batches)
  t0 = time.perf_counter()
  state, metrics = step_fn(state, batches[0])
  jax.block_until_ready((state, metrics))
  compile_s = time.perf_counter() - t0
  for i in range(warmup):
    state, metrics = jax.block_until_ready(step_fn(state, batches[i % len(batches)]))

  times = []
  c0 = time.process_time()
  for i in range(steps):
    t = time.perf_counter()
    state, metrics = jax.block_until_ready(step_fn(state, batches[i % len(batches)]))
    times.append(time.perf_counter() - t)
  cpu = time.process_time() - c0
  total = float(sum(times))
  loss = float(jax.device_get(metrics["total_loss"]))
  return {"steps": steps, "warmup_steps": warmup, "seconds": total,
          "examples_per_s": steps * batch_size / total,
          "s_per_step_mean": total / steps, "s_per_step_median": float(np.median(times)),
          "s_per_step_min": min(times), "s_per_step_all": times,
          "compile_and_first_step_s": compile_s, "process_cpu_seconds": cpu,
          "last_total_loss": loss}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = _parse_args(argv)
  config = load_config(args.config, args.set)
  config.init_from = ""  # a pretrained checkpoint changes values, not speed
  if args.data_dir:
    config.data.dir = args.data_dir
  if config.batch_size % jax.process_count():
    raise ValueError(f"batch_size {config.batch_size} must divide over the processes")

  t0 = time.perf_counter()
  dataset = sources.load_dataset(config)
  load_s = time.perf_counter() - t0
  index = examples.TrainExampleIndex.build(dataset)
  log_q = examples.item_log_q(dataset)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices=jax.local_devices())
  if config.batch_size % mesh.size:
    raise ValueError(f"batch_size {config.batch_size} must divide over {mesh.size} devices")

  it = _new_iterator(dataset, config, 0, index, log_q)
  sample = next(it)
  it.close()
  cat = dataset.catalogue
  streaming = cat.records is not None
  content = ("read record by record from ArrayRecord per batch (data.streaming)" if streaming
             else "gathered from the in-memory catalogue (decoded at build time)")

  machine = machine_info()
  print("command:", " ".join([sys.executable] + sys.argv))
  print(f"machine: {machine['cpu_count']} CPUs ({machine['cpus_usable']} usable), "
        f"load avg {machine['load_avg_1_5_15']}, jax {machine['jax']} "
        f"{machine['backend']}: {machine['devices']}")
  print(f"config: {args.config} {args.set} (init_from=''), batch_size {config.batch_size}, "
        f"mesh {dict(mesh.shape)}, {len(dataset.train)} train interactions, "
        f"{cat.num_items} items; batch {_batch_bytes(sample)['total'] / 2**20:.2f} MiB")
  print(f"content: {content}; per batch {_batch_bytes(sample)['fields']}")

  pipe = []
  for w in args.workers:
    r = time_pipeline(dataset, config, mesh, w, args.batches, args.warmup_batches, index, log_q)
    pipe.append(r)
    print(f"pipeline num_workers={w}: {r['examples_per_s']:,.0f} examples/s "
          f"({r['ms_per_batch']:.2f} ms/batch = next {r['ms_per_batch_next']:.2f} + "
          f"make_global_batch {r['ms_per_batch_make_global_batch']:.2f}; "
          f"start-up + warm-up {r['startup_and_warmup_s']:.1f} s)", flush=True)

  if args.step_mode == "bound":
    step = step_bound(dataset, config, mesh, index, log_q)
    print(f"train step (bound, not run): {step['flops_per_example'] / 1e9:,.1f} GFLOP an "
          f"example (XLA cost analysis; {step['params']:,} params, "
          f"{step['temp_bytes'] / 2**30:.1f} GiB of temporaries); at this host's float32 "
          f"matmul peak, {step['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s, it would consume "
          f"{step['examples_per_s']:,.2f} examples/s")
  else:
    step = time_step(dataset, config, mesh, args.steps, args.warmup_steps, index, log_q)
    print(f"train step: {step['examples_per_s']:,.1f} examples/s "
          f"({step['s_per_step_median']:.3f} s/step median, {step['s_per_step_mean']:.3f} "
          f"mean, {args.steps} steps; compile + first step "
          f"{step['compile_and_first_step_s']:.1f} s; {step['params']:,} params)")

  ratios = {}
  for r in pipe:
    ratio = r["examples_per_s"] / step["examples_per_s"]
    ratios[str(r["num_workers"])] = ratio
    verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
    print(f"ratio pipeline/step, num_workers={r['num_workers']}: {ratio:,.1f}x "
          f"({verdict} the >= {TARGET_RATIO:g}x target)")
  # Measured one at a time: in training, workers and the step share the same cores.
  print("note: pipeline and step were timed separately; in training they share the CPUs.")

  report = {
      "command": [sys.executable] + sys.argv, "args": vars(args), "machine": machine,
      "config": {"spec": args.config, "overrides": args.set, "batch_size": config.batch_size,
                 "data_dir": config.data.dir, "protocol": config.data.protocol,
                 "text_len": config.data.text_len, "init_from": config.init_from,
                 "encoder": config.model.encoder.to_dict(), "mesh": dict(mesh.shape)},
      "data": {"load_s": load_s, "train_examples": int(index.num_examples),
               "num_items": int(cat.num_items), "streaming": streaming, "content": content,
               "batch_bytes": _batch_bytes(sample)},
      "pipeline": pipe, "step": step, "ratio_pipeline_over_step": ratios,
      "target_ratio": TARGET_RATIO,
      "meets_target": {k: v >= TARGET_RATIO for k, v in ratios.items()},
  }
  if args.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {args.json_out}")
  return report


if __name__ == "__main__":  # guards the spawned Grain workers, which re-import this module
  main()
