"""The training loop: config -> data -> sharded model -> steps -> checkpoints -> evaluation.

One readable loop, in order:
  0. the config is checked (``config_validation.validate``) before anything loads or compiles;
  1. data set (``data.sources``) and Grain iterator (each process reads its share);
  2. model + optimizer, split into (graphdef, state), initialised under ``jax.jit`` straight
     onto the mesh by the rules in ``sharding.py`` (``create_sharded_state``); the newest
     usable checkpoint, if any, is restored straight onto those shardings and verified
     against its content fingerprint (``checkpointing``: an unusable one is reported and the
     next older one tried);
  3. the jitted train step with explicit in/out shardings and the state donated, behind
     ``guard_nonfinite``: a NaN/Inf loss term or gradient norm stops the run before any save
     (``nonfinite="stop"``) or drops that step's update (``"skip"``, counted and logged);
  4. every ``log_every`` steps: each loss term, learning rate, gate weights and examples/s to
     the console, TensorBoard and metrics.jsonl (clu writers), steps/s and ETA (clu
     ``ReportProgress``); every ``cache_refresh_every`` steps: re-encode the whole catalogue
     into the item cache; every ``checkpoint_every`` steps and at the end: an asynchronous
     Orbax checkpoint (with a content fingerprint);
  5. SIGTERM/SIGINT (or a multi-host preemption notice): a checkpoint at the current step,
     committed, then ``Preempted`` (the CLI exits with ``EXIT_PREEMPTED``, "resume me");
  6. with ``validation.every``: full-ranking evaluation on ``valid`` every that many steps
     (the runner's exclusion and tie rules), written with the other metrics; a checkpoint at
     each, the best one kept by Orbax (``BestN`` on the metric); training stops after
     ``validation.patience`` evaluations without improvement, and the best state is the
     result (``TrainedModel.best``: its step, epochs and score);
  7. ``train_and_evaluate`` only: full-ranking evaluation of the final model
     (``model_eval.evaluate_model``, the benchmark runner's path).

A resumed run rewrites metrics.jsonl from the restored step on, so the log has no duplicate
steps and ``train_history`` covers the whole run.
"""

from __future__ import annotations

import collections
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
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from clu import periodic_actions

from recfusion_jax import (checkpointing, config_validation, gradcache, losses, model_eval,
                           score_terms, sharding, tiled_losses, writers)
from recfusion_jax.baselines import markov
from recfusion_jax.data import examples, pipeline, sources
from recfusion_jax.data.types import RecDataset
from recfusion_jax.models import item_item
from recfusion_jax.models.recfusion import RecFusion, source_names


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int):
  """AdamW with linear warm-up + cosine decay and global-norm clipping; returns (tx, schedule).

  ``optimizer.encoder_weight_decay`` (unset: ``weight_decay``) decays the content encoder's
  matrices; ``weight_decay`` every other matrix. optax.adamw takes one rate, so this is its own
  chain (scale_by_adam, add_decayed_weights, scale_by_learning_rate) with two masked decays.
  ``optimizer.encoder_lr_scale`` multiplies the encoder's whole update (its step and its decay):
  a pretrained trunk fine-tuned at a fraction of the rate that the ID table and user model need.
  ``optimizer.encoder_lr_scale_paths`` (path prefixes; default the whole encoder) narrows it,
  e.g. to the pretrained trunk and text stem, so parts started from scratch train at the rate.
  """
  o = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.learning_rate, warmup_steps=o.warmup_steps,
      decay_steps=max(num_steps, o.warmup_steps + 1), end_value=o.learning_rate * 0.01)
  encoder_decay = o.get("encoder_weight_decay")
  encoder_decay = o.weight_decay if encoder_decay is None else encoder_decay
  in_encoder = lambda path: sharding.path_name(path).startswith("encoder/")
  # Decay matrices only: decaying LayerNorm scales, biases and temperatures hurts more than helps.
  def decay_mask(encoder: bool):
    return lambda params: jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and in_encoder(path) == encoder, params)
  steps = [optax.clip_by_global_norm(o.clip_norm),
           optax.scale_by_adam(b2=o.b2),
           optax.add_decayed_weights(o.weight_decay, mask=decay_mask(False)),
           optax.add_decayed_weights(encoder_decay, mask=decay_mask(True)),
           optax.scale_by_learning_rate(schedule)]
  lr_scale = o.get("encoder_lr_scale", 1.0)
  if lr_scale != 1.0:   # at 1 the chain (and so a checkpoint's optimizer state) is unchanged
    steps.append(optax.masked(optax.scale(lr_scale),
                              _prefix_mask(tuple(o.get("encoder_lr_scale_paths", ("encoder/",))))))
  return optax.chain(*steps), schedule


