"""Tensor-by-tensor mapping of BERT / ViT / CLIP checkpoints onto a ContentEncoder.

Rules (see docs/PRETRAINED.md):
  * a checkpoint tower (BERT, ViT, CLIP-text, CLIP-vision) feeds the stem of its modality;
  * separate towers (``unified=False``): it also feeds ``towers[modality]``;
  * one shared trunk (``unified=True``): only the tower of modality ``trunk_from`` feeds the
    trunk; the other towers' Transformer layers are reported unused (e.g. a ViT added to a
    BERT-trunk encoder contributes its patch embedding, class token and positions only).

Layouts: torch Linear ``[out, in]`` -> ``kernel [in, out]``; Conv ``[out, in, kh, kw]`` ->
``[kh, kw, in, out]``; LayerNorm ``weight`` -> ``scale``. The image processor's pixel
normalisation is folded into the patch embedding, because the image stem always sees
``uint8 / 127.5 - 1`` (see ``_fold_pixel_norm``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recfusion_jax.convert.hf import HFCheckpoint, Tower, read_hf_checkpoint
from recfusion_jax.models.encoder import ContentEncoder

Path_ = tuple[str | int, ...]


def path_str(path: Path_) -> str:
  return "/".join(str(p) for p in path)


@dataclasses.dataclass
class ConversionReport:
  """What one checkpoint contributed; every name is reported, nothing is dropped silently."""
  source: str
  model_type: str
  prefix: str
  loaded: dict[str, str] = dataclasses.field(default_factory=dict)     # encoder param <- tensor
  unmapped: dict[str, str] = dataclasses.field(default_factory=dict)   # tensor -> why unused
  missing: list[str] = dataclasses.field(default_factory=list)         # encoder params not filled
  truncated: dict[str, str] = dataclasses.field(default_factory=dict)  # tensor -> old -> new shape
  notes: list[str] = dataclasses.field(default_factory=list)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def summary(self) -> str:
    lines = [f"{self.source} ({self.model_type}, prefix {self.prefix!r}): "
             f"{len(self.loaded)} parameters loaded"]
    lines += [f"  truncated {k}: {v}" for k, v in self.truncated.items()]
    lines += [f"  unused {k}: {v}" for k, v in self.unmapped.items()]
    lines += [f"  not filled: {k}" for k in self.missing]
    lines += [f"  note: {n}" for n in self.notes]
    return "\n".join(lines)


# A rule maps a tensor name (relative to its tower) to (part, path inside the part, layout):
# part is "stem" or "trunk"; layout is how the torch tensor becomes the JAX one.
_Rule = tuple[str, Callable[[re.Match], tuple[str, Path_, str]]]


def _module_rules(hf_module: str, part: str, target: Path_, kind: str) -> list[_Rule]:
  """Rules for the weight/bias of one torch Linear ('linear'), LayerNorm ('norm') or Embedding."""
  leaf = {"linear": {"weight": ("kernel", "linear"), "bias": ("bias", "copy")},
          "norm": {"weight": ("scale", "copy"), "bias": ("bias", "copy")},
          "embed": {"weight": ("embedding", "copy")},
          "positions": {"weight": ("embedding", "positions")}}[kind]
  rules = []
  for name, (param, layout) in leaf.items():
    rules.append((re.escape(f"{hf_module}.{name}"),
                  lambda m, t=target + (param,), lay=layout: (part, t, lay)))
  return rules


def _layer_rules(layer_prefix: str, modules: dict[str, tuple[str, str]]) -> list[_Rule]:
  """Per-layer rules: ``{layer_prefix}.{i}.{hf module}.{weight|bias}`` -> ``layers/i/...``."""
  leaf = {"linear": {"weight": ("kernel", "linear"), "bias": ("bias", "copy")},
          "norm": {"weight": ("scale", "copy"), "bias": ("bias", "copy")}}
  rules = []
  for hf_module, (target, kind) in modules.items():
    for name, (param, layout) in leaf[kind].items():
      pattern = rf"{re.escape(layer_prefix)}\.(\d+)\.{re.escape(hf_module)}\.{name}"
      rules.append((pattern, lambda m, t=tuple(target.split("/")), p=param, lay=layout:
                    ("trunk", ("layers", int(m[1])) + t + (p,), lay)))
  return rules


_CLIP_LAYER = {
    "self_attn.q_proj": ("attention/query", "linear"),
    "self_attn.k_proj": ("attention/key", "linear"),
    "self_attn.v_proj": ("attention/value", "linear"),
    "self_attn.out_proj": ("attention/out", "linear"),
    "layer_norm1": ("attention_norm", "norm"),
    "mlp.fc1": ("mlp_in", "linear"),
    "mlp.fc2": ("mlp_out", "linear"),
    "layer_norm2": ("mlp_norm", "norm"),
}

_RULES: dict[str, list[_Rule]] = {
    "bert": [
        *_module_rules("embeddings.word_embeddings", "stem", ("word_embeddings",), "embed"),
        *_module_rules("embeddings.position_embeddings", "stem", ("position_embeddings",),
                       "positions"),
        *_module_rules("embeddings.token_type_embeddings", "stem", ("token_type_embeddings",),
                       "embed"),
        *_module_rules("embeddings.LayerNorm", "stem", ("norm",), "norm"),
        *_layer_rules("encoder.layer", {
            "attention.self.query": ("attention/query", "linear"),
            "attention.self.key": ("attention/key", "linear"),
            "attention.self.value": ("attention/value", "linear"),
            "attention.output.dense": ("attention/out", "linear"),
            "attention.output.LayerNorm": ("attention_norm", "norm"),
            "intermediate.dense": ("mlp_in", "linear"),
            "output.dense": ("mlp_out", "linear"),
            "output.LayerNorm": ("mlp_norm", "norm"),
        }),
    ],
    "vit": [
        (re.escape("embeddings.cls_token"), lambda m: ("stem", ("cls_token",), "squeeze")),
        (re.escape("embeddings.position_embeddings"),
         lambda m: ("stem", ("position_embeddings",), "squeeze")),
        (re.escape("embeddings.patch_embeddings.projection.weight"),
         lambda m: ("stem", ("patch_embedding", "kernel"), "patch")),
        (re.escape("embeddings.patch_embeddings.projection.bias"),
         lambda m: ("stem", ("patch_embedding", "bias"), "patch")),
        *_layer_rules("encoder.layer", {
            "attention.attention.query": ("attention/query", "linear"),
            "attention.attention.key": ("attention/key", "linear"),
            "attention.attention.value": ("attention/value", "linear"),
            "attention.output.dense": ("attention/out", "linear"),
            "layernorm_before": ("attention_norm", "norm"),
            "intermediate.dense": ("mlp_in", "linear"),
            "output.dense": ("mlp_out", "linear"),
            "layernorm_after": ("mlp_norm", "norm"),
        }),
        *_module_rules("layernorm", "trunk", ("final_norm",), "norm"),
    ],
    "clip_text": [
        *_module_rules("embeddings.token_embedding", "stem", ("word_embeddings",), "embed"),
        *_module_rules("embeddings.position_embedding", "stem", ("position_embeddings",),
                       "positions"),
        *_layer_rules("encoder.layers", _CLIP_LAYER),
        *_module_rules("final_layer_norm", "trunk", ("final_norm",), "norm"),
    ],
    "clip_vision": [
        (re.escape("embeddings.class_embedding"), lambda m: ("stem", ("cls_token",), "squeeze")),
        (re.escape("embeddings.position_embedding.weight"),
         lambda m: ("stem", ("position_embeddings",), "squeeze")),
        (re.escape("embeddings.patch_embedding.weight"),
         lambda m: ("stem", ("patch_embedding", "kernel"), "patch")),
        *_module_rules("pre_layrnorm", "stem", ("pre_norm",), "norm"),
        *_layer_rules("encoder.layers", _CLIP_LAYER),
        *_module_rules("post_layernorm", "trunk", ("final_norm",), "norm"),
    ],
}

# Tensors deliberately left out, with the reason that goes into the report.
_IGNORED = [
    (r"(.*\.)?position_ids", "buffer: positions are computed, not stored"),
    (r"(.*\.)?pooler\..*", "pooler head: the encoder pools without it (encoder.<m>.pooling)"),
    (r"(.*\.)?mask_token", "masked-image-modelling token: unused by the encoder"),
    (r"text_projection\..*|visual_projection\..*|logit_scale",
     "CLIP projection/temperature: the recommender trains its own projections"),
]


_KEY_BIAS = ("attention key bias: adds the same q.b to every logit of a query, which softmax "
             "ignores; the encoder's key projection has no bias (outputs unchanged)")


def _match(rules: list[_Rule], name: str):
  for pattern, target in rules:
    m = re.fullmatch(pattern, name)
    if m:
      return target(m)
  return None


def _ignored(name: str) -> str | None:
  for pattern, reason in _IGNORED:
    if re.fullmatch(pattern, name):
      return reason
  return None


def _module_at(root: nnx.Module, path: Path_):
  node = root
  for key in path:
    node = node[key] if isinstance(key, int) or isinstance(node, nnx.Dict) else getattr(node, key)
  return node


def _pixel_affine(ckpt: HFCheckpoint) -> tuple[np.ndarray, np.ndarray]:
  """(a, b) per channel with ``hf_pixels = a * stem_pixels + b``.

  The stem computes ``s = x / 127.5 - 1`` from uint8 ``x``; HF image processors feed
  ``(x * rescale - mean) / std``. Substituting ``x = 127.5 (s + 1)`` gives the affine map.
  """
  n = ckpt.pixel_norm
  mean, std = np.asarray(n["image_mean"], np.float64), np.asarray(n["image_std"], np.float64)
  r = n["rescale_factor"]
  return 127.5 * r / std, (127.5 * r - mean) / std


def _fold_pixel_norm(kernel: np.ndarray, bias: np.ndarray | None, ckpt: HFCheckpoint
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Patch conv on HF pixels == conv with (kernel * a, bias + sum kernel * b) on stem pixels."""
  a, b = _pixel_affine(ckpt)
  k64 = kernel.astype(np.float64)  # [kh, kw, in, out]
  new_bias = np.einsum("hwio,i->o", k64, b)
  if bias is not None:
    new_bias = new_bias + bias.astype(np.float64)
  # Left in float64: the caller casts once, to the parameter's dtype.
  return k64 * a[None, None, :, None], new_bias


