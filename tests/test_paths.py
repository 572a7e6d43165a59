"""Run outputs and data through ``etils.epath``: a local folder and ``gs://`` alike.

Offline, ``gs://`` is served from memory (``fake_gcs``): epath's fsspec backend -- what epath
uses for gs:// without TensorFlow (or with EPATH_USE_TF=false), gcsfs then doing the I/O --
with fsspec's in-memory filesystem in gcsfs's place. Not covered here, because both need the
network: epath's TensorFlow (tf.io.gfile) backend, its default for gs:// when TensorFlow is
installed, and Orbax on gs:// (it asks google.cloud.storage about the bucket, and TensorStore
writes the arrays with its own GCS driver). So the Checkpointer is checked for the path it
hands Orbax and for moving unusable steps aside on gs://, not for a save + restore there
(tests/test_train_loop.py and tests/test_faults.py do those on a local disk); TensorBoard files
(clu, through tf.io.gfile) are not written to the fake bucket either.
"""

import os
from unittest import mock

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem

from recfusion_jax import checkpointing, paths, serving, writers
from recfusion_jax.benchmark import fit, report
from recfusion_jax.data import mmrec, splits

BUCKET = "gs://bucket"


class _MemoryGcs(MemoryFileSystem):
  """fsspec's in-memory filesystem keyed as gcsfs keys GCS: ``gs://b/x`` is ``b/x``; like
  gcsfs it opens mode "a" as "w" (GCS objects cannot be appended to)."""

  protocol = ("gs", "gcs")
  root_marker = ""

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return path.strip("/")

  def _open(self, path, mode="rb", **kwargs):
    return super()._open(path, mode.replace("a", "w"), **kwargs)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs:// paths read and write an empty in-memory store for the test's duration.

  Run from an empty folder that must stay empty: a path that lost its scheme on the way
  (``os.path.abspath("gs://b")``) would have made a local ``gs:`` folder there.
  """
  monkeypatch.chdir(tmp_path)
  fs = _MemoryGcs(skip_instance_cache=True)
  fs.store, fs.pseudo_dirs = {}, [""]   # this instance's own (the class holds shared ones)
  # epath picks tf.io.gfile for gs:// whenever TensorFlow is installed; the fsspec backend is
  # the one whose filesystem can be swapped.
  with mock.patch.object(gpath, "_is_tf_installed", lambda: False), \
       mock.patch.object(epath_backend.fsspec_backend, "fs", lambda path: fs):
    yield fs
  assert not os.listdir(tmp_path)


def test_resolve_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.resolve("gs://bucket/run")) == "gs://bucket/run"
  assert os.fspath(paths.resolve(epath.Path("gs://bucket/run/"))) == "gs://bucket/run"
  assert paths.resolve("run") == epath.Path(tmp_path / "run")
  assert paths.resolve(tmp_path / "a" / ".." / "b") == epath.Path(tmp_path / "b")


def test_append_text_keeps_earlier_rows_in_a_bucket_and_locally(fake_gcs, tmp_path):
  for path in (epath.Path(f"{BUCKET}/log.txt"), tmp_path / "log.txt"):
    paths.append_text(path, "a\n")
    paths.append_text(path, "b\n")
    assert path.read_text() == "a\nb\n"
    path.unlink()   # the fixture checks that tmp_path is left empty


def test_checkpointer_keeps_the_scheme_and_moves_steps_aside_in_the_bucket(fake_gcs):
  with mock.patch.object(checkpointing.ocp, "CheckpointManager") as manager:
    ckpt = checkpointing.Checkpointer(f"{BUCKET}/run/checkpoints", save_every=1, keep=1)
  assert os.fspath(ckpt.directory) == "gs://bucket/run/checkpoints"
  assert os.fspath(ckpt.corrupt_directory) == "gs://bucket/run/checkpoints.corrupt"
  assert os.fspath(manager.call_args.args[0]) == "gs://bucket/run/checkpoints"

  (ckpt.directory / "7").mkdir(parents=True)
  (ckpt.directory / "7" / "data").write_text("step 7")
  ckpt.corrupt_directory.mkdir(parents=True)
  (ckpt.corrupt_directory / "7").mkdir()   # moved aside before: the new one gets a suffix
  ckpt._move_aside([7])   # pylint: disable=protected-access
  assert not (ckpt.directory / "7").exists()
  assert (ckpt.corrupt_directory / "7.1" / "data").read_text() == "step 7"


def test_local_checkpointer_is_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ckpt = checkpointing.Checkpointer("run/checkpoints", save_every=1, keep=1, async_save=False)
  try:
    assert ckpt.directory == epath.Path(tmp_path / "run" / "checkpoints")
    assert ckpt.corrupt_directory == epath.Path(tmp_path / "run" / "checkpoints.corrupt")
    assert ckpt.all_steps() == []
  finally:
    ckpt.close()


def test_metrics_jsonl_in_a_bucket(fake_gcs):
  workdir = epath.Path(f"{BUCKET}/run")
  assert writers.read_jsonl(workdir) == []
  writer = writers.JsonlWriter(workdir / writers.JSONL_NAME)
  writer.write_hparams({"lr": 0.1, "model": ["a"]})
  for step in (1, 2, 3):
    writer.write_scalars(step, {"loss": np.float32(step / 2)})
  rows = writers.read_jsonl(os.fspath(workdir))
  assert rows == [{"hparams": {"lr": 0.1, "model": "['a']"}}, {"step": 1, "loss": 0.5},
                  {"step": 2, "loss": 1.0}, {"step": 3, "loss": 1.5}]
  assert writers.truncate_jsonl(workdir, 2) == rows[:3]
  assert writers.read_jsonl(workdir) == rows[:3]
  assert sorted(fake_gcs.store) == ["bucket/run/metrics.jsonl"]   # the .tmp was renamed
  writer.write_scalars(3, {"loss": 2.0})   # the resumed run appends again
  assert writers.read_jsonl(workdir)[-1] == {"step": 3, "loss": 2.0}


def test_data_in_a_bucket(fake_gcs):
  """MMRec data (TSV, .npy) and split TSVs written and read back on gs://."""
  data_dir = f"{BUCKET}/data/baby"
  log = {"user": np.array([0, 0, 1, 1]), "item": np.array([0, 1, 1, 2]),
         "rating": np.ones(4), "timestamp": np.arange(4), "label": np.array([0, 2, 0, 1])}
  text = np.arange(6, dtype=np.float32).reshape(3, 2) + 1
  mmrec.write_mmrec(data_dir, "baby", log, {"text": text}, item_names=["a", "b", "c"])
  assert mmrec.inter_path(data_dir) == "gs://bucket/data/baby/baby.inter"
  dataset, _ = mmrec.read_mmrec(data_dir, modalities=("text",))
  assert dataset.name == "mmrec/baby"
  np.testing.assert_array_equal(dataset.catalogue.features["text"], text)
  assert mmrec.read_item_names(data_dir) == ["a", "b", "c"]

  split = splits.Split(protocol="loo", seed=0, labels=np.array(["train", "test"]),
                       meta={"positive_min_rating": None}, modality_mask=None)
  split_log = splits.LogArrays(np.array([1, 2]), np.array([3, 4]), np.array([4.0, 5.0]),
                               np.array([10, 20]))
  written = splits.write_split(split, split_log, f"{BUCKET}/data/splits")
  assert written["tsv"] == "gs://bucket/data/splits/loo/seed0.tsv"
  back, labels = splits.read_split_tsv(written["tsv"])
  np.testing.assert_array_equal(back.item, split_log.item)
  assert labels.tolist() == ["train", "test"]


def test_serving_arrays_in_a_bucket_and_a_local_loader(fake_gcs):
  index = serving.save_arrays(epath.Path(f"{BUCKET}/export/weights"), {"a/b": np.eye(2)})
  assert index["a/b"]["file"] == "a.b.npy"
  with epath.Path(f"{BUCKET}/export/weights/a.b.npy").open("rb") as f:
    np.testing.assert_array_equal(np.load(f), np.eye(2))
  with pytest.raises(ValueError, match="epath"):
    serving.save_arrays(f"{BUCKET}/export/weights", {})   # a str URI would land in ./gs:
  with pytest.raises(ValueError, match="memory-maps"):
    serving.Recommendations.load(f"{BUCKET}/export")


def test_benchmark_files_in_a_bucket(fake_gcs):
  run_dir = epath.Path(f"{BUCKET}/bench/runs/loo/BPR/seed0")
  fit.write_jsonl(run_dir / "metrics.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}])
  assert report._read_curve(os.fspath(run_dir)) == (   # pylint: disable=protected-access
      [1, 2], [2.0, 1.0], "loss")