def _prefix_mask(prefixes: tuple[str, ...]):
  """An optax mask: True for parameters whose path starts with one of ``prefixes``.

  The prefixes may name parts that only some encoders have (``trunk/`` or ``towers/text/``),
  so each prefix's count is logged, and prefixes that match nothing at all are an error.
  """
  def mask(params):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [sharding.path_name(path) for path, _ in leaves]
    counts = {p: sum(n.startswith(p) for n in names) for p in prefixes}
    if not any(counts.values()):
      raise ValueError(f"optimizer.encoder_lr_scale_paths {list(prefixes)} match no parameter; "
                       f"parameter paths look like {names[:3]}")
    logging.info("encoder_lr_scale applies to (prefix: parameters) %s", counts)
    return jax.tree_util.tree_unflatten(treedef, [n.startswith(prefixes) for n in names])
  return mask


def create_model(config: ml_collections.ConfigDict, dataset: RecDataset) -> RecFusion:
  """The model, eagerly on the default device (evaluation, tools); training uses
  ``create_sharded_state``, which never holds it whole on one device."""
  model = _init_model(config, dataset)
  _load_init_from(model, config)
  fill_item_item_prior(model, dataset, config)
  fill_transition_prior(model, dataset)
  return model


def _init_model(config: ml_collections.ConfigDict, dataset: RecDataset) -> RecFusion:
  # Rngs made here, from the seed alone: eager and jitted inits draw identical values.
  return RecFusion(config.model, num_users=dataset.num_users,
                   num_items=dataset.catalogue.num_items, rngs=nnx.Rngs(config.seed))


def _load_init_from(model: RecFusion, config: ml_collections.ConfigDict) -> None:
  if config.get("init_from"):
    from recfusion_jax.convert import load_pretrained_encoder  # pylint: disable=import-outside-toplevel
    report = load_pretrained_encoder(model.encoder, config.init_from)
    logging.info("initialised the encoder from %s: %s", config.init_from, report)


def fill_item_item_prior(model: RecFusion, dataset: RecDataset,
                         config: ml_collections.ConfigDict) -> None:
  """``model.item_item="ease"``: EASE's weights on ``dataset.train`` and their starting scale
  (``models.item_item``); ``"ease_fixed"``: the weights alone. Each value is placed on its
  variable's sharding; other modes: nothing."""
  # Under nnx.eval_shape (restoring: the values come from the checkpoint) only shapes matter,
  # and the zeros the model was built with have them: no EASE fit for nothing.
  if (model.item_item_mode not in ("ease", "ease_fixed")
      or isinstance(model.item_item[...], jax.core.Tracer)):
    return
  reg = float(config.model.item_item_reg)

  def put(variable, value):
    variable[...] = sharding.put_global(np.asarray(value, np.float32), variable[...].sharding)

  logging.info("item-item prior: EASE (reg %g) on %d training pairs", reg, len(dataset.train.user))
  if model.item_item_mode == "ease_fixed":   # weighted after training: no starting scale
    score_terms.fill_ease_matrix(model, dataset, reg)
    return
  weights, scale = item_item.ease_prior(dataset, reg)
  logging.info("item-item prior: starting scale %g", scale)
  put(model.item_item, weights)
  put(model.item_item_scale, scale)


def fill_transition_prior(model: RecFusion, dataset: RecDataset) -> None:
  """``model.transition="markov"``: the chain's transition probabilities on ``dataset.train``
  (``baselines.markov``), placed on the variable's sharding; otherwise nothing."""
  if model.transition is None or isinstance(model.transition[...], jax.core.Tracer):
    return   # restoring under nnx.eval_shape: the checkpoint holds the values
  probabilities = markov.transition_probabilities(examples.TrainExampleIndex.build(dataset),
                                                  dataset.catalogue.num_items)
  logging.info("transition prior: a first-order Markov chain on %d training pairs",
               len(dataset.train.user))
  model.transition[...] = sharding.put_global(probabilities, model.transition[...].sharding)


