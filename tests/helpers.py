"""Shared test fixtures: a tiny config and random batches that follow the data contract."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from absl import flags
import numpy as np

from configs import tiny


def run_absl_main(main: Callable[[list[str]], Any], argv: Sequence[str]) -> Any:
  """Calls an ``app.run`` main as its CLI would: flags parsed from ``argv``, reset afterwards."""
  argv = list(argv)
  try:
    return main(flags.FLAGS(argv))
  finally:
    flags.FLAGS.unparse_flags()


def tiny_config(**overrides):
  config = tiny.get_config()
  config.model.embed_dim = 16
  config.model.encoder.width = 16
  config.model.encoder.mlp_dim = 32
  config.model.encoder.depth = 1
  config.model.user.history_len = 6
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def random_batch(config, batch_size: int, num_users: int, num_items: int, seed: int = 0,
                 presence: np.ndarray | None = None) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  e = config.model.encoder
  hist = config.model.user.history_len
  b = batch_size
  items = rng.choice(num_items, size=b, replace=False) if b <= num_items else rng.integers(
      0, num_items, b)
  items[1] = items[0]  # an accidental hit: the same item twice in one batch
  return {
      "user_id": rng.integers(0, num_users, b).astype(np.int32),
      "user_has_id": rng.random(b) > 0.2,
      "history": rng.integers(0, num_items, (b, hist)).astype(np.int32),
      "history_mask": rng.random((b, hist)) > 0.3,
      "item_id": items.astype(np.int32),
      "item_has_id": rng.random(b) > 0.2,
      "log_q": np.log(rng.dirichlet(np.ones(num_items))[items] + 1e-6).astype(np.float32),
      "text_ids": rng.integers(1, e.text.vocab_size, (b, e.text.max_len)).astype(np.int32),
      "text_mask": np.arange(e.text.max_len)[None] < rng.integers(1, e.text.max_len + 1, (b, 1)),
      "image": rng.integers(0, 256, (b, e.image.size, e.image.size, 3)).astype(np.uint8),
      "video": rng.integers(0, 256, (b, e.video.frames, e.video.size, e.video.size, 3)
                            ).astype(np.uint8),
      "presence": rng.random((b, 3)) > 0.25 if presence is None else presence,
      "example_mask": np.arange(b) < b - 1,  # the last row is padding
  }
