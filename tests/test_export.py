"""Export for serving: the exported programs answer as the in-process model (several batch
sizes), lower for several platforms at once, and scale past the 2 GB constant ceiling."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from recfusion_jax import export, serving
from recfusion_jax.data.synthetic import make_synthetic
from recfusion_jax.models.recfusion import RecFusion
from recfusion_jax.recommend import service
from recfusion_jax.recommend.inference import ServingFunctions, content_inputs
from tests.helpers import tiny_config

K = 5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(in-process Recommendations, the export directory's, the data set) of one untrained model."""
  config = tiny_config()
  dataset = make_synthetic(num_items=60, num_users=30, num_topics=4, seed=0)
  model = RecFusion(config.model, num_users=dataset.num_users,
                    num_items=dataset.catalogue.num_items, rngs=nnx.Rngs(0))
  out = tmp_path_factory.mktemp("export")
  hist = config.model.user.history_len
  export.export_for_serving(model, dataset, str(out), history_len=hist, k=K)
  local = service.recommendations(model, dataset, history_len=hist, k=K)
  return local, serving.Recommendations.load(str(out)), dataset, out


def test_export_layout_weights_not_constants(exported):
  _, loaded, dataset, out = exported
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["k"] == K and manifest["platforms"] == ["cpu"]
  assert manifest["num_items"] == dataset.catalogue.num_items
  # The parameters are program inputs saved beside the programs, not baked-in constants.
  assert set(manifest["params"]) == set(loaded.params)
  assert len(list((out / "weights").glob("*.npy"))) == len(manifest["params"])
  for name in serving.PROGRAMS:
    program = jax.export.deserialize(bytearray((out / "programs" / f"{name}.bin").read_bytes()))
    assert len(program.in_avals) > len(manifest["params"]), name
  assert len(loaded.item_names) == dataset.catalogue.num_items
  assert loaded.item_table["emb"].shape[0] == dataset.catalogue.num_items


@pytest.mark.parametrize("users", [[0], [3, 7, 11], list(range(30))])
def test_exported_top_k_equals_in_process(exported, users):
  local, loaded, _, _ = exported
  want, got = local.for_users(users, K), loaded.for_users(users, K)
  np.testing.assert_array_equal(got["items"], want["items"])
  np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["weights"], want["weights"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["weights"].sum(-1), 1.0, atol=1e-5)
  for row, user in enumerate(users):               # known items are never recommended
    assert not set(got["items"][row]) & set(loaded.known(user))


def test_exported_new_items(exported):
  """Cold start from the export alone (the CLI test compares it with the workdir's answer)."""
  _, loaded, dataset, _ = exported
  # "New" items with exactly items 5's and 9's content: their nearest catalogue items are them.
  got = loaded.for_new_items(content_inputs(dataset.catalogue, np.array([5, 9])), K)
  np.testing.assert_array_equal(got["nearest"][:, 0], [5, 9])
  np.testing.assert_allclose(got["similarity"][:, 0], 1.0, atol=1e-5)
  assert got["users"].shape == (2, K) and (np.diff(got["user_scores"], axis=1) <= 0).all()
  np.testing.assert_allclose(got["user_weights"].sum(-1), 1.0, atol=1e-5)


def test_multi_platform_lowering():
  """cpu, cuda and tpu programs from one CPU-only process (lowered, not run)."""
  config = tiny_config()
  dataset = make_synthetic(num_items=60, num_users=30, num_topics=4, seed=0)
  model = nnx.eval_shape(lambda: RecFusion(config.model, num_users=10, num_items=20,
                                           rngs=nnx.Rngs(0)))
  programs = export.export_programs(
      ServingFunctions(model), content_inputs(dataset.catalogue, np.arange(1)),
      history_len=config.model.user.history_len, k=3, platforms=("cpu", "cuda", "tpu"))
  assert set(programs) == set(serving.PROGRAMS)
  for program in programs.values():
    assert program.platforms == ("cpu", "cuda", "tpu")
    again = jax.export.deserialize(program.serialize())
    assert again.platforms == ("cpu", "cuda", "tpu")
  with pytest.raises(ValueError, match="platforms"):
    export.export_programs(ServingFunctions(model), {}, history_len=6, k=3,
                           platforms=("gpu",))


def test_model_over_2gb_exports():
  """A 2.4 GB item-ID table (shape-only: nothing allocated) exports to small programs."""
  config = tiny_config()
  config.model.embed_dim = 1024
  num_items = 600_000
  dataset = make_synthetic(num_items=60, num_users=30, num_topics=4, seed=0)
  model = nnx.eval_shape(lambda: RecFusion(config.model, num_users=10, num_items=num_items,
                                           rngs=nnx.Rngs(0)))
  functions = ServingFunctions(model)
  size = sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in functions.params.values())
  assert size > 2**31, size
  programs = export.export_programs(
      functions, content_inputs(dataset.catalogue, np.arange(1)),
      history_len=config.model.user.history_len, k=10)
  largest = max(len(p.serialize()) for p in programs.values())
  assert largest < 5_000_000, largest
  table = programs["rank_items"].in_avals[2]
  assert any(a.shape == (num_items, 1024) for a in programs["rank_items"].in_avals), table


def test_exported_transition_term_equals_in_process(tmp_path):
  """model.transition="markov": the chain and its chosen (weight, decay) are state, so the
  export carries them and answers as the in-process model, which they change."""
  config = tiny_config(**{"model.scoring": "dot", "model.item_bias": True,
                          "model.fusion": "residual", "model.user.kind": "pool",
                          "model.user.use_id": False, "model.history_fusion": "sum",
                          "model.transition": "markov"})
  dataset = make_synthetic(num_items=60, num_users=30, num_topics=4, seed=0)
  model = RecFusion(config.model, num_users=dataset.num_users,
                    num_items=dataset.catalogue.num_items, rngs=nnx.Rngs(0))
  model.cache_has_id[...] = np.ones(dataset.catalogue.num_items, bool)
  model.transition[...] = np.asarray(jax.random.uniform(jax.random.key(0), (60, 60))) * 5.0
  hist = config.model.user.history_len
  plain = service.recommendations(model, dataset, history_len=hist, k=K).for_users(
      list(range(30)), K)
  model.transition_setting[...] = np.array([1.0, 0.5], np.float32)
  export.export_for_serving(model, dataset, str(tmp_path), history_len=hist, k=K)
  want = service.recommendations(model, dataset, history_len=hist, k=K).for_users(
      list(range(30)), K)
  got = serving.Recommendations.load(str(tmp_path)).for_users(list(range(30)), K)
  np.testing.assert_array_equal(got["items"], want["items"])
  np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5, atol=1e-5)
  assert (want["items"] != plain["items"]).any()
