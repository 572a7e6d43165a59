"""The training loop: config -> data -> sharded model -> steps -> checkpoints -> evaluation.

One readable loop, in order:
  1. data set (``data.sources``) and Grain iterator (each process reads its share);
  2. model + optimizer, split into (graphdef, state); the state is put on the mesh by the rules
     in ``sharding.py``; a checkpoint, if any, is restored straight onto those shardings;
  3. the jitted train step with explicit in/out shardings and the state donated;
  4. every ``log_every`` steps: each loss term, learning rate, gate weights and examples/s to
     the console, TensorBoard and metrics.jsonl (clu writers), steps/s and ETA (clu
     ``ReportProgress``); every ``cache_refresh_every`` steps: re-encode the whole catalogue
     into the item cache; every ``checkpoint_every`` steps and at the end: an asynchronous
     Orbax checkpoint;
  5. ``train_and_evaluate`` only: full-ranking evaluation of the final model
     (``model_eval.evaluate_model``, the benchmark runner's path).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from clu import periodic_actions

from recfusion_jax import checkpointing, losses, model_eval, sharding, writers
from recfusion_jax.data import examples, pipeline, sources
from recfusion_jax.data.types import RecDataset
from recfusion_jax.models.recfusion import RecFusion, source_names


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int):
  """AdamW with linear warm-up + cosine decay and global-norm clipping; returns (tx, schedule)."""
  o = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.learning_rate, warmup_steps=o.warmup_steps,
      decay_steps=max(num_steps, o.warmup_steps + 1), end_value=o.learning_rate * 0.01)
  # Decay matrices only: decaying LayerNorm scales, biases and temperatures hurts more than helps.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.adamw(schedule, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask))
  return tx, schedule


def create_model(config: ml_collections.ConfigDict, dataset: RecDataset) -> RecFusion:
  model = RecFusion(config.model, num_users=dataset.num_users,
                    num_items=dataset.catalogue.num_items, rngs=nnx.Rngs(config.seed))
  if config.get("init_from"):
    from recfusion_jax.convert import load_pretrained_encoder  # pylint: disable=import-outside-toplevel
    report = load_pretrained_encoder(model.encoder, config.init_from)
    logging.info("initialised the encoder from %s: %s", config.init_from, report)
  return model


def compute_losses(model: RecFusion, batch: Mapping[str, jax.Array], contrastive_weight: float,
                   logq_weight: float = 1.0, full_catalogue: bool = False,
                   in_batch_weight: float = 1.0, exclude_history: bool = False
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and everything the step reports (shared by the step and the tests).

  The in-batch term is a softmax over the global batch's positives, where ``logq_weight``
  scales the logQ correction (1 removes the popularity bias of in-batch negatives entirely, 0
  keeps it) and a row's own user's other positives are not its negatives; ``full_catalogue``
  (config ``rec_loss="full"``) adds a softmax over every trained item of the catalogue, one
  term per target of the row (several for per-user batches). ``exclude_history`` keeps the
  items of a row's visible history out of its catalogue negatives (evaluation never ranks
  them either).
  """
  out = model(batch, full_catalogue=full_catalogue)
  valid = batch["example_mask"]
  in_batch = losses.sampled_softmax_loss(out["logits"], batch["item_id"],
                                         logq_weight * batch["log_q"], valid,
                                         user_ids=batch["user_id"])
  rec = in_batch_weight * in_batch
  extra = {}
  if full_catalogue:
    full = catalogue_loss(out["catalogue_logits"], batch, out["candidates"], exclude_history)
    rec = full + rec
    extra = {"full_softmax_loss": full, "in_batch_loss": in_batch}
  contrastive = losses.cross_modal_loss(out["content_emb"], out["presence"], batch["item_id"],
                                        valid, model.contrastive_inverse_temperature)
  total = losses.total_loss(rec, contrastive, contrastive_weight)
  w = valid.astype(jnp.float32)[:, None]
  aux = {"rec_loss": rec, "contrastive_loss": contrastive, "total_loss": total, **extra,
         "gate_weights": jnp.sum(out["gate_weights"] * w, 0) / jnp.maximum(jnp.sum(w), 1.0),
         "content_emb": out["content_emb"], "presence": out["presence"]}
  return total, aux


