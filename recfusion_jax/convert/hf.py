"""Reading Hugging Face model folders (config.json + safetensors) without transformers.

Supported: BERT (``model_type`` ``bert``), ViT (``vit``) and CLIP (``clip``, plus the single
towers ``clip_text_model`` / ``clip_vision_model``). A folder may be a plain ``save_pretrained``
folder, a sentence-transformers folder (weights in the root or in the Transformer module's
subfolder named by ``modules.json``) and its tensor names may carry a prefix such as ``bert.``,
``vit.`` or ``0.auto_model.``; the prefix is found from an anchor tensor, not guessed.

Hyperparameters missing from an older ``config.json`` take transformers' documented defaults
(``_DEFAULTS``), which is what transformers itself does when it loads that file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import ml_collections
import numpy as np
import safetensors.numpy

from recfusion_jax.data.types import MODALITIES

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json")

# transformers' config defaults for the fields we read (BertConfig, ViTConfig, CLIPTextConfig,
# CLIPVisionConfig).
_DEFAULTS = {
    "bert": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                 max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                 position_embedding_type="absolute", is_decoder=False),
    "vit": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.0,
                layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3),
    "clip_text": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5, dropout=0.0),
    "clip_vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5, dropout=0.0),
}

# Image-processor normalisation each family was trained with, used when the folder has no
# preprocessor_config.json (the report says so).
_DEFAULT_PIXEL_NORM = {
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # IMAGENET_STANDARD_MEAN/STD
    "clip_vision": ((0.48145466, 0.4578275, 0.40821073),   # OPENAI_CLIP_MEAN/STD
                    (0.26862954, 0.26130258, 0.27577711)),
}

# HF hidden_act -> recfusion_jax.models.transformer.ACTIVATIONS.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "quick_gelu": "quick_gelu", "relu": "relu"}

# model_type -> (towers as (modality, family, tensor prefix inside the model), config key of each
# tower's sub-config or None when the hyperparameters are top level).
_MODEL_TYPES = {
    "bert": ((("text", "bert", ""),), None),
    "vit": ((("image", "vit", ""),), None),
    "clip": ((("text", "clip_text", "text_model."), ("image", "clip_vision", "vision_model.")),
             {"text": "text_config", "image": "vision_config"}),
    "clip_text_model": ((("text", "clip_text", "text_model."),), None),
    "clip_vision_model": ((("image", "clip_vision", "vision_model."),), None),
}
# A tensor that every checkpoint of the family has, used to find the folder's key prefix.
_ANCHORS = {
    "bert": "embeddings.word_embeddings.weight",
    "vit": "embeddings.patch_embeddings.projection.weight",
    "clip_text": "text_model.embeddings.token_embedding.weight",
    "clip_vision": "vision_model.embeddings.patch_embedding.weight",
}
SUPPORTED = ("bert (BertModel, Bert*), vit (ViTModel, ViTFor*), "
             "clip (CLIPModel, CLIPTextModel, CLIPVisionModel)")


@dataclasses.dataclass(frozen=True)
class Tower:
  """One Transformer of a checkpoint: BERT's, ViT's, or one of CLIP's two."""
  modality: str          # "text" | "image"
  family: str            # "bert" | "vit" | "clip_text" | "clip_vision"
  prefix: str            # tensor-name prefix of the tower inside the model ("text_model.")
  config: dict[str, Any]  # the tower's hyperparameters, defaults filled in

  @property
  def pre_ln(self) -> bool:
    return self.family != "bert"

  @property
  def causal(self) -> bool:
    return self.family == "clip_text"

  @property
  def activation(self) -> str:
    return _ACTIVATIONS[self.config["hidden_act"]]  # validated by read_hf_checkpoint

  def trunk_config(self) -> dict[str, Any]:
    """The encoder's trunk hyperparameters that reproduce this tower exactly."""
    c = self.config
    return dict(width=c["hidden_size"], depth=c["num_hidden_layers"],
                num_heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"],
                pre_ln=self.pre_ln, ln_eps=float(c["layer_norm_eps"]),
                activation=self.activation)


