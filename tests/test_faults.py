"""Fault injection on the tiny config, each case in a subprocess running the real CLI
(``python -m recfusion_jax.main``): SIGTERM -> checkpoint + exit 75 + exact resume, corrupt
checkpoints -> logged fallback to an older one, NaN -> stop without a NaN checkpoint, bad
configs -> one line before compiling; plus the in-process pieces (skip mode, split stability).

Runs share work: one uninterrupted reference run (checkpoints 10/20/30/40) serves the exact-
resume comparison and, copied, the corruption cases (all three in one restore). A persistent
compilation cache, shared by the subprocesses, keeps recompiling cheap.
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recfusion_jax import train, writers
from recfusion_jax.data import splits as splits_lib
from data_prep import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
SMALL = ["--config.model.embed_dim=16", "--config.model.encoder.width=16",
         "--config.model.encoder.mlp_dim=32", "--config.model.encoder.depth=1",
         "--config.model.user.history_len=6", "--config.batch_size=64",
         "--config.data.synthetic.num_items=300", "--config.data.synthetic.num_users=200",
         "--config.eval_block_size=128", f"--config.num_steps={STEPS}",
         "--config.log_every=5", "--config.cache_refresh_every=100"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  out = dict(os.environ)
  out.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=ROOT)
  return out


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "recfusion_jax.main", "--config", "configs/tiny.py",
          f"--workdir={workdir}", *SMALL, *extra]


def _run(env, workdir, *extra, timeout=400):
  return subprocess.run(_cmd(workdir, *extra), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def _steps(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())


def _fingerprint(workdir, step):
  """The content fingerprint saved with a checkpoint (the JSON item of Checkpointer)."""
  item = os.path.join(workdir, "checkpoints", str(step), "fingerprint")
  for path in sorted(glob.glob(os.path.join(item, "*"))):
    try:
      with open(path) as f:
        data = json.load(f)
    except (ValueError, UnicodeDecodeError, IsADirectoryError):
      continue
    if isinstance(data, dict) and len(data) > 10:
      return data
  raise AssertionError(f"no fingerprint in {item}: {os.listdir(item)}")


def _train_steps(rows):
  return [row["step"] for row in rows if "total_loss" in row]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  """An uninterrupted run: checkpoints at 10, 20, 30, 40 (keep 4)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = _run(env, workdir, "--config.checkpoint_every=10", "--config.keep_checkpoints=4")
  assert result.returncode == 0, result.stderr[-3000:]
  assert _steps(workdir) == [10, 20, 30, 40]
  return workdir


def test_sigterm_saves_exits_75_and_resumes_exactly(env, reference, tmp_path):
  workdir = str(tmp_path / "run")
  # No periodic checkpoint: whatever is saved is SIGTERM's.
  proc = subprocess.Popen(_cmd(workdir, "--config.checkpoint_every=1000"), cwd=ROOT, env=env,
                          stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if "] [10] " in line and "total_loss" in line:
      break
  sent = time.perf_counter()
  proc.send_signal(signal.SIGTERM)
  lines += proc.stderr.readlines()
  status = proc.wait(timeout=120)
  seconds_to_exit = time.perf_counter() - sent
  log = "".join(lines)
  assert status == train.EXIT_PREEMPTED, log[-3000:]
  (step,) = _steps(workdir)
  assert 10 <= step < STEPS
  assert f"SIGTERM received: checkpoint of step {step} committed" in log, log[-3000:]
  print(f"SIGTERM: checkpoint at step {step}, exit {status} after {seconds_to_exit:.1f} s")
  assert seconds_to_exit < 60

  resumed = _run(env, workdir, "--config.checkpoint_every=1000")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {step}" in resumed.stderr
  # Bitwise the same final state as the uninterrupted run (data iterator included).
  assert _fingerprint(workdir, STEPS) == _fingerprint(reference, STEPS)
  # The log continues without duplicate steps; train_history covers the whole run.
  rows = writers.read_jsonl(workdir)
  expected = list(range(5, STEPS + 1, 5))
  assert _train_steps(rows) == expected
  keyed = [(row["step"], key) for row in rows if "step" in row for key in row if key != "step"]
  assert len(keyed) == len(set(keyed))
  with open(os.path.join(workdir, "results.json")) as f:
    assert [row["step"] for row in json.load(f)["train_history"]] == expected


def _data_files(workdir, step):
  files = [p for p in glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**"),
                                recursive=True)
           if os.path.isfile(p) and "/d/" in p]
  assert files, os.listdir(os.path.join(workdir, "checkpoints", str(step), "state"))
  return files


