"""Grain input pipeline over training examples, and global-batch assembly for a mesh.

Pipeline (per process)::

  range(num batches) -> example ids of the batch (this process's block of the global batch:
  consecutive positions of a global, per-epoch permutation; same seed on every process) ->
  gather the batch from the TrainExampleIndex in one vectorised call -> to_iter_dataset ->
  optional multiprocess prefetch

Global batch ``n`` is positions ``n * G .. (n + 1) * G - 1`` of the stream of epochs (each a
permutation of all examples), ``G`` = local batch size x process count; process ``p`` reads its
``p``-th block of ``G / P`` rows. So the processes together see every example exactly once per
epoch and all yield the same number of batches; and where the mesh holds each process's devices
together in process order (``sharding.make_mesh`` on CPU processes), ``make_global_batch`` puts
block ``p`` at rows ``p * G / P ..``: the global batches, rows in order, do not depend on the
process count, and P processes train on exactly the batches one process would
(tests/test_multiprocess.py). Per-user rows (``example`` cloze / next) too: each row's random
choices are keyed by the seed, its user and its epoch (``examples.make_user_batch``), never by
the rest of the block (tests/test_pipeline.py).

Checkpointing: the returned ``grain.DatasetIterator`` has ``get_state``/``set_state`` (JSON-able
dicts). With Orbax, save it next to the model (``checkpointing.Checkpointer`` does)::

  manager.save(step, args=ocp.args.Composite(
      state=..., data=grain.checkpoint.CheckpointSave(iterator)))
  manager.restore(step, args=ocp.args.Composite(
      state=..., data=grain.checkpoint.CheckpointRestore(iterator)))

Every process must build the pipeline with the same ``seed``. The iterator carries its
``StreamSpec`` (global batch, seed, examples per epoch, its process), and
``checkpointing.DataCheckpointHandler`` saves the global position (``stream_record``) next to
the per-process states, so a checkpoint restores onto another process count
(``resume_batch``, ``seek``).
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from typing import Any

from absl import flags
import grain
from grain._src.python.dataset import dataset as grain_dataset
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from recfusion_jax.data.examples import (EXAMPLE_KINDS, TrainBatchFn, TrainExampleIndex,
                                         UserBatchFn, item_log_q, trained_users)
from recfusion_jax.data.types import RecDataset
from recfusion_jax.sharding import DATA_AXES


class _BatchExampleIds:
  """Batch number -> the example ids of that batch in this process's stream (picklable).

  The global stream is, epoch after epoch, that epoch's permutation of ``range(num_examples)``;
  batch ``n`` of process ``p`` of ``P`` is its positions ``(n * P + p) * batch_size + [0,
  batch_size)``. Slots past the end of a finite run are -1.
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int, process_index: int,
               process_count: int, num_epochs: int | None, with_epochs: bool = False):
    self.with_epochs = with_epochs
    self.num_examples = num_examples
    self.batch_size = batch_size
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.stream_len = None if num_epochs is None else num_epochs * num_examples
    self._init_cache()

  def _init_cache(self):
    self._lock = threading.Lock()
    self._cache: dict[int, np.ndarray] = {}

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    del state["_lock"], state["_cache"]
    return state

  def __setstate__(self, state: dict[str, Any]):
    self.__dict__.update(state)
    self._init_cache()

  def num_batches(self) -> int:
    if self.stream_len is None:
      return sys.maxsize
    return -(-self.stream_len // (self.batch_size * self.process_count))

  def _permutation(self, epoch: int) -> np.ndarray:
    # Consecutive batches reuse the current (and, across a boundary, the previous) epoch.
    with self._lock:
      perm = self._cache.get(epoch)
      if perm is None:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        if len(self._cache) >= 2:
          del self._cache[min(self._cache)]
        self._cache[epoch] = perm
      return perm

  def __call__(self, batch_number: int) -> np.ndarray:
    block = int(batch_number) * self.process_count + self.process_index
    position = block * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
    valid = np.ones(self.batch_size, dtype=bool)
    if self.stream_len is not None:
      valid = position < self.stream_len
    epoch, offset = np.divmod(position, self.num_examples)
    out = np.full(self.batch_size, -1, dtype=np.int64)
    for e in np.unique(epoch[valid]):
      rows = valid & (epoch == e)
      out[rows] = self._permutation(int(e))[offset[rows]]
    return np.stack([out, epoch]) if self.with_epochs else out


def _resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if (process_index is None) != (process_count is None):
    raise ValueError("pass both process_index and process_count, or neither")
  if process_index is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"bad process_index={process_index} / process_count={process_count}")
  return process_index, process_count


