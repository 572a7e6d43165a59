"""Tests of the Grain training pipeline and global-batch assembly."""

import json
import logging

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from recfusion_jax import checkpointing
from recfusion_jax.data.synthetic import make_synthetic
from recfusion_jax.data import examples, pipeline
from recfusion_jax.data.types import MODALITIES, PER_USER_KEYS, TRAIN_BATCH_SPEC, feature_key

OPTIONAL_KEYS = set(PER_USER_KEYS) | {feature_key(m) for m in MODALITIES}

HISTORY_LEN = 5
BATCH = 16


@pytest.fixture(scope="module")
def small():
  # ~200 train examples: an epoch is ~13 batches, so tests cross epoch boundaries.
  return make_synthetic(num_items=80, num_users=20, num_topics=4, min_interactions=8,
                        max_interactions=14, seed=2)


def _iterator(dataset, **kwargs):
  kwargs = {"batch_size": BATCH, "history_len": HISTORY_LEN, "seed": 11, **kwargs}
  return pipeline.make_train_iterator(dataset, **kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y)
    assert set(x) - OPTIONAL_KEYS == set(TRAIN_BATCH_SPEC) - OPTIONAL_KEYS
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batches_follow_contract_and_gather(small):
  index = examples.TrainExampleIndex.build(small)
  log_q = examples.item_log_q(small)
  ids = pipeline.example_id_batches(index.num_examples, BATCH, seed=11, process_index=0,
                                    process_count=1)
  batches = _take(_iterator(small), 3)
  for i, batch in enumerate(batches):
    expected = examples.make_train_batch(small, index, ids[i], HISTORY_LEN, log_q, BATCH)
    _assert_batches_equal([batch], [expected])
    for key, (dtype, _) in TRAIN_BATCH_SPEC.items():
      if key in OPTIONAL_KEYS:
        continue
      assert batch[key].dtype == np.dtype(dtype) and batch[key].shape[0] == BATCH


@pytest.mark.parametrize("skip", [5, 13, 20])  # mid-epoch, around and after a boundary
def test_checkpoint_restore_resumes_exactly(small, skip):
  iterator = _iterator(small)
  _take(iterator, skip)
  state = json.loads(json.dumps(iterator.get_state()))  # must be JSON-able
  expected = _take(iterator, 4)
  fresh = _iterator(small)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 4), expected)


# Per-user row kinds: (data.example, data.next_positions, data.next_window).
USER_ROWS = {"cloze": ("cloze", 0, "latest"), "next": ("next", 0, "latest"),
             "next_sampled": ("next", 2, "latest"), "next_random_window": ("next", 2, "random")}


def _user_rows(kind):
  example, next_positions, next_window = USER_ROWS[kind]
  return dict(example=example, next_positions=next_positions, next_window=next_window,
              target_share=0.3)


@pytest.mark.parametrize("example", list(USER_ROWS))
def test_user_batches_visit_every_user_and_resume_exactly(small, example):
  iterator = _iterator(small, **_user_rows(example))
  users = examples.trained_users(examples.TrainExampleIndex.build(small))
  epoch = -(-len(users) // BATCH)
  seen = np.concatenate([b["user_id"][b["example_mask"]] for b in _take(iterator, epoch)])
  # Batches run on across epoch boundaries: the first len(users) rows are one epoch.
  np.testing.assert_array_equal(np.sort(seen[:len(users)]), users)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, 3)
  fresh = _iterator(small, **_user_rows(example))
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 3), expected)


@pytest.mark.parametrize("example", list(USER_ROWS))
def test_user_batches_do_not_depend_on_the_process_count(small, example):
  # Two processes, each building its half of every global batch, give the rows one process
  # builds, random hold-outs included (keyed by user and epoch, not by the block), across
  # epoch boundaries; and a user's hidden items change from one epoch to the next.
  kwargs = _user_rows(example)
  whole = _take(_iterator(small, batch_size=2 * BATCH, process_index=0, process_count=1,
                          **kwargs), 4)
  halves = [_take(_iterator(small, process_index=p, process_count=2, **kwargs), 4)
            for p in range(2)]
  for batch, first, second in zip(whole, *halves):
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), batch[key],
                                    err_msg=key)
  if example != "next":   # the random choices: hidden items, or the transitions kept
    users = examples.trained_users(examples.TrainExampleIndex.build(small))
    rows = np.concatenate([b["user_id"][b["example_mask"]] for b in whole])
    drawn = {"cloze": "target_mask", "next_sampled": "target_positions",
             "next_random_window": "history"}[example]
    hidden = np.concatenate([b[drawn][b["example_mask"]] for b in whole])
    first_epoch, second_epoch = hidden[:len(users)], hidden[len(users):2 * len(users)]
    order = np.argsort(rows[:len(users)]), np.argsort(rows[len(users):2 * len(users)])
    assert not np.array_equal(first_epoch[order[0]], second_epoch[order[1]])


