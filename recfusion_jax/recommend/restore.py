"""A trained model out of a training workdir: read-only, the model only, onto shardings.

The training checkpoint holds the whole train state (model and optimizer). Inference and export
need the model alone: the restore target is the abstract model (``nnx.eval_shape``, no memory
allocated) with the shardings of ``sharding.state_shardings`` on the given mesh, and Orbax reads
only those arrays (``partial_restore``) straight into their shards -- the optimizer moments are
never read. The checkpoint directory is opened read-only: nothing is created, locked or deleted
in it, so a model can be served or exported while its training still runs.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from recfusion_jax import sharding
from recfusion_jax.data.types import RecDataset
from recfusion_jax.models.recfusion import RecFusion
from recfusion_jax.recommend.inference import placeholder_like

# Where the model sits in the saved train state: ``nnx.state((model, optimizer))`` stores it
# under "0"; a checkpoint of the model alone has it at the root.
_MODEL_PREFIXES: tuple[tuple[str, ...], ...] = (("0",), ())


def checkpoint_dir(workdir: str | epath.Path) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def read_only_manager(directory: str | epath.Path) -> ocp.CheckpointManager:
  """A CheckpointManager that never writes to ``directory`` (train state item only)."""
  directory = epath.Path(directory)
  if not directory.exists():
    raise FileNotFoundError(f"no checkpoint directory {directory}")
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.PyTreeCheckpointHandler()})


def _nested_get(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _abstract_model(config: ml_collections.ConfigDict, dataset: RecDataset) -> RecFusion:
  from recfusion_jax import train  # pylint: disable=import-outside-toplevel  (heavy imports)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.init_from = ""     # the checkpoint replaces every weight; no pretrained file is read
  return nnx.eval_shape(lambda: train.create_model(config, dataset))


def restore_model(config: ml_collections.ConfigDict, workdir: str | epath.Path,
                  dataset: RecDataset, mesh: jax.sharding.Mesh | None = None,
                  step: int | None = None) -> tuple[RecFusion, int]:
  """(model with the checkpoint's weights placed on ``mesh``, its step); latest step by default.

  ``mesh`` defaults to ``config.mesh`` over this process's devices. PRNG streams are not
  restored (inference never draws from them); they get fresh placeholder keys.
  """
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp) if mesh is None else mesh
  manager = read_only_manager(checkpoint_dir(workdir))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {checkpoint_dir(workdir)}")
    model = _abstract_model(config, dataset)
    graphdef, rng_state, arrays = nnx.split(model, nnx.RngState, ...)
    shardings = sharding.state_shardings(arrays, mesh)
    flat = list(nnx.to_flat_state(arrays))
    flat_shardings = [s for _, s in nnx.to_flat_state(shardings)]
    saved = manager.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)
    paths = [tuple(str(k) for k in path) for path, _ in flat]
    prefix = next((p for p in _MODEL_PREFIXES
                   if _nested_get(saved, p + paths[0] + ("value",)) is not None), None)
    if prefix is None:
      raise ValueError(f"checkpoint step {step} in {checkpoint_dir(workdir)} holds no "
                       f"'{'/'.join(paths[0])}': not a checkpoint of this model")
    target: dict[str, Any] = {}
    for path, (_, variable), leaf_sharding in zip(paths, flat, flat_shardings):
      node = target
      for key in prefix + path:
        node = node.setdefault(key, {})
      # Both are nnx Variables (the shardings mirror the state), holding a ShapeDtypeStruct
      # and a NamedSharding: get_value(), not the deprecated .value ([...] is for arrays).
      value = variable.get_value()
      node["value"] = jax.ShapeDtypeStruct(value.shape, value.dtype,
                                           sharding=leaf_sharding.get_value())
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))["state"]
  finally:
    manager.close()
  values = [_nested_get(restored, prefix + path + ("value",)) for path in paths]
  state = nnx.from_flat_state([(p, v.replace(x)) for (p, v), x in zip(flat, values)])
  rngs = nnx.from_flat_state([(p, v.replace(placeholder_like(v.get_value())))
                              for p, v in nnx.to_flat_state(rng_state)])
  return nnx.merge(graphdef, rngs, state), int(step)
