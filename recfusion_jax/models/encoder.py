"""The unified content encoder: modality stems -> ONE shared trunk -> pooling -> projection.

Every modality's tokens go through the same Transformer (``unified=True``), tagged by a learned
modality-type embedding; ``unified=False`` builds one trunk per modality instead (the ablation,
and the layout for two-tower checkpoints such as CLIP). Each item's modalities are encoded as
separate sequences: they have different lengths, and packing them into one sequence would make
attention cost grow with the product instead of the sum.

Each modality's stem is chosen by ``encoder.<modality>.stem``: its raw-content stem (``tokens``
for text, ``pixels`` for image and video; the default) or ``features``, a projection of a
precomputed vector (``encoder.<modality>.feature_dim`` wide, batch key ``<modality>_features``)
into one trunk token -- for data sets that ship features instead of content (MMRec).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from recfusion_jax.data.types import MODALITIES, feature_key
from recfusion_jax.models import stems
from recfusion_jax.models.transformer import Trunk

POOLINGS = ("cls", "mean", "eos")
# Stems a modality can have; the first is the default.
STEMS: dict[str, tuple[str, ...]] = {"text": ("tokens", "features"),
                                     "image": ("pixels", "features"),
                                     "video": ("pixels", "features")}


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Unit vectors; the eps keeps an all-zero row (absent content) at zero instead of NaN."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def scale_gradient(x: jax.Array, scale: float) -> jax.Array:
  """``x`` in the forward pass; ``scale`` times the incoming gradient in the backward pass."""
  frozen = jax.lax.stop_gradient(x)
  return frozen + scale * (x - frozen)


def pool(hidden: jax.Array, mask: jax.Array, how: str) -> jax.Array:
  """[B, N, W] -> [B, W]: first token, masked mean (sentence-transformers) or last valid token."""
  if how == "cls":
    return hidden[:, 0]
  if how == "mean":
    weights = mask.astype(hidden.dtype)[..., None]
    return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
  if how == "eos":  # CLIP text: the end-of-text token is the last unpadded position
    last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  raise ValueError(f"unknown pooling {how!r}; choose from {POOLINGS}")


class ContentEncoder(nnx.Module):
  """Maps an item's content to unit vectors, one per modality, in one embedding space."""

  def __init__(self, cfg: Mapping[str, Any], modalities: tuple[str, ...], embed_dim: int, *,
               rngs: nnx.Rngs):
    unknown = set(modalities) - set(MODALITIES)
    if unknown:
      raise ValueError(f"unknown modalities {sorted(unknown)}; known: {MODALITIES}")
    self.modalities = tuple(m for m in MODALITIES if m in modalities)
    self.unified = bool(cfg.unified)
    self.embed_dim = embed_dim
    width, common = cfg.width, dict(ln_eps=cfg.ln_eps, dropout=cfg.dropout, rngs=rngs)
    self.pooling = {m: cfg[m].pooling for m in self.modalities}
    self.causal = {m: bool(cfg[m].get("causal", False)) for m in self.modalities}
    # The share of the trunk's weight gradient that each modality's tokens pass on (1: all).
    # Below 1 a modality still trains its own stem through the trunk, but moves the shared
    # trunk less (posters through a text-pretrained trunk; at 0 that cost cold_items 0.043 on
    # valid, docs/TUNING.md §24, so every config keeps 1).
    self.trunk_gradient_scale = {
        m: float(cfg[m].get("trunk_gradient_scale", 1.0)) for m in self.modalities}
    for m, scale in self.trunk_gradient_scale.items():
      if not 0.0 <= scale <= 1.0:
        raise ValueError(f"encoder.{m}.trunk_gradient_scale={scale}; must lie in [0, 1]")
    for m, how in self.pooling.items():
      if how not in POOLINGS:
        raise ValueError(f"encoder.{m}.pooling={how!r}; choose from {POOLINGS}")

    self.stem_kinds = {m: cfg[m].get("stem", STEMS[m][0]) for m in self.modalities}
    for m, kind in self.stem_kinds.items():
      if kind not in STEMS[m]:
        raise ValueError(f"encoder.{m}.stem={kind!r}; choose from {STEMS[m]}")

    def stem_for(modality, make_raw):
      if modality not in self.modalities:
        return None
      if self.stem_kinds[modality] == "features":
        return stems.FeatureStem(feature_dim=cfg[modality].feature_dim, width=width, **common)
      return make_raw(cfg[modality])

    self.text_stem = stem_for("text", lambda t: stems.TextStem(
        vocab_size=t.vocab_size, max_len=t.max_len, width=width,
        type_vocab_size=t.type_vocab_size, stem_norm=t.stem_norm, **common))
    self.image_stem = stem_for("image", lambda i: stems.ImageStem(
        image_size=i.size, patch_size=i.patch, channels=3, width=width,
        patch_bias=i.patch_bias, pre_norm=i.pre_norm, **common))
    self.video_stem = stem_for("video", lambda v: stems.VideoStem(
        num_frames=v.frames, image_size=v.size, tubelet_frames=v.tubelet_frames,
        patch_size=v.patch, channels=3, width=width, dropout=cfg.dropout, rngs=rngs))

    # Multiway (transformer.Block): these modalities' tokens take LayerNorms and MLPs of their
    # own in the shared trunk, attention stays shared. Separate towers have their own whole
    # trunk already, so there it changes nothing.
    experts = tuple(cfg.get("experts", ()))
    unknown = set(experts) - set(MODALITIES)
    if unknown:
      raise ValueError(f"encoder.experts names unknown modalities {sorted(unknown)}; known: "
                       f"{MODALITIES}")
    self.experts = tuple(m for m in self.modalities if m in experts) if self.unified else ()

    def make_trunk(experts=()):
      # Memory switches (transformer.py); .get keeps configs written before them working.
      return Trunk(width=width, depth=cfg.depth, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
                   pre_ln=cfg.pre_ln, ln_eps=cfg.ln_eps, activation=cfg.activation,
                   dropout=cfg.dropout, remat=cfg.get("remat", False),
                   compute_dtype=cfg.get("compute_dtype", "float32"),
                   attention=cfg.get("attention", "einsum"), experts=experts, rngs=rngs)

    self.trunk = make_trunk(self.experts) if self.unified else None
    self.towers = None if self.unified else nnx.Dict({m: make_trunk() for m in self.modalities})
    # Zero-initialised so a trunk imported from BERT/ViT sees exactly its pretraining inputs at
    # step 0; training then learns how to tell the modalities apart.
    self.modality_embeddings = nnx.Param(jnp.zeros((len(MODALITIES), width)))
    self.projections = nnx.Dict(
        {m: nnx.Linear(width, embed_dim, rngs=rngs) for m in self.modalities})

  def trunk_for(self, modality: str) -> Trunk:
    return self.trunk if self.unified else self.towers[modality]

  def content_key(self, modality: str) -> str:
    """The batch key this encoder reads for ``modality`` (its stem's input)."""
    if self.stem_kinds[modality] == "features":
      return feature_key(modality)
    return "text_ids" if modality == "text" else modality

  def input_keys(self) -> tuple[str, ...]:
    """Every batch key ``__call__`` reads (the gradient-caching step slices only these)."""
    keys = [self.content_key(m) for m in self.modalities]
    if "text" in self.modalities and self.stem_kinds["text"] != "features":
      keys.append("text_mask")
    return tuple(keys) + ("presence",)

  def stem_tokens(self, modality: str, content: Mapping[str, jax.Array]):
    if self.stem_kinds[modality] == "features":
      return getattr(self, f"{modality}_stem")(content[feature_key(modality)])
    if modality == "text":
      return self.text_stem(content["text_ids"], content["text_mask"])
    if modality == "image":
      return self.image_stem(content["image"])
    return self.video_stem(content["video"])

  def hidden_states(self, modality: str, content: Mapping[str, jax.Array]):
    """Trunk output [B, N, width] and token mask for one modality (used by the converter tests)."""
    tokens, mask = self.stem_tokens(modality, content)
    tokens = tokens + self.modality_embeddings[MODALITIES.index(modality)]
    trunk = self.trunk_for(modality)
    expert = modality if modality in self.experts else None
    scale = self.trunk_gradient_scale[modality]
    if scale == 1.0:
      return trunk(tokens, mask, self.causal[modality], expert), mask
    # A view of the trunk: its parameters' values with a scaled gradient, and the trunk's own
    # other state (merge shares those Variables, so dropout still advances the trunk's RNGs).
    graphdef, params, rest = nnx.split(trunk, nnx.Param, ...)
    view = nnx.merge(graphdef, jax.tree.map(lambda p: scale_gradient(p, scale), params), rest)
    return view(tokens, mask, self.causal[modality], expert), mask

  def pooled(self, modality: str, content: Mapping[str, jax.Array]) -> jax.Array:
    hidden, mask = self.hidden_states(modality, content)
    return pool(hidden, mask, self.pooling[modality])

  def __call__(self, content: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Returns (embeddings [B, M, d] unit norm, zero where absent; presence [B, M] bool).

    M counts this encoder's modalities in MODALITIES order. Absent modalities are still run
    through the network (static shapes under jit) and then masked out.
    """
    missing = [f"{m} ({self.content_key(m)})" for m in self.modalities
               if self.content_key(m) not in content]
    if missing:
      raise KeyError(f"batch has no content for modalities {missing} that the model encodes")
    if not self.modalities:  # an ID-only model: no content sources
      b = content["presence"].shape[0]
      return jnp.zeros((b, 0, self.embed_dim)), jnp.zeros((b, 0), bool)
    presence = jnp.stack(
        [content["presence"][:, MODALITIES.index(m)] for m in self.modalities], axis=1)
    embeddings = jnp.stack(
        [l2_normalize(self.projections[m](self.pooled(m, content))) for m in self.modalities],
        axis=1)
    return embeddings * presence[..., None].astype(embeddings.dtype), presence.astype(bool)