def _placement(encoder: ContentEncoder, tower: Tower, part: str,
               trunk_from: str | None) -> tuple[Path_ | None, str | None]:
  """Where a tower's stem/trunk tensors go: (encoder path prefix, None) or (None, why not)."""
  m = tower.modality
  if part == "stem":
    return (f"{m}_stem",), None
  if not encoder.unified:
    return ("towers", m), None
  if m == trunk_from:
    return ("trunk",), None
  return None, f"the shared trunk is fed from the {trunk_from} tower (trunk_from={trunk_from!r})"


def _check_trunk_compatible(encoder: ContentEncoder, tower: Tower) -> None:
  """Layouts the shapes cannot reveal: LN placement, heads, activation, causality, epsilon."""
  trunk = encoder.trunk_for(tower.modality)
  if not trunk.layers:
    return
  block, want = trunk.layers[0], tower.trunk_config()
  have = dict(pre_ln=block.pre_ln, num_heads=block.attention.num_heads,
              activation=block.activation, ln_eps=block.attention_norm.epsilon)
  problems = [f"{k}: encoder {have[k]!r} vs checkpoint {want[k]!r}" for k in have
              if (not math.isclose(have[k], want[k], rel_tol=1e-6) if k == "ln_eps"
                  else have[k] != want[k])]
  if encoder.causal.get(tower.modality, False) != tower.causal:
    problems.append(f"causal: encoder {encoder.causal[tower.modality]} vs checkpoint "
                    f"{tower.causal}")
  if problems:
    raise ValueError(f"the {tower.family} tower cannot feed the {tower.modality} trunk exactly: "
                     + "; ".join(problems))