def test_corrupt_checkpoints_fall_back_with_reasons(env, reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  # 40: 64 flipped bytes in the middle of each data file; 30: each data file cut to half; 20: no
  # metadata. Every file, not one: ocdbt.process_0/d/ also holds the per-process b-tree nodes,
  # which the restore skips once the root index is merged, so one file alone can be a region no
  # read touches (seen twice in CI, once for each kind of damage).
  for path in _data_files(workdir, 40):
    with open(path, "r+b") as f:
      middle = os.path.getsize(path) // 2
      f.seek(middle)
      data = bytearray(f.read(64))
      f.seek(middle)
      f.write(bytes(b ^ 0xFF for b in data))
  for path in _data_files(workdir, 30):
    os.truncate(path, os.path.getsize(path) // 2)
  os.remove(os.path.join(workdir, "checkpoints", "20", "state", "_METADATA"))

  # num_steps=10: the restore is the whole run (no training after it, then the evaluation).
  result = _run(env, workdir, "--config.checkpoint_every=10", "--config.keep_checkpoints=4",
                "--config.num_steps=10")
  log = result.stderr
  assert result.returncode == 0, log[-3000:]
  reasons = {}
  for step in (40, 30, 20):
    marker = f"checkpoint step {step} in "
    assert marker in log, log[-3000:]
    line = log[log.index(marker):].splitlines()[0]
    assert "is unusable: " in line
    reasons[step] = line.split("is unusable: ", 1)[1]
  print("fallback reasons:", json.dumps(reasons, indent=1))
  assert reasons[40].startswith("fingerprint mismatch") or "Error" in reasons[40]
  assert "resuming from checkpoint step 10" in log
  assert _steps(workdir) == [10]
  corrupt = os.path.join(workdir, "checkpoints.corrupt")
  assert sorted(os.listdir(corrupt)) == ["20", "30", "40"]


def test_nan_stops_before_saving(env, tmp_path):
  workdir = str(tmp_path / "run")
  result = _run(env, workdir, "--config.optimizer.learning_rate=1e6",
                "--config.checkpoint_every=1", "--config.keep_checkpoints=2")
  log = result.stderr
  assert result.returncode == 1, log[-3000:]
  line = next(l for l in log.splitlines() if l.startswith("error: non-finite"))
  step = int(line.split(" at step ")[1].split(":")[0])
  assert "total_loss=" in line and "rec_loss=" in line, line
  print(f"NaN stop: {line[:200]}")
  assert step < STEPS
  # Checkpoints: only steps before the bad one, the last finite one kept.
  saved = _steps(workdir)
  assert saved and max(saved) == step - 1, (saved, step)
  assert "non-finite" not in json.dumps(_fingerprint(workdir, step - 1))


@pytest.mark.parametrize("flags, expected", [
    (["--config.log_every=0", "--config.checkpoint_every=0", "--config.num_steps=0"],
     ["log_every must be >= 1, got 0", "checkpoint_every must be >= 1, got 0",
      "num_steps must be >= 1, got 0"]),
    (["--config.log_evry=5"], ["no field 'log_evry' (did you mean 'log_every'?)"]),
])
def test_bad_config_fails_fast_on_one_line(env, tmp_path, flags, expected):
  start = time.perf_counter()
  result = _run(env, str(tmp_path / "run"), *flags, timeout=120)
  elapsed = time.perf_counter() - start
  assert result.returncode == 2, result.stderr[-3000:]
  # The message itself, once on stderr: absl's E-prefixed log line repeats it, and libraries
  # may log (glog-style "I1202 ..." lines, e.g. TensorFlow's oneDNN notice) or warn before it.
  lines = [l for l in result.stderr.splitlines()
           if l.strip() and not re.match(r"[IWEF]\d{4} |WARNING", l)]
  assert len(lines) == 1, result.stderr
  for text in expected:
    assert text in lines[0], result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(str(tmp_path / "run" / "checkpoints"))
  assert elapsed < 60, elapsed


# ---- in-process pieces ---------------------------------------------------------------------


def test_skip_mode_drops_the_update_and_keeps_finite_steps():
  def step_fn(state, batch):
    new = {"w": state["w"] + batch, "n": state["n"] + 1}
    return new, {"total_loss": jnp.sum(new["w"])}

  state = {"w": jnp.zeros(3), "n": jnp.int32(0)}
  skip = jax.jit(train.guard_nonfinite(step_fn, "skip"))
  state, aux = skip(state, jnp.ones(3))
  assert not bool(aux["nonfinite"]) and int(state["n"]) == 1
  state, aux = skip(state, jnp.array([1.0, jnp.nan, 1.0]))
  assert bool(aux["nonfinite"])
  np.testing.assert_array_equal(state["w"], np.ones(3))   # the bad update was dropped
  assert int(state["n"]) == 1
  stop = jax.jit(train.guard_nonfinite(step_fn, "stop"))
  _, aux = stop(state, jnp.array([jnp.inf, 0.0, 0.0]))
  assert bool(aux["nonfinite"])


def test_splits_unchanged_by_a_duplicated_or_reordered_row():
  rng = np.random.default_rng(0)
  n = 3000
  rows = [[str(u), str(i), str(r), str(t)] for u, i, r, t in zip(
      rng.integers(1, 60, n), rng.integers(1, 200, n), rng.integers(1, 6, n),
      rng.integers(0, 500, n))]   # timestamps collide often: ties matter
  users, items = set(range(1, 60)), set(range(1, 200))

  def labels(raw_rows):
    log = tables._clean_interactions(raw_rows, users, items, tables.BuildReport())  # pylint: disable=protected-access
    out = {}
    for protocol in ("warm_ratio", "loo", "cold_users"):
      split = splits_lib.make_split(protocol, log, {}, {}, seed=0)
      out[protocol] = dict(zip(zip(log.user.tolist(), log.item.tolist()), split.labels))
    return out

  base = labels(rows)
  # A row repeated at the end of the file (before: 1103 of 2667 warm_ratio labels changed).
  assert labels(rows + [rows[100]]) == base
  shuffled = [rows[k] for k in rng.permutation(n)]
  assert labels(shuffled) == base


def test_truncate_jsonl_drops_the_steps_after_the_checkpoint(tmp_path):
  workdir = str(tmp_path)
  with open(os.path.join(workdir, writers.JSONL_NAME), "w") as f:
    for row in ({"lr": 1.0}, {"step": 5, "total_loss": 1.0}, {"step": 10, "total_loss": 0.9},
                {"step": 15, "total_loss": 0.8}):
      f.write(json.dumps(row) + "\n")
  kept = writers.truncate_jsonl(workdir, 10)
  assert [row.get("step") for row in kept] == [None, 5, 10]
  assert writers.read_jsonl(workdir) == kept
