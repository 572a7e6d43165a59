r"""Symmetric InfoNCE, loss + gradients, naive [B, B] against tiled ring, as the batch grows.

Every point (method, B) runs in a fresh subprocess on ``--devices`` simulated CPU devices
(default 8), so its peak RSS is its own: the inputs a, b [B, d] (unit vectors, generated on
the devices, split over the mesh's batch axes), one compile, then ``--repeats`` timed calls
of ``jax.value_and_grad`` with respect to a, b and the inverse temperature.

  naive  ``losses.info_nce`` under ``jax.jit`` with the batch sharded over the mesh: XLA's
         partitioner gathers what the [B, B] logits need (the project's default path);
  tiled  ``tiled_losses.info_nce(mesh=...)``: the ring of ``recfusion_jax.ops.tiled_lse``.

Next to each point: the FLOP bound, i.e. the algorithm's matmul FLOPs (naive 6 B^2 d: logits and
two gradient matmuls; tiled 8 B^2 d: the backward pass recomputes the logits) divided by the
float32 matmul peak measured in the same subprocess right after the point, on the same
simulated devices (under the same load: the host is shared, so load is recorded too).
A series stops before a point that its last point predicts to need more than ``--naive_max_gib``
(naive) or ``--max_gib`` (tiled) -- the memory the loss added to the process grows as B^2 or
B -- or more than ``--max_seconds`` (time grows as B^2): the host is shared.

  nice -n 10 python perf/contrastive_scaling.py --out /tmp/contrastive_scaling.jsonl
  python perf/contrastive_scaling.py --batches 4096,8192 --methods tiled  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GIB = 2.0**30


# ----------------------------------------------------------------------------- child side


def _child_setup(devices: int):
  # The simulated devices share the host's cores, so at large B one device can reach a ring
  # step's collective-permute minutes after another; XLA:CPU aborts the process when a
  # collective waits more than 40 s by default (real accelerators run their devices in step).
  os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                             "--xla_cpu_collective_call_terminate_timeout_seconds=7200 "
                             "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, _ROOT)
  import jax  # pylint: disable=import-outside-toplevel
  return jax


def _peak_rss_bytes() -> int:
  import resource  # pylint: disable=import-outside-toplevel
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def matmul_peak(jax, devices: int, dim: int, dtype: str = "float32") -> dict:
  """Best matmul FLOP/s over tile-like shapes, every simulated device busy at once; operands
  in ``dtype``, accumulated and returned in float32 (for bf16 the form that reaches a CPU's
  AMX kernels, as ``models.transformer.dense_bf16`` does)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  mesh = jax.make_mesh((devices,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  split = NamedSharding(mesh, P("d"))
  f = jax.jit(lambda x, y: jnp.einsum("nmk,nkl->nml", x, y,
                                      preferred_element_type=jnp.float32), out_shardings=split)
  best = {"flops_per_s": 0.0}
  for m in (1024, 2048):
    x = jax.device_put(jnp.ones((devices, m, dim), dtype), split)
    y = jax.device_put(jnp.ones((devices, dim, m), dtype), split)
    f(x, y).block_until_ready()
    for _ in range(3):
      start = time.perf_counter()
      f(x, y).block_until_ready()
      rate = 2 * devices * m * dim * m / (time.perf_counter() - start)
      if rate > best["flops_per_s"]:
        best = {"flops_per_s": rate, "shape": f"{devices} x [{m},{dim}]@[{dim},{m}]"}
  return best


def _point(args) -> dict:
  jax = _child_setup(args.devices)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from recfusion_jax import losses, sharding, tiled_losses  # pylint: disable=import-outside-toplevel

  b, d = args.batch, args.dim
  mesh = sharding.make_mesh()
  rows = NamedSharding(mesh, P(sharding.DATA_AXES))

  @jax.jit
  def make_inputs(key):
    ka, kb, ki = jax.random.split(key, 3)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    a = unit(jax.random.normal(ka, (b, d), jnp.float32))
    bb = unit(a + 0.5 * jax.random.normal(kb, (b, d), jnp.float32))  # correlated pairs
    item_ids = jax.random.randint(ki, (b,), 0, 4 * b)  # a few accidental hits
    return (jax.lax.with_sharding_constraint(a, rows), jax.lax.with_sharding_constraint(bb, rows),
            jax.lax.with_sharding_constraint(jnp.ones((b,), bool), rows),
            jax.lax.with_sharding_constraint(item_ids, rows))

  a, bb, valid, item_ids = make_inputs(jax.random.key(0))
  inv_temp = jnp.float32(10.0)
  jax.block_until_ready((a, bb, valid, item_ids))
  rss_inputs = _peak_rss_bytes()

  if args.method == "naive":
    loss_fn = losses.info_nce
  else:
    loss_fn = lambda *xs: tiled_losses.info_nce(*xs, tile=args.tile, mesh=mesh)
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 4)))
  start = time.perf_counter()
  compiled = step.lower(a, bb, valid, item_ids, inv_temp).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  times, loss = [], None
  for _ in range(args.repeats):
    start = time.perf_counter()
    loss, grads = compiled(a, bb, valid, item_ids, inv_temp)
    jax.block_until_ready((loss, grads))
    times.append(time.perf_counter() - start)
    del grads
  rss_loss = _peak_rss_bytes()
  # Measured after the loss (its buffers are free by now), under the same load.
  peak = matmul_peak(jax, args.devices, d)
  return {"method": args.method, "batch": b, "dim": d, "devices": args.devices,
          "tile": args.tile if args.method == "tiled" else None, "loss": float(loss),
          "seconds": min(times), "all_seconds": times, "compile_seconds": compile_s,
          "peak_rss_bytes": rss_loss, "rss_after_inputs_bytes": rss_inputs,
          "compiled_temp_bytes_per_device": memory.temp_size_in_bytes, "matmul_peak": peak}


