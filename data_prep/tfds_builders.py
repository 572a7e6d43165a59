"""TFDS builders (ArrayRecord): the MovieLens multimodal items and interactions, and the
synthetic multimodal items of ``data_prep.synthetic_pod``.

Kept apart from ``data_prep.movielens`` (and ``data_prep.synthetic_pod``) because TFDS registers
every builder class by name when the class is defined: ``python -m data_prep.movielens`` runs
that module a second time as ``__main__``, which would define (and register) the classes twice.
The MovieLens builders and the build read the raw files through ``data_prep.tables``, so neither
imports the other.

The raw-data directory comes from, in order: the builder config's ``raw_dir``; TFDS's
``manual_dir`` (``download_and_prepare(download_config=tfds.download.DownloadConfig(
manual_dir=...))``); ``../shared/data`` next to the repository.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_prep import tables
from recfusion_jax.data import synthetic

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


@dataclasses.dataclass(eq=False)
class SyntheticItemsConfig(tfds.core.BuilderConfig):
  """``generator``: the ``SyntheticConfig`` fields; ``chunk_items``: items drawn at a time (the
  content is deterministic in the seed and the chunk size)."""

  generator: dict[str, Any] = dataclasses.field(default_factory=dict)
  chunk_items: int = 8


def synthetic_items_config(generator: dict[str, Any] | None = None, chunk_items: int = 8
                           ) -> SyntheticItemsConfig:
  cfg = synthetic.resolve_config(generator)
  fields = dataclasses.asdict(cfg)
  digest = hashlib.sha1(json.dumps([fields, chunk_items], sort_keys=True).encode()).hexdigest()
  # The shapes name the config; the digest keeps sets of other generator settings apart.
  name = (f"n{cfg.num_items}_img{cfg.image_size}_vid{cfg.video_frames}_txt{cfg.text_len}_"
          f"{digest[:10]}")
  return SyntheticItemsConfig(name=name, generator=fields, chunk_items=chunk_items)


class SyntheticMmItems(tfds.core.GeneratorBasedBuilder):
  """Synthetic items with text, image and video (``recfusion_jax.data.synthetic``'s planted
  topics), drawn ``chunk_items`` at a time; one split 'train'; ``index`` is the dense item id.

  TFDS's writer keeps what it is given in memory up to 1 GB, then in 1,000 temporary buckets on
  disk by key hash, each sorted alone when the shards are written: memory stays bounded whatever
  the catalogue's size. (``disable_shuffling`` would keep item order in the records but puts
  every small integer key in one bucket, which is then sorted whole in memory.)"""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Planted-topic text, image and video, streamed.",
                   "1.1.0": "Videos stored as raw bytes (Encoding.BYTES), not int64 lists."}

  def __init__(self, *, config: SyntheticItemsConfig | None = None,
               file_format: str = "array_record", **kwargs):
    super().__init__(config=config or synthetic_items_config(), file_format=file_format,
                     **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = synthetic.resolve_config(self.builder_config.generator)
    size, length, frames = cfg.image_size, cfg.text_len, cfg.video_frames
    return self.dataset_info_from_configs(
        description="Synthetic multimodal items with planted topics (recfusion_jax.data."
                    "synthetic): topic words, topic image templates, moving topic videos.",
        features=tfds.features.FeaturesDict({
            "index": tfds.features.Scalar(dtype=np.int32, doc="dense item index"),
            "item_id": tfds.features.Scalar(dtype=np.int64, doc="item id (= index)"),
            "topic": tfds.features.Scalar(dtype=np.int32, doc="planted dominant topic"),
            "text_ids": tfds.features.Tensor(shape=(length,), dtype=np.int32),
            "text_mask": tfds.features.Tensor(shape=(length,), dtype=np.bool_),
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            # Raw uint8 frames in one bytes field: noisy pixels barely compress, and reading is
            # a copy. (Without BYTES, TFDS stores a tensor as an int64 list, one varint a pixel:
            # parsing a 2.4 MB video took 52 ms, and the streaming pipeline fed 20 items/s.)
            "video": tfds.features.Tensor(shape=(frames, size, size, 3), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            "has_text": tfds.features.Scalar(dtype=np.bool_),
            "has_image": tfds.features.Scalar(dtype=np.bool_),
            "has_video": tfds.features.Scalar(dtype=np.bool_),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    cfg = synthetic.resolve_config(self.builder_config.generator)
    plan = synthetic.content_plan(cfg)
    for start, chunk in synthetic.content_chunks(cfg, plan, self.builder_config.chunk_items):
      for j, has in enumerate(chunk["presence"].tolist()):
        k = start + j
        yield k, {
            "index": k, "item_id": k, "topic": int(chunk["topic"][j]),
            "text_ids": chunk["text_ids"][j], "text_mask": chunk["text_mask"][j],
            "image": chunk["image"][j], "video": chunk["video"][j],
            "has_text": has[0], "has_image": has[1], "has_video": has[2],
        }


def build_synthetic_items(data_dir: str, generator: dict[str, Any], chunk_items: int = 8,
                          overwrite: bool = False) -> str:
  """Builds (or reuses) the synthetic items under ``data_dir``; returns its version folder."""
  builder = SyntheticMmItems(data_dir=data_dir,
                             config=synthetic_items_config(generator, chunk_items))
  return _prepare(builder, overwrite)
