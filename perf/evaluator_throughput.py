"""Throughput of the full-ranking evaluator: user x item scores per second, top-k included.

Synthetic dot-product problem (score_fn = user_block @ items.T), default 100,000 users x
50,000 items x 64-d, 20 excluded and 5 relevant items per user. Timing covers the whole
``evaluate_full_ranking`` call (host blocking, transfers, scoring, exclusion scatter, top-k,
metrics) after one warm-up call on a single block compiles the jitted step.

  python perf/evaluator_throughput.py                       # full size
  python perf/evaluator_throughput.py --users 10000         # smaller, for a laptop
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from recfusion_jax.evaluate import evaluate_full_ranking  # noqa: E402


def dot_score(user_block: jax.Array, item_table: jax.Array) -> jax.Array:
  return user_block @ item_table.T


def _random_ids(rng: np.random.Generator, rows: int, width: int, num_items: int) -> np.ndarray:
  # Duplicates within a row are possible and harmless here (exclusion and relevance dedupe).
  return rng.integers(0, num_items, size=(rows, width), dtype=np.int32)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--users", type=int, default=100_000)
  parser.add_argument("--items", type=int, default=50_000)
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--block-size", type=int, default=1024)
  parser.add_argument("--exclude", type=int, default=20, help="excluded items per user")
  parser.add_argument("--relevant", type=int, default=5, help="relevant items per user")
  parser.add_argument("--topk-chunk", type=int, default=None,
                      help="chunk length of the exact chunked top-k; 0 = plain lax.top_k, "
                           "default automatic")
  parser.add_argument("--repeats", type=int, default=1, help="timed runs; the best is kept")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  rng = np.random.default_rng(args.seed)
  users = rng.normal(size=(args.users, args.dim)).astype(np.float32)
  items = rng.normal(size=(args.items, args.dim)).astype(np.float32)
  exclude = _random_ids(rng, args.users, args.exclude, args.items)
  relevant = _random_ids(rng, args.users, args.relevant, args.items)

  def run(num_users: int) -> dict[str, float]:
    return evaluate_full_ranking(dot_score, users[:num_users], items, exclude[:num_users],
                                 relevant[:num_users], k=args.k, block_size=args.block_size,
                                 topk_chunk=args.topk_chunk)

  t0 = time.perf_counter()
  run(min(args.users, args.block_size))  # compiles the (only) block shape
  compile_s = time.perf_counter() - t0
  times, cpu_times = [], []
  for _ in range(args.repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    result = run(args.users)
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
  best = min(times)
  report = {
      "args": vars(args),
      "scores_per_s": args.users * args.items / best,
      "users_per_s": args.users / best,
      "seconds": best,
      "all_seconds": times,
      # CPU seconds of this process (all threads); on a shared machine wall time includes
      # waiting for cores, so this shows how much of the wall time was our own work.
      "cpu_seconds": cpu_times,
      "warmup_compile_s": compile_s,
      "metrics": result,
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": os.cpu_count(), "devices": [str(d) for d in jax.devices()],
                  "jax": jax.__version__},
  }
  print("command:", " ".join(sys.argv))
  print(json.dumps(report, indent=2))
  print(f"{report['scores_per_s']:.3e} user x item scores/s "
        f"({args.users} users x {args.items} items x {args.dim}-d, k={args.k}, "
        f"block={args.block_size}, {best:.2f} s)")


if __name__ == "__main__":
  main()
