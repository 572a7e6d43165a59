"""Losses and their gradients against a naive float64 NumPy reference, one row at a time.

The reference is written independently of ``losses.py``: for each row it lists the allowed
columns explicitly (valid, and not an accidental hit = the row's own item at another
position), takes -log softmax of the diagonal over them, and derives the gradient by hand
(softmax - onehot over the allowed columns, then the chain rule).
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recfusion_jax import losses

# float32 JAX vs float64 reference; conftest sets full-precision matmuls.
_RTOL = 1e-5
_ATOL = 1e-6


# ----------------------------------------------------------------------------- reference


def _allowed_columns(r, item_ids, valid):
  """Columns row r is normalised over: valid and not the row's own item elsewhere."""
  return [c for c in range(len(item_ids))
          if valid[c] and not (c != r and item_ids[c] == item_ids[r])]


def _ref_softmax_ce(scores, item_ids, valid):
  """Mean over valid rows r of -log softmax(scores[r, allowed])[r], and d loss / d scores.

  ``scores`` [B, B] float64; row r is the query, column c the candidate.
  """
  n = len(item_ids)
  num_valid = sum(bool(v) for v in valid)
  loss, grad = 0.0, np.zeros((n, n))
  if num_valid == 0:
    return 0.0, grad
  for r in range(n):
    if not valid[r]:
      continue
    cols = _allowed_columns(r, item_ids, valid)
    top = max(scores[r][c] for c in cols)
    lse = top + math.log(sum(math.exp(scores[r][c] - top) for c in cols))
    loss += (lse - scores[r][r]) / num_valid
    for c in cols:
      grad[r, c] += math.exp(scores[r][c] - lse) / num_valid
    grad[r, r] -= 1.0 / num_valid
  return loss, grad


def _ref_sampled_softmax(logits, item_ids, log_q, valid):
  """Loss and gradients w.r.t. logits and log_q (corrected logit = logit - log_q[col])."""
  logits = np.asarray(logits, np.float64)
  log_q = np.asarray(log_q, np.float64)
  corrected = logits - log_q[None, :]
  loss, g = _ref_softmax_ce(corrected, item_ids, valid)
  # d corrected[r, c] / d log_q[c] = -1 for every row r.
  return loss, g, -g.sum(axis=0)


