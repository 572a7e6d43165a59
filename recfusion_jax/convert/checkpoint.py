"""Converted-encoder checkpoints: HF folders -> ContentEncoder -> Orbax, and back (``init_from``).

A converted checkpoint directory holds
  params/          Orbax (StandardCheckpointer) tree of the converted parameters only, keyed by
                   their NNX path ("trunk/layers/0/attention/query/kernel"); parameters that no
                   checkpoint filled (projections, modality embeddings, scratch stems) are absent
                   so that ``load_pretrained_encoder`` leaves them at their fresh initialisation;
  encoder.json     the encoder config, modalities, sources and every conversion report;
  tokenizer/       the text checkpoint's tokenizer files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from recfusion_jax import paths as paths_lib   # convert_hf has an argument named paths
from recfusion_jax import sharding
from recfusion_jax.convert.hf import HFCheckpoint, encoder_config_from_hf, read_hf_checkpoint, \
    select_towers
from recfusion_jax.convert.mapping import ConversionReport, import_hf_checkpoint, path_str
from recfusion_jax.models.encoder import ContentEncoder

PARAMS_DIR = "params"
CONFIG_FILE = "encoder.json"
TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass
class Converted:
  """An encoder filled from HF checkpoints, with what is needed to save it."""
  encoder: ContentEncoder
  config: ml_collections.ConfigDict
  modalities: tuple[str, ...]
  reports: list[ConversionReport]
  sources: list[HFCheckpoint]

  @property
  def loaded(self) -> set[str]:
    return {p for r in self.reports for p in r.loaded}

  @property
  def not_filled(self) -> list[str]:
    """Encoder parameters that no checkpoint filled (they keep their initialisation)."""
    return [p for p in _encoder_params(self.encoder) if p not in self.loaded]


def convert_hf(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
               modalities: Sequence[str] | None = None, unified: bool | None = None,
               trunk_from: str | None = None, max_len: int | None = None,
               seed: int = 0) -> Converted:
  """Builds the encoder that reproduces ``paths`` and fills it, checkpoint by checkpoint.

  See ``encoder_config_from_hf`` for the arguments; ``seed`` initialises what stays unfilled.
  """
  sources = [read_hf_checkpoint(p) for p in
             ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
  cfg = encoder_config_from_hf(sources, modalities=modalities, unified=unified,
                               trunk_from=trunk_from, max_len=max_len)
  selected = select_towers(sources, modalities)
  mods = tuple(m for m in ("text", "image") if any(m in ms for _, ms in selected))
  if cfg.unified:
    trunk_from = trunk_from or selected[0][1][0]
  else:
    trunk_from = None
  # Projections are never converted; their size only matters to the recommender.
  encoder = ContentEncoder(cfg, mods, embed_dim=cfg.width, rngs=nnx.Rngs(seed))
  reports = [import_hf_checkpoint(encoder, ckpt, modalities=ms, trunk_from=trunk_from)
             for ckpt, ms in selected]
  return Converted(encoder, cfg, mods, reports, sources)


def _nest(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, dict):
      flat.update(_flatten(value, path))
    else:
      flat[path] = value
  return flat


def _encoder_params(encoder: nnx.Module) -> dict[str, nnx.Variable]:
  return {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(encoder, nnx.Param))}


def save_converted(converted: Converted, out_dir: str | os.PathLike, *,
                   force: bool = False) -> epath.Path:
  """Writes params/ (Orbax), encoder.json and tokenizer/ under ``out_dir`` (local or a URI);
  returns it."""
  out = paths_lib.resolve(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  params = _encoder_params(converted.encoder)
  tree = _nest({p: np.asarray(jax.device_get(params[p].get_value()))
                for p in sorted(converted.loaded)})
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out / PARAMS_DIR, tree, force=force)
  checkpointer.wait_until_finished()

  tokenizer = None
  # The tokenizer belongs to whichever checkpoint filled the text stem.
  text_sources = [c for c, r in zip(converted.sources, converted.reports)
                  if any(k.startswith("text_stem/") for k in r.loaded)]
  if text_sources:
    files = text_sources[0].tokenizer_files()
    if files:
      (out / TOKENIZER_DIR).mkdir(exist_ok=True)
      for f in files:
        epath.Path(f).copy(out / TOKENIZER_DIR / f.name, overwrite=True)
      tokenizer = dict(dir=TOKENIZER_DIR, files=sorted(f.name for f in files))
  meta = dict(
      format=1,
      encoder=converted.config.to_dict(),
      modalities=list(converted.modalities),
      sources=[str(c.model_dir) for c in converted.sources],
      tokenizer=tokenizer,
      reports=[r.to_dict() for r in converted.reports],
      not_filled=converted.not_filled,
  )
  (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False))
  return out


def load_encoder_config(ckpt_dir: str | os.PathLike
                        ) -> tuple[ml_collections.ConfigDict, tuple[str, ...]]:
  """(encoder config, converted modalities) of a converted checkpoint directory."""
  meta = json.loads((epath.Path(ckpt_dir) / CONFIG_FILE).read_text())
  return ml_collections.ConfigDict(meta["encoder"]), tuple(meta["modalities"])


@dataclasses.dataclass
class LoadReport:
  """Outcome of ``load_pretrained_encoder``, by parameter path."""
  loaded: list[str]
  missing: list[str]      # encoder parameters the checkpoint does not have (kept as initialised)
  unexpected: list[str]   # checkpoint parameters the encoder does not have (not loaded)

  def __str__(self) -> str:
    return self.summary()

  def summary(self) -> str:
    lines = [f"loaded {len(self.loaded)} pretrained encoder parameters"]
    lines += [f"  kept initialisation: {p}" for p in self.missing]
    lines += [f"  not in this encoder: {p}" for p in self.unexpected]
    return "\n".join(lines)


def _trunk_into_towers(stored: dict[str, np.ndarray], checkpoint_modalities: Sequence[str],
                       encoder_modalities: Sequence[str]) -> dict[str, np.ndarray]:
  """A unified checkpoint's ``trunk/...`` as ``towers/<m>/...`` for each modality it was
  converted for (a BERT trunk starts the text tower of the separate-towers ablation, as it
  starts the shared trunk of the unified encoder); other entries unchanged."""
  targets = [m for m in checkpoint_modalities if m in encoder_modalities]
  if not targets:
    return stored   # the trunk matches nothing: reported as unexpected
  out = {p: v for p, v in stored.items() if not p.startswith("trunk/")}
  trunk = {p[len("trunk/"):]: v for p, v in stored.items() if p.startswith("trunk/")}
  for m in targets:
    out.update({f"towers/{m}/{p}": v for p, v in trunk.items()})
  return out


_PER_TOKEN = ("attention_norm/", "mlp_in/", "mlp_out/", "mlp_norm/")


def _trunk_into_experts(stored: dict[str, np.ndarray],
                        experts: Sequence[str]) -> dict[str, np.ndarray]:
  """The shared trunk's LayerNorms and MLPs also as each Multiway expert's (``experts/<m>/``),
  where the checkpoint has none of its own: a text-pretrained block starts the posters' MLP
  from what it learned on text, as it starts the shared attention."""
  out = dict(stored)
  for path, value in stored.items():
    if not path.startswith("trunk/"):
      continue
    head, _, tail = path.rpartition("/layers/")
    layer, _, rest = tail.partition("/")
    for m in experts:
      if head == "trunk" and rest.startswith(_PER_TOKEN):
        out.setdefault(f"trunk/layers/{layer}/experts/{m}/{rest}", value)
      elif path.startswith("trunk/final_norm/"):
        out.setdefault(f"trunk/expert_final_norms/{m}/{path[len('trunk/final_norm/'):]}", value)
  return out


def load_pretrained_encoder(encoder: ContentEncoder, ckpt_dir: str | os.PathLike) -> LoadReport:
  """Restores a converted checkpoint into ``encoder`` in place (the ``init_from`` hook).

  Parameters are matched by NNX path and must have the same shape (a mismatch raises with the
  path in the message); extra and missing parameters are reported, not fatal, so an encoder with
  more modalities than the checkpoint (e.g. video) keeps its fresh initialisation for those.
  A unified checkpoint's trunk starts the towers of its modalities in a separate-towers encoder,
  and its LayerNorms and MLPs start a Multiway trunk's experts (``encoder.experts``).
  Values keep the encoder's dtype and, for sharded encoders, its shardings.
  """
  root = paths_lib.resolve(ckpt_dir)
  params_dir = root / PARAMS_DIR
  if not params_dir.is_dir():
    raise FileNotFoundError(f"{params_dir} does not exist: not a converted checkpoint "
                            "(python -m recfusion_jax.convert --hf ... --out DIR)")
  stored = _flatten(ocp.StandardCheckpointer().restore(params_dir))
  if not encoder.unified and any(p.startswith("trunk/") for p in stored):
    stored = _trunk_into_towers(stored, load_encoder_config(root)[1], encoder.modalities)
  if encoder.experts:
    stored = _trunk_into_experts(stored, encoder.experts)
  params = _encoder_params(encoder)
  mismatched = [f"{p}: checkpoint {list(v.shape)} vs encoder "
                f"{list(params[p].get_value().shape)}"
                for p, v in stored.items()
                if p in params and tuple(v.shape) != tuple(params[p].get_value().shape)]
  if mismatched:
    raise ValueError(f"shape mismatch restoring {ckpt_dir}: " + "; ".join(mismatched))
  loaded = []
  for path, value in sorted(stored.items()):
    if path not in params:
      continue
    variable = params[path]
    old = variable.get_value()
    if isinstance(old, jax.Array):
      # Every process read the same file: each supplies its own shards of the global array.
      new = sharding.put_global(np.asarray(value).astype(old.dtype), old.sharding)
    else:
      new = jnp.asarray(value, dtype=old.dtype)
    variable.set_value(new)  # nnx.state hands out the module's own Variables: writes through
    loaded.append(path)
  return LoadReport(loaded=loaded, missing=sorted(set(params) - set(stored)),
                    unexpected=sorted(set(stored) - set(params)))
