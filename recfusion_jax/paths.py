"""Run and data paths as ``etils.epath.Path``: local folders and object stores alike.

Everything the project writes or reads by path (checkpoints, metrics, results, exports, data
sets) goes through ``epath.Path``, so ``gs://bucket/run`` works wherever ``/tmp/run`` does.
"""

from __future__ import annotations

import os

from etils import epath


def has_scheme(path: str | os.PathLike) -> bool:
  """True for a URI (``gs://...``, ``s3://...``), False for a local path."""
  return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
  """``path`` as an ``epath.Path``; a local one made absolute, a URI kept as it is.

  Absolute so that Orbax and a later ``chdir`` see the same folder; only local ones because
  ``os.path.abspath("gs://b/run")`` is ``<cwd>/gs:/b/run``, a local folder named ``gs:``.
  """
  if has_scheme(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.fspath(path)))


def append_text(path: str | os.PathLike, text: str) -> None:
  """Appends ``text`` to the file ``path`` (created if absent), local or on an object store.

  GCS objects cannot be appended to, and gcsfs (epath's gs:// backend without TensorFlow) opens
  mode "a" as "w" with only a warning, which would drop the earlier rows; so an object is read
  and rewritten whole, fine for small logs. A local file is appended to.
  """
  path = epath.Path(path)
  if has_scheme(path):
    path.write_text((path.read_text() if path.exists() else "") + text)
  else:
    with path.open("a") as f:
      f.write(text)
