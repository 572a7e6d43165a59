"""The data set a training config names: ``config.data.source`` -> RecDataset."""

from __future__ import annotations

import dataclasses
import logging

import ml_collections

from recfusion_jax.data import mmrec
from recfusion_jax.data.movielens import load_movielens
from recfusion_jax.data.synthetic import make_synthetic
from recfusion_jax.data.types import RecDataset


def load_dataset(config: ml_collections.ConfigDict) -> RecDataset:
  """The RecDataset named by ``config.data.source``: ``synthetic`` (generated in memory),
  ``movielens`` (``data_prep.movielens``'s build), ``tfds`` (any build in that layout, e.g.
  ``data_prep.synthetic_pod``'s; its shapes must be the model's) or ``mmrec``."""
  if config.data.source == "synthetic":
    return make_synthetic(seed=config.seed, **config.data.synthetic.to_dict())
  if config.data.source in ("movielens", "tfds"):
    dataset = load_movielens(config.data.dir, config.data.protocol, seed=config.data.split_seed,
                             streaming=config.data.get("streaming", False))
    dataset = truncate_text(dataset, config.data.get("text_len"))
    if config.data.source == "tfds":
      check_content_shapes(dataset, config.model, config.data.dir)
    return dataset
  if config.data.source == "mmrec":
    return load_mmrec(config)
  raise ValueError(f"unknown data.source {config.data.source!r}; choose synthetic, movielens, "
                   "tfds or mmrec")


def check_content_shapes(dataset: RecDataset, model: ml_collections.ConfigDict,
                         where: str) -> None:
  """Raises ValueError, naming every mismatch, when the catalogue's content does not have the
  shapes the model's stems take (a build is made for one config's shapes, e.g.
  ``data_prep.synthetic_pod``'s flags for ``configs/pod.py``'s ``SHAPES``)."""
  cat, e = dataset.catalogue, model.encoder
  problems = []
  wanted = [m for m in model.modalities if e[m].get("stem") != "features"]
  # One item's shape per content key, from the arrays or (streaming) the records' features.
  if cat.records is not None:
    shapes, top = cat.records.shapes, cat.records.max_token
  else:
    shapes = {key: getattr(cat, key).shape[1:] for key in ("text_ids", "image", "video")
              if getattr(cat, key) is not None}
    top = int(cat.text_ids.max(initial=0)) if cat.text_ids is not None else 0
  for modality, key in (("text", "text_ids"), ("image", "image"), ("video", "video")):
    if modality in wanted and key not in shapes:
      problems.append(f"it has no {modality} (drop it from model.modalities)")
  if "text" in wanted and "text_ids" in shapes:
    if top >= e.text.vocab_size:
      problems.append(f"token ids reach {top}, model.encoder.text.vocab_size is "
                      f"{e.text.vocab_size}")
    if shapes["text_ids"][0] > e.text.max_len:
      problems.append(f"texts are {shapes['text_ids'][0]} tokens, model.encoder.text.max_len "
                      f"is {e.text.max_len}")
  if "image" in wanted and "image" in shapes and shapes["image"][:2] != (e.image.size,) * 2:
    problems.append(f"images are {shapes['image'][0]} px, model.encoder.image.size is "
                    f"{e.image.size}")
  if "video" in wanted and "video" in shapes and shapes["video"][:3] != (
      e.video.frames, e.video.size, e.video.size):
    problems.append(f"videos are {shapes['video'][0]} frames of {shapes['video'][1]} px, "
                    f"model.encoder.video has {e.video.frames} of {e.video.size}")
  if problems:
    raise ValueError(f"{where}: the data does not fit the model: {'; '.join(problems)}")


def load_mmrec(config: ml_collections.ConfigDict) -> RecDataset:
  """``config.data.dir`` in MMRec's layout; its feature widths must match the model's stems."""
  modalities = tuple(config.model.modalities)
  dataset, report = mmrec.read_mmrec(
      config.data.dir, config.data.get("name") or None, modalities=modalities,
      filter_cold_users=config.data.get("filter_cold_users", True))
  for modality, dim in report["feature_dims"].items():
    stem = config.model.encoder[modality]
    if stem.get("stem") != "features" or stem.get("feature_dim") != dim:
      raise ValueError(
          f"{config.data.dir}: {modality} features are {dim} wide; the model needs "
          f"--config.model.encoder.{modality}.stem=features and "
          f"--config.model.encoder.{modality}.feature_dim={dim} (it has "
          f"stem={stem.get('stem')!r}, feature_dim={stem.get('feature_dim')!r})")
  logging.info("MMRec data %s: %s", dataset.name, report)
  return dataset


def truncate_text(dataset: RecDataset, text_len: int | None) -> RecDataset:
  """Keeps the first ``text_len`` tokens of every item (a cheaper text stem on small machines)."""
  cat = dataset.catalogue
  if cat.records is not None:
    stored = cat.records.shapes.get("text_ids", (0,))[0]
    if not text_len or stored <= text_len:
      return dataset
    return dataclasses.replace(dataset, catalogue=dataclasses.replace(
        cat, records=cat.records.with_text_len(text_len)))
  if not text_len or cat.text_ids is None or cat.text_ids.shape[1] <= text_len:
    return dataset
  cat = dataclasses.replace(cat, text_ids=cat.text_ids[:, :text_len],
                            text_mask=cat.text_mask[:, :text_len])
  return dataclasses.replace(dataset, catalogue=cat)