def create_sharded_state(config: ml_collections.ConfigDict, dataset: RecDataset, mesh: Any,
                         tx: optax.GradientTransformation, *,
                         min_elements: int = sharding.MIN_SHARD_ELEMENTS
                         ) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, state, state_shardings) of model + optimizer, born sharded on ``mesh``.

  The shapes come from an abstract trace (nothing allocated), the shardings from
  ``sharding.state_shardings``, and the values from the same init run under ``jax.jit`` with
  those out_shardings: each device only ever materialises its own shards, so a model that
  fits the mesh but not one device still starts. Every process runs the same program on the
  global mesh, so no host value has to be placed (``put_global``). The random draws are
  ``create_model``'s (XLA's fused init may round a value 1 ulp differently from op-by-op).
  ``config.init_from`` then overwrites the encoder with the pretrained arrays, each placed on
  its parameter's sharding.
  """
  def build():
    model = _init_model(config, dataset)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
  state_shardings = sharding.state_shardings(abstract_state, mesh, min_elements)
  state = jax.jit(lambda: nnx.split(build())[1], out_shardings=state_shardings)()
  if (config.get("init_from") or config.model.get("item_item", "off") in ("ease", "ease_fixed")
      or config.model.get("transition", "off") != "off"):
    # Adam's moments start at zero whatever the weights are: loading after the optimizer
    # is built gives the eager path's state.
    model, optimizer = nnx.merge(graphdef, state)
    _load_init_from(model, config)
    fill_item_item_prior(model, dataset, config)
    fill_transition_prior(model, dataset)
    state = nnx.state((model, optimizer))
  return graphdef, state, state_shardings


def compute_losses(model: RecFusion, batch: Mapping[str, jax.Array], contrastive_weight: float,
                   logq_weight: float = 1.0, full_catalogue: bool = False,
                   in_batch_weight: float = 1.0, exclude_history: bool = False,
                   catalogue_form: str = "softmax", negative_weight: float = 1.0,
                   content: tuple[jax.Array, jax.Array] | None = None,
                   users: Mapping[str, jax.Array | None] | None = None, loss_tile: int = 0,
                   mesh: Mesh | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and everything the step reports (shared by the step and the tests).

  The in-batch term is a softmax over the global batch's positives, where ``logq_weight``
  scales the logQ correction (1 removes the popularity bias of in-batch negatives entirely, 0
  keeps it) and a row's own user's other positives are not its negatives; ``full_catalogue``
  (config ``rec_loss="full"``) adds a softmax over every trained item of the catalogue, one
  term per target of the row (several for per-user batches). ``exclude_history`` keeps the
  items of a row's visible history out of its catalogue negatives (evaluation never ranks
  them either). ``catalogue_form``: that term as a softmax, or as the squared error against
  the 0/1 target row with ``negative_weight`` on non-targets (``losses``). ``content``:
  precomputed (content_emb, presence) of the batch's items instead of running the encoder,
  ``users`` the batch's precomputed ``model.encode_users`` output instead of running the user
  tower (both: the gradient-caching step, ``recfusion_jax.gradcache``).

  ``loss_tile`` > 0 (config ``loss_tile``): the in-batch softmax and the contrastive term are
  computed in [tile, tile] blocks (``recfusion_jax.tiled_losses``; same values and gradients),
  so neither the [B, B] logits nor the gate's [B, B, S] weights exist; with a ``mesh`` of more
  than one device as a ring over its batch axes, each device keeping its own rows.
  """
  out = model(batch, full_catalogue=full_catalogue, content=content, users=users,
              in_batch_logits=not loss_tile)
  valid = batch["example_mask"]
  log_q = logq_weight * batch["log_q"]
  if loss_tile:
    ring = mesh if mesh is not None and mesh.size > 1 else None
    tiled = dict(tile=loss_tile, mesh=ring)
    in_batch = tiled_losses.fused_softmax_loss(
        out["in_batch_users"], out["in_batch_table"], batch["item_id"], log_q, valid,
        model.inverse_temperature, kind=model.fusion.kind, gate_dim=model.fusion.gate_dim,
        user_ids=batch["user_id"], **tiled)
    contrastive = tiled_losses.cross_modal_loss(
        out["content_emb"], out["presence"], batch["item_id"], valid,
        model.contrastive_inverse_temperature, **tiled)
  else:
    in_batch = losses.sampled_softmax_loss(out["logits"], batch["item_id"], log_q, valid,
                                           user_ids=batch["user_id"])
    contrastive = losses.cross_modal_loss(out["content_emb"], out["presence"],
                                          batch["item_id"], valid,
                                          model.contrastive_inverse_temperature)
  rec = in_batch_weight * in_batch
  extra = {}
  if full_catalogue:
    full = catalogue_loss(out["catalogue_logits"], batch, out["candidates"], exclude_history,
                          catalogue_form, negative_weight)
    rec = full + rec
    extra = {f"full_{catalogue_form}_loss": full, "in_batch_loss": in_batch}
  total = losses.total_loss(rec, contrastive, contrastive_weight)
  w = valid.astype(jnp.float32)[:, None]
  aux = {"rec_loss": rec, "contrastive_loss": contrastive, "total_loss": total, **extra,
         "gate_weights": jnp.sum(out["gate_weights"] * w, 0) / jnp.maximum(jnp.sum(w), 1.0),
         "content_emb": out["content_emb"], "presence": out["presence"]}
  return total, aux