def test_orbax_checkpoint_roundtrip(small, tmp_path):
  iterator = _iterator(small)
  _take(iterator, 7)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = _take(iterator, 3)
  fresh = _iterator(small)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    restored = manager.restore(
        7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_batches_equal(_take(restored["data"], 3), expected)


def test_worker_processes_give_the_same_stream_and_resume(small):
  expected = _take(_iterator(small), 8)
  iterator = _iterator(small, num_workers=1)
  try:
    got = _take(iterator, 5)
    state = iterator.get_state()
    assert pipeline.batches_read(iterator) == 5   # the global position of worker states
  finally:
    iterator.close()
  _assert_batches_equal(got, expected[:5])
  resumed = _iterator(small, num_workers=1)
  try:
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 3), expected[5:])
  finally:
    resumed.close()


@pytest.mark.parametrize("num_examples,process_count", [(203, 2), (200, 2), (50, 3)])
def test_processes_split_each_epoch_exactly(num_examples, process_count):
  num_epochs = 3
  per_process = []
  for p in range(process_count):
    batches = list(pipeline.example_id_batches(num_examples, BATCH, seed=5,
                                               num_epochs=num_epochs, process_index=p,
                                               process_count=process_count))
    assert all(b.shape == (BATCH,) for b in batches)
    per_process.append(batches)
  # Same number of steps on every process, or multi-host training would hang.
  assert len({len(batches) for batches in per_process}) == 1
  # The global batches (process blocks in process order) are one process's batches of
  # process_count times the rows: the stream does not depend on the process count.
  stream = np.concatenate([np.concatenate(blocks) for blocks in zip(*per_process)])
  single = np.concatenate(list(pipeline.example_id_batches(
      num_examples, BATCH * process_count, seed=5, num_epochs=num_epochs, process_index=0,
      process_count=1)))
  np.testing.assert_array_equal(stream, single)
  epochs = [stream[e * num_examples:(e + 1) * num_examples] for e in range(num_epochs)]
  for seen in epochs:
    np.testing.assert_array_equal(np.sort(seen), np.arange(num_examples))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
  # Only the tail of the last global batch is padding.
  tail = stream[num_epochs * num_examples:]
  assert tail.size < BATCH * process_count and (tail == -1).all()


# ---- iterator state across process counts (checkpointing.DataCheckpointHandler) --------------

def _global_batches(dataset, global_batch, count, n, move, seed=11):
  """The next ``n`` global batches read by ``count`` processes (each one's block, in process
  order) after ``move(iterator, p)`` positioned each process's iterator."""
  per_process = []
  for p in range(count):
    iterator = _iterator(dataset, batch_size=global_batch // count, process_index=p,
                         process_count=count, seed=seed)
    move(iterator, p)
    per_process.append(_take(iterator, n))
  return [{key: np.concatenate([block[key] for block in blocks]) for key in blocks[0]}
          for blocks in zip(*per_process)]


def _save_processes(dataset, directory, global_batch, count, batches):
  """What ``count`` processes' ``DataCheckpointHandler`` saves after ``batches`` global batches."""
  directory.mkdir()
  handler = checkpointing.DataCheckpointHandler()
  for p in range(count):
    iterator = _iterator(dataset, batch_size=global_batch // count, process_index=p,
                         process_count=count)
    _take(iterator, batches)
    handler.save(directory, args=checkpointing.DataSave(iterator))


def _restore(directory):
  handler = checkpointing.DataCheckpointHandler()
  return lambda iterator, p: handler.restore(directory, args=checkpointing.DataRestore(iterator))


@pytest.mark.parametrize("new_count", [1, 4])
def test_iterator_state_restores_onto_another_process_count(small, tmp_path, new_count):
  global_batch, saved_at = 2 * BATCH, 7    # ~200 examples an epoch: 7 batches cross epoch 1
  _save_processes(small, tmp_path / "data", global_batch, 2, saved_at)
  assert sorted(f.name for f in (tmp_path / "data").iterdir()) == [
      "process_0-of-2.json", "process_1-of-2.json", checkpointing.STREAM_FILE]
  expected = _global_batches(small, global_batch, 1, 4, move=lambda it, p: _take(it, saved_at))
  got = _global_batches(small, global_batch, new_count, 4, move=_restore(tmp_path / "data"))
  _assert_batches_equal(got, expected)