def catalogue_loss(logits: jax.Array, batch: Mapping[str, jax.Array], candidates: jax.Array,
                   exclude_history: bool) -> jax.Array:
  """The full-catalogue term for each batch kind: one target per interaction row, the hidden
  items of a cloze row, or the next item at every position of a causal row."""
  history, history_mask = batch["history"], batch["history_mask"]
  if "targets" not in batch:
    targets, target_mask = batch["item_id"][:, None], batch["example_mask"][:, None]
  elif logits.ndim == 3:   # causal: position t's user state predicts targets[:, t]
    b, length, n = logits.shape
    logits = logits.reshape(b * length, n)
    targets = batch["targets"].reshape(-1, 1)
    target_mask = batch["target_mask"].reshape(-1, 1)
    # Excluding a position's own past would need [B * L, L] lists; next-item rows skip it.
    exclude_history = False
  else:
    targets, target_mask = batch["targets"], batch["target_mask"]
  exclude = (history, history_mask) if exclude_history else (None, None)
  return losses.multi_target_softmax_loss(logits, targets, target_mask, candidates, *exclude)


def rec_loss_is_full(config: ml_collections.ConfigDict) -> bool:
  kind = config.get("rec_loss", "sampled")
  if kind not in ("sampled", "full"):
    raise ValueError(f"rec_loss={kind!r}; choose 'sampled' or 'full'")
  return kind == "full"