def example_id_batches(num_examples: int, batch_size: int, *, seed: int,
                       num_epochs: int | None = None, process_index: int | None = None,
                       process_count: int | None = None,
                       with_epochs: bool = False) -> grain.MapDataset:
  """This process's batches of example ids: [batch_size] int64 arrays, -1 marks padding
  (``with_epochs``: [2, batch_size], the ids and each row's epoch).

  Each epoch is a fresh permutation (seeded by ``seed`` and the epoch number); batches run
  across epoch boundaries, and only the last batch of a finite run has trailing padding.
  Computed per batch with numpy: grain's per-element shuffle/slice/batch path costs many
  times more per example than gathering the batch itself.
  """
  if num_examples < 1:
    raise ValueError(f"num_examples must be >= 1, got {num_examples}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  process_index, process_count = _resolve_process(process_index, process_count)
  ids_of = _BatchExampleIds(num_examples, batch_size, seed, process_index, process_count,
                            num_epochs, with_epochs)
  return grain.MapDataset.range(ids_of.num_batches()).map(ids_of)


def examples_per_epoch(index: TrainExampleIndex, example: str = "interaction") -> int:
  """Rows of one epoch: every train interaction, or every trained user for per-user rows."""
  return index.num_examples if example == "interaction" else int(trained_users(index).size)


def epochs(steps: int, batch_size: int, per_epoch: int, digits: int = 3) -> float:
  """The epochs ``steps`` batches of ``batch_size`` rows cover (``per_epoch`` rows an epoch,
  ``examples_per_epoch``), rounded to ``digits`` decimals as the logs show them."""
  return round(steps * batch_size / per_epoch, digits)


def make_train_dataset(dataset: RecDataset, *, batch_size: int, history_len: int, seed: int,
                       num_epochs: int | None = None, process_index: int | None = None,
                       process_count: int | None = None,
                       index: TrainExampleIndex | None = None,
                       log_q: np.ndarray | None = None,
                       history: str = "earlier", example: str = "interaction",
                       target_share: float = 0.2, next_positions: int = 0,
                       next_window: str = "latest") -> grain.MapDataset:
  """A MapDataset of this process's training batches (dicts with TRAIN_BATCH_SPEC keys).

  ``batch_size`` is the per-process batch size. ``index``/``log_q`` default to being built
  from ``dataset``. ``example`` is one of ``examples.EXAMPLE_KINDS``: one train interaction per
  row (an epoch visits every interaction), or one user per row with several targets (an epoch
  visits every user; see ``examples.make_user_batch``).
  """
  index = TrainExampleIndex.build(dataset) if index is None else index
  log_q = item_log_q(dataset) if log_q is None else log_q
  if example == "interaction":
    ids = example_id_batches(index.num_examples, batch_size, seed=seed, num_epochs=num_epochs,
                             process_index=process_index, process_count=process_count)
    return ids.map(TrainBatchFn(dataset, index, history_len, log_q, batch_size, history))
  if example not in EXAMPLE_KINDS:
    raise ValueError(f"data.example={example!r}; choose from {EXAMPLE_KINDS}")
  users = trained_users(index)
  # Each row's epoch keys its random choices (examples.make_user_batch), so they do not
  # depend on which process builds the row.
  ids = example_id_batches(users.size, batch_size, seed=seed, num_epochs=num_epochs,
                           process_index=process_index, process_count=process_count,
                           with_epochs=True)
  return ids.map(UserBatchFn(dataset, index, users, history_len=history_len, log_q=log_q,
                             batch_size=batch_size, kind=example, target_share=target_share,
                             seed=seed, next_positions=next_positions,
                             next_window=next_window))


def make_train_iterator(dataset: RecDataset, *, batch_size: int, history_len: int, seed: int,
                        num_epochs: int | None = None, num_workers: int = 0,
                        worker_buffer_size: int = 2, read_threads: int = 1,
                        read_buffer_size: int = 4, process_index: int | None = None,
                        process_count: int | None = None,
                        index: TrainExampleIndex | None = None,
                        log_q: np.ndarray | None = None,
                        history: str = "earlier", example: str = "interaction",
                        target_share: float = 0.2, next_positions: int = 0,
                        next_window: str = "latest") -> grain.DatasetIterator:
  """A checkpointable iterator of this process's training batches (``stream_spec`` reads
  what it streams).

  ``num_workers`` > 0 builds batches in that many spawned processes (``mp_prefetch``);
  0 builds them in this process with ``read_threads`` threads. Buffers count batches.
  """
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}")
  process_index, process_count = _resolve_process(process_index, process_count)
  index = TrainExampleIndex.build(dataset) if index is None else index
  ds = make_train_dataset(dataset, batch_size=batch_size, history_len=history_len, seed=seed,
                          num_epochs=num_epochs, process_index=process_index,
                          process_count=process_count, index=index, log_q=log_q,
                          history=history, example=example, target_share=target_share,
                          next_positions=next_positions, next_window=next_window)
  # Small buffers: a batch with video is ~1 MB at default sizes, the default 500 is too many.
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                               prefetch_buffer_size=read_buffer_size))
  if num_workers > 0:
    # grain 0.2.18 reads an absl flag in mp_prefetch and fails in scripts that never parsed
    # flags (google/grain#1355, fixed upstream by #1362). Flags already parsed (absl.app) are
    # left alone; otherwise every flag keeps its default.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=worker_buffer_size))
  iterator = iter(it_ds)
  setattr(iterator, _SPEC_ATTR, StreamSpec(
      global_batch=batch_size * process_count, seed=seed,
      num_examples=examples_per_epoch(index, example), process_index=process_index,
      process_count=process_count))
  return iterator