def catalogue_loss(logits: jax.Array, batch: Mapping[str, jax.Array], candidates: jax.Array,
                   exclude_history: bool, form: str = "softmax",
                   negative_weight: float = 1.0) -> jax.Array:
  """The full-catalogue term for each batch kind: one target per interaction row, the hidden
  items of a cloze row, or the next item at every (or every sampled) position of a causal row;
  ``form`` softmax or squared (see ``compute_losses``)."""
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
  if form == "squared":
    return losses.multi_target_squared_loss(logits, targets, target_mask, candidates, *exclude,
                                            negative_weight=negative_weight)
  if form != "softmax":
    raise ValueError(f"catalogue_loss={form!r}; choose 'softmax' or 'squared'")
  return losses.multi_target_softmax_loss(logits, targets, target_mask, candidates, *exclude)


def rec_loss_is_full(config: ml_collections.ConfigDict) -> bool:
  kind = config.get("rec_loss", "sampled")
  if kind not in ("sampled", "full"):
    raise ValueError(f"rec_loss={kind!r}; choose 'sampled' or 'full'")
  return kind == "full"


def step_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The loss and step options of ``config`` as ``train_step``'s keyword arguments."""
  return dict(contrastive_weight=config.contrastive_weight,
              logq_weight=config.get("logq_weight", 1.0),
              full_catalogue=rec_loss_is_full(config),
              in_batch_weight=config.get("in_batch_weight", 1.0),
              exclude_history=config.get("exclude_history", False),
              catalogue_form=config.get("catalogue_loss", "softmax"),
              negative_weight=config.get("catalogue_negative_weight", 1.0),
              micro_batch=config.get("micro_batch", 0), loss_tile=config.get("loss_tile", 0))


def train_step(graphdef: nnx.GraphDef, state: Any, batch: Mapping[str, jax.Array], *,
               contrastive_weight: float, schedule, logq_weight: float = 1.0,
               full_catalogue: bool = False, in_batch_weight: float = 1.0,
               exclude_history: bool = False, catalogue_form: str = "softmax",
               negative_weight: float = 1.0, micro_batch: int = 0, loss_tile: int = 0,
               mesh: Mesh | None = None) -> tuple[Any, dict[str, jax.Array]]:
  """One optimisation step on the split (model, optimizer) state; pure, for ``jax.jit``.

  ``micro_batch`` > 0 (``config.micro_batch``): the content encoder and the user tower run
  that many rows at a time by gradient caching (``recfusion_jax.gradcache``; the same update,
  less activation memory). ``loss_tile`` > 0: the in-batch losses in tiles (``compute_losses``). ``mesh``: the
  mesh whose devices the batch's rows are split over (the micro-batch layout and the tiled
  losses' ring follow it); None for one device.
  """
  model, optimizer = nnx.merge(graphdef, state)
  loss_fn = functools.partial(compute_losses, contrastive_weight=contrastive_weight,
                              logq_weight=logq_weight, full_catalogue=full_catalogue,
                              in_batch_weight=in_batch_weight, exclude_history=exclude_history,
                              catalogue_form=catalogue_form, negative_weight=negative_weight,
                              loss_tile=loss_tile, mesh=mesh)
  if micro_batch:
    (_, aux), grads = gradcache.loss_and_grads(model, batch, loss_fn, micro_batch=micro_batch,
                                               shards=1 if mesh is None else mesh.size)
  else:
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
    (_, aux), grads = grad_fn(model, batch)
  optimizer.update(model, grads)
  model.write_cache(batch["item_id"], aux.pop("content_emb"), aux.pop("presence"),
                    batch["example_mask"], batch["item_has_id"])
  aux["grad_norm"] = optax.tree.norm(grads)
  aux["learning_rate"] = schedule(optimizer.step[...] - 1)
  aux["temperature"] = 1.0 / model.inverse_temperature
  return nnx.state((model, optimizer)), aux