def test_changed_global_batch_restarts_the_epoch_on_any_process_count(small, tmp_path, caplog):
  saved_at, new_batch = 9, 3 * BATCH
  _save_processes(small, tmp_path / "data", 2 * BATCH, 2, saved_at)
  per_epoch = examples.TrainExampleIndex.build(small).num_examples
  epoch = saved_at * 2 * BATCH // per_epoch
  start = epoch * per_epoch // new_batch
  assert epoch >= 1 and start * new_batch <= epoch * per_epoch < (start + 1) * new_batch
  expected = _global_batches(small, new_batch, 1, 3, move=lambda it, p: _take(it, start))
  for count in (1, 3):
    with caplog.at_level(logging.WARNING):
      got = _global_batches(small, new_batch, count, 3, move=_restore(tmp_path / "data"))
    _assert_batches_equal(got, expected)
    assert f"global_batch {2 * BATCH} -> {new_batch}" in caplog.text
    assert f"restarting epoch {epoch} at global batch {start}" in caplog.text
    caplog.clear()


def test_state_without_global_position_says_why_it_cannot_move(small, tmp_path):
  _save_processes(small, tmp_path / "data", 2 * BATCH, 2, 3)
  (tmp_path / "data" / checkpointing.STREAM_FILE).unlink()
  with pytest.raises(ValueError, match="no stream.json .* cannot be restored onto 1 process"):
    _global_batches(small, 2 * BATCH, 1, 1, move=_restore(tmp_path / "data"))
  # On the process count that wrote it, Grain's per-process state still restores exactly.
  _assert_batches_equal(
      _global_batches(small, 2 * BATCH, 2, 2, move=_restore(tmp_path / "data")),
      _global_batches(small, 2 * BATCH, 1, 2, move=lambda it, p: _take(it, 3)))


def test_checkpointer_restores_iterator_written_by_another_process_count(small, tmp_path):
  """Through Orbax: process 0 of 2 saves (its file and stream.json), 1 process restores."""
  iterator = _iterator(small, process_index=0, process_count=2)
  _take(iterator, 5)
  state = {"w": jax.numpy.arange(4.0)}
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", save_every=1, keep=2, async_save=False)
  ckpt.save(5, state, iterator)
  ckpt.wait()
  fresh = _iterator(small, batch_size=2 * BATCH, process_index=0, process_count=1)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  restored = ckpt.restore(checkpointing.abstract_like(state, shardings), fresh)
  ckpt.close()
  assert restored.step == 5
  reference = _iterator(small, batch_size=2 * BATCH, process_index=0, process_count=1)
  _take(reference, 5)
  _assert_batches_equal(_take(fresh, 2), _take(reference, 2))


def test_infinite_stream_and_argument_errors():
  ids = pipeline.example_id_batches(10, 4, seed=0, process_index=0, process_count=1)
  assert len(ids) > 10**12
  np.testing.assert_array_equal(np.sort(np.concatenate([ids[i] for i in range(5)])),
                                np.sort(np.r_[np.arange(10), np.arange(10)]))
  with pytest.raises(ValueError, match="process_index"):
    pipeline.example_id_batches(10, 4, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="both"):
    pipeline.example_id_batches(10, 4, seed=0, process_index=0)
  with pytest.raises(ValueError, match="num_epochs"):
    pipeline.example_id_batches(10, 4, seed=0, num_epochs=0)


def test_make_global_batch_on_8_devices(small):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
  local = next(_iterator(small))
  global_batch = pipeline.make_global_batch(local, mesh)
  assert set(global_batch) == set(local)
  for key, value in global_batch.items():
    assert value.shape == local[key].shape and value.dtype == local[key].dtype
    assert value.sharding == NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    shard_rows = {s.data.shape[0] for s in value.addressable_shards}
    assert shard_rows == {BATCH // 8}, key
    np.testing.assert_array_equal(np.asarray(value), local[key])
  # Only over 'data': each row block is replicated over 'fsdp'.
  data_only = pipeline.make_global_batch(local, mesh, batch_axes=("data",))
  assert {s.data.shape[0] for s in data_only["image"].addressable_shards} == {BATCH // 4}


def test_make_global_batch_errors(small):
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
  with pytest.raises(ValueError, match="not mesh axes"):
    pipeline.make_global_batch({"x": np.zeros(8)}, mesh, batch_axes=("data", "model"))
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_global_batch({"x": np.zeros(12)}, mesh)