@dataclasses.dataclass
class HFCheckpoint:
  """A Hugging Face model folder, read: config, towers and every tensor (numpy)."""
  root: Path                  # the folder the user named
  model_dir: Path             # where config.json was found (root or a sentence-transformers module)
  config: dict[str, Any]
  model_type: str
  architectures: tuple[str, ...]
  towers: dict[str, Tower]    # modality -> tower
  tensors: dict[str, np.ndarray]  # names exactly as stored
  prefix: str                 # stripped from every tensor name before mapping ("0.auto_model.")
  pixel_norm: dict[str, Any] | None  # image_mean / image_std / rescale_factor and their origin
  sentence_pooling: str | None  # "mean" | "cls" from a sentence-transformers Pooling module
  sentence_max_len: int | None  # sentence-transformers max_seq_length

  @property
  def modalities(self) -> tuple[str, ...]:
    return tuple(m for m in MODALITIES if m in self.towers)

  def tokenizer_files(self) -> list[Path]:
    """Tokenizer files next to the weights, else in the root (sentence-transformers)."""
    found = {}
    for folder in (self.root, self.model_dir):  # model_dir wins: it is the model's own copy
      for name in TOKENIZER_FILES:
        if (folder / name).is_file():
          found[name] = folder / name
    return list(found.values())


def _has_config(folder: Path) -> bool:
  return (folder / "config.json").is_file()


def _weights_in(folder: Path) -> list[Path] | None:
  if (folder / WEIGHTS_FILE).is_file():
    return [folder / WEIGHTS_FILE]
  if (folder / WEIGHTS_INDEX).is_file():
    index = json.loads((folder / WEIGHTS_INDEX).read_text())
    return [folder / name for name in sorted(set(index["weight_map"].values()))]
  return None


def _sentence_transformer_modules(root: Path) -> list[dict[str, Any]]:
  modules = root / "modules.json"
  return json.loads(modules.read_text()) if modules.is_file() else []


def _locate(root: Path) -> tuple[Path, list[Path]]:
  """(folder holding config.json, safetensors files) for a HF or sentence-transformers folder."""
  if not root.is_dir():
    raise FileNotFoundError(f"{root} is not a folder")
  candidates = [root]
  for module in _sentence_transformer_modules(root):
    if module.get("type", "").endswith("models.Transformer"):
      candidates.append(root / module.get("path", ""))
  for folder in candidates:
    if not _has_config(folder):
      continue
    # A sentence-transformers state dict saved whole sits in the root, the config in the module.
    weights = _weights_in(folder) or _weights_in(root)
    if weights:
      return folder, weights
  raise FileNotFoundError(
      f"no Hugging Face model in {root}: looked for config.json and {WEIGHTS_FILE} (or "
      f"{WEIGHTS_INDEX}) in {[str(c) for c in candidates]}; PyTorch .bin files are not read, "
      "re-save them with save_pretrained(..., safe_serialization=True)")


def _model_type(config: dict[str, Any]) -> str:
  model_type = config.get("model_type")
  archs = tuple(config.get("architectures") or ())
  if model_type in _MODEL_TYPES:
    return model_type
  raise ValueError(
      f"unsupported checkpoint: model_type={model_type!r}, architectures={list(archs)}; "
      f"the converter reads {SUPPORTED}")


def _pixel_norm(model_dir: Path, root: Path, family: str) -> dict[str, Any]:
  for folder in (model_dir, root):
    path = folder / "preprocessor_config.json"
    if path.is_file():
      pre = json.loads(path.read_text())
      normalize, rescale = pre.get("do_normalize", True), pre.get("do_rescale", True)
      mean = pre.get("image_mean", _DEFAULT_PIXEL_NORM[family][0]) if normalize else (0.0,) * 3
      std = pre.get("image_std", _DEFAULT_PIXEL_NORM[family][1]) if normalize else (1.0,) * 3
      return dict(image_mean=[float(v) for v in mean], image_std=[float(v) for v in std],
                  rescale_factor=float(pre.get("rescale_factor", 1 / 255)) if rescale else 1.0,
                  origin=str(path))
  mean, std = _DEFAULT_PIXEL_NORM[family]
  return dict(image_mean=list(mean), image_std=list(std), rescale_factor=1 / 255,
              origin=f"no preprocessor_config.json: the {family} default")


def _sentence_settings(root: Path) -> tuple[str | None, int | None]:
  pooling = max_len = None
  for module in _sentence_transformer_modules(root):
    if module.get("type", "").endswith("models.Pooling"):
      pc = json.loads((root / module["path"] / "config.json").read_text())
      modes = [k[len("pooling_mode_"):] for k, v in pc.items()
               if k.startswith("pooling_mode_") and v]
      if modes == ["mean_tokens"]:
        pooling = "mean"
      elif modes == ["cls_token"]:
        pooling = "cls"
      else:
        raise ValueError(f"sentence-transformers pooling {modes} in {root / module['path']} has no "
                         "encoder counterpart (mean_tokens or cls_token)")
  st_config = root / "sentence_bert_config.json"
  if st_config.is_file():
    max_len = json.loads(st_config.read_text()).get("max_seq_length")
  return pooling, max_len