def _jit_on_mesh(step, state_shardings, mesh):
  # The batch's rows are split over every device of the mesh (sharding.batch_sharding).
  return jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def jit_train_step(graphdef, state_shardings, mesh, **step_kwargs):
  """``train_step`` compiled with explicit shardings; the old state's buffers are donated.

  ``step_kwargs``: ``train_step``'s options (``schedule`` and, e.g., ``step_settings(config)``).
  """
  return _jit_on_mesh(functools.partial(train_step, graphdef, mesh=mesh, **step_kwargs),
                      state_shardings, mesh)


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
  """Re-encodes the whole catalogue into the item cache (host loop over fixed-size chunks,
  each chunk's rows split over the state's mesh as a batch's are)."""
  cat = dataset.catalogue
  n = cat.num_items
  mesh = sharding.mesh_of(state)
  chunk = sharding.whole_rows(chunk, mesh)
  for start in range(0, n, chunk):
    ids = np.arange(start, start + chunk)
    valid = ids < n
    ids = np.where(valid, ids, 0)
    content = cat.content(ids)
    content.update(item_id=ids.astype(np.int32), valid=valid)
    if mesh is not None:
      content = sharding.put_rows(content, mesh)
    state = refresh_fn(state, content)
  return state


# ---- the loop's guards: preemption, non-finite values ---------------------------------------

EXIT_PREEMPTED = 75   # launch/common.sh RECFUSION_EXIT_PREEMPTED: "rerun the command to resume"


class Preempted(Exception):
  """SIGTERM/SIGINT or a multi-host preemption notice ended training after a checkpoint."""

  def __init__(self, step: int, reason: str, workdir: str | os.PathLike):
    self.step, self.reason = step, reason
    super().__init__(f"{reason}: checkpoint of step {step} committed in {workdir}; run the "
                     "same command again to resume from it")


class NonFiniteError(RuntimeError):
  """A NaN/Inf in a step's losses, gradient norm or state stopped training before any save."""

  def __init__(self, step: int, terms: Mapping[str, float], what: str = "loss terms",
               last_checkpoint: int | None = None):
    self.step, self.terms = step, dict(terms)
    saved = ("no checkpoint saved yet" if last_checkpoint is None
             else f"last checkpoint: step {last_checkpoint}, kept")
    super().__init__(
        f"non-finite {what} at step {step}: {_format_terms(terms)}; stopped before saving "
        f"({saved}). Lower optimizer.learning_rate, or set nonfinite='skip' to skip such steps")


def _format_terms(terms: Mapping[str, float]) -> str:
  return ", ".join(f"{k}={v:.6g}" for k, v in terms.items())


def _scalars(aux: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in aux.items() if np.ndim(v) == 0 and k != "nonfinite"}


def _select(pred: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
  if jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key):
    data = jnp.where(pred, jax.random.key_data(new), jax.random.key_data(old))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(new))
  return jnp.where(pred, new, old)


def guard_nonfinite(step_fn, mode: str = "stop"):
  """``step_fn`` ((state, batch) -> (state, aux)) with ``aux["nonfinite"]`` added: whether any
  floating value of aux (every loss term, the gradient norm, ...) is NaN or Inf.

  ``mode="stop"`` returns the new state unchanged (the loop stops before saving it);
  ``mode="skip"`` returns the old state instead, inside the same jitted step, so a bad batch
  changes nothing (optimizer step counter and RNG streams included). The step's own math is
  untouched; "skip" keeps the old state alive through the step (twice the state's memory).
  """
  if mode not in config_validation.NONFINITE_MODES:
    raise ValueError(f"nonfinite={mode!r}; choose one of {config_validation.NONFINITE_MODES}")

  def guarded(state, batch):
    new_state, aux = step_fn(state, batch)
    checks = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(aux)
              if jnp.issubdtype(v.dtype, jnp.inexact)]
    finite = jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)
    if mode == "skip":
      new_state = jax.tree.map(functools.partial(_select, finite), new_state, state)
    return new_state, {**aux, "nonfinite": jnp.logical_not(finite)}

  return guarded


def jit_guarded_train_step(graphdef, state_shardings, mesh, *, nonfinite: str = "stop",
                           **step_kwargs):
  """``train_step`` behind ``guard_nonfinite``, compiled as ``jit_train_step`` compiles it
  (explicit in/out shardings, the old state donated)."""
  step = guard_nonfinite(functools.partial(train_step, graphdef, mesh=mesh, **step_kwargs),
                         nonfinite)
  return _jit_on_mesh(step, state_shardings, mesh)


