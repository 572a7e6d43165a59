"""One protocol/seed of a suite as the runner fits and scores it (``ProtocolData``).

MovieLens protocols are read from the exported split TSVs (``data.movielens``); the synthetic
suite labels the generator's log with the same ``data.splits`` code. Nothing is re-derived here
except the selections each protocol defines (cold items, modality slices).
"""

from __future__ import annotations

import dataclasses
import hashlib

import ml_collections
import numpy as np

from recfusion_jax.baselines.common import merge_valid_into_train
from recfusion_jax.data import movielens, splits
from recfusion_jax.data.synthetic import make_synthetic
from recfusion_jax.data.types import MODALITIES, Catalogue, Interactions, RecDataset

SINGLE_SPLIT_PROTOCOLS = ("loo",)
MISSING_MODALITY_DROP_FRAC = 0.3   # as data_prep's missing_modality export


@dataclasses.dataclass
class ProtocolData:
  """One protocol/seed, ready to fit and score. Every ranking excludes the fitted data set's
  ``known`` items (``tune.known`` while tuning, ``fit.known`` for the final score)."""

  protocol: str
  seed: int
  tune: RecDataset                  # train (fitted while tuning) + valid (scored while tuning)
  fit: RecDataset                   # data of the final fit
  heldout: Interactions             # what is ranked
  catalogue: Catalogue              # content scored at evaluation (masked: missing_modality)
  candidate_items: np.ndarray | None = None
  subsets: dict[str, Interactions] = dataclasses.field(default_factory=dict)


def split_seed(protocol: str, seed: int) -> int:
  """The data split a run of ``seed`` uses: ``loo`` has one split (each user's last
  interaction), so its seeds vary only the model's initialisation and sampling."""
  return 0 if protocol in SINGLE_SPLIT_PROTOCOLS else seed


def _raw_protocol(config: ml_collections.ConfigDict, protocol: str, seed: int
                  ) -> tuple[RecDataset, np.ndarray | None]:
  """(data set, test-time presence or None) of a ranking protocol of ``config.data``."""
  seed = split_seed(protocol, seed)
  if config.data.source == "movielens":
    dataset = movielens.load_movielens(config.data.dir, protocol, seed,
                                       streaming=config.data.get("streaming", False))
    presence = (movielens.load_test_presence(config.data.dir, seed)
                if protocol == "missing_modality" else None)
    return dataset, presence
  if config.data.source == "synthetic":
    return _synthetic_protocol(config.data.synthetic, protocol, seed)
  raise ValueError(f"unknown data.source {config.data.source!r}")


def _synthetic_protocol(synthetic: ml_collections.ConfigDict, protocol: str, seed: int
                        ) -> tuple[RecDataset, np.ndarray | None]:
  """The synthetic data set (time-ordered leave-one-out + never-trained items) as a protocol."""
  dataset = make_synthetic(synthetic, seed=seed)
  warm = dataset.catalogue.has_id[dataset.test.item]
  if protocol in ("warm_ratio", "loo", "missing_modality"):
    dataset = dataclasses.replace(dataset, test=dataset.test.select(warm))
  elif protocol == "cold_items":
    dataset = dataclasses.replace(dataset, test=dataset.test.select(~warm))
  else:
    raise ValueError(f"the synthetic suite has no {protocol!r} protocol")
  if protocol != "missing_modality":
    return dataset, None
  # The test items with text and image; a share loses one of the two (the export's rule).
  presence = dataset.catalogue.presence.copy()
  t, i = MODALITIES.index("text"), MODALITIES.index("image")
  items = np.unique(dataset.test.item)
  both = items[presence[items, t] & presence[items, i]]
  dropped, drop_text = splits.choose_dropped_modalities(both, MISSING_MODALITY_DROP_FRAC,
                                                        np.random.default_rng(seed))
  presence[dropped, np.where(drop_text, t, i)] = False
  return dataset, presence


def load_protocol(config: ml_collections.ConfigDict, protocol: str, seed: int, *,
                  split: str = "test", refit: bool = True) -> ProtocolData:
  """The fit/evaluation data of one ranking protocol and seed of ``config.data``."""
  data, test_presence = _raw_protocol(config, protocol, seed)
  if split == "valid":
    fit, heldout = data, data.valid
  else:
    fit, heldout = (merge_valid_into_train(data) if refit else data), data.test
  catalogue = (fit.catalogue if test_presence is None
               else movielens.apply_presence(fit.catalogue, test_presence))
  pdata = ProtocolData(protocol, seed, data, fit, heldout, catalogue)
  if protocol == "cold_items":
    pdata.heldout = heldout.select(~fit.catalogue.has_id[heldout.item])
    pdata.candidate_items = np.unique(pdata.heldout.item).astype(np.int32)
  if test_presence is not None:
    cols = [MODALITIES.index(m) for m in ("text", "image")]
    complete = fit.catalogue.presence[:, cols].all(1)
    kept = catalogue.presence[:, cols].all(1)
    pdata.subsets = {"natural_missing": heldout.select(~complete[heldout.item]),
                     "dropped": heldout.select(complete[heldout.item] & ~kept[heldout.item])}
  return pdata


def fingerprint(pdata: ProtocolData) -> str:
  """Hash of the interactions: identical splits (warm_ratio, missing_modality) share ID fits."""
  h = hashlib.sha1()
  for part in (pdata.tune.train, pdata.tune.valid, pdata.fit.train, pdata.heldout):
    for field in ("user", "item", "timestamp"):
      h.update(np.ascontiguousarray(getattr(part, field)).tobytes())
  return h.hexdigest()
