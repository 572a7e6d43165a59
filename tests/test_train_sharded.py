"""Sharded training state (8 simulated devices).

The sharded train step equals the single-device one (4 data x 2 fsdp); model + optimizer are
born sharded (``train.create_sharded_state``, 2 data x 4 fsdp): each device holds a quarter of
every split leaf, the values equal the eager init, ``init_from`` lands on the shardings.
Evaluation (validation and the final one) runs from that sharded state, each device still
holding a quarter, with the metrics of a single-device copy.
"""

import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from recfusion_jax import evaluate, model_eval, sharding, train
from recfusion_jax.data import sources
from recfusion_jax.recommend import inference
from recfusion_jax.convert import checkpoint as convert_checkpoint
from tests.helpers import assert_states_close, random_batch, tiny_config

NUM_USERS, NUM_ITEMS, BATCH = 24, 64, 16


def _dataset(num_users, num_items):
  # create_sharded_state only reads the table sizes of a RecDataset.
  return types.SimpleNamespace(num_users=num_users,
                               catalogue=types.SimpleNamespace(num_items=num_items))


def _run(config, mesh, steps=2, full_catalogue=False):
  tx, schedule = train.make_optimizer(config, num_steps=10)
  graphdef, state, shardings = train.create_sharded_state(
      config, _dataset(NUM_USERS, NUM_ITEMS), mesh, tx, min_elements=64)
  step = train.jit_train_step(graphdef, shardings, mesh, contrastive_weight=0.5,
                              schedule=schedule, full_catalogue=full_catalogue)
  losses = []
  for i in range(steps):
    batch = jax.device_put(random_batch(config, BATCH, NUM_USERS, NUM_ITEMS, seed=i),
                           sharding.batch_sharding(mesh))
    state, metrics = step(state, batch)
    losses.append(float(metrics["total_loss"]))
  # The step's out_shardings keep the state where the init put it.
  for x, s in zip(jax.tree.leaves(state),
                  jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding, s)
  return state, losses, shardings


