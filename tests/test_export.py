"""Exported serving programs reproduce the in-process model, for any batch size."""

import numpy as np
from flax import nnx

from recfusion_jax.data.synthetic import make_synthetic
from recfusion_jax import export
from recfusion_jax.data import examples
from recfusion_jax.models.recfusion import RecFusion
from recfusion_jax.recommend import Recommender
from tests.helpers import tiny_config


def test_export_round_trip(tmp_path):
  config = tiny_config()
  dataset = make_synthetic(num_items=60, num_users=30, num_topics=4, seed=0)
  model = RecFusion(config.model, num_users=dataset.num_users,
                    num_items=dataset.catalogue.num_items, rngs=nnx.Rngs(0))
  hist = config.model.user.history_len
  export.export_for_serving(model, dataset.catalogue, str(tmp_path), history_len=hist, k=5)
  programs, table, manifest = export.load_serving(str(tmp_path))
  assert manifest["k"] == 5

  rec = Recommender(model)
  for users in (np.arange(3), np.arange(7, 18)):          # two batch sizes, one program
    inputs = examples.user_eval_inputs(dataset, users, hist)
    ids, scores = programs["recommend"](inputs, table)
    expected = np.array(rec.score_fn()(rec.encode_users(inputs), rec.item_table(dataset.catalogue)))
    for row, user_scores in enumerate(expected):
      seen = inputs["history"][row][inputs["history_mask"][row]]
      user_scores[seen] = -np.inf
      np.testing.assert_allclose(np.asarray(scores)[row], np.sort(user_scores)[::-1][:5],
                                 rtol=1e-5, atol=1e-6)
      assert not set(np.asarray(ids)[row]) & set(seen)

  content = dataset.catalogue.content(np.arange(4))
  content = {k: content[k] for k in export.CONTENT_KEYS if k in content}
  emb, presence = programs["encode_items"](content)
  ref_emb, ref_presence = rec.encode_catalogue(dataset.catalogue, np.arange(4))
  np.testing.assert_allclose(np.asarray(emb), ref_emb, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(presence), ref_presence)
