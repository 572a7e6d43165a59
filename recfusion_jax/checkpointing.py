"""Orbax checkpoints of the train state and the input iterator, verified on restore.

The train state is written with ``StandardSave`` (array shards written by the processes that
own them; asynchronous so training continues while bytes hit disk). The Grain iterator's
position goes next to it (``DataCheckpointHandler``: one JSON per process, as Grain writes it,
and the global position in ``stream.json``), so a restart resumes the data stream exactly, on
the same or another process count.

Restoring takes an *abstract* state: shapes, dtypes and the shardings wanted NOW. Orbax reads
each array straight into that sharding, so a checkpoint written on one mesh restores onto any
other (different device count or data/fsdp split).

Integrity. Orbax checksums only the shard index of its zarr3 chunks, not the chunk data, so a
flipped byte inside a chunk loads without error. Every checkpoint therefore also holds a
``fingerprint`` item: per array, two 32-bit lanes of an order-free checksum of its elements
(``state_fingerprint``: a hash of each element's bits and global position, summed modulo 2^32),
computed on the devices from the saved state. The sum does not depend on how the array is
sharded, so a checkpoint verifies on any mesh and any number of processes. ``restore`` tries the
newest checkpoint first; one that fails to load, fails verification or holds a non-finite value
is logged with its step and the reason, moved to ``<directory>.corrupt/`` (so the run can write
that step again), and the next older one is tried. When none is usable, nothing is moved and
``CheckpointError`` lists every step's problem.

Retention (``Checkpointer``'s ``preservation_policy``): the latest ``keep`` checkpoints,
the latest one whose loss and state were finite (``LatestFinite``; the train loop never saves a
non-finite state, this is the second line of defence) and, with ``best_metric``, the one with
the best validation score (Orbax ``BestN``). Each save carries a flat metrics dict
(loss, finiteness, skipped steps) that Orbax stores with the step.

Preemption (``PreemptionWatch``): SIGTERM/SIGINT set a flag that the train loop reads at each
step boundary; in a multi-process run JAX's preemption service (installed by
``jax.distributed.initialize``) owns SIGTERM and ``CheckpointManager.reached_preemption(step)``
makes every process agree on the step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
from typing import Any, Callable, Mapping, Sequence

from etils import epath
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from recfusion_jax import paths
from recfusion_jax.data import pipeline

FINGERPRINT_ITEM = "fingerprint"
FINITE_KEY = "finite"   # metrics key: the step's loss and the saved state were finite


class CheckpointError(RuntimeError):
  """No checkpoint in a directory that has some could be restored and verified."""


def abstract_like(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``state`` placed on ``shardings`` (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


# ---- content fingerprint -----------------------------------------------------------------------

_LANE_SEEDS = (0x9E3779B9, 0x7F4A7C15)


def _fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser (uint32 arithmetic wraps modulo 2^32)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _as_uint32_words(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as uint32 words (one per element; two for 8-byte dtypes), flattened."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32).reshape(-1)
  size = np.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _leaf_checksum(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """([2] uint32 checksum lanes, all-finite flag) of one array."""
  words = _as_uint32_words(x)
  position = jnp.arange(words.shape[0], dtype=jnp.uint32)
  lanes = []
  for seed in _LANE_SEEDS:
    salt = _fmix32(position ^ jnp.uint32(seed))
    lanes.append(jnp.sum(_fmix32(words + salt * jnp.uint32(0x01000193)), dtype=jnp.uint32))
  finite = (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
            else jnp.bool_(True))
  return jnp.stack(lanes), finite


def _leaf_names(tree: Any) -> list[str]:
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def make_fingerprint_fn(mesh: jax.sharding.Mesh | None = None
                        ) -> Callable[[Any], tuple[dict[str, str], dict[str, bool]]]:
  """A function ``state -> ({leaf name: checksum hex}, {leaf name: all finite})``.

  Jitted once per state structure; with ``mesh`` the outputs are replicated over it, so every
  process of a multi-process run reads the same values.
  """
  out_shardings = None
  if mesh is not None:
    out_shardings = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  checksums = jax.jit(lambda state: jax.tree.map(_leaf_checksum, state),
                      out_shardings=out_shardings)

  def fingerprint(state: Any) -> tuple[dict[str, str], dict[str, bool]]:
    names = _leaf_names(state)
    pairs = jax.tree.leaves(jax.device_get(checksums(state)))
    lanes, finite = pairs[0::2], pairs[1::2]
    digest = {n: "".join(f"{int(w):08x}" for w in np.asarray(l)) for n, l in zip(names, lanes)}
    return digest, {n: bool(f) for n, f in zip(names, finite)}

  return fingerprint


def compare_fingerprints(stored: Mapping[str, str], computed: Mapping[str, str]
                         ) -> str | None:
  """None when equal, else what differs (a few leaf names)."""
  missing = sorted(set(stored) - set(computed))
  extra = sorted(set(computed) - set(stored))
  changed = sorted(n for n in set(stored) & set(computed) if stored[n] != computed[n])
  if not (missing or extra or changed):
    return None
  parts = []
  for label, names in (("content differs", changed), ("not restored", missing),
                       ("not in the fingerprint", extra)):
    if names:
      more = f" and {len(names) - 3} more" if len(names) > 3 else ""
      parts.append(f"{label}: {', '.join(names[:3])}{more}")
  return "fingerprint mismatch (" + "; ".join(parts) + ")"


# ---- data iterator -----------------------------------------------------------------------------

STREAM_FILE = "stream.json"


class DataCheckpointHandler(grain.checkpoint.CheckpointHandler):
  """Grain's iterator handler, restorable onto another process count.

  Save: each process writes its iterator state to ``process_<p>-of-<P>.json`` (Grain's own
  files; ``p``/``P`` from the iterator's ``pipeline.StreamSpec`` when it has one) and process 0
  writes ``pipeline.stream_record`` (global batches read, global batch, seed, examples per
  epoch) to ``stream.json``.

  Restore (rule of ``pipeline.resume_batch``): with the same process count and stream the
  process's own state is set (exact, worker states included). With another process count and
  the same stream every process moves to the saved global batch: the global batches do not
  depend on the process count, so the run continues exactly as an uninterrupted one. With a
  changed global batch, seed or epoch size a warning says why the position does not carry over
  and the run restarts the saved position's epoch at the global batch holding its first
  example, on any process count. A checkpoint written by another process count without
  ``stream.json`` (or an iterator whose worker state cannot be moved) raises ``ValueError``
  saying so; ``Checkpointer.restore`` reports it as the checkpoint's problem.
  """

  def save(self, directory: epath.Path, item: Any = None, args: Any = None):
    item = item or args.item
    spec = pipeline.stream_spec(item)
    index, count = ((spec.process_index, spec.process_count) if spec is not None
                    else (jax.process_index(), jax.process_count()))
    (directory / _process_file(index, count)).write_text(json.dumps(item.get_state(), indent=4))
    record = pipeline.stream_record(item)
    if record is not None and index == 0:
      (directory / STREAM_FILE).write_text(json.dumps(record, indent=4))

  def restore(self, directory: epath.Path, item: Any = None, args: Any = None):
    item = item or args.item
    spec = pipeline.stream_spec(item)
    if spec is None:
      return super().restore(directory, item=item)
    own = directory / _process_file(spec.process_index, spec.process_count)
    stream = directory / STREAM_FILE
    if not stream.exists():
      if own.exists():   # written before stream.json: Grain's rule, same process count only
        return _set_state(item, own)
      written = sorted(f.name for f in directory.glob("process_*-of-*.json"))
      raise ValueError(
          f"the data iterator state in {directory} ({', '.join(written) or 'no files'}) has no "
          f"{STREAM_FILE} (global position), so it cannot be restored onto "
          f"{spec.process_count} process(es); restore on the process count that wrote it")
    record = json.loads(stream.read_text())
    batch, why = pipeline.resume_batch(record, spec)
    if why is None and own.exists():
      return _set_state(item, own)
    if why is None:
      logging.info("data iterator: state written by %d process(es), restored onto %d at global "
                   "batch %d (global position %d examples)", record["process_count"],
                   spec.process_count, batch, batch * spec.global_batch)
    else:
      logging.warning("data iterator: %s", why)
    try:
      pipeline.seek(item, batch)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"the data iterator cannot be moved to global batch {batch} "
                       f"({_one_line(e)}); restore on the process count that wrote it "
                       f"({record['process_count']})") from e
    item.start_prefetch()
    return item


def _process_file(index: int, count: int) -> str:
  return f"process_{index}-of-{count}.json"


def _set_state(iterator: Any, path: epath.Path) -> Any:
  """This process's own saved state, set as Grain's handler does (exact, worker states too)."""
  iterator.set_state(json.loads(path.read_text()))
  iterator.start_prefetch()
  return iterator


@ocp.args.register_with_handler(DataCheckpointHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any


# ---- retention ---------------------------------------------------------------------------------


@dataclasses.dataclass
class LatestFinite:
  """Orbax preservation policy: keeps the latest checkpoint whose metrics say it was finite.

  Written by hand: Orbax's policies rank by one metric (BestN) or by recency, none keeps "the
  latest one satisfying a predicate".
  """

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
    del context
    keep = [False] * len(checkpoints)
    for i in range(len(checkpoints) - 1, -1, -1):
      metrics = checkpoints[i].metrics
      if metrics is not None and bool(metrics.get(FINITE_KEY, False)):
        keep[i] = True
        break
    return keep


def _finite_score(metrics: Mapping[str, Any] | None) -> float:
  return float(bool(metrics and metrics.get(FINITE_KEY, False)))


@dataclasses.dataclass
class Restored:
  """What ``Checkpointer.restore`` returns."""

  step: int
  state: Any
  metrics: dict[str, Any]   # the metrics saved with the step ({} when none)


class Checkpointer:
  """``ocp.CheckpointManager`` with the project's items, retention and verified restore.

  Args:
    directory: the checkpoint folder (created): local, or a URI such as ``gs://bucket/run``.
    save_every: Orbax's save interval (``save`` with ``force=True`` saves at any step).
    keep: how many of the latest checkpoints to keep (plus the latest finite one).
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int,
               async_save: bool = True, best_metric: str | None = None):
    self.directory = paths.resolve(directory)
    policies: list[Any] = [checkpoint_managers.LatestN(n=keep), LatestFinite()]
    if best_metric is not None:
      # The best validated step is kept too; equal scores keep the earlier step (the loop's
      # BestTracker picks it), so ``step`` goes into every save's metrics.
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda m: (float(m.get(best_metric, float("-inf"))),
                                   -int(m.get("step", 0))), n=1))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, enable_async_checkpointing=async_save,
            # best_fn is what makes Orbax store the metrics of each step; retention is decided
            # by preservation_policy alone.
            best_fn=_finite_score, best_mode="max",
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies)),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": DataCheckpointHandler(),
                       FINGERPRINT_ITEM: ocp.JsonCheckpointHandler()})

  def save(self, step: int, state: Any, data_iterator: Any | None = None, *,
           fingerprint: Mapping[str, str] | None = None,
           metrics: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Starts an (asynchronous) save; True if one was started.

    ``fingerprint`` (``make_fingerprint_fn``'s first output for ``state``) is stored with it and
    checked by ``restore``; ``metrics`` (flat, JSON-able) decide retention.
    """
    metrics = {**(metrics or {}), "step": step}
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = DataSave(data_iterator)
    if fingerprint is not None:
      items[FINGERPRINT_ITEM] = ocp.args.JsonSave(dict(fingerprint))
    return self.manager.save(step, args=ocp.args.Composite(**items),
                             metrics=metrics, force=force)

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def metrics(self, step: int) -> dict[str, Any]:
    return dict(self.manager.metrics(step) or {})

  def restore(self, abstract_state: Any, data_iterator: Any | None = None,
              step: int | None = None, *, fingerprint_fn: Callable[[Any], Any] | None = None,
              fall_back: bool = True) -> Restored | None:
    """The newest usable checkpoint (or ``step``), or None when the folder has none.

    With ``fingerprint_fn`` (``make_fingerprint_fn``) the restored state must match the stored
    fingerprint and be finite. Unusable checkpoints are logged with their step and reason; with
    ``fall_back`` the next older one is tried (the newer unusable ones are moved aside),
    otherwise ``CheckpointError`` is raised. ``data_iterator`` is moved in place, onto the
    saved global position even on another process count (``DataCheckpointHandler``).
    """
    steps = sorted(self.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      return None
    problems: list[tuple[int, str]] = []
    for candidate in steps:
      restored, problem = self._try_restore(candidate, abstract_state, data_iterator,
                                            fingerprint_fn)
      problem = _agree_across_processes(problem)
      if problem is None:
        if problems:
          self._move_aside([s for s, _ in problems])
          logging.warning("resuming from checkpoint step %d in %s (newer unusable ones moved "
                          "to %s)", candidate, self.directory, self.corrupt_directory)
        return restored
      logging.error("checkpoint step %d in %s is unusable: %s", candidate, self.directory,
                    problem)
      problems.append((candidate, problem))
      if not fall_back:
        break
    detail = "; ".join(f"step {s}: {p}" for s, p in problems)
    raise CheckpointError(
        f"no usable checkpoint in {self.directory} ({detail}). Nothing was moved or deleted: "
        "inspect the folder, then move it away to start over.")

  @property
  def corrupt_directory(self) -> epath.Path:
    """``<directory>.corrupt``, a sibling (``gs://b/run/checkpoints.corrupt`` for a bucket)."""
    return self.directory.parent / f"{self.directory.name}.corrupt"

  def _try_restore(self, step: int, abstract_state: Any, data_iterator: Any | None,
                   fingerprint_fn: Callable[[Any], Any] | None
                   ) -> tuple[Restored | None, str | None]:
    items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = DataRestore(data_iterator)
    if fingerprint_fn is not None:
      items[FINGERPRINT_ITEM] = ocp.args.JsonRestore()
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      # Whatever fails while reading a checkpoint (a truncated chunk, a missing metadata or
      # iterator file, a structure mismatch) makes that checkpoint unusable; it is reported.
      return None, _one_line(e)
    state = out["state"]
    if fingerprint_fn is not None:
      stored = out[FINGERPRINT_ITEM]
      if not stored:
        return None, "no content fingerprint stored with it"
      computed, finite = fingerprint_fn(state)
      problem = compare_fingerprints(stored, computed)
      if problem is not None:
        return None, problem
      bad = sorted(n for n, ok in finite.items() if not ok)
      if bad:
        return None, f"non-finite values in {', '.join(bad[:3])}"
    return Restored(step, state, self.metrics(step)), None

  def _move_aside(self, steps: Sequence[int]) -> None:
    """Moves unusable step folders out of the manager's directory (process 0 renames)."""
    if jax.process_index() == 0:
      target_root = self.corrupt_directory
      target_root.mkdir(parents=True, exist_ok=True)
      for step in steps:
        source = self.directory / str(step)
        target = target_root / str(step)
        suffix = 1
        while target.exists():
          target = target_root / f"{step}.{suffix}"
          suffix += 1
        if source.exists():
          source.rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("recfusion_checkpoint_move_aside")
    self.manager.reload()

  def reached_preemption(self, step: int) -> bool:
    """Orbax/JAX multi-host preemption notice for ``step`` (False in single-process runs)."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  if len(text) > 300:
    text = text[:300] + " ..."
  return f"{type(error).__name__}: {text}"


def _agree_across_processes(problem: str | None) -> str | None:
  """Every process takes the same decision: a checkpoint unusable on one is unusable on all."""
  if jax.process_count() == 1:
    return problem
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  bad = multihost_utils.process_allgather(np.asarray(problem is not None, np.int32))
  if problem is None and np.any(bad):
    return f"unusable on process(es) {np.flatnonzero(bad).tolist()}"
  return problem


# ---- preemption --------------------------------------------------------------------------------


class PreemptionWatch:
  """SIGTERM/SIGINT -> a flag the train loop reads at each step boundary (a context manager).

  In a single-process run both signals set the flag; a second SIGINT interrupts at once. In a
  multi-process run SIGTERM stays with JAX's preemption service (``jax.distributed``
  installs it; the loop asks ``CheckpointManager.reached_preemption``), and SIGINT is passed on
  to it as SIGTERM so that every process stops at the same step. The previous handlers come
  back on exit. Outside the main thread no handler can be installed and only the multi-host
  notice works.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}

  def _handler(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if jax.process_count() > 1:
      os.kill(os.getpid(), signal.SIGTERM)   # JAX's preemption notifier owns SIGTERM
      return
    if self._event.is_set() and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = name
    self._event.set()
    logging.warning("%s received: saving a checkpoint at the end of the current step, then "
                    "exiting (a second SIGINT interrupts at once)", name)

  def __enter__(self) -> "PreemptionWatch":
    if threading.current_thread() is not threading.main_thread():
      logging.warning("training outside the main thread: SIGTERM/SIGINT cannot be caught")
      return self
    signals = [signal.SIGINT] if jax.process_count() > 1 else [signal.SIGTERM, signal.SIGINT]
    for signum in signals:
      self._previous[signum] = signal.signal(signum, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()

  @property
  def requested(self) -> bool:
    return self._event.is_set()
