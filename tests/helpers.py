"""Shared test fixtures: a tiny config, random batches that follow the data contract, and a
leaf-by-leaf comparison of two states."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

from absl import flags
import jax
import numpy as np

from configs import tiny
from recfusion_jax import sharding


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


def cyclic_walks(num_users: int, num_items: int, length: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(users, items, last) of timelines in which every user walks the catalogue cyclically
  (item i followed by i + 1 mod N) for ``length + 1`` steps from a random start; ``last`` marks
  each user's final step (the next item only an order-aware model names)."""
  rng = np.random.default_rng(seed)
  users, items = [], []
  for u in range(num_users):
    start = rng.integers(num_items)
    users += [u] * (length + 1)
    items += [(start + t) % num_items for t in range(length + 1)]
  users, items = np.asarray(users, np.int32), np.asarray(items, np.int32)
  return users, items, np.r_[users[1:] != users[:-1], True]


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


class StateComparison(NamedTuple):
  """What ``assert_states_close`` compared: all leaves, the floating ones, the bitwise-equal
  ones."""

  leaves: int
  floats: int
  bitwise: int


def assert_states_close(a: Any, b: Any, *, rtol: float = 0.0, atol: float = 0.0,
                        check: Callable[[np.ndarray, np.ndarray, str], None] | None = None
                        ) -> StateComparison:
  """Asserts that two states (any pytrees of the same structure: nnx states, gradients) hold
  the same leaves: the same dtype and shape, floating values close, everything else (integer
  counts, RNG keys by their key data) equal. ``check(x, y, name)`` replaces the default
  float test, ``np.testing.assert_allclose`` with ``rtol`` and ``atol``. The counts come back so
  a test can check that the comparison covered enough."""
  flat_a = jax.tree_util.tree_flatten_with_path(jax.device_get(a))[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(b))[0])
  assert len(flat_a) == len(flat_b), (len(flat_a), len(flat_b))
  floats = bitwise = 0
  for path, x in flat_a:
    y, name = flat_b[path], sharding.path_name(path)
    if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, (name, x.dtype, x.shape, y.dtype, y.shape)
    bitwise += np.array_equal(x, y)
    if x.dtype.kind == "f":
      if check is None:
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=name)
      else:
        check(x, y, name)
      floats += 1
    else:
      np.testing.assert_array_equal(x, y, err_msg=name)
  return StateComparison(len(flat_a), floats, bitwise)