def import_hf_checkpoint(encoder: ContentEncoder,
                         checkpoint: str | os.PathLike | HFCheckpoint, *,
                         modalities: Sequence[str] | None = None,
                         trunk_from: str | None = None) -> ConversionReport:
  """Copies a checkpoint's tensors into ``encoder`` in place and reports what happened.

  Args:
    encoder: a ContentEncoder, e.g. built from ``encoder_config_from_hf``.
    checkpoint: a HF folder or an already read ``HFCheckpoint``.
    modalities: which of the checkpoint's towers to import (default: those the encoder has).
    trunk_from: unified encoders: the modality whose tower feeds the shared trunk (default: the
      checkpoint's first imported tower). A tower of another modality feeds its stem only.

  Raises:
    ValueError: a tensor whose shape does not fit its parameter (named in the message), a
      layout the encoder cannot reproduce, or an invalid selection.
  """
  ckpt = checkpoint if isinstance(checkpoint, HFCheckpoint) else read_hf_checkpoint(checkpoint)
  report = ConversionReport(source=str(ckpt.model_dir), model_type=ckpt.model_type,
                            prefix=ckpt.prefix)
  wanted = [m for m in ckpt.modalities if m in encoder.modalities
            and (modalities is None or m in modalities)]
  if not wanted:
    raise ValueError(f"{ckpt.model_dir} provides {ckpt.modalities}; the encoder has "
                     f"{encoder.modalities}; selected {modalities}: nothing to import")
  if encoder.unified:
    trunk_from = trunk_from or wanted[0]
  elif trunk_from is not None:
    raise ValueError("trunk_from applies to a unified encoder only")

  params = dict(nnx.to_flat_state(nnx.state(encoder, nnx.Param)))
  for m in wanted:
    if _placement(encoder, ckpt.towers[m], "trunk", trunk_from)[0] is not None:
      _check_trunk_compatible(encoder, ckpt.towers[m])

  values: dict[Path_, np.ndarray] = {}
  sources: dict[Path_, str] = {}
  patch: dict[str, Any] = {}
  for full_name in sorted(ckpt.tensors):
    array = ckpt.tensors[full_name]
    if not full_name.startswith(ckpt.prefix):
      report.unmapped[full_name] = f"outside the model's prefix {ckpt.prefix!r}"
      continue
    name = full_name[len(ckpt.prefix):]
    tower = next((t for t in ckpt.towers.values() if name.startswith(t.prefix)), None)
    reason = _ignored(name)
    if reason:
      report.unmapped[full_name] = reason
      continue
    rule = _match(_RULES[tower.family], name[len(tower.prefix):]) if tower else None
    if rule is None:
      report.unmapped[full_name] = "not part of any supported tower layout"
      continue
    part, rel, layout = rule
    if tower.modality not in wanted:
      report.unmapped[full_name] = f"{tower.modality} tower not imported"
      continue
    where, why_not = _placement(encoder, tower, part, trunk_from)
    if where is None:
      report.unmapped[full_name] = why_not
      continue
    path = where + rel
    if layout == "patch":  # folded once kernel and bias are both known
      patch[rel[-1]] = (path, _to_layout(full_name, array, layout, (), report), full_name)
      continue
    if path not in params:
      report.unmapped[full_name] = (
          _KEY_BIAS if rel[-3:] == ("attention", "key", "bias")
          else f"the encoder has no parameter {path_str(path)}")
      continue
    _check_norm_eps(encoder, full_name, path, tower)
    target_shape = tuple(params[path].get_value().shape)
    value = _to_layout(full_name, array, layout, target_shape, report)
    _check_shape(full_name, value, path, target_shape)
    values[path], sources[path] = value, full_name

  if patch:
    _place_patch(ckpt, patch, params, values, sources, report)
  if ckpt.sentence_max_len and "text" in wanted:
    report.notes.append(f"sentence-transformers max_seq_length={ckpt.sentence_max_len}: the model "
                        "was trained on texts up to that length")

  cast = sorted({str(ckpt.tensors[n].dtype) for n in sources.values() if n in ckpt.tensors}
                - {str(params[p].get_value().dtype) for p in values})
  if cast:
    report.notes.append(f"tensors stored as {cast} were cast to the encoder's parameter dtype")
  for path, value in values.items():
    variable = params[path]
    old = variable.get_value()
    new = jnp.asarray(value, dtype=old.dtype)
    if isinstance(old, jax.Array) and hasattr(old, "sharding"):
      new = jax.device_put(new, old.sharding)  # keep a sharded encoder sharded
    variable.set_value(new)  # nnx.state hands out the module's own Variables: writes through
    report.loaded[path_str(path)] = sources[path]
  report.missing = [path_str(p) for p in params if p not in values]
  return report


