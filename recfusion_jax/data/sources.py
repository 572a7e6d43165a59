"""The data set a training config names: ``config.data.source`` -> RecDataset."""

from __future__ import annotations

import dataclasses

import ml_collections

from recfusion_jax.data.movielens import load_movielens
from recfusion_jax.data.synthetic import make_synthetic
from recfusion_jax.data.types import RecDataset


def load_dataset(config: ml_collections.ConfigDict) -> RecDataset:
  """The RecDataset named by ``config.data.source`` (``synthetic`` or ``movielens``)."""
  if config.data.source == "synthetic":
    return make_synthetic(seed=config.seed, **config.data.synthetic.to_dict())
  if config.data.source == "movielens":
    dataset = load_movielens(config.data.dir, config.data.protocol, seed=config.data.split_seed)
    return truncate_text(dataset, config.data.get("text_len"))
  raise ValueError(f"unknown data.source {config.data.source!r}; choose synthetic or movielens")


def truncate_text(dataset: RecDataset, text_len: int | None) -> RecDataset:
  """Keeps the first ``text_len`` tokens of every item (a cheaper text stem on small machines)."""
  cat = dataset.catalogue
  if not text_len or cat.text_ids is None or cat.text_ids.shape[1] <= text_len:
    return dataset
  cat = dataclasses.replace(cat, text_ids=cat.text_ids[:, :text_len],
                            text_mask=cat.text_mask[:, :text_len])
  return dataclasses.replace(dataset, catalogue=cat)
