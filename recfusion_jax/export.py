r"""Export a trained RecFusion for serving: ``jax.export`` programs + weights + precomputed tables.

  python -m recfusion_jax.export --config configs/tiny.py --workdir RUN --out RUN/export \
      [--platforms cpu,cuda,tpu] [--k 10] [--step N]

The directory layout is documented in ``recfusion_jax/serving.py``, the loader that serves it
with NumPy and JAX alone (``serving.Recommendations.load``).

Scaling: every program takes the parameters as its first input, so the serialized programs stay
small whatever the model's size (constants baked into StableHLO stop at 2 GB) and the weights
are plain ``.npy`` files beside them, written one array at a time. The training checkpoint is
opened read-only and only the model's arrays are read, straight onto the mesh's shardings
(``recommend.restore``). ``--platforms`` lowers every program once per platform into one
multi-platform artifact. The catalogue's fusion table and the training users' representations
are precomputed with the same programs and saved beside them.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from etils import epath

from recfusion_jax import score_terms, serving
from recfusion_jax.data.types import RecDataset
from recfusion_jax.models.recfusion import RecFusion
from recfusion_jax.recommend import service
from recfusion_jax.recommend.inference import USER_KEYS, ServingFunctions, content_inputs

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _spec(value: Any, leading: Any = None) -> jax.ShapeDtypeStruct:
  shape = tuple(value.shape) if leading is None else (leading,) + tuple(value.shape[1:])
  return jax.ShapeDtypeStruct(shape, value.dtype)


def _specs(tree: Mapping[str, Any], leading: Any = None) -> dict[str, jax.ShapeDtypeStruct]:
  return {key: _spec(value, leading) for key, value in tree.items()}


def export_programs(functions: ServingFunctions, content_example: Mapping[str, Any], *,
                    history_len: int, k: int, platforms: Sequence[str] = ("cpu",)
                    ) -> dict[str, jax.export.Exported]:
  """Every serving program of ``functions``, exported with the parameters as first input.

  Only shapes are used (``functions.params`` may be ``jax.ShapeDtypeStruct``s: nothing is
  allocated). ``content_example`` gives the content inputs' trailing shapes (one item is
  enough). Batch dimensions are symbolic; the catalogue and the user table must hold at least
  ``k`` rows.
  """
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f"platforms {list(platforms)}: choose from {PLATFORMS}")
  params = _specs(functions.params)
  one = 1
  users_spec = {"user_id": jax.ShapeDtypeStruct((one,), np.int32),
                "user_has_id": jax.ShapeDtypeStruct((one,), np.bool_),
                "history": jax.ShapeDtypeStruct((one, history_len), np.int32),
                "history_mask": jax.ShapeDtypeStruct((one, history_len), np.bool_)}
  assert tuple(users_spec) == USER_KEYS
  content_spec = _specs(content_example, one)
  encoded = jax.eval_shape(functions.encode_items, params, content_spec)
  items_spec = {"item_id": jax.ShapeDtypeStruct((one,), np.int32),
                "has_id": jax.ShapeDtypeStruct((one,), np.bool_), **encoded}
  table = jax.eval_shape(functions.item_table, params, items_spec)
  reps = jax.eval_shape(functions.encode_users, params, users_spec)

  def export(fn, *args):
    return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(params, *args)

  # One symbolic scope per program: every dimension variable appears in that program's inputs.
  (b,) = jax.export.symbolic_shape("b")
  u, n, e = jax.export.symbolic_shape("u, n, e", constraints=(f"n >= {k}",))
  u2, j = jax.export.symbolic_shape("u, j", constraints=(f"u >= {k}",))
  return {
      "encode_items": export(functions.encode_items, _specs(content_spec, b)),
      "item_table": export(functions.item_table, _specs(items_spec, b)),
      "encode_users": export(functions.encode_users, _specs(users_spec, b)),
      "rank_items": export(lambda p, r, t, x: functions.rank_items(p, r, t, x, k=k),
                           _specs(reps, u), _specs(table, n),
                           jax.ShapeDtypeStruct((u, e), np.int32)),
      "rank_users": export(lambda p, r, t: functions.rank_users(p, r, t, k=k),
                           _specs(reps, u2), _specs(table, j)),
  }


def export_for_serving(model: RecFusion, dataset: RecDataset, out_dir: str | epath.Path, *,
                       history_len: int, k: int = 10, platforms: Sequence[str] = ("cpu",),
                       step: int | None = None, item_names: Sequence[str] | None = None,
                       tokenizer: Mapping[str, Any] | None = None,
                       text_vocab_size: int | None = None, chunk: int = 256,
                       chosen_terms: Mapping[str, Sequence[float]] | None = None
                       ) -> dict[str, Any]:
  """Writes the serving directory of ``model`` for ``dataset`` (its catalogue, its users).

  The model's item cache is refreshed first (eval-mode encodings of the catalogue).
  ``tokenizer`` ({'file': tokenizer.json, 'build_len': int}) is copied in so a served model
  can tokenise new items' text as the data build did. ``chosen_terms``: the fixed score terms'
  settings ``score_terms.apply_saved`` set, recorded in the manifest (default: what the
  model's setting variables hold, without EASE's reg, which only the exported matrix carries).
  Returns the manifest.
  """
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  functions, encoded = service.prepare_model(model, dataset, chunk)
  k = service.program_k(k, dataset)
  example = content_inputs(dataset.catalogue, np.arange(1))
  programs = export_programs(functions, example, history_len=history_len, k=k,
                             platforms=platforms)
  (out / "programs").mkdir(exist_ok=True)
  for name, program in programs.items():
    (out / "programs" / f"{name}.bin").write_bytes(program.serialize())
  # The tables come from the very programs just exported (one definition of every answer).
  tables = service.compute_tables(service.jit_programs(functions, k), functions.params, dataset,
                                  encoded, history_len=history_len, chunk=chunk)
  manifest: dict[str, Any] = {
      "format": serving.FORMAT, "k": k, "history_len": history_len,
      "platforms": list(platforms), "checkpoint_step": step, "data": dataset.name,
      "modalities": list(functions.modalities), "sources": list(functions.sources),
      "num_items": dataset.catalogue.num_items, "num_users": dataset.num_users,
      "content_inputs": {key: [str(v.dtype), list(v.shape[1:])] for key, v in example.items()},
      "text_vocab_size": text_vocab_size, "programs": list(programs),
      # The fixed terms' settings the weights carry (score_terms.py): weight 0 if never chosen.
      "score_terms": ({key: list(setting) for key, setting in chosen_terms.items()}
                      if chosen_terms is not None else
                      {key: np.asarray(getattr(model, f"{key}_setting")[...]).tolist()
                       for key in score_terms.score_terms(model)}),
  }
  # epath.Path, not str: save_arrays then writes through epath (local or gs://).
  # The parameters are device arrays, split over the mesh they were restored onto; writing a
  # file needs host values, so save_arrays gathers each one to the host, one array at a time,
  # here at export time and nowhere else (the export CLI is one process, whose devices hold
  # every shard).
  manifest["params"] = serving.save_arrays(out / "weights", functions.params)
  manifest["item_table"] = serving.save_arrays(out / "item_table", tables["item_table"])
  manifest["user_table"] = serving.save_arrays(out / "user_table", tables["user_table"])
  manifest["catalogue"] = serving.save_arrays(out / "catalogue",
                                              {"content_vector": tables["content_vector"]})
  manifest["known"] = serving.save_arrays(out / "known", {
      "indptr": tables["known_indptr"], "items": tables["known_items"]})
  names = item_names or [f"item {i}" for i in range(dataset.catalogue.num_items)]
  if len(names) != dataset.catalogue.num_items:
    raise ValueError(f"{len(names)} item names for {dataset.catalogue.num_items} items")
  (out / "items.tsv").write_text(
      "index\tname\n" + "".join(f"{i}\t{' '.join(str(n).split())}\n" for i, n in enumerate(names)),
      encoding="utf-8")
  manifest["tokenizer"] = None
  if tokenizer is not None and tokenizer.get("file"):
    epath.Path(tokenizer["file"]).copy(out / "tokenizer.json", overwrite=True)
    manifest["tokenizer"] = {"file": "tokenizer.json", "build_len": int(tokenizer["build_len"])}
  (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
  logging.info("exported %d programs for %s, %d parameter arrays, to %s", len(programs),
               list(platforms), len(manifest["params"]), out)
  return manifest


def main(argv: Sequence[str]) -> None:
  """CLI: restore ``--workdir``'s checkpoint (read-only, onto the config's mesh) and export it."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from recfusion_jax import config_lib, writers  # pylint: disable=import-outside-toplevel
  from recfusion_jax.recommend import __main__ as cli  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  writers.setup_logging()
  values = flags.FLAGS
  if values.config is None or not values.workdir or not values.out:
    raise app.UsageError("--config, --workdir and --out are required")
  # The training run's protocol fields (main applied them), so the model matches its checkpoint.
  config = config_lib.config_from_flag("config")
  model, dataset, step, context = cli.load_workdir(config, values.workdir, values.step)
  manifest = export_for_serving(
      model, dataset, values.out, history_len=config.model.user.history_len,
      k=values.k, platforms=values.platforms, step=step, item_names=context["item_names"],
      tokenizer=context["tokenizer"], text_vocab_size=context["text_vocab_size"],
      chosen_terms=context["source"].get("score_terms"))
  size = sum(p.stat().length for p in epath.Path(values.out).glob("programs/*.bin"))
  print(f"exported step {step} of {values.workdir} to {values.out}: programs "
        f"{manifest['programs']} for {manifest['platforms']} ({size / 1e6:.2f} MB), "
        f"{len(manifest['params'])} weight arrays, {manifest['num_items']} items, "
        f"{manifest['num_users']} users, k={manifest['k']}")


def define_flags() -> None:
  """The CLI's flags (kept off import; shared with the recommend CLI's where both define one)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  def define(name, fn, *args):
    if name not in flags.FLAGS:
      fn(name, *args)

  define("config", config_flags.DEFINE_config_file, None, "Training configuration file.")
  define("workdir", flags.DEFINE_string, None, "Training run directory (its checkpoints are read).")
  define("out", flags.DEFINE_string, None, "Export directory.")
  define("platforms", flags.DEFINE_list, ["cpu"], f"Target platforms, from {','.join(PLATFORMS)}.")
  define("k", flags.DEFINE_integer, 10, "Items (and users) the ranking programs return.")
  define("step", flags.DEFINE_integer, None, "Checkpoint step (default: the latest).")


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  define_flags()
  _app.run(main)
