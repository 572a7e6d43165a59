r"""Temporary memory of one train step: one-shot against gradient caching (``micro_batch``).

For each global batch B the tiny config's train step (``configs/tiny.py``, full tiny sizes,
rec_loss ``--rec_loss``) is lowered on abstract batch shapes and compiled for one CPU device,
once one-shot (``micro_batch=0``) and once with ``--micro_batch``; XLA's ``memory_analysis``
gives the bytes of temporaries (activations, gradients in flight, the [B, B] logits), which is
what grows with the batch -- the arguments (state, batch) and outputs are the same for both.
Nothing runs, so the numbers are XLA's plan, not a measured peak.

  nice -n 10 python perf/gradcache_memory.py
  python perf/gradcache_memory.py --batches 256,1024 --micro_batch 128 --rec_loss full
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from configs import tiny  # noqa: E402
from recfusion_jax import train  # noqa: E402
from recfusion_jax.models.recfusion import RecFusion  # noqa: E402
from tests.helpers import random_batch  # noqa: E402

_MIB = 2.0**20


def _abstract_batch(config, batch_size: int, num_users: int, num_items: int) -> dict:
  example = random_batch(config, 2, num_users, num_items)
  return {k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype)
          for k, v in example.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", default="256,512,1024,2048,4096")
  parser.add_argument("--micro_batch", type=int, default=64)
  parser.add_argument("--rec_loss", default="sampled", choices=("sampled", "full"))
  args = parser.parse_args()

  config = tiny.get_config()
  synthetic = config.data.synthetic
  model = RecFusion(config.model, num_users=synthetic.num_users,
                    num_items=synthetic.num_items, rngs=nnx.Rngs(0))
  tx, schedule = train.make_optimizer(config, config.num_steps)
  graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  print(f"tiny config: embed {config.model.embed_dim}, encoder width "
        f"{config.model.encoder.width} x depth {config.model.encoder.depth}, modalities "
        f"{tuple(config.model.modalities)}, rec_loss {args.rec_loss}, micro_batch "
        f"{args.micro_batch}; XLA temp MiB of one compiled step (one CPU device)")
  print("| B | one-shot temp MiB | gradcache temp MiB | ratio | compile s (one-shot, gc) |")
  print("|---|---|---|---|---|")
  for batch_size in (int(b) for b in args.batches.split(",")):
    batch = _abstract_batch(config, batch_size, synthetic.num_users, synthetic.num_items)
    temps, seconds = [], []
    for micro_batch in (0, args.micro_batch):
      step = functools.partial(train.train_step, graphdef,
                               contrastive_weight=config.contrastive_weight, schedule=schedule,
                               full_catalogue=args.rec_loss == "full", micro_batch=micro_batch)
      tick = time.perf_counter()
      compiled = jax.jit(step).lower(state, batch).compile()
      seconds.append(time.perf_counter() - tick)
      temps.append(compiled.memory_analysis().temp_size_in_bytes / _MIB)
    print(f"| {batch_size} | {temps[0]:.1f} | {temps[1]:.1f} | {temps[0] / temps[1]:.1f}x | "
          f"{seconds[0]:.0f}, {seconds[1]:.0f} |", flush=True)


if __name__ == "__main__":
  main()
