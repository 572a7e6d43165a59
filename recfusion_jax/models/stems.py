"""Modality stems: turn raw text / image / video into token sequences of the trunk's width.

Each stem returns ``(tokens [B, N, width], mask [B, N])``. Shapes and names mirror the
pretrained models they can be initialised from: the text stem is BERT's embedding block, the
image stem is ViT's (or CLIP's, with ``pre_norm``) patch embedding, the video stem is a ViViT
tubelet embedding with separate spatial and temporal position tables.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _normal(stddev: float = 0.02):
  return nnx.initializers.normal(stddev)


def pixels_to_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 in [-1, 1] (the ViT/CLIP-style normalisation range)."""
  return images.astype(jnp.float32) / 127.5 - 1.0


class TextStem(nnx.Module):
  """Token + position (+ token-type) embeddings, then an optional LayerNorm (BERT has it)."""

  def __init__(self, *, vocab_size: int, max_len: int, width: int, type_vocab_size: int,
               stem_norm: bool, ln_eps: float, dropout: float, rngs: nnx.Rngs):
    self.word_embeddings = nnx.Embed(vocab_size, width, embedding_init=_normal(), rngs=rngs)
    self.position_embeddings = nnx.Embed(max_len, width, embedding_init=_normal(), rngs=rngs)
    self.token_type_embeddings = (
        nnx.Embed(type_vocab_size, width, embedding_init=_normal(), rngs=rngs)
        if type_vocab_size else None)
    self.norm = nnx.LayerNorm(width, epsilon=ln_eps, rngs=rngs) if stem_norm else None
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.max_len = max_len

  def __call__(self, token_ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    length = token_ids.shape[1]
    if length > self.max_len:
      raise ValueError(f"text length {length} exceeds the stem's max_len {self.max_len}")
    x = self.word_embeddings(token_ids) + self.position_embeddings(jnp.arange(length))[None]
    if self.token_type_embeddings is not None:
      # Single-segment inputs: every token has type 0, as BERT sees a lone sentence.
      x = x + self.token_type_embeddings.embedding[0]
    if self.norm is not None:
      x = self.norm(x)
    return self.dropout(x), mask.astype(bool)


class ImageStem(nnx.Module):
  """Non-overlapping patches -> linear embedding, a class token, learned positions."""

  def __init__(self, *, image_size: int, patch_size: int, channels: int, width: int,
               patch_bias: bool, pre_norm: bool, ln_eps: float, dropout: float, rngs: nnx.Rngs):
    if image_size % patch_size:
      raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    self.patch_embedding = nnx.Conv(
        channels, width, kernel_size=(patch_size, patch_size), strides=(patch_size, patch_size),
        padding="VALID", use_bias=patch_bias, rngs=rngs)
    num_patches = (image_size // patch_size) ** 2
    self.cls_token = nnx.Param(_normal()(rngs.params(), (width,)))
    self.position_embeddings = nnx.Param(_normal()(rngs.params(), (num_patches + 1, width)))
    self.pre_norm = nnx.LayerNorm(width, epsilon=ln_eps, rngs=rngs) if pre_norm else None
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.image_size = image_size

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"images of size {images.shape[1:3]} given to a stem built for "
                       f"{self.image_size}x{self.image_size}")
    patches = self.patch_embedding(pixels_to_float(images))
    b, _, _, width = patches.shape
    tokens = patches.reshape(b, -1, width)
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, width))
    x = jnp.concatenate([cls, tokens], axis=1) + self.position_embeddings[...][None]
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    return self.dropout(x), jnp.ones(x.shape[:2], dtype=bool)


class VideoStem(nnx.Module):
  """Tubelets (t x p x p voxels) -> linear embedding; spatial + temporal positions, class token."""

  def __init__(self, *, num_frames: int, image_size: int, tubelet_frames: int, patch_size: int,
               channels: int, width: int, dropout: float, rngs: nnx.Rngs):
    if num_frames % tubelet_frames or image_size % patch_size:
      raise ValueError("video frames/size must be multiples of the tubelet frames/patch size")
    self.tubelet_embedding = nnx.Conv(
        channels, width, kernel_size=(tubelet_frames, patch_size, patch_size),
        strides=(tubelet_frames, patch_size, patch_size), padding="VALID", rngs=rngs)
    self.num_time = num_frames // tubelet_frames
    self.num_space = (image_size // patch_size) ** 2
    self.cls_token = nnx.Param(_normal()(rngs.params(), (width,)))
    self.spatial_position_embeddings = nnx.Param(_normal()(rngs.params(), (self.num_space, width)))
    self.temporal_position_embeddings = nnx.Param(_normal()(rngs.params(), (self.num_time, width)))
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.shape = (num_frames, image_size, image_size)

  def __call__(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    if video.shape[1:4] != self.shape:
      raise ValueError(f"video of shape {video.shape[1:4]} given to a stem built for {self.shape}")
    tubes = self.tubelet_embedding(pixels_to_float(video))  # [B, t, h, w, width]
    b, width = tubes.shape[0], tubes.shape[-1]
    tubes = tubes.reshape(b, self.num_time, self.num_space, width)
    tubes = (tubes + self.spatial_position_embeddings[...][None, None]
             + self.temporal_position_embeddings[...][None, :, None])
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, width))
    x = jnp.concatenate([cls, tubes.reshape(b, -1, width)], axis=1)
    return self.dropout(x), jnp.ones(x.shape[:2], dtype=bool)


class FeatureStem(nnx.Module):
  """A precomputed feature vector (e.g. MMRec's VGG image / sentence-transformer text features)
  -> one trunk token: LayerNorm over the input (the sets' features differ in scale by orders of
  magnitude), then a linear projection to the trunk's width."""

  def __init__(self, *, feature_dim: int, width: int, ln_eps: float, dropout: float,
               rngs: nnx.Rngs):
    if feature_dim < 1:
      raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
    self.input_norm = nnx.LayerNorm(feature_dim, epsilon=ln_eps, rngs=rngs)
    self.projection = nnx.Linear(feature_dim, width, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.feature_dim = feature_dim

  def __call__(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
    if features.ndim != 2 or features.shape[1] != self.feature_dim:
      raise ValueError(f"features of shape {features.shape} given to a stem built for "
                       f"[B, {self.feature_dim}]")
    x = self.projection(self.input_norm(features.astype(jnp.float32)))[:, None]
    return self.dropout(x), jnp.ones(x.shape[:2], dtype=bool)