# ----------------------------------------------------------------------------- parent side


def _run_child(argv: list[str], timeout: float) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__)] + argv
  load_before = os.getloadavg()[0]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  if proc.returncode != 0:
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}",
            "load_before": load_before}
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["load_before"], result["load_after"] = load_before, os.getloadavg()[0]
  return result


def _flops(method: str, b: int, d: int) -> float:
  return (6 if method == "naive" else 8) * b * b * d


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="4096,8192,16384,32768,65536,131072")
  parser.add_argument("--methods", default="naive,tiled")
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--tiles", default="1024", help="tile sizes of the tiled method, one "
                      "series each")
  parser.add_argument("--tile", type=int, default=1024, help=argparse.SUPPRESS)  # child
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=0,
                      help="timed calls per point; 0: 3 up to B = 16,384, then 1")
  parser.add_argument("--naive_max_gib", type=float, default=8.0)
  parser.add_argument("--max_gib", type=float, default=8.0)
  parser.add_argument("--max_seconds", type=float, default=900.0)
  parser.add_argument("--out", default="")
  # Child modes (internal).
  parser.add_argument("--child", choices=("point",), default=None)
  parser.add_argument("--method", default="tiled")
  parser.add_argument("--batch", type=int, default=4096)
  args = parser.parse_args()

  if args.child == "point":
    print(json.dumps(_point(args)))
    return

  common = ["--dim", str(args.dim), "--devices", str(args.devices)]
  header = {"kind": "run", "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  records = []

  def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)
    records.append(record)
    if args.out:  # appended as it comes, so an interrupted run keeps its points
      with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")

  emit(header)
  series = []
  for method in args.methods.split(","):
    if method not in ("naive", "tiled"):
      raise SystemExit(f"unknown method {method!r}")
    tiles = [int(t) for t in args.tiles.split(",")] if method == "tiled" else [args.tile]
    series += [(method, tile) for tile in tiles]
  for method, tile in series:
    last = None
    for b in (int(x) for x in args.batches.split(",")):
      why = _why_stop(last, method, b, args)
      if why:
        emit({"kind": "stop", "method": method, "tile": tile, "batch": b, "why": why})
        break
      repeats = args.repeats or (3 if b <= 16384 else 1)
      result = _run_child(["--child", "point", "--method", method, "--batch", str(b),
                           "--tile", str(tile), "--repeats", str(repeats)] + common,
                          timeout=4 * args.max_seconds + 600)
      result.update(kind="point", method=method, batch=b)
      if "error" not in result:
        bound = _flops(method, b, args.dim) / result["matmul_peak"]["flops_per_s"]
        result.update(flop_bound_seconds=bound, share_of_bound=bound / result["seconds"])
      emit(result)
      last = result
  print(_table(records))


def _why_stop(last: dict | None, method: str, batch: int, args) -> str:
  """Why the point at ``batch`` is not run, from the previous point of the series ('' = run)."""
  if last is None:
    return ""
  if "error" in last:
    return "the previous point failed"
  growth = batch / last["batch"]
  # What the loss added on top of the process and its inputs grows as B^2 (naive) or B (tiled).
  base = last["rss_after_inputs_bytes"]
  memory = base + (last["peak_rss_bytes"] - base) * growth ** (2 if method == "naive" else 1)
  limit = args.naive_max_gib if method == "naive" else args.max_gib
  if memory > limit * _GIB:
    return (f"peak RSS {last['peak_rss_bytes'] / _GIB:.2f} GiB at {last['batch']:,} grows to "
            f"~{memory / _GIB:.0f} GiB > --{'naive_' if method == 'naive' else ''}max_gib {limit}")
  seconds = last["seconds"] * growth**2
  if seconds > args.max_seconds:
    return (f"{last['seconds']:.0f} s at {last['batch']:,} grows to ~{seconds:.0f} s "
            f"> --max_seconds {args.max_seconds:.0f}")
  return ""


def _table(records: list[dict]) -> str:
  lines = ["| B | method (tile) | peak RSS (GiB) | seconds | matmul peak (GFLOP/s) | FLOP bound (s) | "
           "share of bound | loss | load |", "|---|---|---|---|---|---|---|---|---|"]
  stops = []
  for r in records:
    if r.get("kind") == "stop":
      stops.append(f"{r['method']} stopped before {r['batch']:,}: {r['why']}")
    if r.get("kind") != "point":
      continue
    if "error" in r:
      lines.append(f"| {r['batch']:,} | {r['method']} | failed: {r['error'][:80]} ||||||")
      continue
    method = r["method"] + (f" ({r['tile']})" if r.get("tile") else "")
    lines.append(
        f"| {r['batch']:,} | {method} | {r['peak_rss_bytes'] / _GIB:.2f} | "
        f"{r['seconds']:.1f} | {r['matmul_peak']['flops_per_s'] / 1e9:.1f} | "
        f"{r['flop_bound_seconds']:.1f} | {r['share_of_bound']:.0%} | "
        f"{r['loss']:.4f} | {r['load_before']:.1f} |")
  return "\n".join(lines + stops)


if __name__ == "__main__":
  main()
