"""Every sharding decision of the project, in one place.

The mesh has two axes:
  ``data``  -- pure data parallelism (replicas hold the same parameters);
  ``fsdp``  -- parameters and optimizer moments are split along it (ZeRO-3 / FSDP style) and
               the batch is split along it too, so no device repeats another's work.
A batch's leading axis is therefore split over ('data', 'fsdp') = all devices.

Both axes are ``AxisType.Auto``: the model code stays free of sharding annotations and XLA's
partitioner propagates from the parameter and batch shardings given to ``jax.jit`` (it inserts
the all-gathers that make the in-batch softmax see the global batch).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")

# First match wins; patterns are searched in the '/'-joined path of a state leaf, e.g.
# 'encoder/trunk/layers/0/mlp_in/kernel' (optimizer moments end in the same path, so they
# follow their parameter). 'fsdp' marks the dimension to split.
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"_embeddings/embedding$", P("fsdp", None)),          # ID / vocabulary tables: rows
    (r"cache_embeddings$", P("fsdp", None, None)),         # item cache: rows
    (r"cache_presence$", P("fsdp", None)),
    (r"(^|/)(item_item|transition)$", P("fsdp", None)),   # N x N item-item terms: rows
    (r"/kernel$", P("fsdp", None)),                        # Linear [in, out]: input dim
)

# Splitting a small array costs more in collectives than it saves in memory.
MIN_SHARD_ELEMENTS = 2**12


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh; ``data=-1`` takes all devices left after ``fsdp``."""
  devices = list(devices) if devices is not None else jax.devices()
  if data == -1:
    if len(devices) % fsdp:
      raise ValueError(f"{len(devices)} devices cannot be split into fsdp={fsdp} groups")
    data = len(devices) // fsdp
  if data * fsdp != len(devices):
    raise ValueError(f"mesh {data}x{fsdp} does not match {len(devices)} devices")
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def path_name(path: Sequence[Any]) -> str:
  """'encoder/trunk/layers/0/mlp_in/kernel' from a jax key path (Variable '.value' dropped)."""
  parts = []
  for key in path:
    name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
    if name != "value":
      parts.append(str(name))
  return "/".join(parts)


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh,
             min_elements: int = MIN_SHARD_ELEMENTS) -> P:
  """The PartitionSpec of one state leaf under PARAM_RULES (replicated when it cannot split)."""
  fsdp = mesh.shape["fsdp"]
  if fsdp == 1 or int(np.prod(shape)) < min_elements:
    return P()
  for pattern, spec in PARAM_RULES:
    if re.search(pattern, name):
      if len(spec) != len(shape):
        continue
      axis = list(spec).index("fsdp")
      if shape[axis] % fsdp:
        logging.info("replicating %s %s: dim %d not divisible by fsdp=%d", name, shape, axis, fsdp)
        return P()
      return spec
  return P()


def state_shardings(state: Any, mesh: Mesh, min_elements: int = MIN_SHARD_ELEMENTS) -> Any:
  """NamedShardings for every leaf of an nnx state (or any pytree), by PARAM_RULES."""

  def leaf_sharding(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    return NamedSharding(mesh, spec_for(path_name(path), shape, mesh, min_elements))

  return jax.tree_util.tree_map_with_path(leaf_sharding, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over all devices; other axes whole."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def describe(state: Any, shardings: Any) -> dict[str, int]:
  """Counts of sharded / replicated leaves and bytes per device, for the start-up log."""
  # PRNG key leaves carry no memory worth counting and have no numpy dtype.
  is_array = lambda x: hasattr(x, "dtype") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
  leaves = jax.tree.leaves(state)
  specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  sharded = sum(1 for s in specs if any(a is not None for a in s.spec))
  total_bytes = sum(int(np.prod(getattr(x, "shape", ()))) * np.dtype(x.dtype).itemsize
                    for x in leaves if is_array(x))
  per_device = 0
  for x, s in zip(leaves, specs):
    if is_array(x):
      shard_shape = s.shard_shape(tuple(x.shape))
      per_device += int(np.prod(shard_shape)) * np.dtype(x.dtype).itemsize
  return {"leaves": len(leaves), "sharded_leaves": sharded, "bytes_total": total_bytes,
          "bytes_per_device": per_device}


def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def put_global(tree: Any, shardings: Any) -> Any:
  """Places host values (identical on every process) onto global shardings.

  ``jax.device_put`` only reaches this process's devices; with several processes each one
  supplies the shards it owns via ``make_array_from_callback``. PRNG keys travel as key data.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def put(x, s):
    if _is_key(x):
      data = np.asarray(jax.random.key_data(x))
      placed = jax.make_array_from_callback(data.shape, s, lambda idx: data[idx])
      return jax.random.wrap_key_data(placed, impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  return jax.tree.map(put, tree, shardings)


def put_rows(tree: Any, mesh: Mesh) -> Any:
  """Host arrays (the same on every process) with their leading axis split over the mesh's
  batch axes (``batch_sharding``): each process places only its own devices' rows."""
  rows = batch_sharding(mesh)
  return put_global(tree, jax.tree.map(lambda _: rows, tree))


def whole_rows(rows: int, mesh: Mesh | None) -> int:
  """``rows`` rounded up to a number ``batch_sharding(mesh)`` splits evenly (no mesh: as is)."""
  if mesh is None:
    return rows
  shards = int(np.prod([mesh.shape[axis] for axis in DATA_AXES]))
  return -(-rows // shards) * shards


def mesh_of(tree: Any) -> Mesh | None:
  """The mesh ``tree``'s arrays are laid out on (by their NamedShardings), or None when none
  is (host values, arrays on one device)."""
  meshes = {x.sharding.mesh for x in jax.tree.leaves(tree)
            if isinstance(getattr(x, "sharding", None), NamedSharding)}
  if len(meshes) > 1:
    raise ValueError(f"arrays on {len(meshes)} different meshes: {meshes}")
  return meshes.pop() if meshes else None
