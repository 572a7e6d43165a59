"""Metrics and console output of a run: clu metric writers plus a JSON-lines file.

``create_writer(workdir)`` gives every process a console writer (absl logging) and process 0
also TensorBoard event files in ``workdir`` and ``workdir/metrics.jsonl`` (one
``{"step": ..., name: value}`` object per write, read back by the benchmark's plots and
tests). ``setup_logging()`` makes the console show INFO lines under ``absl.app.run``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from etils import epath

from recfusion_jax import paths

JSONL_NAME = "metrics.jsonl"


class JsonlWriter(metric_writers.MetricWriter):
  """Scalars (and hparams) as JSON lines in ``path``, appended so resumed runs keep history.

  Written by hand because clu has no JSON-lines writer. Non-scalar summaries (images,
  histograms, ...) belong in TensorBoard; this file holds scalars only and ignores them.
  ``path`` may be on an object store (``paths.append_text`` rewrites the object there, fine at
  one row per ``log_every`` steps).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = epath.Path(path)

  def _append(self, row: Mapping[str, Any]) -> None:
    paths.append_text(self.path, json.dumps(row) + "\n")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._append({"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}})

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._append({"hparams": {k: v if isinstance(v, (int, float, str, bool)) or v is None
                              else str(v) for k, v in hparams.items()}})

  def write_summaries(self, step, values, metadata=None) -> None:
    del step, values, metadata

  def write_images(self, step, images) -> None:
    del step, images

  def write_videos(self, step, videos) -> None:
    del step, videos

  def write_audios(self, step, audios, *, sample_rate) -> None:
    del step, audios, sample_rate

  def write_texts(self, step, texts) -> None:
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    del step, arrays, num_buckets

  def flush(self) -> None:
    pass  # every write is closed on return

  def close(self) -> None:
    pass


def create_writer(workdir: str | os.PathLike) -> metric_writers.MetricWriter:
  """Console on every process; TensorBoard + metrics.jsonl on process 0 only."""
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(just_logging=True, asynchronous=False)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  return metric_writers.MultiWriter([
      # clu's summary writer goes through tf.io.gfile, which reads gs:// itself: a string.
      metric_writers.create_default_writer(os.fspath(workdir), asynchronous=False),
      JsonlWriter(workdir / JSONL_NAME)])


class _QuietLibraries(logging.Filter):
  """Keeps Orbax's per-save INFO chatter out of the training log (warnings still pass)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def setup_logging() -> None:
  """INFO to the console through absl's handler (call inside ``absl.app.run``'s main).

  ``logging.basicConfig`` is not enough: importing grain installs a root handler first, which
  makes basicConfig a no-op and leaves the root logger at WARNING, so a run printed nothing
  for minutes. absl's handler is on the root logger once app.run has parsed the flags.
  """
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.INFO)
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
  logging.getLogger("jax._src").setLevel(logging.WARNING)


def read_jsonl(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows of ``workdir/metrics.jsonl`` ([] when there is none)."""
  path = epath.Path(workdir) / JSONL_NAME
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_jsonl(workdir: str | os.PathLike, last_step: int) -> list[dict[str, Any]]:
  """Drops the rows of steps after ``last_step`` from ``metrics.jsonl``; returns the kept rows.

  A run resumed from the checkpoint of ``last_step`` writes those steps again, so the file
  continues without duplicate steps. Rows without a step (hparams) are kept. The file is
  replaced by write + rename, so a kill during the rewrite loses nothing (atomic on a local
  disk; on GCS the rename is a copy that replaces the object whole, then a delete).
  """
  rows = read_jsonl(workdir)
  kept = [row for row in rows if row.get("step", last_step) <= last_step]
  if len(kept) != len(rows):
    path = epath.Path(workdir) / JSONL_NAME
    tmp = path.parent / f"{JSONL_NAME}.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    tmp.replace(path)
  return kept
