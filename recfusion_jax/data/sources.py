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
  """The RecDataset named by ``config.data.source`` (``synthetic``, ``movielens`` or ``mmrec``)."""
  if config.data.source == "synthetic":
    return make_synthetic(seed=config.seed, **config.data.synthetic.to_dict())
  if config.data.source == "movielens":
    dataset = load_movielens(config.data.dir, config.data.protocol, seed=config.data.split_seed)
    return truncate_text(dataset, config.data.get("text_len"))
  if config.data.source == "mmrec":
    return load_mmrec(config)
  raise ValueError(f"unknown data.source {config.data.source!r}; choose synthetic, movielens "
                   "or mmrec")


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
  if not text_len or cat.text_ids is None or cat.text_ids.shape[1] <= text_len:
    return dataset
  cat = dataclasses.replace(cat, text_ids=cat.text_ids[:, :text_len],
                            text_mask=cat.text_mask[:, :text_len])
  return dataclasses.replace(dataset, catalogue=cat)