def _check_norm_eps(encoder: ContentEncoder, name: str, path: Path_, tower: Tower) -> None:
  module = _module_at(encoder, path[:-1])
  eps = float(tower.config["layer_norm_eps"])
  if isinstance(module, nnx.LayerNorm) and not math.isclose(module.epsilon, eps, rel_tol=1e-6):
    raise ValueError(f"{name}: LayerNorm epsilon {eps} in the checkpoint, {module.epsilon} in "
                     f"{path_str(path[:-1])}; set encoder.ln_eps={eps}")


def _to_layout(name: str, array: np.ndarray, layout: str, target_shape: tuple[int, ...],
               report: ConversionReport) -> np.ndarray:
  if layout == "copy":
    return array
  if layout == "linear":
    if array.ndim != 2:
      raise ValueError(f"{name}: expected a 2-D Linear weight, got shape {array.shape}")
    return array.T
  if layout == "squeeze":  # ViT's [1, 1, D] class token and [1, N, D] positions
    lead = array.ndim - len(target_shape)
    if lead > 0 and all(d == 1 for d in array.shape[:lead]):
      return array.reshape(array.shape[lead:])
    return array
  if layout == "positions":
    if array.ndim == 2 and array.shape[0] > target_shape[0] and array.shape[1:] == target_shape[1:]:
      report.truncated[name] = f"{list(array.shape)} -> {list(target_shape)}"
      return array[:target_shape[0]]
    return array
  if layout == "patch":
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
  raise AssertionError(layout)