def train_step(graphdef: nnx.GraphDef, state: Any, batch: Mapping[str, jax.Array], *,
               contrastive_weight: float, schedule, logq_weight: float = 1.0,
               full_catalogue: bool = False, in_batch_weight: float = 1.0,
               exclude_history: bool = False) -> tuple[Any, dict[str, jax.Array]]:
  """One optimisation step on the split (model, optimizer) state; pure, for ``jax.jit``."""
  model, optimizer = nnx.merge(graphdef, state)
  grad_fn = nnx.value_and_grad(compute_losses, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
  (_, aux), grads = grad_fn(model, batch, contrastive_weight, logq_weight, full_catalogue,
                            in_batch_weight, exclude_history)
  optimizer.update(model, grads)
  model.write_cache(batch["item_id"], aux.pop("content_emb"), aux.pop("presence"),
                    batch["example_mask"], batch["item_has_id"])
  aux["grad_norm"] = optax.tree.norm(grads)
  aux["learning_rate"] = schedule(optimizer.step[...] - 1)
  aux["temperature"] = 1.0 / model.inverse_temperature
  return nnx.state((model, optimizer)), aux


def jit_train_step(graphdef, state_shardings, mesh, *, contrastive_weight: float, schedule,
                   logq_weight: float = 1.0, full_catalogue: bool = False,
                   in_batch_weight: float = 1.0, exclude_history: bool = False):
  """``train_step`` compiled with explicit shardings; the old state's buffers are donated."""
  step = functools.partial(train_step, graphdef, contrastive_weight=contrastive_weight,
                           schedule=schedule, logq_weight=logq_weight,
                           full_catalogue=full_catalogue, in_batch_weight=in_batch_weight,
                           exclude_history=exclude_history)
  return jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def _refresh_cache_fn(graphdef, state_shardings):
  """Jitted (state, content chunk) -> state with the chunk's encodings written to the cache."""

  def refresh(state, chunk):
    model, optimizer = nnx.merge(graphdef, state)
    model.eval()  # no dropout: the cache holds what inference would compute
    emb, presence = model.encode_content(chunk)
    model.write_cache(chunk["item_id"], emb, presence, chunk["valid"], chunk["item_has_id"])
    model.train()
    return nnx.state((model, optimizer))

  return jax.jit(refresh, in_shardings=(state_shardings, None), out_shardings=state_shardings,
                 donate_argnums=0)


def refresh_cache(refresh_fn, state, dataset: RecDataset, chunk: int) -> Any:
  """Re-encodes the whole catalogue into the item cache (host loop over fixed-size chunks)."""
  cat = dataset.catalogue
  n = cat.num_items
  for start in range(0, n, chunk):
    ids = np.arange(start, start + chunk)
    valid = ids < n
    ids = np.where(valid, ids, 0)
    content = cat.content(ids)
    content.update(item_id=ids.astype(np.int32), valid=valid)
    state = refresh_fn(state, content)
  return state


class TrainedModel(NamedTuple):
  """What ``train_model`` returns: the final model (host copy), its data, mesh and logs."""

  model: RecFusion
  dataset: RecDataset
  mesh: Any
  history: list[dict[str, Any]]


def train_model(config: ml_collections.ConfigDict, workdir: str,
                dataset: RecDataset | None = None) -> TrainedModel:
  """Trains ``config`` in ``workdir`` (resuming from its checkpoints); no evaluation.

  ``dataset`` overrides ``data.sources.load_dataset(config)`` (e.g. a benchmark protocol's
  train+valid fit).
  """
  os.makedirs(workdir, exist_ok=True)
  dataset = sources.load_dataset(config) if dataset is None else dataset
  logging.info("data %s: %d users, %d items, %d train / %d valid / %d test, %d cold items",
               dataset.name, dataset.num_users, dataset.catalogue.num_items, len(dataset.train),
               len(dataset.valid), len(dataset.test), len(dataset.cold_items))

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  if config.batch_size % (mesh.size) or config.batch_size % jax.process_count():
    raise ValueError(f"batch_size {config.batch_size} must divide over {mesh.size} devices")
  local_batch = config.batch_size // jax.process_count()
  index = examples.TrainExampleIndex.build(dataset)
  log_q = examples.item_log_q(dataset)
  data_iter = pipeline.make_train_iterator(
      dataset, batch_size=local_batch, history_len=config.model.user.history_len,
      seed=config.seed, num_workers=config.data.num_workers, index=index, log_q=log_q,
      history=config.data.get("history", "earlier"),
      example=config.data.get("example", "interaction"),
      target_share=config.data.get("target_share", 0.2))

  model = create_model(config, dataset)
  tx, schedule = make_optimizer(config, config.num_steps)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  state_shardings = sharding.state_shardings(state, mesh)
  logging.info("state on mesh %s: %s", dict(mesh.shape), sharding.describe(state, state_shardings))
  state = sharding.put_global(state, state_shardings)

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    save_every=config.checkpoint_every, keep=config.keep_checkpoints)
  restored = ckpt.restore(checkpointing.abstract_like(state, state_shardings), data_iter)
  start_step = 0
  if restored is not None:
    start_step, state = restored
    logging.info("resumed from step %d", start_step)

  step_fn = jit_train_step(graphdef, state_shardings, mesh,
                           contrastive_weight=config.contrastive_weight, schedule=schedule,
                           logq_weight=config.get("logq_weight", 1.0),
                           full_catalogue=rec_loss_is_full(config),
                           in_batch_weight=config.get("in_batch_weight", 1.0),
                           exclude_history=config.get("exclude_history", False))
  refresh_fn = _refresh_cache_fn(graphdef, state_shardings)
  writer = writers.create_writer(workdir)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=config.num_steps, writer=writer, every_steps=config.log_every,
      every_secs=None)
  names = source_names(model)
  if start_step == 0:
    state = refresh_cache(refresh_fn, state, dataset, config.eval_block_size)

  history: list[dict[str, Any]] = []
  tick, tick_step = time.perf_counter(), start_step
  for step in range(start_step + 1, config.num_steps + 1):
    batch = pipeline.make_global_batch(next(data_iter), mesh)
    state, metrics = step_fn(state, batch)
    report_progress(step)
    if step % config.cache_refresh_every == 0:
      state = refresh_cache(refresh_fn, state, dataset, config.eval_block_size)
    if step % config.log_every == 0 or step == config.num_steps:
      metrics = jax.device_get(metrics)
      now = time.perf_counter()
      values = {k: float(v) for k, v in metrics.items() if k != "gate_weights"}
      values.update({f"gate/{n}": float(w) for n, w in zip(names, metrics["gate_weights"])})
      values["examples_per_sec"] = (step - tick_step) * config.batch_size / (now - tick)
      writer.write_scalars(step, values)
      history.append({"step": step, **values})
      tick, tick_step = time.perf_counter(), step
    ckpt.save(step, state, data_iter, force=step == config.num_steps)
  writer.close()
  ckpt.wait()
  ckpt.close()

  # A host copy of the final state, so evaluation can run on one process's devices alone.
  model, _ = nnx.merge(graphdef, sharding.to_host(state, mesh))
  return TrainedModel(model, dataset, mesh, history)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming from its checkpoints) and evaluates the result."""
  model, dataset, mesh, history = train_model(config, workdir)
  # With one process the evaluation is sharded over the mesh; with several, every process ranks
  # all users on its own devices (same result on each).
  results = model_eval.evaluate_model(model, dataset, config,
                                      mesh if jax.process_count() == 1 else None,
                                      split=config.get("eval_split", "test"))
  results["train_history"] = history
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
  logging.info("evaluation: %s", {k: v for k, v in results.items() if k != "train_history"})
  return results