def _ref_info_nce(a, b, valid, item_ids, inv_temp):
  """Symmetric InfoNCE; returns loss and gradients w.r.t. a, b and the inverse temperature."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  dots = a @ b.T
  logits = dots * inv_temp
  loss_ab, g_ab = _ref_softmax_ce(logits, item_ids, valid)  # row a[r], columns b[c]
  loss_ba, g_ba = _ref_softmax_ce(logits.T, item_ids, valid)  # row b[r], columns a[c]
  loss = 0.5 * (loss_ab + loss_ba)
  g_logits = 0.5 * (g_ab + g_ba.T)
  # logits = inv_temp * a @ b.T.
  return (loss, inv_temp * g_logits @ b, inv_temp * g_logits.T @ a,
          float(np.sum(g_logits * dots)))


def _ref_cross_modal(emb, presence, item_ids, valid, inv_temp):
  """Mean of InfoNCE over modality pairs having at least one item with both present."""
  emb = np.asarray(emb, np.float64)
  total, count = 0.0, 0
  g_emb, g_temp = np.zeros_like(emb), 0.0
  for m, n in itertools.combinations(range(emb.shape[1]), 2):
    both = [bool(presence[i, m] and presence[i, n] and valid[i]) for i in range(len(valid))]
    if not any(both):
      continue
    loss, ga, gb, gt = _ref_info_nce(emb[:, m], emb[:, n], both, item_ids, inv_temp)
    total += loss
    count += 1
    g_emb[:, m] += ga
    g_emb[:, n] += gb
    g_temp += gt
  if count == 0:
    return 0.0, g_emb, 0.0
  return total / count, g_emb / count, g_temp / count


# ----------------------------------------------------------------------------- inputs


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _batch(seed, b=12, num_items=5):
  """Few distinct items (many accidental hits) and two padding rows.

  Padding rows reuse a real item id, as padded batches do, so they must be masked as
  columns even though they would also count as accidental hits.
  """
  rng = np.random.default_rng(seed)
  item_ids = rng.integers(0, num_items, b).astype(np.int32)
  item_ids[1] = item_ids[0]
  valid = np.ones(b, bool)
  valid[-2:] = False
  item_ids[-1] = item_ids[0]
  logits = (3.0 * rng.normal(size=(b, b))).astype(np.float32)
  log_q = np.log(rng.dirichlet(np.ones(num_items))[item_ids] + 1e-4).astype(np.float32)
  return logits, item_ids, log_q, valid


# Every call goes through these jitted functions: one compile per shape instead of eager
# op-by-op dispatch. The tests reuse a few shapes (B in {2, 3, 4, 12}, d = 8) so that the
# file stays fast on a shared CPU.
_sampled_softmax_vg = jax.jit(jax.value_and_grad(losses.sampled_softmax_loss, argnums=(0, 2)))
_info_nce_vg = jax.jit(jax.value_and_grad(losses.info_nce, argnums=(0, 1, 4)))
_cross_modal_vg = jax.jit(jax.value_and_grad(losses.cross_modal_loss, argnums=(0, 4)))


def _sampled_softmax_and_grads(logits, item_ids, log_q, valid):
  loss, (g_logits, g_log_q) = _sampled_softmax_vg(
      jnp.asarray(logits, jnp.float32), jnp.asarray(item_ids, jnp.int32),
      jnp.asarray(log_q, jnp.float32), jnp.asarray(valid, bool))
  return float(loss), np.asarray(g_logits), np.asarray(g_log_q)


def _info_nce_and_grads(a, b, valid, item_ids, inv_temp):
  loss, grads = _info_nce_vg(
      jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), jnp.asarray(valid, bool),
      jnp.asarray(item_ids, jnp.int32), jnp.float32(inv_temp))
  return (float(loss),) + tuple(np.asarray(g) for g in grads)


def _cross_modal_and_grads(emb, presence, item_ids, valid, inv_temp):
  loss, grads = _cross_modal_vg(
      jnp.asarray(emb, jnp.float32), jnp.asarray(presence, bool),
      jnp.asarray(item_ids, jnp.int32), jnp.asarray(valid, bool), jnp.float32(inv_temp))
  return (float(loss),) + tuple(np.asarray(g) for g in grads)


def _sampled_softmax(*args):
  return _sampled_softmax_and_grads(*args)[0]


def _info_nce(*args):
  return _info_nce_and_grads(*args)[0]


def _cross_modal(*args):
  return _cross_modal_and_grads(*args)[0]


def _assert_close(got, want, name):
  np.testing.assert_allclose(got, want, rtol=_RTOL, atol=_ATOL, err_msg=name)


def _assert_all_finite(*values):
  for v in values:
    assert np.all(np.isfinite(np.asarray(v))), v


# ----------------------------------------------------------------------------- sampled softmax


def test_sampled_softmax_hand_computed_2x2():
  # logits [[2, 0], [1, 3]], log_q [0, ln 2] -> corrected [[2, -ln 2], [1, 3 - ln 2]].
  # row 0: log(e^2 + e^2 e^-2 / 2) - 2 = log(1 + e^-2 / 2)
  # row 1: log(e + e^3 / 2) - (3 - ln 2) = log(1 + 2 e^-2)
  # loss = (log(1 + e^-2 / 2) + log(1 + 2 e^-2)) / 2
  #      = (0.0654764951... + 0.2395447662...) / 2 = 0.1525106306...
  expected = 0.5 * (math.log(1 + math.exp(-2) / 2) + math.log(1 + 2 * math.exp(-2)))
  assert expected == pytest.approx(0.1525106307, abs=1e-10)
  logits = np.array([[2.0, 0.0], [1.0, 3.0]], np.float32)
  log_q = np.array([0.0, math.log(2.0)], np.float32)
  loss = _sampled_softmax(logits, np.array([7, 9]), log_q, np.array([True, True]))
  assert loss == pytest.approx(expected, rel=1e-6)
  # Same items in both columns: each row only has its own positive -> loss 0.
  loss = _sampled_softmax(logits, np.array([7, 7]), log_q, np.array([True, True]))
  assert loss == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_softmax_matches_reference(seed):
  logits, item_ids, log_q, valid = _batch(seed)
  loss, g_logits, g_log_q = _sampled_softmax_and_grads(logits, item_ids, log_q, valid)
  ref_loss, ref_g_logits, ref_g_log_q = _ref_sampled_softmax(logits, item_ids, log_q, valid)
  _assert_close(loss, ref_loss, "loss")
  _assert_close(g_logits, ref_g_logits, "d/d logits")
  _assert_close(g_log_q, ref_g_log_q, "d/d log_q")
  # Padding rows get no gradient, and nor do padding columns.
  np.testing.assert_array_equal(g_logits[~valid], 0.0)
  np.testing.assert_array_equal(g_logits[:, ~valid], 0.0)


def test_log_q_correction():
  logits, item_ids, log_q, valid = _batch(3)
  with_q = _sampled_softmax(logits, item_ids, log_q, valid)
  without_q = _sampled_softmax(logits, item_ids, np.zeros_like(log_q), valid)
  # The correction matters here, by exactly what the reference says.
  assert abs(with_q - without_q) > 1e-2
  ref_with_q, _, _ = _ref_sampled_softmax(logits, item_ids, log_q, valid)
  ref_without_q, _, _ = _ref_sampled_softmax(logits, item_ids, np.zeros_like(log_q), valid)
  _assert_close(with_q - without_q, ref_with_q - ref_without_q, "loss change")
  # It is a per-column shift of the logits.
  shifted = _sampled_softmax(logits - log_q[None, :], item_ids, np.zeros_like(log_q), valid)
  _assert_close(with_q, shifted, "pre-shifted logits")
  # A constant log_q shifts every logit of a row equally: softmax ignores it.
  for constant in (-7.5, 0.3):
    const_q = np.full_like(log_q, constant)
    _assert_close(_sampled_softmax(logits, item_ids, const_q, valid),
                  without_q, f"log_q = {constant}")
    _, _, g_log_q = _sampled_softmax_and_grads(logits, item_ids, const_q, valid)
    assert abs(float(g_log_q.sum())) < 1e-6  # shift-invariance: the gradient sums to 0


def test_accidental_hit_is_not_a_negative():
  rng = np.random.default_rng(4)
  b = 4
  logits = rng.normal(size=(b, b)).astype(np.float32)
  item_ids = np.array([3, 3, 1, 4], np.int32)  # columns 0 and 1 hold the same item
  log_q = rng.normal(size=b).astype(np.float32)
  valid = np.ones(b, bool)
  loss = _sampled_softmax(logits, item_ids, log_q, valid)
  # Written with the duplicate column deleted from each of the two rows' candidates.
  corrected = logits.astype(np.float64) - log_q[None, :]
  per_row = []
  for r in range(b):
    row = corrected[r]
    if r in (0, 1):
      row = np.delete(row, 1 - r)
    positive = corrected[r, r]
    per_row.append(np.log(np.sum(np.exp(row))) - positive)
  _assert_close(loss, np.mean(per_row), "duplicate deleted")
  # However high the duplicate scores, the loss does not move, and it gets no gradient.
  boosted = logits.copy()
  boosted[0, 1] = boosted[1, 0] = 50.0
  _assert_close(_sampled_softmax(boosted, item_ids, log_q, valid), loss, "boosted duplicate")
  _, g_logits, _ = _sampled_softmax_and_grads(logits, item_ids, log_q, valid)
  assert g_logits[0, 1] == 0.0 and g_logits[1, 0] == 0.0
  # Sanity: with distinct ids the same logits give a different loss.
  distinct = _sampled_softmax(logits, np.arange(b), log_q, valid)
  assert abs(distinct - loss) > 1e-3


def test_padding_column_is_not_a_negative():
  rng = np.random.default_rng(5)
  logits, log_q = rng.normal(size=(4, 4)).astype(np.float32), np.zeros(4, np.float32)
  item_ids = np.array([0, 1, 2, 3], np.int32)
  padded = _sampled_softmax(logits, item_ids, log_q, np.array([True, True, True, False]))
  cropped = _sampled_softmax(logits[:3, :3], item_ids[:3], log_q[:3], np.ones(3, bool))
  _assert_close(padded, cropped, "padding == cropped batch")


# ----------------------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_info_nce_matches_reference(seed):
  _, item_ids, _, valid = _batch(seed)
  rng = np.random.default_rng(100 + seed)
  a, b = _unit(rng, len(item_ids), 8), _unit(rng, len(item_ids), 8)
  inv_temp = 5.0
  loss, g_a, g_b, g_t = _info_nce_and_grads(a, b, valid, item_ids, inv_temp)
  ref_loss, ref_g_a, ref_g_b, ref_g_t = _ref_info_nce(a, b, valid, item_ids, inv_temp)
  _assert_close(loss, ref_loss, "loss")
  _assert_close(g_a, ref_g_a, "d/d a")
  _assert_close(g_b, ref_g_b, "d/d b")
  _assert_close(g_t, ref_g_t, "d/d inverse_temperature")


def test_info_nce_padding_row_is_not_a_negative():
  # The minimal case: a padding row must not change the loss, in either direction.
  rng = np.random.default_rng(6)
  a, b = _unit(rng, 3, 8), _unit(rng, 3, 8)
  ids = np.arange(3)
  padded = _info_nce(a, b, np.array([True, True, False]), ids, 5.0)
  cropped = _info_nce(a[:2], b[:2], np.array([True, True]), ids[:2], 5.0)
  _assert_close(padded, cropped, "padding == cropped batch")


def test_info_nce_hand_computed_2x2():
  # a = b = [e0, e1] (in R^8), inverse temperature 1 -> logits [[1, 0], [0, 1]], symmetric, so
  # each of the 4 (row, direction) terms is log(e + 1) - 1 = log(1 + e^-1) = 0.3132616875...
  eye = np.eye(2, 8, dtype=np.float32)
  loss = _info_nce(eye, eye, np.array([True, True]), np.array([0, 1]), 1.0)
  assert loss == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
  assert math.log(1 + math.exp(-1)) == pytest.approx(0.3132616875, abs=1e-10)


# ----------------------------------------------------------------------------- cross-modal


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_modal_matches_reference(seed):
  _, item_ids, _, valid = _batch(seed)
  rng = np.random.default_rng(200 + seed)
  b, m = len(item_ids), 3
  # Garbage (not zero) vectors where absent: a correct mask must ignore them anyway.
  emb = _unit(rng, b, m, 8)
  presence = rng.random((b, m)) > 0.3
  presence[:, 2] = False
  presence[3, 2] = presence[3, 0] = True  # pair (0, 2) has exactly one item
  loss, g_emb, g_t = _cross_modal_and_grads(emb, presence, item_ids, valid, 4.0)
  ref_loss, ref_g_emb, ref_g_t = _ref_cross_modal(emb, presence, item_ids, valid, 4.0)
  _assert_close(loss, ref_loss, "loss")
  _assert_close(g_emb, ref_g_emb, "d/d emb")
  _assert_close(g_t, ref_g_t, "d/d inverse_temperature")
  # Absent (or padded) embeddings receive no gradient.
  np.testing.assert_array_equal(g_emb[~(presence & valid[:, None])], 0.0)


def test_cross_modal_pair_without_items_contributes_nothing():
  rng = np.random.default_rng(7)
  b = 4
  emb = _unit(rng, b, 3, 8)
  item_ids = np.arange(b, dtype=np.int32)
  valid = np.ones(b, bool)
  presence = np.ones((b, 3), bool)
  presence[:2, 2] = False  # rows 0-1 lack modality 2 ...
  presence[2:, 1] = False  # ... rows 2-3 lack modality 1: pair (1, 2) has no item.
  loss, g_emb, g_t = _cross_modal_and_grads(emb, presence, item_ids, valid, 3.0)
  _assert_all_finite(loss, g_emb, g_t)
  # Mean over the two remaining pairs only, each on its own items.
  pair_01 = _info_nce(emb[:2, 0], emb[:2, 1], valid[:2], item_ids[:2], 3.0)
  pair_02 = _info_nce(emb[2:, 0], emb[2:, 2], valid[2:], item_ids[2:], 3.0)
  _assert_close(loss, 0.5 * (pair_01 + pair_02), "mean over non-empty pairs")
  ref_loss, ref_g_emb, ref_g_t = _ref_cross_modal(emb, presence, item_ids, valid, 3.0)
  _assert_close(loss, ref_loss, "loss")
  _assert_close(g_emb, ref_g_emb, "d/d emb")
  _assert_close(g_t, ref_g_t, "d/d inverse_temperature")


# ----------------------------------------------------------------------------- edge cases


def test_all_masked_is_finite():
  rng = np.random.default_rng(8)
  b = 4
  logits, log_q = rng.normal(size=(b, b)).astype(np.float32), np.zeros(b, np.float32)
  ids, none = np.arange(b, dtype=np.int32), np.zeros(b, bool)
  loss, g_logits, g_log_q = _sampled_softmax_and_grads(logits, ids, log_q, none)
  _assert_all_finite(loss, g_logits, g_log_q)
  assert loss == 0.0 and not g_logits.any() and not g_log_q.any()

  a, bb = _unit(rng, 3, 8), _unit(rng, 3, 8)
  loss, g_a, g_b, g_t = _info_nce_and_grads(a, bb, none[:3], ids[:3], 5.0)
  _assert_all_finite(loss, g_a, g_b, g_t)
  assert loss == 0.0 and not g_a.any() and not g_b.any()

  emb = _unit(rng, b, 3, 8)
  for presence, valid in ((np.zeros((b, 3), bool), np.ones(b, bool)),  # nothing present
                          (np.ones((b, 3), bool), none),  # everything padding
                          (np.eye(b, 3, dtype=bool), np.ones(b, bool))):  # never two at once
    loss, g_emb, g_t = _cross_modal_and_grads(emb, presence, ids, valid, 5.0)
    _assert_all_finite(loss, g_emb, g_t)
    assert loss == 0.0 and not g_emb.any()
  # One modality: no pair at all.
  loss, g_emb, _ = _cross_modal_and_grads(emb[:, :1], np.ones((b, 1), bool), ids,
                                          np.ones(b, bool), 5.0)
  _assert_all_finite(loss, g_emb)
  assert loss == 0.0


def test_only_positive_left_gives_zero_loss_and_finite_gradient():
  # One valid row, or every row the same item: the positive is the only candidate.
  rng = np.random.default_rng(9)
  b = 4
  logits = (100.0 * rng.normal(size=(b, b))).astype(np.float32)  # large: no overflow either
  log_q = rng.normal(size=b).astype(np.float32)
  for ids, valid in ((np.arange(b), np.eye(b, dtype=bool)[0]),
                     (np.full(b, 2), np.ones(b, bool))):
    loss, g_logits, g_log_q = _sampled_softmax_and_grads(logits, ids, log_q, valid)
    _assert_all_finite(loss, g_logits, g_log_q)
    assert loss == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(g_logits, 0.0, atol=1e-7)
  # Very large finite logits with real negatives still match the reference.
  ids, valid = np.arange(b), np.ones(b, bool)
  loss, g_logits, g_log_q = _sampled_softmax_and_grads(logits, ids, log_q, valid)
  ref_loss, ref_g_logits, ref_g_log_q = _ref_sampled_softmax(logits, ids, log_q, valid)
  np.testing.assert_allclose(loss, ref_loss, rtol=_RTOL)
  np.testing.assert_allclose(g_logits, ref_g_logits, rtol=_RTOL, atol=_ATOL)
  np.testing.assert_allclose(g_log_q, ref_g_log_q, rtol=_RTOL, atol=_ATOL)


# ----------------------------------------------------------------------------- symmetry


def test_losses_invariant_to_batch_permutation():
  logits, item_ids, log_q, valid = _batch(10)
  rng = np.random.default_rng(10)
  b = len(item_ids)
  perm = rng.permutation(b)
  # Rows and columns move together: the positives stay on the diagonal.
  permuted_logits = logits[perm][:, perm]
  _assert_close(
      _sampled_softmax(permuted_logits, item_ids[perm], log_q[perm], valid[perm]),
      _sampled_softmax(logits, item_ids, log_q, valid), "sampled softmax")

  a, bb = _unit(rng, b, 8), _unit(rng, b, 8)
  _assert_close(_info_nce(a[perm], bb[perm], valid[perm], item_ids[perm], 5.0),
                _info_nce(a, bb, valid, item_ids, 5.0), "info_nce")

  emb, presence = _unit(rng, b, 3, 8), rng.random((b, 3)) > 0.3
  _assert_close(
      _cross_modal(emb[perm], presence[perm], item_ids[perm], valid[perm], 5.0),
      _cross_modal(emb, presence, item_ids, valid, 5.0), "cross_modal")


def _ref_full_softmax(logits, item_ids, candidates, valid):
  """Naive: per valid row, -log softmax over (candidates + the row's positive)."""
  logits = np.asarray(logits, np.float64)
  num_valid = sum(bool(v) for v in valid)
  loss, grad = 0.0, np.zeros_like(logits)
  for r in range(logits.shape[0]):
    if not valid[r]:
      continue
    cols = [c for c in range(logits.shape[1]) if candidates[c] or c == item_ids[r]]
    top = max(logits[r, c] for c in cols)
    lse = top + math.log(sum(math.exp(logits[r, c] - top) for c in cols))
    loss += (lse - logits[r, item_ids[r]]) / num_valid
    for c in cols:
      grad[r, c] += math.exp(logits[r, c] - lse) / num_valid
    grad[r, item_ids[r]] -= 1.0 / num_valid
  return loss, grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_softmax_matches_reference(seed):
  rng = np.random.default_rng(seed)
  b, n = 6, 11
  logits = rng.normal(size=(b, n)) * 3
  item_ids = rng.integers(0, n, b)
  candidates = rng.random(n) < 0.6
  candidates[item_ids[0]] = False   # a positive that is not a candidate is still scored
  valid = rng.random(b) < 0.8
  valid[0] = True
  ref_loss, ref_grad = _ref_full_softmax(logits, item_ids, candidates, valid)
  fn = lambda x: losses.full_softmax_loss(x, jnp.asarray(item_ids), jnp.asarray(candidates),
                                          jnp.asarray(valid))
  loss, grad = jax.value_and_grad(fn)(jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(loss, ref_loss, rtol=_RTOL, atol=_ATOL)
  np.testing.assert_allclose(grad, ref_grad, rtol=_RTOL, atol=_ATOL)
  # Non-candidates other than the positive get no gradient: they are not negatives.
  others = ~candidates[None, :] & (np.arange(n)[None, :] != item_ids[:, None])
  assert not np.asarray(grad)[others].any()


def test_full_softmax_hand_computed():
  # One row, positive 0 (logit 1), candidates {1, 2} with logits 0 and 2; item 3 excluded.
  logits = jnp.asarray([[1.0, 0.0, 2.0, 50.0]])
  loss = losses.full_softmax_loss(logits, jnp.asarray([0]), jnp.asarray([False, True, True, False]),
                                  jnp.asarray([True]))
  expected = -math.log(math.e / (math.e + 1.0 + math.e ** 2))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def _ref_multi_target(logits, targets, target_mask, candidates, exclude, exclude_mask):
  """Naive: each real target of row r is -log softmax over the row's allowed items, where
  allowed = candidates, minus the row's excluded items, plus the row's own targets."""
  logits = np.asarray(logits, np.float64)
  terms = []
  for r in range(logits.shape[0]):
    real = [int(t) for t, m in zip(targets[r], target_mask[r]) if m]
    dropped = {int(e) for e, m in zip(exclude[r], exclude_mask[r]) if m}
    cols = [c for c in range(logits.shape[1])
            if (candidates[c] and c not in dropped) or c in real]
    top = max(logits[r, c] for c in cols) if cols else 0.0
    lse = top + math.log(sum(math.exp(logits[r, c] - top) for c in cols)) if cols else 0.0
    terms += [lse - logits[r, t] for t in real]
  return sum(terms) / max(len(terms), 1)


def _multi_target_case(rng):
  """Random [5, 13] logits with up to 4 targets and 3 excluded items a row; the last row has no
  target and row 0's first target is also excluded (it stays scored)."""
  rows, n, t, e = 5, 13, 4, 3
  logits = rng.normal(size=(rows, n))
  targets = rng.integers(0, n, (rows, t))
  target_mask = rng.random((rows, t)) < 0.6
  target_mask[-1] = False
  candidates = rng.random(n) < 0.7
  exclude = rng.integers(0, n, (rows, e))
  exclude[0, 0] = targets[0, 0]
  target_mask[0, 0] = True
  exclude_mask = rng.random((rows, e)) < 0.7
  exclude_mask[0, 0] = True
  return logits, targets, target_mask, candidates, exclude, exclude_mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_target_softmax_matches_reference(seed):
  rng = np.random.default_rng(seed)
  logits, targets, target_mask, candidates, exclude, exclude_mask = _multi_target_case(rng)
  logits = logits * 3
  args = [jnp.asarray(x) for x in (targets, target_mask, candidates, exclude, exclude_mask)]
  fn = lambda x: losses.multi_target_softmax_loss(x, *args)
  want = _ref_multi_target(logits, targets, target_mask, candidates, exclude, exclude_mask)
  loss, grad = jax.value_and_grad(fn)(jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(loss, want, rtol=_RTOL, atol=_ATOL)
  # The gradient matches the naive loss's, by central differences in float64.
  flat = logits.reshape(-1)
  for k in rng.choice(flat.size, 8, replace=False):
    step = np.zeros_like(flat)
    step[k] = 1e-5
    num = (_ref_multi_target((flat + step).reshape(logits.shape), targets, target_mask,
                             candidates, exclude, exclude_mask)
           - _ref_multi_target((flat - step).reshape(logits.shape), targets, target_mask,
                               candidates, exclude, exclude_mask)) / 2e-5
    np.testing.assert_allclose(np.asarray(grad).reshape(-1)[k], num, atol=1e-4)
  assert not np.asarray(grad)[-1].any()


def _ref_multi_target_squared(logits, targets, target_mask, candidates, exclude, exclude_mask,
                              negative_weight):
  """Naive: per row, (score - 1)^2 over its distinct real targets plus negative_weight *
  score^2 over its other allowed items; the mean over rows that have a real target."""
  logits = np.asarray(logits, np.float64)
  sums = []
  for r in range(logits.shape[0]):
    real = {int(t) for t, m in zip(targets[r], target_mask[r]) if m}
    if not real:
      continue
    dropped = {int(e) for e, m in zip(exclude[r], exclude_mask[r]) if m}
    total = 0.0
    for c in range(logits.shape[1]):
      if c in real:
        total += (logits[r, c] - 1.0) ** 2
      elif candidates[c] and c not in dropped:
        total += negative_weight * logits[r, c] ** 2
    sums.append(total)
  return sum(sums) / max(len(sums), 1)


@pytest.mark.parametrize("seed,negative_weight", [(0, 1.0), (1, 0.1), (2, 0.0)])
def test_multi_target_squared_matches_reference(seed, negative_weight):
  rng = np.random.default_rng(seed)
  logits, targets, target_mask, candidates, exclude, exclude_mask = _multi_target_case(rng)
  targets[1, 1] = targets[1, 0]                # a repeated target counts once
  target_mask[1, :2] = True
  args = [jnp.asarray(x) for x in (targets, target_mask, candidates, exclude, exclude_mask)]
  fn = lambda x: losses.multi_target_squared_loss(x, *args, negative_weight=negative_weight)
  ref = lambda x: _ref_multi_target_squared(x, targets, target_mask, candidates, exclude,
                                            exclude_mask, negative_weight)
  loss, grad = jax.value_and_grad(fn)(jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(loss, ref(logits), rtol=_RTOL, atol=_ATOL)
  flat = logits.reshape(-1)
  for k in rng.choice(flat.size, 8, replace=False):
    step = np.zeros_like(flat)
    step[k] = 1e-5
    num = (ref((flat + step).reshape(logits.shape))
           - ref((flat - step).reshape(logits.shape))) / 2e-5
    np.testing.assert_allclose(np.asarray(grad).reshape(-1)[k], num, atol=1e-4)
  assert not np.asarray(grad)[-1].any()


def test_multi_target_softmax_one_target_is_the_full_softmax():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(4, 9)), jnp.float32)
  item_ids = jnp.asarray([1, 5, 5, 8])
  candidates = jnp.asarray(rng.random(9) < 0.5)
  valid = jnp.asarray([True, True, False, True])
  np.testing.assert_allclose(
      losses.multi_target_softmax_loss(logits, item_ids[:, None], valid[:, None], candidates),
      losses.full_softmax_loss(logits, item_ids, candidates, valid), rtol=1e-6)