def _find_prefix(tensors: dict[str, np.ndarray], towers: dict[str, Tower], where: Path) -> str:
  prefixes = set()
  for tower in towers.values():
    anchor = _ANCHORS[tower.family]
    prefixes |= {k[:-len(anchor)] for k in tensors if k.endswith(anchor)}
  if len(prefixes) != 1:
    anchors = [_ANCHORS[t.family] for t in towers.values()]
    raise ValueError(f"{where}: expected exactly one tensor name ending in one of {anchors}, "
                     f"found prefixes {sorted(prefixes)}")
  return prefixes.pop()


def read_hf_checkpoint(path: str | os.PathLike) -> HFCheckpoint:
  """Reads a BERT / ViT / CLIP folder; raises on an unsupported architecture or layout."""
  root = Path(path)
  model_dir, weight_files = _locate(root)
  config = json.loads((model_dir / "config.json").read_text())
  model_type = _model_type(config)
  tower_specs, sub_configs = _MODEL_TYPES[model_type]
  towers = {}
  for modality, family, prefix in tower_specs:
    raw = config[sub_configs[modality]] if sub_configs else config
    towers[modality] = Tower(modality, family, prefix, {**_DEFAULTS[family], **(raw or {})})
  for tower in towers.values():
    c = tower.config
    if c.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"{model_dir}: position_embedding_type={c['position_embedding_type']!r} "
                       "is not supported (the text stem has absolute positions)")
    if c.get("is_decoder"):
      raise ValueError(f"{model_dir}: a BERT decoder (is_decoder=true) is not supported")
    if c.get("num_channels", 3) != 3:
      raise ValueError(f"{model_dir}: num_channels={c['num_channels']}; image stems take RGB")
    if c["hidden_act"] not in _ACTIVATIONS:
      raise ValueError(f"{model_dir}: {tower.family} hidden_act={c['hidden_act']!r} has no "
                       f"counterpart in the encoder; supported: {sorted(_ACTIVATIONS)}")

  tensors = {}
  for f in weight_files:
    tensors.update(safetensors.numpy.load_file(str(f)))
  prefix = _find_prefix(tensors, towers, model_dir)
  image = towers.get("image")
  pixel_norm = _pixel_norm(model_dir, root, image.family) if image else None
  pooling, max_len = _sentence_settings(root)
  return HFCheckpoint(
      root=root, model_dir=model_dir, config=config, model_type=model_type,
      architectures=tuple(config.get("architectures") or ()), towers=towers, tensors=tensors,
      prefix=prefix, pixel_norm=pixel_norm, sentence_pooling=pooling, sentence_max_len=max_len)


# ---------------------------------------------------------------------------------------------
# Encoder configs.

# Settings for modalities that no checkpoint provides: their stems start from scratch.
def _scratch_modality_configs() -> dict[str, ml_collections.ConfigDict]:
  return dict(
      text=ml_collections.ConfigDict(dict(
          vocab_size=30522, max_len=128, type_vocab_size=2, stem_norm=True, pooling="mean",
          causal=False)),
      image=ml_collections.ConfigDict(dict(
          size=224, patch=16, patch_bias=True, pre_norm=False, pooling="cls")),
      video=ml_collections.ConfigDict(dict(
          frames=8, size=224, tubelet_frames=2, patch=16, pooling="cls")),
  )


def _stem_config(ckpt: HFCheckpoint, tower: Tower, max_len: int | None) -> dict[str, Any]:
  c = tower.config
  if tower.modality == "text":
    positions = c["max_position_embeddings"]
    # All positions by default, so a config with the checkpoint's max_position_embeddings
    # (e.g. 512 for BERT) restores; sentence-transformers' shorter max_seq_length is only noted.
    length = max_len or positions
    if length > positions:
      raise ValueError(f"max_len={length} exceeds the checkpoint's {positions} positions")
    if tower.family == "bert":
      return dict(vocab_size=c["vocab_size"], max_len=length, type_vocab_size=c["type_vocab_size"],
                  stem_norm=True, pooling=ckpt.sentence_pooling or "mean", causal=False)
    return dict(vocab_size=c["vocab_size"], max_len=length, type_vocab_size=0, stem_norm=False,
                pooling="eos", causal=True)
  # The folded pixel normalisation needs a patch bias unless it is the identity map of [-1, 1].
  norm = ckpt.pixel_norm
  half = 127.5 * norm["rescale_factor"]  # mean = std = half maps [0, 255] exactly onto [-1, 1]
  identity = np.allclose(norm["image_mean"], half) and np.allclose(norm["image_std"], half)
  return dict(size=c["image_size"], patch=c["patch_size"],
              patch_bias=tower.family == "vit" or not identity,
              pre_norm=tower.family == "clip_vision", pooling="cls")


