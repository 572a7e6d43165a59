"""The launchers in launch/, run for real against stub executables (no JAX, no cloud, no GPU).

Stub `gcloud`, `git`, `uv`, `curl`, `srun`, `sbatch`, `scontrol` and a stub trainer are written
into a tmp folder put first on PATH; they record their argv and environment. The stub trainer
installs SIGTERM/SIGINT handlers (exit 75, the "resume me" code, like the real trainer) and
starts two grandchildren standing in for Grain workers and the multiprocessing resource tracker
(one of them ignores SIGTERM), so the tests can check that nothing outlives a launcher.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREEMPTED = 75
# Generous: the machine running the tests may be loaded.
READY_TIMEOUT_S = 60
EXIT_TIMEOUT_S = 120

_TRAINER = r'''#!{python} -S
"""Stub trainer: records itself, starts two grandchildren, handles TERM/INT like the trainer."""
import json, os, signal, subprocess, sys, time
args = sys.argv[1:]
if args[:2] == ["-m", "recfusion_jax.main"]:  # used as the venv's python on the fake TPU VM
  args = args[2:]
ident = os.environ.get("JAX_PROCESS_ID") or os.environ.get("FAKE_WORKER_ID") or "0"
def knob(name, default=None):
  return os.environ.get(f"{name}_{ident}", os.environ.get(name, default))
out = os.environ["STUB_OUT"]
state = dict(argv=args, id=ident, pid=os.getpid(), sid=os.getsid(0), pgid=os.getpgid(0),
             env={k: v for k, v in os.environ.items()
                  if k.startswith(("JAX_", "CUDA_", "XLA_", "SLURM_")) or k == "DATA_OUT"},
             signals=[], children=[], exit_time=None)
def save():
  path = os.path.join(out, f"trainer-{ident}-{os.getpid()}.json")
  with open(path + ".tmp", "w") as f:
    json.dump(state, f)
  os.replace(path + ".tmp", path)
def on_signal(signum, frame):
  state["signals"].append(signal.Signals(signum).name)
  if knob("STUB_IGNORE_TERM"):  # stuck, e.g. in a collective with a dead peer
    save()
    return
  state["exit_time"] = time.time()
  save()
  sys.exit(int(knob("STUB_TERM_EXIT", "75")))
signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
state["children"] = [
    subprocess.Popen(["sleep", "600"]).pid,
    subprocess.Popen([sys.executable, "-S", "-c", "import signal, time; "
                      "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]).pid]
save()
print("stub trainer", ident, "ready", flush=True)
if knob("STUB_EXIT") is not None:
  time.sleep(float(knob("STUB_EXIT_DELAY", "0.5")))
  state["exit_time"] = time.time()
  save()
  sys.exit(int(knob("STUB_EXIT")))
while True:
  time.sleep(0.1)
'''

# Records one JSON line per call into $STUB_LOG, then does what `behaviour` says.
_RECORDER = r'''#!{python} -S
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
  f.write(json.dumps(dict(tool=os.path.basename(sys.argv[0]), argv=sys.argv[1:],
                          env=dict(os.environ), cwd=os.getcwd())) + "\n")
{behaviour}
'''

_SRUN = r'''
import signal, time
def on_term(signum, frame):
  with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(dict(tool="srun-signal", argv=[signal.Signals(signum).name])) + "\n")
  sys.exit(PREEMPTED)
PREEMPTED = 75
signal.signal(signal.SIGTERM, on_term)
if os.environ.get("STUB_SRUN_SLEEP"):
  with open(os.environ["STUB_LOG"] + ".srun-ready", "w") as f:
    f.write("1")
  time.sleep(float(os.environ["STUB_SRUN_SLEEP"]))
sys.exit(int(os.environ.get("STUB_SRUN_EXIT", "0")))
'''

# gcloud: `tpu-vm ssh ... --command SCRIPT` runs SCRIPT with bash on fake workers (a HOME folder
# each, all in parallel like --worker=all); `storage ...` works on a folder standing in for gs://.
_GCLOUD = r'''
import re, shutil, subprocess
argv = sys.argv[1:]
root = os.environ["FAKE_ROOT"]
def local(url):
  assert url.startswith("gs://"), url
  return os.path.join(root, "gcs", url[len("gs://"):])
if argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
  if os.environ.get("FAKE_SSH_RECORD_ONLY"):
    sys.exit(0)
  script = argv[argv.index("--command") + 1]
  worker = [a.split("=", 1)[1] for a in argv if a.startswith("--worker=")][0]
  workers = range(int(os.environ["FAKE_WORKERS"])) if worker == "all" else [int(worker)]
  procs = []
  for w in workers:
    home = os.path.join(root, f"worker{w}")
    os.makedirs(home, exist_ok=True)
    env = dict(os.environ, HOME=home, FAKE_WORKER_ID=str(w), STUB_OUT=home)
    procs.append(subprocess.Popen(["bash", "-c", script], cwd=home, env=env))
  sys.exit(max(p.wait() for p in procs))
if argv[:2] == ["storage", "ls"]:
  sys.exit(0 if os.path.exists(local(argv[2])) else 1)
if argv[:2] == ["storage", "rsync"]:
  exclude = [a.split("=", 1)[1] for a in argv if a.startswith("--exclude=")]
  src, dst = [a for a in argv[2:] if not a.startswith("--")]
  for dirpath, _, files in os.walk(src):
    for name in files:
      rel = os.path.relpath(os.path.join(dirpath, name), src)
      if any(re.search(p, rel) for p in exclude):
        continue
      os.makedirs(os.path.dirname(os.path.join(local(dst), rel)), exist_ok=True)
      shutil.copy(os.path.join(dirpath, name), os.path.join(local(dst), rel))
  sys.exit(0)
if argv[:2] == ["storage", "cp"]:
  os.makedirs(os.path.dirname(local(argv[3])), exist_ok=True)
  shutil.copy(argv[2], local(argv[3]))
  sys.exit(0)
print("stub gcloud: unexpected", argv, file=sys.stderr)
sys.exit(99)
'''

_GIT = r'''
argv = sys.argv[1:]
if argv[0] == "clone":
  os.makedirs(os.path.join(argv[-1], ".git"))
elif argv[:2] == ["rev-parse", "--short"]:
  print("abc1234")
'''

# uv: `venv PATH` installs the stub trainer as PATH/bin/python.
_UV = r'''
import shutil
argv = sys.argv[1:]
if argv[0] == "venv":
  os.makedirs(os.path.join(argv[-1], "bin"))
  shutil.copy(os.environ["STUB_TRAINER"], os.path.join(argv[-1], "bin", "python"))
'''

_CURL = r'''
print(os.environ["FAKE_WORKER_ID"])
'''


def _write_exe(path: Path, text: str) -> Path:
  path.write_text(text)
  path.chmod(0o755)
  return path


@pytest.fixture
def stubs(tmp_path):
  """A bin folder of stubs, the call log they write, and cleanup of anything a test started."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  out = tmp_path / "out"
  out.mkdir()
  python = sys.executable
  trainer = _write_exe(tmp_path / "stub_trainer.py", _TRAINER.replace("{python}", python))
  for name, behaviour in dict(gcloud=_GCLOUD, git=_GIT, uv=_UV, curl=_CURL, srun=_SRUN,
                              sbatch="", scontrol="").items():
    _write_exe(bin_dir / name,
               _RECORDER.replace("{python}", python).replace("{behaviour}", behaviour))
  log = tmp_path / "calls.jsonl"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log),
             STUB_OUT=str(out), STUB_TRAINER=str(trainer), FAKE_ROOT=str(tmp_path / "fake"),
             RECFUSION_TRAINER=str(trainer), SWEEP_GRACE_S="1")
  for key in ("DRY_RUN", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "REPO", "WORKDIR", "DATA_DIR", "CONFIG"):
    env.pop(key, None)

  class Stubs:
    pass

  s = Stubs()
  s.env, s.log, s.out, s.tmp, s.trainer = env, log, out, tmp_path, trainer

  def calls(tool=None):
    if not log.exists():
      return []
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [r for r in rows if tool is None or r["tool"] == tool]

  s.calls = calls
  yield s
  for record in _trainer_records(tmp_path):
    for pid in [record["pid"], *record["children"]]:
      for kill in (lambda p: os.killpg(p, signal.SIGKILL), lambda p: os.kill(p, signal.SIGKILL)):
        try:
          kill(pid)
        except (ProcessLookupError, PermissionError):
          pass