def _check_shape(name: str, value: np.ndarray, path: Path_, target_shape: tuple[int, ...]):
  if tuple(value.shape) != target_shape:
    raise ValueError(f"shape mismatch: checkpoint tensor {name} has shape {list(value.shape)} "
                     f"(in the encoder's layout) but {path_str(path)} has {list(target_shape)}")


def _place_patch(ckpt: HFCheckpoint, patch: dict[str, Any], params, values, sources,
                 report: ConversionReport) -> None:
  """Folds the pixel normalisation into the patch embedding (exact up to fp32 rounding)."""
  if "kernel" not in patch:
    raise ValueError(f"{ckpt.model_dir}: patch-embedding bias without its weight")
  k_path, kernel, k_name = patch["kernel"]
  if k_path not in params:
    raise ValueError(f"{k_name}: the encoder has no parameter {path_str(k_path)}")
  _check_shape(k_name, kernel, k_path, tuple(params[k_path].get_value().shape))
  b_path = k_path[:-1] + ("bias",)
  bias_entry = patch.get("bias")
  if bias_entry is not None:
    _check_shape(bias_entry[2], bias_entry[1], b_path,
                 (kernel.shape[-1],) if b_path not in params
                 else tuple(params[b_path].get_value().shape))
  kernel, bias = _fold_pixel_norm(kernel, bias_entry[1] if bias_entry else None, ckpt)
  values[k_path], sources[k_path] = kernel, k_name
  norm = ckpt.pixel_norm
  report.notes.append(
      f"pixel normalisation (mean {norm['image_mean']}, std {norm['image_std']}, rescale "
      f"{norm['rescale_factor']:.6g}; from {norm['origin']}) folded into "
      f"{path_str(k_path[:-1])}: the stem takes uint8 pixels")
  if b_path in params:
    values[b_path] = bias
    sources[b_path] = (f"{bias_entry[2]} + folded pixel normalisation" if bias_entry
                       else f"derived from {k_name} and the pixel normalisation")
  elif np.any(bias != 0):
    raise ValueError(f"{path_str(b_path)} does not exist (encoder.image.patch_bias=False) but "
                     f"{k_name} needs a bias: the checkpoint's own bias and/or its pixel "
                     "normalisation; set encoder.image.patch_bias=True")
  elif bias_entry is not None:
    report.unmapped[bias_entry[2]] = "all-zero patch bias; the stem has none (patch_bias=False)"
