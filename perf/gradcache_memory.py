r"""The whole train step as the global batch grows: one-shot, gradient caching, and both with
the tiled losses.

Every point (method, B) runs in a fresh subprocess on one CPU device (simulated devices share
the host's cores and only slow a CPU step down), so its peak RSS is its own. A point builds the
tiny config's model (``configs/tiny.py``, full tiny sizes, ``--rec_loss``), compiles
``train.train_step`` for a random batch of B examples, records XLA's temporary bytes of that
executable (``memory_analysis``: activations, gradients in flight, logits -- what grows with
the batch; the state and the batch are the same for every method), then times ``--repeats``
steps (best one; compile excluded) and records the process's peak RSS.

  one_shot         micro_batch 0, loss_tile 0: the encoder over the whole batch, [B, B] logits
                   and the gate's [B, B, S] weights (the default path);
  gradcache        micro_batch ``--micro_batch`` (recfusion_jax/gradcache.py);
  gradcache_tiled  and loss_tile ``--tile`` (recfusion_jax/tiled_losses.py): nothing of size
                   B^2 and one micro-batch's encoder activations.

A series stops before a point that its last point predicts (temp bytes growing as B^2 for
one_shot and gradcache, as B for gradcache_tiled) to need more than ``--max_gib``.

  nice -n 10 python perf/gradcache_memory.py --out /tmp/step_scaling.jsonl
  python perf/gradcache_memory.py --batches 256,1024 --methods one_shot,gradcache  # quick
  python perf/gradcache_memory.py --batches 4096 --methods gradcache_tiled --history_len 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MIB = 2.0**20
METHODS = {"one_shot": (False, False), "gradcache": (True, False),
           "gradcache_tiled": (True, True)}   # name -> (micro-batches, tiles)


def _point(args) -> dict:
  """One (method, B) in this process: compile, temp bytes, best step time, peak RSS."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, _ROOT)
  import resource  # pylint: disable=import-outside-toplevel
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from recfusion_jax import train  # pylint: disable=import-outside-toplevel
  from recfusion_jax.models.recfusion import RecFusion  # pylint: disable=import-outside-toplevel
  from tests.helpers import random_batch  # pylint: disable=import-outside-toplevel

  config = tiny.get_config()
  config.rec_loss = args.rec_loss
  micro, tiled = METHODS[args.method]
  config.micro_batch = args.micro_batch if micro else 0
  config.loss_tile = args.tile if tiled else 0
  if args.history_len:
    config.model.user.history_len = args.history_len
  synthetic = config.data.synthetic
  model = RecFusion(config.model, num_users=synthetic.num_users,
                    num_items=synthetic.num_items, rngs=nnx.Rngs(0))
  model.cache_has_id[...] = jnp.ones_like(model.cache_has_id[...])
  tx, schedule = train.make_optimizer(config, config.num_steps)
  graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  batch = jax.device_put(random_batch(config, args.batch, synthetic.num_users,
                                      synthetic.num_items, seed=1))
  step = jax.jit(functools.partial(train.train_step, graphdef, schedule=schedule,
                                   **train.step_settings(config)))
  tick = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - tick
  temp = compiled.memory_analysis().temp_size_in_bytes
  seconds = []
  for _ in range(args.repeats):
    tick = time.perf_counter()
    state, aux = compiled(state, batch)
    jax.block_until_ready(aux["total_loss"])
    seconds.append(time.perf_counter() - tick)
  return dict(method=args.method, batch=args.batch, micro_batch=config.micro_batch,
              loss_tile=config.loss_tile, rec_loss=args.rec_loss,
              temp_mib=temp / _MIB, compile_s=compile_s, step_s=min(seconds),
              examples_per_s=args.batch / min(seconds),
              total_loss=float(aux["total_loss"]),
              peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2.0**20,
              load=os.getloadavg()[0])


def _predicted_gib(last: dict, batch: int) -> float:
  power = 1 if last["loss_tile"] else 2
  return last["temp_mib"] * (batch / last["batch"]) ** power / 1024


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--batches", default="1024,2048,4096,8192,16384")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--micro_batch", type=int, default=256)
  parser.add_argument("--tile", type=int, default=1024)
  parser.add_argument("--rec_loss", default="sampled", choices=("sampled", "full"))
  parser.add_argument("--history_len", type=int, default=0,
                      help="user history length (0: the tiny config's)")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--max_gib", type=float, default=8.0)
  parser.add_argument("--out", default="")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--method", default="", help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(_point(args)))
    return

  records = []
  print("| B | method | XLA temp MiB | peak RSS GiB | step s | examples/s | compile s | load |")
  print("|---|---|---|---|---|---|---|---|")
  for method in args.methods.split(","):
    last = None
    for batch in (int(b) for b in args.batches.split(",")):
      if last is not None and _predicted_gib(last, batch) > args.max_gib:
        print(f"| {batch:,} | {method} | stopped: predicted {_predicted_gib(last, batch):.1f} "
              f"GiB of temporaries > --max_gib {args.max_gib} | | | | | |", flush=True)
        break
      cmd = [sys.executable, os.path.abspath(__file__), "--child", "--method", method,
             "--batch", str(batch), "--micro_batch", str(args.micro_batch), "--tile",
             str(args.tile), "--rec_loss", args.rec_loss, "--repeats", str(args.repeats),
             "--history_len", str(args.history_len)]
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if proc.returncode:
        raise SystemExit(f"point {method} B={batch} failed:\n{proc.stderr[-3000:]}")
      last = json.loads(proc.stdout.strip().splitlines()[-1])
      records.append(last)
      print(f"| {batch:,} | {method} | {last['temp_mib']:.0f} | {last['peak_rss_gib']:.2f} | "
            f"{last['step_s']:.2f} | {last['examples_per_s']:.0f} | {last['compile_s']:.0f} | "
            f"{last['load']:.1f} |", flush=True)
      if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
          f.write(json.dumps(last) + "\n")


if __name__ == "__main__":
  main()