def train_iterator_from_config(config: Any, dataset: RecDataset, *,
                               num_workers: int | None = None,
                               index: TrainExampleIndex | None = None,
                               log_q: np.ndarray | None = None) -> grain.DatasetIterator:
  """``make_train_iterator`` with the settings of ``config.data`` / ``config.model.user``: the
  one place the train loop, the valid curve and the pipeline benchmark read them from.
  ``num_workers`` defaults to ``config.data.num_workers``; the batch is this process's share
  of ``config.batch_size``."""
  data = config.data
  return make_train_iterator(
      dataset, batch_size=config.batch_size // jax.process_count(),
      history_len=config.model.user.history_len, seed=config.seed,
      num_workers=data.get("num_workers", 0) if num_workers is None else num_workers,
      index=index, log_q=log_q, history=data.get("history", "earlier"),
      example=data.get("example", "interaction"), target_share=data.get("target_share", 0.2),
      next_positions=data.get("next_positions", 0),
      next_window=data.get("next_window", "latest"))


# ---- the global position, across process counts ------------------------------------------------

_SPEC_ATTR = "recfusion_stream_spec"
_STREAM_FIELDS = ("global_batch", "seed", "num_examples")


@dataclasses.dataclass(frozen=True)
class StreamSpec:
  """What global batch ``n`` holds (``global_batch``, ``seed``, ``num_examples`` an epoch) and
  which block of it this process reads. Equal stream fields: equal global batches, whatever
  the process count."""

  global_batch: int
  seed: int
  num_examples: int
  process_index: int
  process_count: int