def _trainer_records(root: Path) -> list[dict]:
  records = []
  for path in glob.glob(str(root / "**" / "trainer-*.json"), recursive=True):
    with open(path) as f:
      records.append(json.load(f))
  return records


def _alive(pid: int) -> bool:
  """True for a live process; zombies (exited, not reaped by a container's init) are dead."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def _wait_for(predicate, timeout_s: float = READY_TIMEOUT_S, what: str = "condition"):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(0.05)
  raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _records_by_id(root: Path) -> dict[str, dict]:
  return {r["id"]: r for r in _trainer_records(root)}


def _assert_nothing_survives(root: Path):
  survivors = []
  for record in _trainer_records(root):
    for pid in [record["pid"], *record["children"]]:
      if _alive(pid):
        survivors.append(pid)
  # The sweep after each exit is bounded (SWEEP_GRACE_S=1 here); allow it to finish.
  deadline = time.monotonic() + 10
  while survivors and time.monotonic() < deadline:
    time.sleep(0.1)
    survivors = [p for p in survivors if _alive(p)]
  assert not survivors, f"processes outlived the launcher: {survivors}"


def _run(script: str, env: dict, *args: str, timeout: float = EXIT_TIMEOUT_S):
  return subprocess.run(["bash", str(REPO / "launch" / script), *args], env=env,
                        capture_output=True, text=True, timeout=timeout)


def _start(script: str, env: dict, *args: str) -> subprocess.Popen:
  # A launcher started with SIGINT ignored (inherited: a test run started as `cmd &` from a
  # script) cannot trap it, so the SIGINT tests would test the parent, not the launcher. A
  # Python-level handler is reset to the default by exec; SIG_IGN would be inherited.
  previous = signal.getsignal(signal.SIGINT)
  if previous is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    return subprocess.Popen(["bash", str(REPO / "launch" / script), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
  finally:
    signal.signal(signal.SIGINT, previous)


def _signal_state(pid: int) -> str:
  """The ignored/blocked/caught signal masks of a live process (for a failure message)."""
  try:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
  except OSError as e:
    return f"(no /proc status: {e})"
  masks = [line.replace("\t", "") for line in lines
           if line.startswith(("SigBlk", "SigIgn", "SigCgt"))]
  return " ".join(masks)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
  try:
    stdout, stderr = proc.communicate(timeout=EXIT_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    state = _signal_state(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate()
    raise AssertionError(f"launcher did not exit ({state}):\n{stdout}\n{stderr}")
  return proc.returncode, stdout, stderr


def _dry_lines(stdout: str) -> list[list[str]]:
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


# ------------------------------------------------------------------ local_multiprocess.sh


def test_local_dry_run_prints_one_command_per_process(stubs):
  env = dict(stubs.env, DRY_RUN="1", NUM_PROCESSES="3", DEVICES_PER_PROCESS="2",
             WORKDIR=str(stubs.tmp / "run"), PORT="23456")
  result = _run("local_multiprocess.sh", env, "--config.num_steps=7")
  assert result.returncode == 0, result.stderr
  lines = _dry_lines(result.stdout)
  assert len(lines) == 3
  for i, words in enumerate(lines):
    assert words[0] == "env"
    assert {"JAX_PLATFORMS=cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo",
            "XLA_FLAGS=--xla_force_host_platform_device_count=2",
            "JAX_COORDINATOR_ADDRESS=127.0.0.1:23456", "JAX_NUM_PROCESSES=3",
            f"JAX_PROCESS_ID={i}"} <= set(words)
    command = words[words.index("setsid") + 1:]
    assert "--distributed" in command and "--config.num_steps=7" in command
    assert command[command.index(">") + 1] == f"{stubs.tmp}/run.process{i}.log"
  assert not _trainer_records(stubs.tmp), "DRY_RUN started a process"


@pytest.mark.parametrize("term_exits,expected", [({}, PREEMPTED), ({"STUB_TERM_EXIT_1": "3"}, 3)])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_local_signal_reaches_every_process(stubs, sig, term_exits, expected):
  env = dict(stubs.env, WORKDIR=str(stubs.tmp / "run"), **term_exits)
  proc = _start("local_multiprocess.sh", env)
  _wait_for(lambda: len(_trainer_records(stubs.out)) == 2, what="2 stub trainers")
  os.kill(proc.pid, sig)
  status, _, stderr = _finish(proc)
  assert status == expected, stderr
  records = _records_by_id(stubs.out)
  assert [records[i]["signals"] for i in "01"] == [[sig.name], [sig.name]], stderr
  for i in "01":  # each trainer led its own session, apart from the launcher
    assert records[i]["sid"] == records[i]["pid"] == records[i]["pgid"]
    assert records[i]["env"]["JAX_PROCESS_ID"] == i
  assert f"got {sig.name}" in stderr
  _assert_nothing_survives(stubs.tmp)


def test_local_failed_process_stops_the_others_within_30s(stubs):
  # Process 1 fails; process 0 ignores SIGTERM (as when blocked in a collective with a dead peer)
  # and must be killed by the launcher.
  env = dict(stubs.env, WORKDIR=str(stubs.tmp / "run"), STUB_EXIT_1="7", STUB_EXIT_DELAY="1",
             STUB_IGNORE_TERM_0="1", PEER_GRACE_S="3")
  proc = _start("local_multiprocess.sh", env)
  status, _, stderr = _finish(proc)
  end = time.time()
  assert status == 7, stderr
  records = _records_by_id(stubs.out)
  assert end - records["1"]["exit_time"] < 30
  assert records["0"]["signals"] == ["SIGTERM"]
  assert "process 1" in stderr and "failed with exit 7" in stderr
  assert "stopping the other 1 process(es)" in stderr
  assert re.search(r"process 0 \(pid \d+\) still running after SIGTERM; killing", stderr), stderr
  assert "exit 7: process 1 failed with exit 7" in stderr
  _assert_nothing_survives(stubs.tmp)


def test_local_dead_peer_ends_the_others_within_30s(stubs):
  env = dict(stubs.env, WORKDIR=str(stubs.tmp / "run"), NUM_PROCESSES="3", PEER_GRACE_S="3")
  proc = _start("local_multiprocess.sh", env)
  _wait_for(lambda: len(_trainer_records(stubs.out)) == 3, what="3 stub trainers")
  victim = _records_by_id(stubs.out)["2"]["pid"]
  os.kill(victim, signal.SIGKILL)
  killed_at = time.time()
  status, _, stderr = _finish(proc)
  assert time.time() - killed_at < 30
  assert status == 128 + signal.SIGKILL, stderr
  assert f"process 2 (pid {victim}) killed by SIGKILL" in stderr
  records = _records_by_id(stubs.out)
  assert records["0"]["signals"] == records["1"]["signals"] == ["SIGTERM"]
  _assert_nothing_survives(stubs.tmp)


def test_local_second_signal_kills_at_once(stubs):
  env = dict(stubs.env, WORKDIR=str(stubs.tmp / "run"), STUB_IGNORE_TERM="1",
             SHUTDOWN_GRACE_S="600")
  proc = _start("local_multiprocess.sh", env)
  _wait_for(lambda: len(_trainer_records(stubs.out)) == 2, what="2 stub trainers")
  os.kill(proc.pid, signal.SIGTERM)
  _wait_for(lambda: all(r["signals"] for r in _trainer_records(stubs.out)), what="forwarding")
  os.kill(proc.pid, signal.SIGTERM)
  status, _, stderr = _finish(proc)
  assert status == 128 + signal.SIGKILL, stderr
  assert "second signal: killing 2 process group(s) now" in stderr
  _assert_nothing_survives(stubs.tmp)


def test_local_success_exits_zero_and_sweeps_leftovers(stubs):
  env = dict(stubs.env, WORKDIR=str(stubs.tmp / "run"), STUB_EXIT="0")
  status, _, stderr = _finish(_start("local_multiprocess.sh", env))
  assert status == 0, stderr
  assert stderr.count("finished") == 2
  _assert_nothing_survives(stubs.tmp)


# ------------------------------------------------------------------ multi_gpu.sh


def test_multi_gpu_dry_run_single_process_drives_all_gpus(stubs):
  env = dict(stubs.env, DRY_RUN="1", NUM_GPUS="8", WORKDIR="/data/run1",
             JAX_COORDINATOR_ADDRESS="stale:1")
  del env["RECFUSION_TRAINER"]  # the real trainer command
  result = _run("multi_gpu.sh", env, "--config.batch_size=64")
  assert result.returncode == 0, result.stderr
  (words,) = _dry_lines(result.stdout)
  assert not any(w.startswith(("JAX_", "CUDA_VISIBLE_DEVICES")) for w in words)
  command = words[words.index("setsid") + 1:]
  assert command[:8] == ["python", "-m", "recfusion_jax.main", "--config", "configs/pod.py",
                         "--workdir", "/data/run1", "--nodistributed"]
  assert "--config.batch_size=64" in command


def test_multi_gpu_dry_run_process_per_gpu_on_two_nodes(stubs):
  env = dict(stubs.env, DRY_RUN="1", NUM_GPUS="4", PROCESSES_PER_NODE="2", NUM_NODES="2",
             NODE_RANK="1", COORDINATOR="node0:1234", WORKDIR="/shared/run",
             DATA_DIR="/shared/data")
  result = _run("multi_gpu.sh", env)
  assert result.returncode == 0, result.stderr
  lines = _dry_lines(result.stdout)
  assert len(lines) == 2
  for local_rank, words in enumerate(lines):
    assert {f"CUDA_VISIBLE_DEVICES={2 * local_rank},{2 * local_rank + 1}",
            "JAX_COORDINATOR_ADDRESS=node0:1234", "JAX_NUM_PROCESSES=4",
            f"JAX_PROCESS_ID={2 + local_rank}"} <= set(words)
    assert "--distributed" in words and "--config.data.dir=/shared/data" in words


@pytest.mark.parametrize("env_extra,message", [
    (dict(NUM_GPUS="4", PROCESSES_PER_NODE="3"), "does not divide NUM_GPUS=4"),
    (dict(NUM_GPUS="4", NUM_NODES="2", NODE_RANK="0"), "set COORDINATOR"),
    (dict(NUM_GPUS="4", NODE_RANK="1"), "NODE_RANK must be in [0, 1)"),
])
def test_multi_gpu_rejects_bad_layouts(stubs, env_extra, message):
  result = _run("multi_gpu.sh", dict(stubs.env, WORKDIR="/tmp/x", **env_extra))
  assert result.returncode == 2 and message in result.stderr, result.stderr


def test_multi_gpu_processes_get_their_gpu_and_rank(stubs):
  env = dict(stubs.env, NUM_GPUS="2", PROCESSES_PER_NODE="2", WORKDIR=str(stubs.tmp / "run"),
             STUB_EXIT="0")
  status, _, stderr = _finish(_start("multi_gpu.sh", env))
  assert status == 0, stderr
  records = _records_by_id(stubs.out)
  for i in "01":
    assert records[i]["env"]["CUDA_VISIBLE_DEVICES"] == i
    assert records[i]["env"]["JAX_NUM_PROCESSES"] == "2"
    assert records[i]["env"]["JAX_COORDINATOR_ADDRESS"].startswith("127.0.0.1:")
    assert (stubs.tmp / "run.logs" / f"process{i}.log").read_text().startswith("stub trainer")
  _assert_nothing_survives(stubs.tmp)


# ------------------------------------------------------------------ SLURM


def _slurm_env(stubs, **extra):
  return dict(stubs.env, SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(REPO), SLURM_NTASKS="16",
              SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_STEP_NODELIST="gpu[001-002]",
              SLURM_JOB_NUM_NODES="2", WORKDIR="/shared/run", LOG_DIR=str(stubs.tmp / "logs"),
              JAX_COORDINATOR_ADDRESS="stale:1", JAX_NUM_PROCESSES="3", JAX_PROCESS_ID="1",
              **extra)


def test_slurm_submit_dry_run_and_real(stubs):
  env = dict(stubs.env, NODES="2", GPUS_PER_NODE="4", PARTITION="gpu", ACCOUNT="proj",
             WORKDIR="/shared/run", DATA_DIR="/shared/data", LOG_DIR=str(stubs.tmp / "logs"))
  dry = _run("slurm_gpu.sh", dict(env, DRY_RUN="1"), "--config.num_steps=5")
  assert dry.returncode == 0, dry.stderr
  assert not stubs.calls("sbatch") and not (stubs.tmp / "logs").exists()
  (printed,) = _dry_lines(dry.stdout)
  real = _run("slurm_gpu.sh", env, "--config.num_steps=5")
  assert real.returncode == 0, real.stderr
  (call,) = stubs.calls("sbatch")
  assert ["sbatch", *call["argv"]] == printed
  assert {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
          "--account=proj", "--export=ALL"} <= set(call["argv"])
  assert call["argv"][-2:] == ["launch/slurm.sbatch", "--config.num_steps=5"]
  assert call["cwd"] == str(REPO)
  assert (call["env"]["WORKDIR"], call["env"]["DATA_DIR"]) == ("/shared/run", "/shared/data")
  assert (stubs.tmp / "logs").is_dir()  # sbatch's --output folder must exist beforehand


def test_slurm_batch_script_uses_srun_and_jax_auto_detection(stubs):
  result = _run("slurm.sbatch", _slurm_env(stubs), "--config.num_steps=5")
  assert result.returncode == 0, result.stderr
  (call,) = stubs.calls("srun")
  argv = call["argv"]
  assert "--kill-on-bad-exit=0" in argv and "--wait=30" in argv
  assert f"--output={stubs.tmp}/logs/4242.task%t.log" in argv
  trainer = argv[argv.index(stubs.env["RECFUSION_TRAINER"]):]
  assert trainer[1:] == ["--config", "configs/pod.py", "--workdir", "/shared/run",
                         "--distributed", "--config.num_steps=5"]
  # JAX must find coordinator and ranks in SLURM_*: nothing hand-set may shadow them.
  assert not {"JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"} & set(call["env"])
  assert call["env"]["SLURM_STEP_NODELIST"] == "gpu[001-002]"
  assert not stubs.calls("scontrol")


@pytest.mark.parametrize("srun_exit,restarts,requeued", [
    (PREEMPTED, "0", True), (PREEMPTED, "20", False), (1, "0", False)])
def test_slurm_requeues_on_the_preempted_code_only(stubs, srun_exit, restarts, requeued):
  env = _slurm_env(stubs, STUB_SRUN_EXIT=str(srun_exit), SLURM_RESTART_COUNT=restarts)
  result = _run("slurm.sbatch", env)
  assert result.returncode == srun_exit, result.stderr
  calls = [c["argv"] for c in stubs.calls("scontrol")]
  assert calls == ([["requeue", "4242"]] if requeued else []), result.stderr


def test_slurm_batch_shell_forwards_sigterm_to_srun(stubs):
  env = _slurm_env(stubs, STUB_SRUN_SLEEP="600")
  proc = _start("slurm.sbatch", env)
  _wait_for(lambda: Path(str(stubs.log) + ".srun-ready").exists(), what="stub srun")
  os.kill(proc.pid, signal.SIGTERM)
  status, _, stderr = _finish(proc)
  assert status == PREEMPTED, stderr
  assert [c["argv"] for c in stubs.calls("srun-signal")] == [["SIGTERM"]]
  assert [c["argv"] for c in stubs.calls("scontrol")] == [["requeue", "4242"]]


def test_slurm_batch_script_refuses_to_run_outside_slurm(stubs):
  result = _run("slurm.sbatch", dict(stubs.env, WORKDIR="/shared/run"))
  assert result.returncode == 2 and "not inside a SLURM job" in result.stderr
  assert not stubs.calls()


def test_slurm_dry_run_prints_srun_and_requeue(stubs):
  result = _run("slurm.sbatch", dict(stubs.env, DRY_RUN="1", WORKDIR="/shared/run"))
  assert result.returncode == 0, result.stderr
  srun, requeue = _dry_lines(result.stdout)
  assert srun[0] == "srun" and "--distributed" in srun and requeue[:2] == ["scontrol", "requeue"]
  assert not stubs.calls()


# ------------------------------------------------------------------ tpu_pod.sh

_TPU = dict(REPO="https://example.org/team/recfusion-jax.git", BRANCH="dev", TPU_NAME="my-v5e-64",
            ZONE="us-west4-a", PROJECT="my-project", WORKDIR="gs://bucket/runs/r1",
            DATA_DIR="gs://bucket/data/pod", CONFIG="configs/pod.py")


@pytest.mark.parametrize("missing,message", [
    ("REPO", "set REPO to the git URL"), ("TPU_NAME", "set TPU_NAME"), ("ZONE", "set ZONE")])
def test_tpu_requires_its_variables(stubs, missing, message):
  env = dict(stubs.env, **{k: v for k, v in _TPU.items() if k != missing})
  result = _run("tpu_pod.sh", env, "start")
  assert result.returncode != 0 and message in result.stderr, result.stderr
  assert not stubs.calls()


def test_tpu_requires_gs_paths(stubs):
  result = _run("tpu_pod.sh", dict(stubs.env, **dict(_TPU, WORKDIR="/home/me/run")))
  assert result.returncode == 2 and "set WORKDIR to a gs:// path" in result.stderr
  assert not stubs.calls()


def test_tpu_dry_run_prints_the_gcloud_commands(stubs):
  env = dict(stubs.env, DRY_RUN="1", **_TPU)
  result = _run("tpu_pod.sh", env, "start", "--config.num_steps=1000", "--config.note=a b")
  assert result.returncode == 0, result.stderr
  assert not stubs.calls(), "DRY_RUN ran something"
  heads = [line for line in result.stdout.splitlines() if line.startswith("+ gcloud")]
  base = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5e-64", "--zone", "us-west4-a",
          "--project", "my-project"]
  workers = []
  for line in heads:
    words = shlex.split(line[2:].split(" --command ")[0])
    assert words[:-1] == base
    workers.append(words[-1])
  assert workers == ["--worker=all", "--worker=0", "--worker=all"]
  scripts = result.stdout.split("+ gcloud")[1:]
  for step, script in zip(["do_setup", "do_data", "do_launch"], scripts):
    assert script.rstrip().endswith(f"{step}\nSCRIPT\n)\"")
    assert "BRANCH=dev\n" in script and "REPO=https://example.org/team/recfusion-jax.git" in script
  assert 'git fetch origin && git checkout "$BRANCH" && git pull --ff-only origin "$BRANCH"' in \
      scripts[0]
  assert "setsid nohup bash" in scripts[2]
  # The printed commands are runnable as they stand: the stub gcloud receives the same argv.
  replay = subprocess.run(["bash", "-c", result.stdout.replace("+ gcloud", "gcloud")],
                          env=dict(stubs.env, FAKE_SSH_RECORD_ONLY="1"),
                          capture_output=True, text=True, timeout=EXIT_TIMEOUT_S)
  assert replay.returncode == 0, replay.stderr
  replayed = stubs.calls("gcloud")
  assert [c["argv"][:-2] for c in replayed] == [shlex.split(h[2:].split(" --command ")[0])[1:]
                                                for h in heads]
  launch_script = replayed[2]["argv"][-1]
  assert "TRAIN_ARGS=" in launch_script
  train_args = re.search(r"^TRAIN_ARGS=(.*)$", launch_script, re.M).group(1)
  assert shlex.split(shlex.split(train_args)[0]) == ["--config.num_steps=1000",
                                                     "--config.note=a b"]


def _tpu_env(stubs, **extra):
  return dict(stubs.env, FAKE_WORKERS="2", STOP_TIMEOUT_S="20", **dict(_TPU, **extra))


def test_tpu_pod_start_stop_restart_on_fake_workers(stubs):
  build = ('mkdir -p "$DATA_OUT/items" && echo 1 > "$DATA_OUT/items/part-0" && '
           'echo "{}" > "$DATA_OUT/manifest.json" && echo built >> "$HOME/builds"')
  env = _tpu_env(stubs, DATA_BUILD=build)
  fake = stubs.tmp / "fake"
  result = _run("tpu_pod.sh", env, "start", "--config.num_steps=1000", "--config.note=a b")
  assert result.returncode == 0, result.stdout + result.stderr
  ssh = [c["argv"] for c in stubs.calls("gcloud") if c["argv"][0] == "compute"]
  assert [a for argv in ssh for a in argv if a.startswith("--worker=")] == \
      ["--worker=all", "--worker=0", "--worker=all"]

  # Setup: a clone of REPO at BRANCH, and only the core package + jax[tpu] (+ gcsfs) installed.
  for w in "01":
    home = fake / f"worker{w}"
    clone = [c["argv"] for c in stubs.calls("git")
             if c["argv"][0] == "clone" and c["env"]["HOME"] == str(home)]
    assert clone == [["clone", "--branch", "dev", _TPU["REPO"], f"{home}/recfusion-jax"]]
    installs = [c["argv"] for c in stubs.calls("uv")
                if c["argv"][0] == "pip" and c["env"]["HOME"] == str(home)]
    assert installs[0][-4:] == ["-e", f"{home}/recfusion-jax", "jax[tpu]==0.10.2", "gcsfs"]
    assert not any(re.search(r"torch|tensorflow", a) for argv in installs[:1] for a in argv)
    # Data extras (TensorFlow etc.) only where the data set is built: worker 0.
    assert (len(installs) == 2) == (w == "0")
  # Data: built once, on worker 0, uploaded with the manifest last.
  assert (fake / "worker0" / "builds").read_text() == "built\n"
  assert not (fake / "worker1" / "builds").exists()
  assert (fake / "gcs/bucket/data/pod/items/part-0").read_text() == "1\n"
  storage = [c["argv"] for c in stubs.calls("gcloud") if c["argv"][0] == "storage"]
  build_dir = f"{fake}/worker0/recfusion-data-build"
  assert storage == [
      ["storage", "ls", "gs://bucket/data/pod/manifest.json"],
      ["storage", "rsync", "--recursive", r"--exclude=^manifest\.json$", build_dir,
       "gs://bucket/data/pod"],
      ["storage", "cp", f"{build_dir}/manifest.json", "gs://bucket/data/pod/manifest.json"]]
  # Launch: one detached trainer per worker, with its own session, log and pid file.
  records = _wait_for(lambda: len(_trainer_records(fake)) == 2 and _records_by_id(fake),
                      what="2 trainers")
  for w in "01":
    rec, run_dir = records[w], fake / f"worker{w}" / "recfusion-run"
    assert rec["argv"] == ["--config", "configs/pod.py", "--workdir", "gs://bucket/runs/r1",
                           "--config.data.dir=gs://bucket/data/pod", "--distributed",
                           "--config.num_steps=1000", "--config.note=a b"]
    assert int((run_dir / "trainer.pid").read_text()) == rec["pid"] and _alive(rec["pid"])
    assert rec["sid"] == int((run_dir / "session.pid").read_text()) != os.getsid(0)
    assert "stub trainer" in _wait_for(lambda: (run_dir / f"worker-{w}.log").read_text(),
                                       what="log")
  status = _run("tpu_pod.sh", env, "status")
  assert status.returncode == 0 and status.stdout.count("running (pid") == 2, status.stdout
  again = _run("tpu_pod.sh", env, "launch")
  assert again.returncode != 0 and "a trainer is already running" in again.stderr

  stop = _run("tpu_pod.sh", env, "stop")
  assert stop.returncode == 0, stop.stderr
  assert stop.stdout.count("stopped; stopped after saving a checkpoint") == 2, stop.stdout
  for w in "01":
    assert (fake / f"worker{w}" / "recfusion-run" / "exit_code").read_text() == "75\n"
    assert _records_by_id(fake)[w]["signals"] == ["SIGTERM"]
  _assert_nothing_survives(fake)
  status = _run("tpu_pod.sh", env, "status")
  assert status.stdout.count("not running; stopped after saving a checkpoint: run "
                             "'launch/tpu_pod.sh start' again to resume") == 2, status.stdout

  # Rerun: pulls the branch, keeps the data, starts the trainers again (they resume by themselves).
  first_pids = {r["pid"] for r in _trainer_records(fake)}
  rerun = _run("tpu_pod.sh", env, "start")
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  for w in "01":
    home = str(fake / f"worker{w}")
    git = [c["argv"] for c in stubs.calls("git") if c["env"]["HOME"] == home
           and c["argv"][0] != "rev-parse"]
    assert git[-3:] == [["fetch", "origin"], ["checkout", "dev"],
                        ["pull", "--ff-only", "origin", "dev"]]
  assert (fake / "worker0" / "builds").read_text() == "built\n"
  _wait_for(lambda: len(_trainer_records(fake)) == 4, what="restarted trainers")
  new = [r for r in _trainer_records(fake) if r["pid"] not in first_pids]
  assert all(_alive(r["pid"]) for r in new)
  assert _run("tpu_pod.sh", env, "stop").returncode == 0
  _assert_nothing_survives(fake)


def test_tpu_data_step_fails_clearly_without_data_or_build(stubs):
  result = _run("tpu_pod.sh", _tpu_env(stubs), "start")
  assert result.returncode != 0
  assert "manifest.json does not exist and DATA_BUILD is empty" in result.stderr
  assert not _trainer_records(stubs.tmp / "fake"), "trained without data"


def test_tpu_uses_data_already_built(stubs):
  manifest = stubs.tmp / "fake/gcs/bucket/data/pod/manifest.json"
  manifest.parent.mkdir(parents=True)
  manifest.write_text("{}")
  result = _run("tpu_pod.sh", _tpu_env(stubs, DATA_BUILD="exit 1"), "data")
  assert result.returncode == 0, result.stderr
  assert "[worker 0] data set present: gs://bucket/data/pod" in result.stdout
  ssh = [c["argv"] for c in stubs.calls("gcloud") if c["argv"][0] == "compute"]
  assert len(ssh) == 1 and "--worker=0" in ssh[0]
  assert [c["argv"][:2] for c in stubs.calls("gcloud")[1:]] == [["storage", "ls"]]