class _NonFiniteWatch:
  """Reads each step's ``nonfinite`` flag without stalling the device: ``poll()`` looks at the
  flags already computed, ``poll(wait=True)`` at all of them (before a save, an evaluation,
  the end)."""

  def __init__(self, mode: str, skipped: int = 0):
    self.mode, self.skipped = mode, skipped
    self.pending: collections.deque = collections.deque()
    self.last_checkpoint: int | None = None

  def add(self, step: int, aux: Mapping[str, Any]) -> None:
    self.pending.append((step, aux))

  def poll(self, wait: bool = False) -> None:
    while self.pending:
      step, aux = self.pending[0]
      if not wait and not aux["nonfinite"].is_ready():
        return
      self.pending.popleft()
      if not bool(jax.device_get(aux["nonfinite"])):
        continue
      terms = _scalars(jax.device_get(aux))
      if self.mode == "stop":
        raise NonFiniteError(step, terms, last_checkpoint=self.last_checkpoint)
      self.skipped += 1
      logging.warning("step %d skipped, its update dropped (nonfinite='skip'; %d skipped so "
                      "far): %s", step, self.skipped, _format_terms(terms))


# ---- the loop ----------------------------------------------------------------------------------


class TrainedModel(NamedTuple):
  """What ``train_model`` returns: the final model (its arrays on ``mesh``, split as training
  split them), its data, mesh and logs."""

  model: RecFusion
  dataset: RecDataset
  mesh: Any
  history: list[dict[str, Any]]   # training scalars of every logged step, resumed runs included
  skipped_steps: int = 0          # steps whose update nonfinite="skip" dropped
  valid_history: list[dict[str, Any]] = []   # {"step", "epoch", metrics} of each validation
  best: dict[str, Any] | None = None   # the selected validation (its step), or None
  last_step: int = 0              # the step training ended at (earlier with early stopping)


class ValidationSettings(NamedTuple):
  """``config.validation``: evaluate on valid every ``every`` steps (0: never), keep and return
  the best state by ``metric``, stop after ``patience`` evaluations without improvement (0:
  train all ``num_steps``). The section is required (``config_validation.REQUIRED``); its
  defaults are configs/tiny.py's, which every config builds on, and nowhere else."""

  every: int
  patience: int
  metric: str

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "ValidationSettings":
    v = config.validation
    return cls(int(v.every), int(v.patience), str(v.metric))


class BestTracker:
  """Which validation is best so far and how many came after it (early stopping's count).

  A later score must be strictly higher to count as better, so ties keep the earlier (shorter)
  fit. Rebuilt from the logged valid curve on resume, so a resumed run stops where an
  uninterrupted one would.
  """

  def __init__(self, metric: str, patience: int, history: list[dict[str, Any]] = ()):
    self.metric, self.patience = metric, patience
    self.best: dict[str, Any] | None = None
    self.since_best = 0
    for row in history:
      self.update(row)

  def update(self, row: Mapping[str, Any]) -> bool:
    """Records one validation; True when it is the new best."""
    value = float(row[self.metric])
    if self.best is None or value > float(self.best[self.metric]):
      self.best, self.since_best = dict(row), 0
      return True
    self.since_best += 1
    return False

  @property
  def should_stop(self) -> bool:
    return self.patience > 0 and self.since_best >= self.patience


VALID_PREFIX = "valid/"


def _is_train_row(row: Mapping[str, Any]) -> bool:
  return "total_loss" in row


