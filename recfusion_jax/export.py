r"""Export a trained RecFusion for serving: StableHLO programs + the item table.

  python -m recfusion_jax.export --config configs/tiny.py --workdir DIR --out DIR/export

writes
  recommend.bin     (user inputs, item table) -> top-k item ids and scores; batch size symbolic
  encode_items.bin  item content -> per-modality embeddings, for new (cold-start) items
  item_table.npz    the fusion table of the current catalogue (the second input of recommend)
  manifest.json     input names, dtypes and shapes, k, modalities, the checkpoint step

Both programs are ``jax.export`` artifacts with the model's parameters baked in as constants:
a server needs only ``jax.export.deserialize(bytes).call(...)``, no Python model code. The item
table is an input, not a constant, so the catalogue can be re-encoded (``encode_items`` + a new
table) without exporting again.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recfusion_jax.data.types import Catalogue
from recfusion_jax.models.fusion import fused_scores
from recfusion_jax.models.recfusion import RecFusion
from recfusion_jax.recommend import CONTENT_KEYS, USER_KEYS, Recommender


def _specs(arrays: Mapping[str, np.ndarray], batch: Any) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct((batch,) + v.shape[1:], v.dtype) for k, v in arrays.items()}


def export_for_serving(model: RecFusion, catalogue: Catalogue, out_dir: str, *,
                       history_len: int, k: int = 10, platforms: tuple[str, ...] = ("cpu",),
                       step: int | None = None) -> dict[str, Any]:
  """Writes the serving artifacts of ``model`` for ``catalogue`` into ``out_dir``."""
  os.makedirs(out_dir, exist_ok=True)
  rec = Recommender(model)
  table = rec.item_table(catalogue)
  graphdef, state = rec.graphdef, rec.state
  kind, gate_dim = rec.kind, rec.gate_dim

  def recommend(users, item_table):
    m = nnx.merge(graphdef, state)
    reps = m.encode_users(*(users[key] for key in USER_KEYS))
    reps = {key: v for key, v in reps.items() if v is not None}
    scores = fused_scores(reps, item_table, kind=kind, gate_dim=gate_dim)
    # Items the user already has are not recommended again.
    seen = jnp.zeros(scores.shape, bool).at[
        jnp.arange(scores.shape[0])[:, None], users["history"]].max(users["history_mask"])
    top_scores, top_ids = jax.lax.top_k(jnp.where(seen, -jnp.inf, scores), k)
    return top_ids.astype(jnp.int32), top_scores

  def encode_items(content):
    return nnx.merge(graphdef, state).encode_content(content)

  (batch,) = jax.export.symbolic_shape("b")
  example_users = {
      "user_id": np.zeros((1,), np.int32), "user_has_id": np.zeros((1,), bool),
      "history": np.zeros((1, history_len), np.int32),
      "history_mask": np.zeros((1, history_len), bool)}
  content = catalogue.content(np.arange(1))
  content = {key: content[key] for key in CONTENT_KEYS if key in content}
  table_specs = {key: jax.ShapeDtypeStruct(v.shape, v.dtype) for key, v in table.items()}

  exported = {
      "recommend": jax.export.export(jax.jit(recommend), platforms=platforms)(
          _specs(example_users, batch), table_specs),
      "encode_items": jax.export.export(jax.jit(encode_items), platforms=platforms)(
          _specs(content, batch)),
  }
  for name, program in exported.items():
    with open(os.path.join(out_dir, f"{name}.bin"), "wb") as f:
      f.write(program.serialize())
  np.savez(os.path.join(out_dir, "item_table.npz"), **table)
  manifest = {
      "k": k, "history_len": history_len, "modalities": list(model.modalities),
      "sources": list(model.sources), "fusion": kind, "platforms": list(platforms),
      "checkpoint_step": step,
      "user_inputs": {key: [str(v.dtype), list(v.shape[1:])] for key, v in example_users.items()},
      "content_inputs": {key: [str(v.dtype), list(v.shape[1:])] for key, v in content.items()},
      "item_table": {key: [str(v.dtype), list(v.shape)] for key, v in table.items()},
  }
  with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
  return manifest


def load_serving(out_dir: str) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
  """(programs, item table, manifest) from an export directory; programs are callables."""
  programs = {}
  for name in ("recommend", "encode_items"):
    with open(os.path.join(out_dir, f"{name}.bin"), "rb") as f:
      programs[name] = jax.export.deserialize(bytearray(f.read())).call
  with np.load(os.path.join(out_dir, "item_table.npz")) as data:
    table = {key: data[key] for key in data.files}
  with open(os.path.join(out_dir, "manifest.json")) as f:
    manifest = json.load(f)
  return programs, table, manifest


def main(argv):
  """CLI: restore the latest checkpoint of ``--workdir`` and export it."""
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  from recfusion_jax import checkpointing, train  # pylint: disable=import-outside-toplevel
  from recfusion_jax.data import sources  # pylint: disable=import-outside-toplevel
  config = flags.FLAGS.config
  dataset = sources.load_dataset(config)
  model = train.create_model(config, dataset)
  graphdef, state = nnx.split(model)
  ckpt = checkpointing.Checkpointer(os.path.join(flags.FLAGS.workdir, "checkpoints"),
                                    save_every=1, keep=1)
  tx, _ = train.make_optimizer(config, config.num_steps)
  full_graphdef, full_state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  del graphdef, state
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), full_state)
  # The newest checkpoint that loads and matches its content fingerprint (older ones otherwise).
  restored = ckpt.restore(abstract, fingerprint_fn=checkpointing.make_fingerprint_fn())
  if restored is None:
    raise FileNotFoundError(f"no checkpoint under {flags.FLAGS.workdir}/checkpoints")
  step, full_state = restored.step, restored.state
  model, _ = nnx.merge(full_graphdef, full_state)
  manifest = export_for_serving(model, dataset.catalogue, flags.FLAGS.out,
                                history_len=config.model.user.history_len, step=step)
  print(f"exported step {step} to {flags.FLAGS.out}: {sorted(manifest)}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Training configuration file.")
  flags.DEFINE_string("workdir", None, "Training run directory (its checkpoints are read).")
  flags.DEFINE_string("out", None, "Export directory.")
  flags.mark_flags_as_required(["config", "workdir", "out"])
  app.run(main)
