"""MMRec-format data: the reader on files written in MMRec's exact layout, the ``features`` stem,
and RecFusion plus every baseline running on such a set unchanged."""

import os

import numpy as np
import pytest
from flax import nnx

from configs import mmrec as mmrec_config
from recfusion_jax import train
from recfusion_jax.baselines import common
from recfusion_jax.benchmark import fit, registry
from recfusion_jax.benchmark.protocols import ProtocolData
from recfusion_jax.data import mmrec, sources
from recfusion_jax.data.types import MODALITIES, feature_key
from recfusion_jax.models.encoder import ContentEncoder
from tests.data_fixtures import IMAGE_DIM, TEXT_DIM, write_mmrec_files


def _config(data_dir, steps=6):
  config = mmrec_config.get_config("name=baby")
  config.data.dir = data_dir
  e = config.model.encoder
  e.text.feature_dim, e.image.feature_dim = TEXT_DIM, IMAGE_DIM
  e.width, e.mlp_dim, e.num_heads = 16, 32, 2
  config.model.embed_dim = 16
  config.model.user.history_len = 6
  config.model.user.depth = 1
  config.num_steps, config.batch_size = steps, 32
  config.log_every = config.cache_refresh_every = config.checkpoint_every = steps
  config.eval_block_size = 64
  return config


def test_reader_follows_mmrec_layout_and_counts_what_it_drops(tmp_path):
  data_dir, rows, label = write_mmrec_files(str(tmp_path))
  dataset, report = mmrec.read_mmrec(data_dir)
  assert dataset.name == "mmrec/baby"
  assert (dataset.num_users, dataset.catalogue.num_items) == (48, 40)
  # The cold user's test row is dropped (as MMRec's filter_out_cod_start_users) and counted.
  assert report["dropped_cold_user_interactions"] == {"valid": 0, "test": 1}
  assert 47 not in dataset.test.user and not dataset.user_has_id[47]
  assert len(dataset.train) == int((label == 0).sum())
  assert len(dataset.valid) == int((label == 1).sum())
  assert len(dataset.test) == int((label == 2).sum()) - 1
  # Every kept row is where its x_label put it, with its rating and timestamp.
  kept = {(u, i, r, t, x) for (u, i, r, t), x in zip(rows, label) if u != 47}
  got = {(int(u), int(i), float(r), int(t), x) for x, part in enumerate(
      (dataset.train, dataset.valid, dataset.test))
         for u, i, r, t in zip(part.user, part.item, part.rating, part.timestamp)}
  assert got == kept
  # Train is sorted by (user, time), as the rest of the project expects.
  order = np.lexsort((dataset.train.timestamp, dataset.train.user))
  np.testing.assert_array_equal(order, np.arange(len(dataset.train)))
  # The item only in test is cold: no ID, scored from its features.
  assert 39 in dataset.cold_items and not dataset.catalogue.has_id[39]
  # Features: rows by itemID; a zero row is a missing modality, a NaN row too (zeroed).
  cat = dataset.catalogue
  assert cat.features["text"].shape == (40, TEXT_DIM) and cat.features["image"].shape == (40, IMAGE_DIM)
  image_col, text_col = MODALITIES.index("image"), MODALITIES.index("text")
  assert not cat.presence[0, image_col] and cat.presence[0, text_col]
  assert not cat.presence[1, text_col] and np.all(cat.features["text"][1] == 0)
  assert report["items_missing"] == {"text": 1, "image": 1}
  assert report["non_finite_feature_rows"] == {"text": 1, "image": 0}
  assert not cat.presence[:, MODALITIES.index("video")].any()
  content = cat.content(np.array([2, 5]))
  np.testing.assert_array_equal(content[feature_key("image")], cat.features["image"][[2, 5]])
  assert mmrec.read_item_names(data_dir)[7] == "B0000007"