def train_model(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                dataset: RecDataset | None = None) -> TrainedModel:
  """Trains ``config`` in ``workdir`` (resuming from its checkpoints); no final evaluation.

  ``dataset`` overrides ``data.sources.load_dataset(config)`` (e.g. a benchmark protocol's
  train+valid fit). Raises ``config_validation.ConfigError`` before loading anything for a bad
  config, ``Preempted`` after SIGTERM/SIGINT made it save a checkpoint, ``NonFiniteError`` when
  a NaN/Inf stops it (``nonfinite="stop"``), ``checkpointing.CheckpointError`` when no
  checkpoint of ``workdir`` can be restored.
  """
  config_validation.validate(config, num_devices=jax.device_count(),
                             num_processes=jax.process_count())
  workdir = epath.Path(workdir)   # local or gs://
  workdir.mkdir(parents=True, exist_ok=True)
  dataset = sources.load_dataset(config) if dataset is None else dataset
  logging.info("data %s: %d users, %d items, %d train / %d valid / %d test, %d cold items",
               dataset.name, dataset.num_users, dataset.catalogue.num_items, len(dataset.train),
               len(dataset.valid), len(dataset.test), len(dataset.cold_items))

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  index = examples.TrainExampleIndex.build(dataset)
  log_q = examples.item_log_q(dataset)
  data_iter = pipeline.train_iterator_from_config(config, dataset, index=index, log_q=log_q)

  tx, schedule = make_optimizer(config, config.num_steps)
  graphdef, state, state_shardings = create_sharded_state(config, dataset, mesh, tx)
  logging.info("state on mesh %s: %s", dict(mesh.shape), sharding.describe(state, state_shardings))

  settings = ValidationSettings.from_config(config)
  best_key = VALID_PREFIX + settings.metric
  ckpt = checkpointing.Checkpointer(
      workdir / "checkpoints", save_every=config.checkpoint_every,
      keep=config.keep_checkpoints, best_metric=best_key if settings.every else None)
  fingerprint_fn = checkpointing.make_fingerprint_fn(mesh)
  abstract_state = checkpointing.abstract_like(state, state_shardings)
  restored = ckpt.restore(abstract_state, data_iter, fingerprint_fn=fingerprint_fn)
  start_step, saved_metrics = 0, {}
  if restored is not None:
    start_step, state, saved_metrics = restored.step, restored.state, restored.metrics
    logging.info("resumed from step %d", start_step)
  watch = _NonFiniteWatch(config.get("nonfinite", "stop"),
                          int(saved_metrics.get("skipped_steps", 0)))
  watch.last_checkpoint = start_step if restored is not None else None

  step_fn = jit_guarded_train_step(
      graphdef, state_shardings, mesh, nonfinite=watch.mode, schedule=schedule,
      **step_settings(config))
  refresh_fn = _refresh_cache_fn(graphdef, state_shardings)
  # The log continues at the restored step: rows of the steps after it are written again.
  earlier = writers.truncate_jsonl(workdir, start_step) if jax.process_index() == 0 else (
      writers.read_jsonl(workdir))
  history = [row for row in earlier if _is_train_row(row) and row["step"] <= start_step]
  per_epoch = pipeline.examples_per_epoch(index, config.data.get("example", "interaction"))
  epoch_of = lambda step: pipeline.epochs(step, config.batch_size, per_epoch)
  validate = (model_eval.make_validator(dataset, config, graphdef, mesh) if settings.every
              else None)
  valid_history = [
      {"step": row["step"], "epoch": epoch_of(row["step"]),
       **{k[len(VALID_PREFIX):]: v for k, v in row.items() if k.startswith(VALID_PREFIX)}}
      for row in earlier if best_key in row and row["step"] <= start_step]
  tracker = BestTracker(settings.metric, settings.patience, valid_history)
  writer = writers.create_writer(workdir)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=config.num_steps, writer=writer, every_steps=config.log_every,
      every_secs=None)
  names = source_names(nnx.merge(graphdef, state)[0])   # static attributes; no copy
  if start_step == 0:
    state = refresh_cache(refresh_fn, state, dataset, config.eval_block_size)

  last_saved = start_step if restored is not None else None
  last_metrics: dict[str, Any] = {}

  def save(step: int, extra: Mapping[str, float] | None = None) -> None:
    nonlocal last_saved
    if last_saved == step:
      return
    watch.poll(wait=True)   # never save a state that a non-finite step produced
    digest, finite = fingerprint_fn(state)
    bad = sorted(n for n, ok in finite.items() if not ok)
    if bad:
      raise NonFiniteError(step, {n: float("nan") for n in bad[:5]}, what="state values",
                           last_checkpoint=last_saved)
    loss = float(jax.device_get(last_metrics["total_loss"])) if last_metrics else float("nan")
    metrics = {checkpointing.FINITE_KEY: True, "loss": loss, "skipped_steps": watch.skipped,
               **(extra or {})}
    ckpt.save(step, state, data_iter, fingerprint=digest, metrics=metrics, force=True)
    last_saved = watch.last_checkpoint = step

  tick, tick_step = time.perf_counter(), start_step
  step = start_step
  try:
    with checkpointing.PreemptionWatch() as preemption:
      # A run that already stopped early (resumed after it) trains no further.
      last = start_step if tracker.should_stop else config.num_steps
      for step in range(start_step + 1, last + 1):
        batch = pipeline.make_global_batch(next(data_iter), mesh)
        state, last_metrics = step_fn(state, batch)
        watch.add(step, last_metrics)
        watch.poll()
        report_progress(step)
        if step % config.cache_refresh_every == 0:
          state = refresh_cache(refresh_fn, state, dataset, config.eval_block_size)
        if step % config.log_every == 0 or step == config.num_steps:
          watch.poll(wait=True)
          metrics = jax.device_get(last_metrics)
          now = time.perf_counter()
          values = {k: float(v) for k, v in metrics.items()
                    if k not in ("gate_weights", "nonfinite")}
          values.update({f"gate/{n}": float(w) for n, w in zip(names, metrics["gate_weights"])})
          values["examples_per_sec"] = (step - tick_step) * config.batch_size / (now - tick)
          if watch.mode == "skip":
            values["skipped_steps"] = float(watch.skipped)
          writer.write_scalars(step, values)
          history.append({"step": step, **values})
          tick, tick_step = time.perf_counter(), step
        stop_early = False
        if validate is not None and (step % settings.every == 0 or step == config.num_steps):
          watch.poll(wait=True)
          scores = validate(state)
          writer.write_scalars(step, {VALID_PREFIX + k: v for k, v in scores.items()})
          row = {"step": step, "epoch": epoch_of(step), **scores}
          valid_history.append(row)
          improved = tracker.update(row)
          logging.info("valid at step %d (epoch %.2f): %s=%.4f%s", step, row["epoch"],
                       settings.metric, scores[settings.metric],
                       " (best)" if improved else
                       f" (best {tracker.best[settings.metric]:.4f} at step "
                       f"{tracker.best['step']}, {tracker.since_best} since)")
          # Every validated state is saved; Orbax's BestN keeps the best of them.
          save(step, {best_key: float(scores[settings.metric])})
          stop_early = tracker.should_stop
        if step % config.checkpoint_every == 0 or step == config.num_steps or stop_early:
          save(step)
        notice = ckpt.reached_preemption(step)
        if preemption.requested or notice:
          reason = (f"{preemption.signal_name} received" if preemption.requested
                    else "preemption notice (all processes)")
          save(step)
          ckpt.wait()
          writer.flush()
          logging.warning("%s: checkpoint of step %d committed; exiting with code %d (rerun "
                          "the same command to resume)", reason, step, EXIT_PREEMPTED)
          raise Preempted(step, reason, workdir)
        if stop_early:
          logging.info("early stopping at step %d: no better valid %s in %d evaluations "
                       "(best %.4f at step %d)", step, settings.metric, settings.patience,
                       tracker.best[settings.metric], tracker.best["step"])
          break
      watch.poll(wait=True)
      if tracker.best is not None and tracker.best["step"] != step:
        ckpt.wait()
        restored = ckpt.restore(abstract_state, step=tracker.best["step"],
                                fingerprint_fn=fingerprint_fn, fall_back=False)
        state = restored.state
        logging.info("the result is the best validated state: step %d (%s=%.4f)",
                     tracker.best["step"], settings.metric, tracker.best[settings.metric])
  finally:
    writer.close()
    data_iter.close()
    ckpt.close()   # waits for the saves in flight

  # The model stays split over the mesh as training left it (the optimizer's part is dropped);
  # evaluation, recommendation and export run on the mesh from these arrays.
  model, _ = nnx.merge(graphdef, state)
  return TrainedModel(model, dataset, mesh, history, watch.skipped, valid_history,
                      tracker.best, step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                       ) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming from its checkpoints) and evaluates the result."""
  trained = train_model(config, workdir)
  results: dict[str, Any] = {}
  terms = score_terms.score_terms(trained.model)
  if terms:
    # Fixed terms left at weight 0 by training: weighed on valid now, as the runner does, and
    # saved for recommend and export (a model trained on train alone may choose on valid).
    if len(trained.dataset.valid):
      results["score_terms"] = score_terms.choose_all(trained.model, trained.dataset, config,
                                                      mesh=trained.mesh)
      score_terms.save(workdir, results["score_terms"])
    else:
      results["score_terms"] = {"skipped": f"{trained.dataset.name} has no valid split: the "
                                f"terms {terms} stay at weight 0"}
      logging.warning("%s", results["score_terms"]["skipped"])
  # On the mesh, with every process (the model's parameters are split over all of them).
  results.update(model_eval.evaluate_model(trained.model, trained.dataset, config, trained.mesh,
                                      split=config.get("eval_split", "test")))
  results["train_history"] = trained.history
  if trained.valid_history:
    results["valid_history"] = trained.valid_history
    results["best"] = trained.best
  if trained.skipped_steps:
    results["skipped_steps"] = trained.skipped_steps
  if jax.process_index() == 0:
    (epath.Path(workdir) / "results.json").write_text(json.dumps(results, indent=2))
  logging.info("evaluation: %s", {k: v for k, v in results.items() if k != "train_history"})
  return results