def stream_spec(iterator: Any) -> StreamSpec | None:
  """The ``StreamSpec`` of a ``make_train_iterator`` iterator (None for other iterators)."""
  return getattr(iterator, _SPEC_ATTR, None)


def batches_read(iterator: grain.DatasetIterator) -> int:
  """Batches this process's iterator has returned: the global batches consumed (every process
  reads one block of each)."""
  state = iterator.get_state()
  if set(state) == {"next_index"}:
    return int(state["next_index"])
  return int(grain_dataset.get_next_index(iterator))   # worker processes (mp_prefetch)


def stream_record(iterator: grain.DatasetIterator) -> dict[str, int] | None:
  """The global position as JSON: global batches read and the stream they index (None when
  the iterator has no ``StreamSpec``). Its position in examples is
  ``batches * global_batch``, the same on every process."""
  spec = stream_spec(iterator)
  if spec is None:
    return None
  return {"batches": batches_read(iterator), "process_count": spec.process_count,
          **{name: getattr(spec, name) for name in _STREAM_FIELDS}}


def resume_batch(record: dict[str, int], spec: StreamSpec) -> tuple[int, str | None]:
  """The global batch at which ``spec``'s iterator resumes a saved ``stream_record``.

  Same global batch, seed and examples per epoch: ``(record["batches"], None)``, the exact
  position, whatever the process counts. Otherwise the saved position cannot be carried over
  and the rule is: restart the epoch it lies in, ``e = batches * old global_batch // old
  num_examples``, at the new stream's global batch that holds the epoch's first example,
  ``e * num_examples // global_batch`` (a few rows of epoch ``e - 1`` come again before it);
  the second item says why.
  """
  batches = int(record["batches"])
  if all(int(record[name]) == getattr(spec, name) for name in _STREAM_FIELDS):
    return batches, None
  epoch = batches * int(record["global_batch"]) // int(record["num_examples"])
  start = epoch * spec.num_examples // spec.global_batch
  changed = ", ".join(f"{name} {record[name]} -> {getattr(spec, name)}"
                      for name in _STREAM_FIELDS if int(record[name]) != getattr(spec, name))
  return start, (f"the data stream changed since the checkpoint ({changed}), so its position "
                 f"({batches} global batches) does not carry over: restarting epoch {epoch} "
                 f"at global batch {start}, the one holding the epoch's first example")


def seek(iterator: grain.DatasetIterator, batch: int) -> None:
  """Moves the iterator to global batch ``batch`` (its block of it)."""
  if set(iterator.get_state()) == {"next_index"}:
    iterator.set_state({"next_index": int(batch)})
  else:
    grain_dataset.set_next_index(iterator, int(batch))   # worker processes (mp_prefetch)


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh,
                      batch_axes: tuple[str, ...] | str = DATA_AXES
                      ) -> dict[str, jax.Array]:
  """Assembles global arrays from each process's local batch.

  The leading (batch) dimension is split over ``batch_axes`` of ``mesh`` (all of them
  together), the other dimensions are replicated. The global batch is the concatenation of
  the processes' local batches in process order.
  """
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  missing = [axis for axis in axes if axis not in mesh.axis_names]
  if missing:
    raise ValueError(f"batch axes {missing} are not mesh axes {mesh.axis_names}")
  shards = int(np.prod([mesh.shape[axis] for axis in axes]))
  sharding = NamedSharding(mesh, PartitionSpec(axes))
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    global_rows = value.shape[0] * jax.process_count() if value.ndim else 0
    if value.ndim == 0 or global_rows % shards:
      raise ValueError(f"{key}: global batch {global_rows} (local shape {value.shape}) is not "
                       f"divisible by the {shards} shards of mesh axes {axes}")
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
