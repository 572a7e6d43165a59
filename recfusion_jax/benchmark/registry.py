"""What the benchmark runs: protocols, metrics, and every model (ID baselines and the content
models, each content model a change applied to the suite's RecFusion config)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import ml_collections

from recfusion_jax import config_lib
from recfusion_jax.baselines import bpr_mf, chance, ease, lightgcn, markov, popularity, sasrec
from recfusion_jax.baselines.common import Baseline

PROTOCOLS: tuple[str, ...] = ("warm_ratio", "loo", "cold_items", "cold_users",
                              "missing_modality", "retrieval")
RANKING_PROTOCOLS = PROTOCOLS[:-1]
HEADLINE = ("HR@10", "NDCG@10", "Recall@10", "Precision@10", "MRR@10")
SAMPLED = ("sampled_HR@10", "sampled_NDCG@10")
RETRIEVAL = tuple(f"{d}_R@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10))
SUBSETS = ("natural_missing", "dropped")   # missing_modality slices


@dataclasses.dataclass(frozen=True)
class BaselineSpec:
  """How the runner fits one baseline."""

  factory: Callable[..., Baseline]
  grid: tuple[dict[str, Any], ...] = ({},)
  max_epochs: int = 0            # iterative models: epochs are tuned up to this
  eval_every: int = 1
  protocols: tuple[str, ...] = ("warm_ratio", "loo", "cold_users", "missing_modality")


# ID-only models cannot score items they never saw, so cold_items is not theirs; SASRec and the
# Markov chain are next-item models, run on the sequential protocol.
BASELINES: dict[str, BaselineSpec] = {
    "random": BaselineSpec(chance.RandomScores, protocols=RANKING_PROTOCOLS),
    "popularity": BaselineSpec(popularity.Popularity),
    "ease": BaselineSpec(ease.EASE, tuple(ease.GRID)),
    "bpr_mf": BaselineSpec(bpr_mf.BPRMF, tuple(bpr_mf.GRID), bpr_mf.MAX_EPOCHS,
                           bpr_mf.EVAL_EVERY),
    "lightgcn": BaselineSpec(lightgcn.LightGCN, tuple(lightgcn.GRID), lightgcn.MAX_EPOCHS,
                             lightgcn.EVAL_EVERY),
    "sasrec": BaselineSpec(sasrec.SASRec, tuple(sasrec.GRID), sasrec.MAX_EPOCHS,
                           sasrec.EVAL_EVERY, protocols=("loo",)),
    "markov": BaselineSpec(markov.MarkovChain, tuple(markov.GRID), protocols=("loo",)),
}


def _set_modalities(*modalities: str) -> Callable[[ml_collections.ConfigDict], None]:
  def apply(config):
    config.model.modalities = modalities
  return apply


def _id_only(config: ml_collections.ConfigDict) -> None:
  # RecFusion's user model and scoring with the ID source alone: the rung that shows whether
  # content adds anything (docs/TUNING.md), and a check on the user model against the ID
  # baselines. Nothing to align across modalities, nothing to gate.
  config.model.modalities = ()
  config.contrastive_weight = 0.0
  config.model.item_id.dropout = 0.0


def _concat(config: ml_collections.ConfigDict) -> None:
  # VBPR-style: the item ID embedding plus the concatenated content embeddings.
  config.model.fusion = "concat"


def _clip_two_tower(config: ml_collections.ConfigDict) -> None:
  config.model.encoder.unified = False
  config.model.fusion = "mean"
  if not config.contrastive_weight:
    config.contrastive_weight = 0.1


# Content models: changes applied to the suite's RecFusion config.
CONTENT_MODELS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    "id_only": _id_only,
    "text_only": _set_modalities("text"),
    "image_only": _set_modalities("image"),
    "concat": _concat,
    "clip_two_tower": _clip_two_tower,
    "RecFusion": lambda config: None,
    **{f"RecFusion-{name}": functools.partial(config_lib.apply_ablation, name=name)
       for name in config_lib.ABLATIONS},
}
ABLATION_GROUP = ("RecFusion",) + tuple(f"RecFusion-{name}" for name in config_lib.ABLATIONS)
ALL_MODELS = tuple(BASELINES) + tuple(CONTENT_MODELS)


def fit_protocol(protocol: str, model: str) -> str:
  """The protocol whose fitted model a run scores.

  ``retrieval`` scores the cold_items fit. A content model's ``missing_modality`` run scores
  its ``warm_ratio`` fit: the two protocols share the split (checked by fingerprint at run
  time) and differ only in the test-time catalogue mask, which the model never sees in
  training. ID baselines share fits the same way, through the fingerprint.
  """
  if protocol == "retrieval":
    return "cold_items"
  if protocol == "missing_modality" and model not in BASELINES:
    return "warm_ratio"
  return protocol


def applies(model: str, protocol: str) -> bool:
  """Whether ``model`` runs on ``protocol``."""
  if model in BASELINES:
    return protocol in BASELINES[model].protocols
  if model == "id_only":   # no content: nothing to score a cold item or a modality with
    return protocol in ("warm_ratio", "loo", "cold_users")
  if protocol == "retrieval":
    return model not in ("text_only", "image_only")
  return True
