"""Every file in configs/ trains: each config is built (with CPU-sized widths where its own are
not), given data of its own kind in the real on-disk format, and run for two real steps of the
train loop (``train.train_model``) on the 8 simulated devices; the losses must be finite.

Data: tiny -> its in-memory synthetic source; movielens -> ``data_prep.movielens`` on a tiny raw
directory in the real file formats; mmrec -> a tiny set in MMRec's layout; pod -> the
pod-shaped synthetic catalogue of ``data_prep.synthetic_pod`` at ``pod.SHAPES["test"]``.
"""

import json
import math
import os
import pathlib

import numpy as np
import pytest

import configs
from configs import mmrec, movielens, pod, tiny
from recfusion_jax import config_lib, train
from recfusion_jax.data import sources, synthetic
from tests import data_fixtures

CONFIG_FILES = sorted(p.stem for p in pathlib.Path(configs.__file__).parent.glob("*.py")
                      if p.stem != "__init__")
POD_DATA = dict(num_items=96, num_users=64, interactions_per_user=8, chunk_items=16,
                **pod.SHAPES["test"])


def _cpu_sized(config):
  """The config's model family at test widths (one block, 16 wide), a small batch."""
  m = config.model
  m.embed_dim, m.gate_dim, m.gate_hidden = 16, 8, 16
  e = m.encoder
  e.width, e.depth, e.num_heads, e.mlp_dim = 16, 1, 2, 32
  m.user.history_len, m.user.depth, m.user.num_heads = 6, 1, 2
  config.batch_size = 32
  config.eval_block_size = 64
  return config


def _train_two_steps(config, workdir):
  config.num_steps = 2
  config.log_every = 1
  # One checkpoint (the last step) and one cache refresh after the initial one: both programs
  # run, neither twice (compiling dominates a test of two steps).
  config.checkpoint_every = config.cache_refresh_every = 2
  trained = train.train_model(config, str(workdir))
  assert trained.mesh.devices.size == 8
  assert [row["step"] for row in trained.history] == [1, 2]
  for row in trained.history:
    assert math.isfinite(row["total_loss"]), row
  return trained


@pytest.fixture(scope="module")
def pod_data(tmp_path_factory):
  from data_prep import synthetic_pod  # pylint: disable=import-outside-toplevel  (imports TF)
  out = tmp_path_factory.mktemp("pod") / "data"
  report = synthetic_pod.build(str(out), verbose=False, protocols=("loo", "cold_items"),
                               **POD_DATA)
  return str(out), report


@pytest.fixture(scope="module")
def movielens_data(tmp_path_factory):
  from data_prep import movielens as movielens_prep  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("ml")
  data_fixtures.write_movielens_raw(root / "raw")
  vocab = root / "vocab.txt"
  vocab.write_text("\n".join(data_fixtures.VOCAB) + "\n")
  out = root / "out"
  # The model's shapes (64 px posters, 32 tokens); only the protocol trained is split.
  movielens_prep.build(str(root / "raw"), str(out), image_size=64, text_len=32,
                       tokenizer_path=str(vocab), seeds=(0,), verbose=False)
  return str(out)


def test_every_config_file_has_a_training_test():
  trained_here = {"tiny", "movielens", "mmrec", "pod"}
  assert set(CONFIG_FILES) == trained_here, "add a training test for the new config"


def test_tiny_trains(tmp_path):
  _train_two_steps(_cpu_sized(tiny.get_config()), tmp_path)


def test_movielens_trains_on_its_build(movielens_data, tmp_path):
  config = _cpu_sized(movielens.get_config("size=small"))
  config.data.dir = movielens_data
  config_lib.set_protocol(config, config.data.protocol)   # the recipe's fields, as main does
  trained = _train_two_steps(config, tmp_path)
  assert config.rec_loss == "full" and trained.dataset.catalogue.image.shape[1] == 64
  assert trained.model.item_item_setting is not None   # warm_ratio's field: EASE's fixed term


def test_mmrec_trains_on_mmrec_files(tmp_path):
  data_dir, _, _ = data_fixtures.write_mmrec_files(str(tmp_path / "data"))
  config = _cpu_sized(mmrec.get_config("name=baby"))
  config.data.dir = data_dir
  e = config.model.encoder
  e.text.feature_dim, e.image.feature_dim = data_fixtures.TEXT_DIM, data_fixtures.IMAGE_DIM
  _train_two_steps(config, tmp_path / "run")


def test_pod_trains_on_the_pod_shaped_synthetic_catalogue(pod_data, tmp_path):
  data_dir, _ = pod_data
  config = pod.get_config("size=test")
  config.data.dir = data_dir
  assert config.rec_loss == "sampled" and config.data.source == "tfds"
  assert config.data.streaming   # the content stays in the ArrayRecord files
  trained = _train_two_steps(config, tmp_path)
  assert dict(trained.mesh.shape) == {"data": 4, "fsdp": 2}
  cat = trained.dataset.catalogue
  assert cat.video is None and cat.records.shapes["video"] == (4, 16, 16, 3)


def test_pod_test_size_keeps_the_model_family():
  full, small = pod.get_config(), pod.get_config("size=test")
  keys = lambda c: set(c.to_dict()) | {f"model.{k}" for k in c.model.to_dict()} | {
      f"model.encoder.{k}" for k in c.model.encoder.to_dict()}
  assert keys(full) == keys(small)
  for get in (lambda c: c.model.modalities, lambda c: c.model.encoder.unified,
              lambda c: c.model.fusion, lambda c: c.rec_loss, lambda c: c.data.source):
    assert get(full) == get(small)
  assert (full.model.encoder.image.size, full.model.encoder.video.frames,
          full.data.text_len) == (224, 16, 128)
  assert (full.batch_size, full.mesh.fsdp) == (16384, 8)


def test_pod_data_round_trip(pod_data):
  """What the reader loads is what the streamed generator drew, item by item."""
  data_dir, report = pod_data
  config = pod.get_config("size=test")
  config.data.dir = data_dir
  dataset = sources.load_dataset(config)
  cat = dataset.catalogue
  assert cat.records is not None and cat.image is None   # pod.py streams (data/records.py)
  content = cat.content(np.arange(cat.num_items))
  manifest = json.loads(pathlib.Path(data_dir, "manifest.json").read_text())
  fields = manifest["generator"]
  plan = synthetic.content_plan(fields)
  chunks = list(synthetic.content_chunks(fields, plan, POD_DATA["chunk_items"]))
  assert [start for start, _ in chunks] == list(range(0, 96, 16))
  for key, value in (("text_ids", content["text_ids"]), ("image", content["image"]),
                     ("video", content["video"]), ("presence", cat.presence)):
    np.testing.assert_array_equal(np.concatenate([c[key] for _, c in chunks]), value, key)
  assert cat.presence[:, 2].sum() == report["items_with"]["video"]
  assert len(dataset.train) + len(dataset.valid) + len(dataset.test) == report["interactions"]
  assert dataset.name == "synthetic_pod/loo/seed0"
  assert os.path.exists(os.path.join(data_dir, "splits", "cold_items", "seed0.tsv"))
  # The pod-size model does not fit the test-shaped data: the loader says why.
  config = pod.get_config()
  config.data.dir = data_dir
  with pytest.raises(ValueError, match="images are 16 px.*videos are 4 frames"):
    sources.load_dataset(config)