def encoder_config_from_hf(
    path: str | os.PathLike | HFCheckpoint | Sequence[str | os.PathLike | HFCheckpoint], *,
    modalities: Sequence[str] | None = None, unified: bool | None = None,
    trunk_from: str | None = None, max_len: int | None = None) -> ml_collections.ConfigDict:
  """The ``model.encoder`` config that reproduces one or more checkpoints.

  Args:
    path: a checkpoint folder, or several (e.g. BERT then ViT); each modality must come from
      exactly one of them.
    modalities: which checkpoint towers to use (default: all of them).
    unified: one shared trunk (default, except for a CLIP folder with both towers selected).
    trunk_from: unified only: the modality whose tower becomes the shared trunk (default: the
      first selected modality of the first checkpoint).
    max_len: text positions to keep (default: all of the checkpoint's; a shorter table is
      truncated and reported).

  Raises:
    ValueError: on unsupported checkpoints and on combinations the encoder cannot express
      (towers of different sizes sharing a trunk, or separate towers of different sizes).
  """
  sources = _sources(path)
  selected = select_towers(sources, modalities)
  if unified is None:
    unified = not (len(sources) == 1 and len(selected[0][1]) > 1)  # CLIP: two towers
  owners = {m: ckpt for ckpt, ms in selected for m in ms}
  cfg = ml_collections.ConfigDict()
  cfg.unified = bool(unified)
  if unified:
    trunk_from = trunk_from or selected[0][1][0]
    if trunk_from not in owners:
      raise ValueError(f"trunk_from={trunk_from!r}, but no checkpoint provides that modality "
                       f"(selected: {sorted(owners)})")
    trunk_tower = owners[trunk_from].towers[trunk_from]
    trunk = trunk_tower.trunk_config()
    for m, ckpt in owners.items():
      width = ckpt.towers[m].config["hidden_size"]
      if width != trunk["width"]:
        raise ValueError(f"the {m} stem of {ckpt.model_dir} has width {width}, the shared trunk "
                         f"(from the {trunk_from} tower) {trunk['width']}")
    dropout_tower = trunk_tower
  else:
    if trunk_from is not None:
      raise ValueError("trunk_from applies to a unified encoder only")
    trunks = {m: ckpt.towers[m].trunk_config() for m, ckpt in owners.items()}
    first = next(iter(trunks.values()))
    if any(t != first for t in trunks.values()):
      raise ValueError(
          "separate towers with different hyperparameters cannot be built: ContentEncoder("
          f"unified=False) gives every tower the same width/depth/heads/mlp/norms; got {trunks}. "
          "Convert one modality (--modality) or use a unified encoder")
    trunk = first
    dropout_tower = next(iter(owners.values())).towers[next(iter(owners))]
  cfg.update(trunk)
  cfg.dropout = float(dropout_tower.config.get("hidden_dropout_prob",
                                               dropout_tower.config.get("dropout", 0.0)))
  for m, sub in _scratch_modality_configs().items():
    if m in owners:
      sub.update(_stem_config(owners[m], owners[m].towers[m], max_len))
    cfg[m] = sub
  return cfg


def _sources(path) -> list[HFCheckpoint]:
  paths = [path] if isinstance(path, (str, os.PathLike, HFCheckpoint)) else list(path)
  if not paths:
    raise ValueError("no checkpoint given")
  return [p if isinstance(p, HFCheckpoint) else read_hf_checkpoint(p) for p in paths]


def select_towers(sources: Sequence[HFCheckpoint], modalities: Sequence[str] | None
                  ) -> list[tuple[HFCheckpoint, tuple[str, ...]]]:
  """Each checkpoint with the modalities it provides; every modality from one checkpoint only."""
  if modalities is not None:
    unknown = set(modalities) - {"text", "image"}
    if unknown:
      raise ValueError(f"cannot import modalities {sorted(unknown)}: checkpoints provide text "
                       "and image towers only (video stems start from scratch)")
  selected, owner = [], {}
  for ckpt in sources:
    ms = tuple(m for m in ckpt.modalities if modalities is None or m in modalities)
    if not ms:
      raise ValueError(f"{ckpt.model_dir} provides {ckpt.modalities}, none of them selected "
                       f"({list(modalities or [])})")
    for m in ms:
      if m in owner:
        raise ValueError(f"modality {m!r} is provided by both {owner[m]} and {ckpt.model_dir}; "
                         "select one with --modality")
      owner[m] = ckpt.model_dir
    selected.append((ckpt, ms))
  return selected
