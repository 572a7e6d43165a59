"""Tests of the synthetic data set: contract, determinism, splits, planted structure."""

import ml_collections
import numpy as np
import pytest

from recfusion_jax.data.synthetic import (SyntheticConfig, content_chunks, content_plan,
                                          make_synthetic, make_synthetic_with_truth,
                                          resolve_config, stream_interactions)
from recfusion_jax.data.types import MODALITIES, RecDataset


@pytest.fixture(scope="module")
def default():
  return make_synthetic_with_truth()


def _arrays(dataset: RecDataset) -> dict[str, np.ndarray]:
  c = dataset.catalogue
  out = {f"catalogue.{k}": getattr(c, k)
         for k in ("text_ids", "text_mask", "image", "video", "presence", "has_id")}
  for split in ("train", "valid", "test"):
    for k in ("user", "item", "timestamp", "rating"):
      out[f"{split}.{k}"] = getattr(getattr(dataset, split), k)
  out["cold_items"] = dataset.cold_items
  out["user_has_id"] = dataset.user_has_id
  return out


def test_contract_shapes_and_dtypes(default):
  dataset, _ = default
  cfg = SyntheticConfig()
  n, s = cfg.num_items, cfg.image_size
  c = dataset.catalogue
  assert c.text_ids.shape == (n, cfg.text_len) and c.text_ids.dtype == np.int32
  assert c.text_mask.shape == (n, cfg.text_len) and c.text_mask.dtype == bool
  assert c.image.shape == (n, s, s, 3) and c.image.dtype == np.uint8
  assert c.video.shape == (n, cfg.video_frames, s, s, 3) and c.video.dtype == np.uint8
  assert c.presence.shape == (n, len(MODALITIES)) and c.presence.dtype == bool
  assert c.has_id.shape == (n,) and c.has_id.dtype == bool
  assert c.num_items == n and dataset.num_users == cfg.num_users
  assert dataset.user_has_id.dtype == bool and dataset.user_has_id.all()
  assert dataset.cold_items.dtype == np.int32
  for split in (dataset.train, dataset.valid, dataset.test):
    assert split.user.dtype == np.int32 and split.item.dtype == np.int32
    assert split.timestamp.dtype == np.int64 and split.rating.dtype == np.float32
    assert split.item.min() >= 0 and split.item.max() < n
    assert split.user.min() >= 0 and split.user.max() < cfg.num_users
  # Text: 0 only (and always) on padding, padding after the tokens.
  assert ((c.text_ids != 0) == c.text_mask).all()
  assert (np.diff(c.text_mask.astype(int), axis=1) <= 0).all()


def test_deterministic_by_seed():
  a, b = _arrays(make_synthetic(seed=7)), _arrays(make_synthetic(seed=7))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  c = _arrays(make_synthetic(seed=8))
  assert not np.array_equal(a["catalogue.image"], c["catalogue.image"])
  assert not np.array_equal(a["train.item"], c["train.item"])


def test_leave_one_out_and_cold_items(default):
  dataset, truth = default
  train, valid, test = dataset.train, dataset.valid, dataset.test
  held_out = truth.held_out_items
  assert held_out.size == round(0.1 * dataset.catalogue.num_items)
  # Held-out items never reach train/valid; every interaction of theirs is in test.
  assert not np.isin(train.item, held_out).any() and not np.isin(valid.item, held_out).any()
  counts = np.bincount(train.item, minlength=dataset.catalogue.num_items)
  np.testing.assert_array_equal(dataset.catalogue.has_id, counts > 0)
  np.testing.assert_array_equal(dataset.cold_items, np.flatnonzero(counts == 0))
  assert np.isin(held_out, dataset.cold_items).all()
  # Leave-one-out by time: the latest event is in test, valid (if any) is after all train.
  for u in range(dataset.num_users):
    t_train = train.timestamp[train.user == u]
    t_valid = valid.timestamp[valid.user == u]
    t_test = test.timestamp[test.user == u]
    assert t_valid.size <= 1 and t_test.size >= 1
    latest = max(t_train.max(initial=0), t_valid.max(initial=0), t_test.max())
    assert t_test.max() == latest
    if t_valid.size:
      assert t_train.max(initial=0) < t_valid[0]
    # Warm test events are only the last one; the rest of test is cold.
    warm_test = ~np.isin(test.item[test.user == u], held_out)
    assert warm_test.sum() <= 1
    # Timestamps within a user are distinct.
    all_t = np.concatenate([t_train, t_valid, t_test])
    assert np.unique(all_t).size == all_t.size
  # A user never sees an item twice.
  pairs = np.concatenate([s.user.astype(np.int64) * 10_000 + s.item for s in (train, valid, test)])
  assert np.unique(pairs).size == pairs.size


