r"""A content model's validation curve: train on a protocol's fit data, score ``valid`` every N
steps with the runner's exact evaluation (same exclusion, tie rule and candidates).

  python -m recfusion_jax.benchmark.curve --config configs/movielens.py:size=small,recipe=dot \
      --model RecFusion --protocol warm_ratio --seed 0 --steps 1500 --eval_every 250 \
      --out runs/curves.jsonl

``--score_without content,id`` also scores each evaluation with that source hidden from every
item (the missing_modality protocol's masking, applied to all modalities; cold items' scoring
from content alone for ``id``): one fit then shows what each path contributes at scoring time.
``--staged`` trains the ID-only form first, then the model from it with that ID side held, so
content trains as a residual on a fixed ID model (docs/TUNING.md §22).

This is how training length and settings are chosen (docs/TUNING.md): the runner then trains
each fit for the chosen ``--steps`` and scores ``test`` once. It keeps its own short loop
because ``train.train_model`` evaluates once, at the end; it has no checkpoints, no resume and
one device: a tuning tool, not a training entry point.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Collection, Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from ml_collections import config_flags

from recfusion_jax import model_eval, paths, sharding, train
from recfusion_jax.baselines.common import rank_split
from recfusion_jax.benchmark import protocols, registry
from recfusion_jax.benchmark.fit import _with_catalogue, content_config
from recfusion_jax.data import examples, movielens, pipeline, types
from recfusion_jax.models.recfusion import RecFusion


def define_flags() -> None:
  """The CLI's flags (defined only when run as a program: the runner's CLI also has --config)."""
  config_flags.DEFINE_config_file("config", "configs/movielens.py:size=small",
                                  "Base RecFusion config (as the runner's --config).")
  flags.DEFINE_enum("model", "RecFusion", sorted(registry.CONTENT_MODELS),
                    "Content model of the registry.")
  flags.DEFINE_string("protocol", "warm_ratio", "Protocol whose valid split is scored.")
  flags.DEFINE_integer("seed", 0, "Split and model seed.")
  flags.DEFINE_integer("steps", 1000, "Training steps (the schedule decays over these).")
  flags.DEFINE_integer("eval_every", 250, "Score valid every this many steps.")
  flags.DEFINE_string("out", None, "JSONL file the curve is appended to (optional).")
  flags.DEFINE_list("score_without", [], "Also score valid with these sources hidden from "
                    "every item: content (all modalities), id.")
  flags.DEFINE_bool("staged", False, "Train the ID-only form first, then --model from it with "
                    "the shared (ID-side) parameters held.")

SOURCES_TO_HIDE = ("content", "id")
# What the ID-only form trains (top-level modules of RecFusion): --staged holds these.
ID_SIDE = ("item_embeddings", "history_embeddings", "item_bias", "item_item", "user_encoder",
           "log_temperature")


def catalogue_without(catalogue: types.Catalogue, source: str) -> types.Catalogue:
  """``catalogue`` with ``source`` hidden from every item: ``content`` zeroes and unflags every
  modality (as missing_modality hides one), ``id`` scores every item as a cold item is."""
  if source == "content":
    return movielens.apply_presence(catalogue, np.zeros_like(catalogue.presence))
  if source == "id":
    return dataclasses.replace(catalogue, has_id=np.zeros_like(catalogue.has_id))
  raise ValueError(f"--score_without {source!r}; choose from {SOURCES_TO_HIDE}")


def valid_curve(name: str, base, protocol: str, seed: int, steps: int, eval_every: int, *,
                keep: Collection[str] = (), score_without: Collection[str] = (),
                staged: bool = False) -> list[dict[str, float]]:
  """Rows {step, epoch, NDCG@10, HR@10, train_s, <last logged losses>} every ``eval_every``.
  ``keep``: the --config overrides, which win over the recipe's per-protocol fields.
  ``score_without``: sources (``SOURCES_TO_HIDE``) each scored hidden as well, as
  ``"NDCG@10 without <source>"`` and ``"HR@10 without <source>"``.
  ``staged``: first train the ID-only form for ``steps`` (its rows carry ``"stage": "id_only"``),
  then ``name`` for ``steps`` from it: its ID side (``ID_SIDE``: the ID tables, the user model,
  the item bias, the scoring temperature) copied and held, so only the content side trains."""
  if steps < 1 or eval_every < 1:
    raise ValueError(f"steps and eval_every must be >= 1, got {steps}, {eval_every}")
  config = content_config(name, base, protocol, seed, steps=steps, keep=keep)
  pdata = protocols.load_protocol(config, protocol, seed, split="valid")
  fit = _with_catalogue(pdata.fit, pdata.fit.catalogue, config.data.get("text_len"))
  hidden = {source: catalogue_without(fit.catalogue, source) for source in score_without}
  if not staged:
    return _train_and_score(config, pdata, fit, steps, eval_every, hidden)[0]
  id_config = content_config("id_only", base, protocol, seed, steps=steps, keep=keep)
  first, id_model = _train_and_score(id_config, pdata, fit, steps, eval_every, {})
  held = nnx.to_flat_state(nnx.state(id_model, nnx.Param))
  second, _ = _train_and_score(config, pdata, fit, steps, eval_every, hidden, start_from=held)
  return [{"stage": "id_only", **row} for row in first] + second


def _train_and_score(config, pdata, fit, steps: int, eval_every: int, hidden, *,
                     start_from=None) -> tuple[list[dict[str, float]], RecFusion]:
  """(rows, trained model) of one fit of ``config`` (``valid_curve``'s loop). ``start_from``:
  a flat Param state whose ``ID_SIDE`` entries are copied into the model and held (their
  updates zeroed, weight decay included)."""
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  index = examples.TrainExampleIndex.build(fit)
  example = config.data.get("example", "interaction")
  data_iter = pipeline.train_iterator_from_config(config, fit, num_workers=0, index=index,
                                                 log_q=examples.item_log_q(fit))
  tx, schedule = train.make_optimizer(config, steps)
  if start_from is not None:
    # optax's own partition: the ID side gets no update at all (weight decay included).
    tx = optax.multi_transform(
        {"train": tx, "hold": optax.set_to_zero()},
        lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: "hold" if sharding.path_name(path).split("/")[0] in ID_SIDE
            else "train", params))
  # train_model's init, so the curve's last row is the runner's score to the last bit.
  graphdef, state, shardings = train.create_sharded_state(config, fit, mesh, tx)
  if start_from is not None:
    model, optimizer = nnx.merge(graphdef, state)
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    copied = 0
    for path, variable in start_from:
      if path[0] not in ID_SIDE:
        continue
      value = variable.get_value()
      if path not in params or params[path].get_value().shape != value.shape:
        raise ValueError(f"staged: the ID-only form's {'/'.join(map(str, path))} "
                         f"{value.shape} has no counterpart of that shape in the model")
      params[path].set_value(jnp.array(value, copy=True))  # the step donates its state
      copied += 1
    if not copied:
      raise ValueError("staged: the ID-only form has no ID-side parameter to hold")
    state = nnx.state((model, optimizer))
  step_fn = train.jit_train_step(graphdef, shardings, mesh, schedule=schedule,
                                 **train.step_settings(config))
  refresh_fn = train._refresh_cache_fn(graphdef, shardings)  # pylint: disable=protected-access
  state = train.refresh_cache(refresh_fn, state, fit, config.eval_block_size)
  rows_per_epoch = pipeline.examples_per_epoch(index, example)
  curve, train_s = [], 0.0
  for step in range(1, steps + 1):
    tick = time.perf_counter()
    state, metrics = step_fn(state, pipeline.make_global_batch(next(data_iter), mesh))
    if step % config.cache_refresh_every == 0:
      state = train.refresh_cache(refresh_fn, state, fit, config.eval_block_size)
    jax.block_until_ready(state)
    train_s += time.perf_counter() - tick
    if step % eval_every and step != steps:
      continue
    trained, _ = nnx.merge(graphdef, state)

    def score(catalogue: types.Catalogue) -> dict[str, float]:
      ranker = model_eval.model_ranker(trained, fit, catalogue,
                                       history_len=config.model.user.history_len,
                                       chunk=config.eval_block_size)
      return rank_split(ranker, fit, pdata.heldout, candidate_items=pdata.candidate_items)

    result = score(fit.catalogue)
    ablated = {}
    for source, catalogue in hidden.items():
      scores = score(catalogue)
      ablated.update({f"{k} without {source}": round(float(scores[k]), 4)
                      for k in ("NDCG@10", "HR@10")})
    losses = {k: round(float(v), 4) for k, v in jax.device_get(metrics).items()
              if np.ndim(v) == 0}
    curve.append({"step": step,
                  "epoch": pipeline.epochs(step, config.batch_size, rows_per_epoch, digits=2),
                  "NDCG@10": round(float(result["NDCG@10"]), 4),
                  "HR@10": round(float(result["HR@10"]), 4), **ablated,
                  "train_s": round(train_s, 1), **losses})
    print(json.dumps(curve[-1]), flush=True)
  trained, _ = nnx.merge(graphdef, state)
  return curve, trained


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  curve = valid_curve(f.model, f.config, f.protocol, f.seed, f.steps, f.eval_every,
                      keep=config_flags.get_override_values(f["config"]),
                      score_without=f.score_without, staged=f.staged)
  best = max((row for row in curve if "stage" not in row), key=lambda row: row["NDCG@10"])
  print("best", json.dumps(best))
  if f.out:
    out = epath.Path(f.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": f.model, "protocol": f.protocol, "seed": f.seed,
              "argv": sys.argv[1:], "best": best, "curve": curve}
    paths.append_text(out, json.dumps(record) + "\n")


if __name__ == "__main__":
  define_flags()
  app.run(main)