def test_reader_rejects_files_that_do_not_belong_together(tmp_path):
  data_dir, _, _ = write_mmrec_files(str(tmp_path))
  np.save(os.path.join(data_dir, "image_feat.npy"), np.ones((39, IMAGE_DIM), np.float32))
  with pytest.raises(ValueError, match="item counts disagree"):
    mmrec.read_mmrec(data_dir)
  with open(os.path.join(data_dir, "baby.inter"), "w") as f:
    f.write("userID\titemID\trating\ttimestamp\n0\t1\t5.0\t7\n")
  with pytest.raises(ValueError, match="x_label"):
    mmrec.read_mmrec(data_dir)


def test_loader_names_the_feature_width_the_config_must_have(tmp_path):
  data_dir, _, _ = write_mmrec_files(str(tmp_path))
  config = _config(data_dir)
  config.model.encoder.image.feature_dim = 4096
  with pytest.raises(ValueError, match="image.feature_dim=12"):
    sources.load_dataset(config)


def test_features_stem_gives_one_token_per_modality_and_masks_absent_ones(tmp_path):
  config = _config(str(tmp_path))
  encoder = ContentEncoder(config.model.encoder, ("text", "image"), 16, rngs=nnx.Rngs(0))
  assert encoder.content_key("text") == "text_features"
  rng = np.random.default_rng(0)
  content = {"text_features": rng.normal(size=(5, TEXT_DIM)).astype(np.float32),
             "image_features": rng.normal(size=(5, IMAGE_DIM)).astype(np.float32),
             "presence": np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 1, 0]], bool)}
  tokens, mask = encoder.stem_tokens("image", content)
  assert tokens.shape == (5, 1, 16) and mask.all()
  emb, presence = encoder(content)
  norms = np.linalg.norm(np.asarray(emb), axis=-1)
  np.testing.assert_allclose(norms[presence], 1.0, rtol=1e-5)
  assert np.all(norms[~np.asarray(presence)] == 0)
  # Different features, different embeddings; the stem reads exactly its modality's vector.
  assert not np.allclose(emb[3], emb[4])
  changed = dict(content, image_features=content["image_features"] + 1.0)
  emb2, _ = encoder(changed)
  np.testing.assert_allclose(emb2[:, 0], emb[:, 0], rtol=1e-6)
  with pytest.raises(KeyError, match="image_features"):
    encoder({k: v for k, v in content.items() if k != "image_features"})
  with pytest.raises(ValueError, match="stem built for"):
    encoder(dict(content, image_features=np.zeros((5, 3), np.float32)))


def test_recfusion_trains_on_mmrec_data_through_the_features_stems(tmp_path):
  data_dir, _, _ = write_mmrec_files(str(tmp_path / "data"))
  config = _config(data_dir, steps=6)
  dataset = sources.load_dataset(config)
  initial = train.create_model(config, dataset)
  kernel0 = np.asarray(initial.encoder.image_stem.projection.kernel[...])
  trained = train.train_model(config, str(tmp_path / "run"))
  kernel = np.asarray(trained.model.encoder.image_stem.projection.kernel[...])
  assert not np.allclose(kernel, kernel0)          # the features stem is trained
  results = train.train_and_evaluate(config, str(tmp_path / "run"))  # resumes at the end
  assert 0.0 <= results["warm"]["NDCG@10"] <= 1.0
  assert "cold_items" in results                    # the test-only item, from features alone


@pytest.mark.parametrize("name", sorted(registry.BASELINES))
def test_every_baseline_fits_and_ranks_mmrec_data(tmp_path, name):
  data_dir, _, _ = write_mmrec_files(str(tmp_path))
  dataset, _ = mmrec.read_mmrec(data_dir)
  # The benchmark's own fit and scoring path: tune on valid, refit on train + valid, rank test.
  pdata = ProtocolData("mmrec", 0, dataset, common.merge_valid_into_train(dataset),
                       dataset.test, dataset.catalogue)
  ranker, _ = fit.fit_baseline(name, pdata, str(tmp_path / name), quick=True)
  metrics = fit.evaluate_ranker(ranker, pdata)
  assert 0.0 <= metrics["NDCG@10"] <= 1.0 and 0.0 <= metrics["HR@10"] <= 1.0
