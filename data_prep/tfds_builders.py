"""TFDS builders (ArrayRecord) for the MovieLens multimodal items and interactions.

Kept apart from ``data_prep.movielens`` because TFDS registers every builder class by name when
the class is defined: ``python -m data_prep.movielens`` runs that module a second time as
``__main__``, which would define (and register) the classes twice. Both read the raw files
through ``data_prep.tables``, so neither imports the other.

The raw-data directory comes from, in order: the builder config's ``raw_dir``; TFDS's
``manual_dir`` (``download_and_prepare(download_config=tfds.download.DownloadConfig(
manual_dir=...))``); ``../shared/data`` next to the repository.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from data_prep import tables

_CITATION = """\
@article{harper2015movielens,
  title={The MovieLens Datasets: History and Context},
  author={Harper, F. Maxwell and Konstan, Joseph A.},
  journal={ACM Transactions on Interactive Intelligent Systems},
  volume={5}, number={4}, pages={19:1--19:19}, year={2015}}
"""

_MANUAL = """\
Put the raw files in manual_dir (see data_prep/movielens.py for the download addresses):
ml-100k/ml-100k.{inter,item,user}, ml-100k-details/movielens100k_details.csv,
ml-1m-posters/movies.dat and ml-1m-posters/posters/<ml1m movie_id>.jpg.
"""


@dataclasses.dataclass(eq=False)
class ItemsConfig(tfds.core.BuilderConfig):
  """Items config: content sizes are part of the data, so they name the config."""

  raw_dir: str | None = None
  image_size: int = 64
  text_len: int = 128
  tokenizer_path: str | None = None


@dataclasses.dataclass(eq=False)
class InteractionsConfig(tfds.core.BuilderConfig):
  raw_dir: str | None = None


def items_config(raw_dir: str | None = None, image_size: int = 64, text_len: int = 128,
                 tokenizer_path: str | None = None) -> ItemsConfig:
  return ItemsConfig(name=f"img{image_size}_txt{text_len}", raw_dir=raw_dir,
                     image_size=image_size, text_len=text_len, tokenizer_path=tokenizer_path)


def _resolve_raw_dir(configured: str | None, dl_manager) -> str:
  if configured:
    return configured
  try:
    return os.fspath(dl_manager.manual_dir)
  except (AssertionError, ValueError):  # no manual_dir given, or it is empty
    return tables.DEFAULT_RAW_DIR


class MovielensMmItems(tfds.core.GeneratorBasedBuilder):
  """ML-100k items with tokenised plot description and poster pixels; one split 'train'."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "ML-100k items + IMDb descriptions + ML-1M posters."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL

  def __init__(self, *, config: ItemsConfig | None = None, file_format: str = "array_record",
               **kwargs):
    # Configs are built on demand (any size), so there is no BUILDER_CONFIGS list to match.
    super().__init__(config=config or items_config(), file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    size, length = cfg.image_size, cfg.text_len
    return self.dataset_info_from_configs(
        description="MovieLens-100k items with IMDb plot descriptions and ML-1M posters.",
        features=tfds.features.FeaturesDict({
            "index": tfds.features.Scalar(dtype=np.int32, doc="dense item index"),
            "item_id": tfds.features.Scalar(dtype=np.int64, doc="ML-100k movie id"),
            "ml1m_id": tfds.features.Scalar(dtype=np.int32, doc="ML-1M id of the poster, -1"),
            "title": tfds.features.Text(),
            "year": tfds.features.Scalar(dtype=np.int32, doc="release year, 0 = unknown"),
            "genres": tfds.features.Text(doc="'|'-separated ML-100k genres"),
            "description": tfds.features.Text(doc="IMDb plot, '' when missing"),
            "text_ids": tfds.features.Tensor(shape=(length,), dtype=np.int32),
            "text_mask": tfds.features.Tensor(shape=(length,), dtype=np.bool_),
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "has_text": tfds.features.Scalar(dtype=np.bool_),
            "has_image": tfds.features.Scalar(dtype=np.bool_),
        }),
        homepage="https://grouplens.org/datasets/movielens/100k/",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    raw_dir = _resolve_raw_dir(self.builder_config.raw_dir, dl_manager)
    return {"train": self._generate_examples(raw_dir)}

  def _generate_examples(self, raw_dir: str):
    cfg = self.builder_config
    item_tables = tables.prepare_tables(raw_dir)
    item_content = tables.prepare_content(raw_dir, cfg.image_size, cfg.text_len,
                                         cfg.tokenizer_path)
    for k, item in enumerate(item_tables.item_ids.tolist()):
      yield item, {
          "index": k,
          "item_id": item,
          "ml1m_id": int(item_tables.ml1m_ids[k]),
          "title": item_tables.titles[k],
          "year": int(item_tables.years[k]),
          "genres": "|".join(item_tables.genres[k]),
          "description": item_tables.descriptions[k],
          "text_ids": item_content.text_ids[k],
          "text_mask": item_content.text_mask[k],
          "image": item_content.image[k],
          "has_text": bool(item_content.has_text[k]),
          "has_image": bool(item_content.has_image[k]),
      }


class MovielensMmInteractions(tfds.core.GeneratorBasedBuilder):
  """Cleaned ML-100k ratings (unknown ids dropped, duplicates resolved); split 'train'."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Cleaned ML-100k interactions."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL

  def __init__(self, *, config: InteractionsConfig | None = None,
               file_format: str = "array_record", **kwargs):
    super().__init__(config=config or InteractionsConfig(name="default"),
                     file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="MovieLens-100k ratings, raw ids, sorted by user, timestamp, item.",
        features=tfds.features.FeaturesDict({
            "user": tfds.features.Scalar(dtype=np.int64),
            "item": tfds.features.Scalar(dtype=np.int64),
            "rating": tfds.features.Scalar(dtype=np.float32),
            "timestamp": tfds.features.Scalar(dtype=np.int64),
        }),
        homepage="https://grouplens.org/datasets/movielens/100k/",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    raw_dir = _resolve_raw_dir(self.builder_config.raw_dir, dl_manager)
    return {"train": self._generate_examples(raw_dir)}

  def _generate_examples(self, raw_dir: str):
    log = tables.prepare_tables(raw_dir).log
    for k, (u, i, r, t) in enumerate(zip(log.user.tolist(), log.item.tolist(),
                                         log.rating.tolist(), log.timestamp.tolist())):
      yield k, {"user": u, "item": i, "rating": r, "timestamp": t}


def _prepare(builder: tfds.core.DatasetBuilder, overwrite: bool) -> str:
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=mode, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return os.fspath(builder.data_dir)


def build_items(data_dir: str, raw_dir: str | None = None, image_size: int = 64,
                text_len: int = 128, tokenizer_path: str | None = None,
                overwrite: bool = False) -> str:
  """Builds (or reuses) the items data set under ``data_dir``; returns its version folder."""
  builder = MovielensMmItems(
      data_dir=data_dir, config=items_config(raw_dir, image_size, text_len, tokenizer_path))
  return _prepare(builder, overwrite)


def build_interactions(data_dir: str, raw_dir: str | None = None, overwrite: bool = False) -> str:
  """Builds (or reuses) the interactions data set under ``data_dir``; returns its folder."""
  builder = MovielensMmInteractions(
      data_dir=data_dir, config=InteractionsConfig(name="default", raw_dir=raw_dir))
  return _prepare(builder, overwrite)
