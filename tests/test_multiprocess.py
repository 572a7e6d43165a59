"""Multi-process training on CPU, the path of a multi-host run: 2 processes x 4 devices (gloo
collectives) train and evaluate exactly as 1 process x 8 devices does.

Both runs are the trainer CLI (``python -m recfusion_jax.main``, configs/tiny.py at small
sizes), started side by side as subprocesses, each in its own process group (killed whole on
failure or timeout, so a hang fails this test instead of stalling CI). The mesh is data=1 x
fsdp=8: the devices of a process are consecutive along the mesh (sharding.make_mesh), so only
an fsdp axis over all 8 devices splits parameters across the two processes (each process then
writes its own shards of the Orbax checkpoint).

Compared: every logged training scalar of every step (process 0's metrics.jsonl; same global
batches, dropout draws and updates, so equal up to the order of float sums in the collectives)
and the final evaluation (results.json, and what each process logs), plus the 2-process run's
checkpoint: one step, written by both processes.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
# Both runs together; generous for a loaded CI machine (~1 min of compiling on an idle one).
TIMEOUT_S = 600
FLAGS = [
    "--config", "configs/tiny.py",
    f"--config.num_steps={STEPS}", "--config.log_every=1", f"--config.checkpoint_every={STEPS}",
    "--config.cache_refresh_every=1000", "--config.batch_size=64", "--config.eval_block_size=128",
    "--config.mesh.data=1", "--config.mesh.fsdp=8",
    # 320 items: the item tables split into 8 fsdp shards.
    "--config.data.synthetic.num_items=320", "--config.data.synthetic.num_users=200",
    "--config.model.modalities=('text', 'image')", "--config.model.embed_dim=16",
    "--config.model.encoder.width=16", "--config.model.encoder.mlp_dim=32",
    "--config.model.encoder.depth=1", "--config.model.user.history_len=6",
]
# Wall-clock rows (ReportProgress, examples/s) differ from run to run.
TIMING_KEYS = {"step", "examples_per_sec", "steps_per_sec", "uptime"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env.update(JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
             # A dead peer ends the survivors' wait in a collective sooner (main.py).
             RECFUSION_HEARTBEAT_TIMEOUT_S="30", **extra)
  return env


def _start(workdir: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
  with open(log, "w") as out:
    return subprocess.Popen(
        [sys.executable, "-m", "recfusion_jax.main", "--workdir", str(workdir), *FLAGS],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True)   # its own process group, killed whole


def _kill_group(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  proc.wait()


def _tail(path: Path, lines: int = 15) -> str:
  text = path.read_text(errors="replace").splitlines() if path.exists() else []
  return "\n".join(text[-lines:])


def _run_all(procs: dict[str, tuple[subprocess.Popen, Path]]) -> None:
  """Waits for every process; one failing (or the timeout) kills the rest, then fails."""
  deadline = time.monotonic() + TIMEOUT_S
  problem = None
  try:
    while problem is None and any(p.poll() is None for p, _ in procs.values()):
      failed = [name for name, (p, _) in procs.items() if p.poll() not in (None, 0)]
      if failed:
        problem = f"{failed[0]} exited with {procs[failed[0]][0].returncode}"
      elif time.monotonic() > deadline:
        problem = f"timed out after {TIMEOUT_S} s"
      else:
        time.sleep(0.5)
  finally:
    for p, _ in procs.values():
      if p.poll() is None:
        _kill_group(p)
  if problem is None:
    failed = [name for name, (p, _) in procs.items() if p.returncode != 0]
    problem = f"{failed[0]} exited with {procs[failed[0]][0].returncode}" if failed else None
  if problem is not None:
    logs = "\n".join(f"== {name} (exit {p.returncode}), {log}:\n{_tail(log)}"
                     for name, (p, log) in procs.items())
    raise AssertionError(f"{problem}\n{logs}")


def _train_rows(workdir: Path) -> dict[int, dict[str, float]]:
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: {k: v for k, v in r.items() if k not in TIMING_KEYS}
          for r in rows if "total_loss" in r}


def _logged_evaluation(log: Path) -> dict:
  """The ``evaluation: {...}`` dict the trainer logs at the end (every process logs one)."""
  lines = [line for line in log.read_text().splitlines() if "] evaluation: {" in line]
  assert lines, f"no evaluation logged in {log}:\n{_tail(log)}"
  text = lines[-1].split("] evaluation: ", 1)[1]
  return ast.literal_eval(re.sub(r"\bnan\b", "None", text))


def _assert_metrics_close(got: dict, want: dict, atol: float, where: str) -> None:
  assert set(got) == set(want), (where, sorted(got), sorted(want))
  for group, values in want.items():
    assert set(got[group]) == set(values), (where, group)
    for name, value in values.items():
      np.testing.assert_allclose(got[group][name], value, rtol=0, atol=atol,
                                 err_msg=f"{where}: {group}/{name}")


def test_two_processes_train_and_evaluate_like_one(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  port = _free_port()
  procs = {"1 process x 8 devices": (_start(one, tmp_path / "one.log", _env(8)),
                                     tmp_path / "one.log")}
  for i in range(2):
    log = tmp_path / f"two.process{i}.log"
    env = _env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))
    procs[f"process {i} of 2"] = (_start(two, log, env), log)
  _run_all(procs)

  # Training: every logged scalar of every step (losses, gradient norm, learning rate, gate).
  single, multi = _train_rows(one), _train_rows(two)
  assert sorted(single) == sorted(multi) == list(range(1, STEPS + 1))
  for step, want in single.items():
    assert set(multi[step]) == set(want), step
    for name, value in want.items():
      np.testing.assert_allclose(multi[step][name], value, rtol=1e-5, atol=1e-7,
                                 err_msg=f"step {step}: {name}")

  # Evaluation: results.json (process 0 writes it) and what every process logged.
  results = json.loads((one / "results.json").read_text())
  expected = {k: v for k, v in results.items() if k != "train_history"}
  assert "warm" in expected and "cold_items" in expected, sorted(expected)
  got = json.loads((two / "results.json").read_text())
  _assert_metrics_close({k: v for k, v in got.items() if k != "train_history"}, expected,
                        1e-6, "results.json")
  for i in range(2):
    _assert_metrics_close(_logged_evaluation(tmp_path / f"two.process{i}.log"), expected,
                          1e-6, f"process {i}'s log")

  # One checkpoint (the last step), committed, written by both processes: each its own array
  # shards (the fsdp-sharded leaves) and its input pipeline position.
  checkpoints = two / "checkpoints"
  assert sorted(os.listdir(checkpoints)) == [str(STEPS)]
  step_dir = checkpoints / str(STEPS)
  assert (step_dir / "commit_success.txt").exists()
  for i in range(2):
    shards = step_dir / "state" / f"ocdbt.process_{i}" / "d"
    assert shards.is_dir() and os.listdir(shards), f"process {i} wrote no array shards"
    position = json.loads((step_dir / "data" / f"process_{i}-of-2.json").read_text())
    assert position["next_index"] == STEPS, position