@pytest.mark.parametrize("fsdp,full_catalogue", [(2, False), (2, True)])
def test_sharded_step_matches_single_device(fsdp, full_catalogue):
  assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
  config = tiny_config(**{"optimizer.warmup_steps": 1})
  mesh8 = sharding.make_mesh(data=8 // fsdp, fsdp=fsdp)
  mesh1 = sharding.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
  state8, losses8, shardings8 = _run(config, mesh8, full_catalogue=full_catalogue)
  state1, losses1, _ = _run(config, mesh1, full_catalogue=full_catalogue)

  # The rules really split something over fsdp (else this test would not test FSDP).
  specs = jax.tree.leaves(shardings8, is_leaf=lambda s: isinstance(s, NamedSharding))
  assert sum("fsdp" in str(s.spec) for s in specs) >= 5

  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  # The full-catalogue softmax sums over every item in a sharded reduction, so its float
  # rounding differs from one device's more than the in-batch loss does; Adam then divides
  # the tiny gradients of rarely-scored ID rows by their own size, which magnifies it.
  tolerance = 3e-5 if full_catalogue else 1e-5
  # A leaf's scale is floored at 1e-2: a bias that starts at zero holds one Adam step (~the
  # learning rate, 1e-3) after the update, and Adam normalises its near-zero gradient, so a
  # last-bit difference in that gradient moves it by ~1e-5 of the step (seen: 3.7e-8).
  def within_tolerance_of_scale(a, b, name):
    assert np.max(np.abs(a - b)) <= tolerance * max(np.max(np.abs(b)), 1e-2), name

  assert assert_states_close(state8, state1, check=within_tolerance_of_scale).floats > 50


def test_bf16_sharded_step_follows_single_device():
  """bf16 compute (the trunk's custom-VJP matmul, ``transformer.dense_bf16``) under the fsdp
  mesh: the weight-gradient matmul contracts the sharded batch axis; the losses must follow
  the one-device bf16 run (bf16 rounding, so a looser tolerance than float32's)."""
  config = tiny_config(**{"optimizer.warmup_steps": 1,
                          "model.encoder.compute_dtype": "bfloat16"})
  mesh8 = sharding.make_mesh(data=4, fsdp=2)
  mesh1 = sharding.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
  _, losses8, _ = _run(config, mesh8, steps=3)
  _, losses1, _ = _run(config, mesh1, steps=3)
  assert np.all(np.isfinite(losses8))
  np.testing.assert_allclose(losses8, losses1, rtol=2e-2)


FSDP = 4


def _is_key(x):
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_split(s):
  return "fsdp" in tuple(s.spec)


def _bytes_on(device, x):
  return sum(s.data.nbytes for s in x.addressable_shards if s.device == device)


@pytest.fixture(scope="module")
def born_sharded(tmp_path_factory):
  """(config, data, tx, state, shardings): a tiny model with dims big enough for the default
  sharding threshold (MIN_SHARD_ELEMENTS), as in training, and a pretrained encoder checkpoint
  (``init_from``) for a few of its parameters. No test donates the state."""
  assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
  config = tiny_config(**{"model.embed_dim": 128, "model.encoder.width": 128,
                          "model.encoder.mlp_dim": 256})
  config.init_from = str(_write_pretrained(tmp_path_factory.mktemp("pretrained"), config))
  data = _dataset(num_users=256, num_items=512)
  mesh = sharding.make_mesh(data=2, fsdp=FSDP)
  tx, _ = train.make_optimizer(config, 10)
  _, state, shardings = train.create_sharded_state(config, data, mesh, tx)
  return config, data, tx, state, shardings


def _pretrained(config):
  e = config.model.encoder
  rng = np.random.default_rng(0)
  shapes = {"trunk/layers/0/mlp_in/kernel": (e.width, e.mlp_dim),
            "text_stem/word_embeddings/embedding": (e.text.vocab_size, e.width),
            "trunk/final_norm/scale": (e.width,)}
  return {path: rng.normal(size=shape).astype(np.float32) for path, shape in shapes.items()}


def _write_pretrained(directory, config):
  """A converted-encoder checkpoint (only the params/ tree that init_from reads)."""
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(directory / convert_checkpoint.PARAMS_DIR,
            convert_checkpoint._nest(_pretrained(config)))  # pylint: disable=protected-access
  ckpt.wait_until_finished()
  return directory


def test_sharded_init_holds_a_quarter_per_device(born_sharded):
  *_, state, shardings = born_sharded
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  specs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  assert len(leaves) == len(specs)
  named = {sharding.path_name(p): (x, s) for (p, x), s in zip(leaves, specs)}
  devices = list(jax.devices())
  split_bytes = whole_bytes = 0
  for name, (x, s) in named.items():
    assert x.sharding.is_equivalent_to(s, x.ndim), name
    if _is_key(x):   # the dropout streams' PRNG keys come out of the jit, replicated
      assert tuple(s.spec) == (), name
      continue
    for device in devices:
      want = x.nbytes // FSDP if _is_split(s) else x.nbytes
      assert _bytes_on(device, x) == want, (name, device)
    if _is_split(s):
      split_bytes += x.nbytes
    else:
      whole_bytes += x.nbytes
      # Replicated: small, or a patch / tubelet conv kernel (PARAM_RULES split 2-D only).
      assert x.size < sharding.MIN_SHARD_ELEMENTS or x.ndim > 2, (name, x.shape)

  # Every large table and matrix is split, and so are both of its Adam moments.
  big_params = [n[2:] for n, (x, _) in named.items()
                if n.startswith("0/") and not _is_key(x) and x.ndim == 2
                and x.size >= sharding.MIN_SHARD_ELEMENTS]
  assert len(big_params) >= 20
  for param in big_params:
    moments = [n for n in named if n.endswith(("/mu/" + param, "/nu/" + param))]
    assert len(moments) == 2, param
    for n in ["0/" + param, *moments]:
      assert _is_split(named[n][1]), n

  per_device = {sum(_bytes_on(d, x) for x, _ in named.values() if not _is_key(x))
                for d in devices}
  total, want = split_bytes + whole_bytes, split_bytes // FSDP + whole_bytes
  assert per_device == {want}
  assert sharding.describe(state, shardings)["bytes_per_device"] == want
  assert whole_bytes < 0.1 * total, (whole_bytes, total)
  print(f"state {total} bytes: {per_device.pop()} per device ({split_bytes} split over "
        f"fsdp={FSDP}, {whole_bytes} replicated)")


def test_sharded_init_equals_eager_init(born_sharded):
  config, data, tx, state, _ = born_sharded
  model = train.create_model(config, data)
  eager = nnx.state((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  # The same random bits; XLA's fused init rounds a few values 1 ulp away from op-by-op.
  compared = assert_states_close(state, eager, rtol=1e-6, atol=0)
  assert compared.bitwise > compared.leaves // 2


def test_init_from_lands_on_the_shardings(born_sharded):
  config, *_, state, _ = born_sharded
  for path, want in _pretrained(config).items():
    node = state[0]["encoder"]
    for key in path.split("/"):
      node = node[int(key) if key.isdigit() else key]
    np.testing.assert_array_equal(np.asarray(node[...]), want, err_msg=path)
    # Placed on the parameter's own sharding (the 1-D scale is below the split threshold).
    assert _is_split(node[...].sharding) == (node[...].ndim == 2), path


def _per_device_bytes(arrays):
  """{bytes on each device} of ``arrays`` (PRNG keys left out)."""
  return {sum(_bytes_on(d, x) for x in arrays if not _is_key(x)) for d in jax.devices()}


def test_evaluation_runs_on_the_sharded_state(monkeypatch):
  """Validation and the final evaluation encode the catalogue and rank users on the mesh from
  the train loop's state: every split parameter, Adam moment and the re-encoded item cache
  stay split (a quarter per device), no replica of a split array appears, and the metrics equal
  a single-device copy's."""
  config = tiny_config(**{"optimizer.warmup_steps": 1})
  config.eval_block_size = 32
  config.data.synthetic.num_items, config.data.synthetic.num_users = 64, 48
  dataset = sources.load_dataset(config)
  mesh = sharding.make_mesh(data=2, fsdp=FSDP)
  tx, schedule = train.make_optimizer(config, 10)
  graphdef, state, shardings = train.create_sharded_state(config, dataset, mesh, tx,
                                                          min_elements=64)
  step = train.jit_train_step(graphdef, shardings, mesh, schedule=schedule,
                              **train.step_settings(config))
  for i in range(2):
    batch = random_batch(config, BATCH, dataset.num_users, dataset.catalogue.num_items, seed=i)
    state, _ = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
  state = train.refresh_cache(train._refresh_cache_fn(graphdef, shardings), state, dataset,  # pylint: disable=protected-access
                              config.eval_block_size)

  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  specs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  named = {sharding.path_name(p): (x, s) for (p, x), s in zip(leaves, specs)}
  split = {n: x for n, (x, s) in named.items() if _is_split(s)}
  split_bytes = sum(x.nbytes for x in split.values())
  whole_bytes = sum(x.nbytes for x, s in named.values() if not _is_split(s) and not _is_key(x))
  assert split_bytes > 0.75 * (split_bytes + whole_bytes), (split_bytes, whole_bytes)
  want = split_bytes // FSDP + whole_bytes
  model_want = (sum(x.nbytes for n, x in split.items() if n.startswith("0/")) // FSDP
                + sum(x.nbytes for n, (x, s) in named.items() if n.startswith("0/")
                      and not _is_split(s) and not _is_key(x)))
  assert _per_device_bytes([x for x, _ in named.values()]) == {want}   # during training
  split_shapes = {(x.shape, x.dtype) for x in split.values()}

  # The host path's numbers: the same state whole on one device.
  one_device = jax.device_put(state, jax.devices()[0])
  assert sharding.mesh_of(one_device) is None
  validate = model_eval.make_validator(dataset, config, graphdef, mesh)
  host_valid = validate(one_device)
  host_final = model_eval.evaluate_model(nnx.merge(graphdef, one_device)[0], dataset, config,
                                         mesh)
  del one_device

  seen = []
  init = inference.Recommender.__init__

  def spy(self, model, *args, **kwargs):
    init(self, model, *args, **kwargs)
    assert self.mesh == mesh
    for path, x in jax.tree_util.tree_flatten_with_path(self.state)[0]:
      name = "0/" + sharding.path_name(path)
      assert x.sharding.is_equivalent_to(named[name][1], x.ndim), (name, x.sharding)
    # The evaluator's model (the re-encoded cache included) holds a quarter of each split leaf.
    assert _per_device_bytes(jax.tree.leaves(self.state)) == {model_want}
    # The train state is whole and unchanged in place: a quarter per device.
    assert _per_device_bytes([x for x, _ in named.values()]) == {want}
    # Nothing split in training has a replicated copy anywhere (a gathered parameter would):
    # the replicated arrays alive are the states' own unsplit leaves and small activations.
    own = {id(x) for x in jax.tree.leaves((self.state, state))}
    for x in jax.live_arrays():
      if (len(x.sharding.device_set) > 1 and x.sharding.is_fully_replicated
          and id(x) not in own):
        assert (x.shape, x.dtype) not in split_shapes, (x.shape, x.dtype)
    seen.append(self.mesh)

  monkeypatch.setattr(inference.Recommender, "__init__", spy)
  valid = validate(state)
  final = model_eval.evaluate_model(nnx.merge(graphdef, state)[0], dataset, config, mesh)
  assert len(seen) == 4   # model_ranker's two, in validation and in the final evaluation
  for x, _ in named.values():
    assert not x.is_deleted()

  def assert_equal(got, want_metrics):
    assert set(got) == set(want_metrics)
    for key, value in want_metrics.items():
      np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-6, err_msg=key)

  assert valid["num_users"] > 0
  assert_equal(valid, host_valid)
  assert set(final) == set(host_final) >= {"warm", "warm_random"}
  for group, metrics in host_final.items():
    assert_equal(final[group], metrics)

  # eval_item_axes=("fsdp",): the item table is split over the fsdp axis (each device ranks
  # its quarter of the items, top-k lists merged) and the metrics stay the same.
  placed = []
  put = evaluate._put   # pylint: disable=protected-access

  def spy_put(tree, mesh_, spec):
    placed.append(spec)
    return put(tree, mesh_, spec)

  monkeypatch.setattr(evaluate, "_put", spy_put)
  config.eval_item_axes = ("fsdp",)
  assert_equal(model_eval.make_validator(dataset, config, graphdef, mesh)(state), host_valid)
  split_final = model_eval.evaluate_model(nnx.merge(graphdef, state)[0], dataset, config, mesh)
  for group, metrics in host_final.items():
    assert_equal(split_final[group], metrics)
  assert jax.sharding.PartitionSpec(("fsdp",)) in placed, placed


@pytest.mark.parametrize("mode", ["ease", "ease_fixed"])
def test_ease_prior_lands_on_the_shardings(mode):
  """model.item_item="ease" / "ease_fixed": the prior is EASE's closed form on the training
  pairs, born split by rows over fsdp (2 data x 4 fsdp) like the eager model's copy, with its
  starting scale (ease) or its weight 0 (ease_fixed)."""
  from recfusion_jax.baselines.ease import ease_weights   # pylint: disable=import-outside-toplevel
  from recfusion_jax.data.types import Interactions      # pylint: disable=import-outside-toplevel
  config = tiny_config(**{"model.scoring": "dot", "model.fusion": "residual",
                          "model.item_item": mode, "model.item_item_reg": 5.0})
  rng = np.random.default_rng(0)
  pairs = np.unique(np.stack([rng.integers(0, NUM_USERS, 400), rng.integers(0, NUM_ITEMS, 400)],
                             1), axis=0).astype(np.int32)
  n = len(pairs)
  data = types.SimpleNamespace(
      num_users=NUM_USERS, catalogue=types.SimpleNamespace(num_items=NUM_ITEMS),
      train=Interactions(pairs[:, 0], pairs[:, 1], np.zeros(n, np.int64), np.ones(n, np.float32)))
  x = np.zeros((NUM_USERS, NUM_ITEMS), np.float32)
  x[pairs[:, 0], pairs[:, 1]] = 1.0
  want = ease_weights(x, 5.0)
  mesh = sharding.make_mesh(data=2, fsdp=4)
  tx, _ = train.make_optimizer(config, num_steps=10)
  _, state, _ = train.create_sharded_state(config, data, mesh, tx, min_elements=64)
  prior = state[0]["item_item"][...]
  np.testing.assert_allclose(np.asarray(prior), want, rtol=1e-6, atol=1e-7)
  assert {s.data.shape for s in prior.addressable_shards} == {(NUM_ITEMS // 4, NUM_ITEMS)}
  eager = train.create_model(config, data)
  np.testing.assert_array_equal(np.asarray(eager.item_item[...]), np.asarray(prior))
  if mode == "ease_fixed":
    np.testing.assert_array_equal(np.asarray(state[0]["item_item_setting"][...]), [0.0])
    return
  scale = float(state[0]["item_item_scale"][...])
  assert scale == float(eager.item_item_scale[...]) and scale > 1.0


def test_transition_prior_lands_on_the_shardings():
  """model.transition="markov": the chain's transition matrix, born split by rows over fsdp
  (2 data x 4 fsdp) like the eager model's copy; the (weight, decay) setting starts at weight
  0, so training sees the trained model alone."""
  from recfusion_jax.baselines import markov   # pylint: disable=import-outside-toplevel
  from recfusion_jax.data.examples import TrainExampleIndex   # pylint: disable=import-outside-toplevel
  from recfusion_jax.data.types import Interactions      # pylint: disable=import-outside-toplevel
  config = tiny_config(**{"model.scoring": "dot", "model.fusion": "residual",
                          "model.transition": "markov"})
  rng = np.random.default_rng(0)
  n = 400
  data = types.SimpleNamespace(
      num_users=NUM_USERS, catalogue=types.SimpleNamespace(num_items=NUM_ITEMS),
      train=Interactions(rng.integers(0, NUM_USERS, n).astype(np.int32),
                         rng.integers(0, NUM_ITEMS, n).astype(np.int32),
                         rng.permutation(n).astype(np.int64), np.ones(n, np.float32)))
  want = markov.transition_probabilities(TrainExampleIndex.build(data), NUM_ITEMS)
  mesh = sharding.make_mesh(data=2, fsdp=4)
  tx, _ = train.make_optimizer(config, num_steps=10)
  _, state, _ = train.create_sharded_state(config, data, mesh, tx, min_elements=64)
  chain = state[0]["transition"][...]
  np.testing.assert_allclose(np.asarray(chain), want, rtol=1e-6)
  assert {s.data.shape for s in chain.addressable_shards} == {(NUM_ITEMS // 4, NUM_ITEMS)}
  eager = train.create_model(config, data)
  np.testing.assert_array_equal(np.asarray(eager.transition[...]), np.asarray(chain))
  assert float(state[0]["transition_setting"][...][0]) == 0.0