def test_missing_modalities_are_zero():
  dataset = make_synthetic(missing_text=0.3, missing_image=0.3, missing_video=0.3,
                           no_content_fraction=0.1)
  c = dataset.catalogue
  n = c.num_items
  assert (~c.presence.any(axis=1)).sum() == round(0.1 * n)
  rates = 1 - c.presence.mean(axis=0)
  assert np.all(np.abs(rates - (0.1 + 0.9 * 0.3)) < 0.08)
  assert not c.text_ids[~c.presence[:, 0]].any() and not c.text_mask[~c.presence[:, 0]].any()
  assert not c.image[~c.presence[:, 1]].any()
  assert not c.video[~c.presence[:, 2]].any()
  # Present rows have content.
  assert c.text_mask[c.presence[:, 0]].any(axis=1).all()
  assert c.image[c.presence[:, 1]].reshape(-1, 3 * 16 * 16).any(axis=1).all()


def test_no_item_loses_all_content_by_chance():
  c = make_synthetic(missing_text=0.5, missing_image=0.5, missing_video=0.5).catalogue
  assert c.presence.any(axis=1).all()


def _topic_accuracy(dataset: RecDataset, truth, modality: str) -> float:
  """Accuracy of a content-only topic classifier on the items that have ``modality``."""
  c = dataset.catalogue
  present = c.presence[:, MODALITIES.index(modality)]
  topic = truth.item_topic[present]
  if modality == "text":
    words = truth.topic_words
    first = words.min()
    ids = c.text_ids[present]
    owner = np.where(ids >= first, (ids - first) // words.shape[1], -1)
    owner = np.where(owner < words.shape[0], owner, -1)
    votes = np.stack([(owner == k).sum(axis=1) for k in range(words.shape[0])], axis=1)
    guess = votes.argmax(axis=1)
  else:
    if modality == "image":
      pixels, templates = c.image[present], truth.image_templates
    else:  # Frame 0 of a video is the unshifted topic template.
      pixels, templates = c.video[present][:, 0], truth.video_templates
    x = (pixels.astype(np.float32) - 128.0) / 40.0
    dist = ((x[:, None] - templates[None]) ** 2).sum(axis=(2, 3, 4))
    guess = dist.argmin(axis=1)
  return float((guess == topic).mean())


@pytest.mark.parametrize("noise", MODALITIES)
def test_noise_modality_is_independent_of_topic(noise):
  dataset, truth = make_synthetic_with_truth(noise_modality=noise)
  chance = 1.0 / truth.image_templates.shape[0]
  for modality in MODALITIES:
    accuracy = _topic_accuracy(dataset, truth, modality)
    if modality == noise:
      assert accuracy < chance + 0.08, (modality, accuracy)
    else:
      assert accuracy > 0.8, (modality, accuracy)


def test_video_moves_with_topic_velocity(default):
  dataset, truth = default
  c = dataset.catalogue
  item = int(np.flatnonzero(c.presence[:, 2])[0])
  k = truth.item_topic[item]
  dy, dx = truth.video_velocity[k]
  frames = (c.video[item].astype(np.float32) - 128.0) / 40.0
  # Frame t correlates best with frame 0 shifted by t * velocity.
  for t in range(1, frames.shape[0]):
    errors = {}
    for sy in range(-4, 5):
      for sx in range(-4, 5):
        shifted = np.roll(frames[0], (sy, sx), axis=(0, 1))
        errors[(sy, sx)] = ((frames[t] - shifted) ** 2).mean()
    best = min(errors, key=errors.get)
    size = frames.shape[1]
    assert ((best[0] - t * dy) % size, (best[1] - t * dx) % size) == (0, 0)


def test_topic_model_ranks_far_above_chance(default):
  """An oracle-topic recommender (user topic histogram x item popularity) beats chance 10x."""
  dataset, truth = default
  n, k = dataset.catalogue.num_items, truth.image_templates.shape[0]
  train = dataset.train
  user_topics = np.zeros((dataset.num_users, k))
  np.add.at(user_topics, (train.user, truth.item_topic[train.item]), 1.0)
  popularity = np.bincount(train.item, minlength=n) + 1.0
  scores = user_topics[:, truth.item_topic] * popularity[None, :]
  scores[train.user, train.item] = -np.inf
  top10 = np.argsort(-scores, axis=1)[:, :10]
  hits = (top10[dataset.valid.user] == dataset.valid.item[:, None]).any(axis=1)
  assert hits.mean() > 10 * (10 / n), hits.mean()


def test_config_sources_and_errors():
  cfg = ml_collections.ConfigDict({"num_items": 50, "num_users": 10, "min_interactions": 5,
                                   "max_interactions": 8})
  dataset = make_synthetic(cfg, seed=3)
  assert dataset.catalogue.num_items == 50 and dataset.num_users == 10
  assert resolve_config({"num_topics": 4}, seed=1) == SyntheticConfig(num_topics=4, seed=1)
  assert resolve_config(SyntheticConfig(num_items=70)).num_items == 70
  with pytest.raises(TypeError, match="unknown synthetic config fields"):
    make_synthetic(num_itemz=5)
  with pytest.raises(ValueError, match="noise_modality"):
    make_synthetic(noise_modality="audio")
  with pytest.raises(ValueError, match="min_interactions"):
    make_synthetic(min_interactions=2)
  with pytest.raises(TypeError):
    make_synthetic(42)


def test_streamed_catalogue_keeps_the_planted_structure():
  """content_chunks / stream_interactions (data_prep.synthetic_pod's generator): chunks of at
  most chunk_items items, absent content zero, images of an item's topic, users who keep to
  their topics, distinct items per user in time order, the same log from the same seed."""
  cfg = resolve_config(num_items=300, num_users=200, min_interactions=5, max_interactions=15)
  plan = content_plan(cfg)
  chunks = list(content_chunks(cfg, plan, 32))
  assert [start for start, _ in chunks] == list(range(0, 300, 32))
  assert max(len(c["topic"]) for _, c in chunks) == 32
  whole = {key: np.concatenate([c[key] for _, c in chunks]) for key in chunks[0][1]}
  assert whole["video"].shape == (300, 4, 16, 16, 3) and whole["video"].dtype == np.uint8
  np.testing.assert_array_equal(whole["presence"], plan.presence)
  np.testing.assert_array_equal(whole["topic"], plan.item_topic)
  for k, key in enumerate(("text_mask", "image", "video")):
    assert not whole[key][~plan.presence[:, k]].any(), key
  shown = np.flatnonzero(plan.presence[:, 1])
  pixels = (whole["image"][shown].astype(np.float32) - 128.0).reshape(shown.size, -1)
  nearest = np.argmax(pixels @ plan.image_templates.reshape(cfg.num_topics, -1).T, axis=1)
  assert (nearest == plan.item_topic[shown]).mean() > 0.8

  log = stream_interactions(cfg, plan.item_topic, users_per_chunk=64)
  again = stream_interactions(cfg, plan.item_topic, users_per_chunk=64)
  np.testing.assert_array_equal(log.item, again.item)
  counts = np.bincount(log.user, minlength=cfg.num_users)
  assert counts.min() >= 1 and counts.max() <= cfg.max_interactions and counts.mean() > 8
  assert (np.diff(log.user) >= 0).all()
  same_user = np.diff(log.user) == 0
  assert (np.diff(log.timestamp)[same_user] > 0).all()
  pairs = log.user.astype(np.int64) * cfg.num_items + log.item
  assert np.unique(pairs).size == len(log)
  topics = np.zeros((cfg.num_users, cfg.num_topics))
  np.add.at(topics, (log.user, plan.item_topic[log.item]), 1.0)
  # Users like one or two of 16 topics: their top topic holds far more than 1/16 of their items.
  assert (topics.max(1) / counts).mean() > 0.5
