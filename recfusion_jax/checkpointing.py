"""Orbax checkpoints of the train state and the input iterator, saved side by side.

The train state is written with ``StandardSave`` (array shards written by the processes that
own them; asynchronous so training continues while bytes hit disk). The Grain iterator's
position goes next to it (one JSON per process), so a restart resumes the data stream exactly.

Restoring takes an *abstract* state: shapes, dtypes and the shardings wanted NOW. Orbax reads
each array straight into that sharding, so a checkpoint written on one mesh restores onto any
other (different device count or data/fsdp split).
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


def abstract_like(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``state`` placed on ``shardings`` (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with the project's two items."""

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep,
            enable_async_checkpointing=async_save),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def save(self, step: int, state: Any, data_iterator: Any | None = None, *,
           force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: Any, data_iterator: Any | None = None,
              step: int | None = None) -> tuple[int, Any] | None:
    """(step, state) of the given or latest checkpoint, or None when there is none.

    ``data_iterator`` (built with the same arguments as when saved) is moved in place.
    """
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return step, restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
