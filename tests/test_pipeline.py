"""Tests of the Grain training pipeline and global-batch assembly."""

import json

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

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


@pytest.mark.parametrize("example", ["cloze", "next"])
def test_user_batches_visit_every_user_and_resume_exactly(small, example):
  iterator = _iterator(small, example=example, target_share=0.3)
  users = examples.trained_users(examples.TrainExampleIndex.build(small))
  epoch = -(-len(users) // BATCH)
  seen = np.concatenate([b["user_id"][b["example_mask"]] for b in _take(iterator, epoch)])
  # Batches run on across epoch boundaries: the first len(users) rows are one epoch.
  np.testing.assert_array_equal(np.sort(seen[:len(users)]), users)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, 3)
  fresh = _iterator(small, example=example, target_share=0.3)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 3), expected)


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
