#!/usr/bin/env bash
# Train on every host of a Cloud TPU VM slice (single host or pod), driven from your machine
# over `gcloud compute tpus tpu-vm ssh --worker=...`. See docs/LAUNCHING.md.
#
#   REPO=https://github.com/ORG/recfusion-jax.git TPU_NAME=my-v5e-64 ZONE=us-west4-a \
#   WORKDIR=gs://BUCKET/recfusion/run1 DATA_DIR=gs://BUCKET/recfusion/data \
#   bash launch/tpu_pod.sh start [--config.key=value ...]
#
# Subcommands:
#   start   setup, then data, then launch (the default). Rerun it after a preemption, a stop or a
#           crash: it pulls BRANCH and the trainer resumes from WORKDIR's latest checkpoint.
#   setup   on every worker: clone REPO (or git fetch && git checkout BRANCH && git pull), create
#           a Python venv with uv, install the package (core only) + jax[tpu] + gcsfs.
#   data    on worker 0 only: if DATA_DIR/manifest.json is missing, run DATA_BUILD into a local
#           folder ($DATA_OUT) and upload it to DATA_DIR (manifest last, so it marks completion).
#   launch  on every worker: start the trainer detached (setsid nohup), pid and log per worker.
#   status  on every worker: running or not, the last exit code and what it means, the log tail.
#   logs    the last LOG_LINES (50) lines of the log of WORKER (default all).
#   stop    SIGTERM to every trainer (it saves a checkpoint and exits 75), SIGKILL to its whole
#           process group after STOP_TIMEOUT_S (300).
#
# Variables (required: REPO, TPU_NAME, ZONE, WORKDIR, DATA_DIR for start/setup/data/launch):
#   REPO, BRANCH (main)            what the workers run; a rerun pulls BRANCH again
#   TPU_NAME, ZONE, PROJECT        the slice (PROJECT: gcloud's default project when unset)
#   WORKDIR, DATA_DIR              gs:// paths: checkpoints/metrics, and the built data set
#   CONFIG (configs/pod.py)        trainer config; further trainer flags follow the subcommand
#   DATA_BUILD                     shell command run on worker 0 (in the repository, venv on
#                                  PATH) that writes a data set into $DATA_OUT; only needed when
#                                  DATA_DIR has no manifest.json yet
#   DATA_EXTRAS (data)             setup.py extras installed on worker 0 for DATA_BUILD only
#   PYTHON_VERSION (3.11), JAX_TPU ("jax[tpu]==0.10.2"), EXTRA_PIP (gcsfs)
#   REMOTE_DIR (~/recfusion-jax), VENV (~/recfusion-venv), RUN_DIR (~/recfusion-run)
#   GCLOUD_SSH_FLAGS               extra flags for `gcloud ... ssh`, e.g. --tunnel-through-iap
#   DRY_RUN=1                      print the gcloud commands (and the remote scripts), run nothing
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh

ACTION=start
case ${1:-} in
  start | setup | data | launch | status | logs | stop) ACTION=$1; shift ;;
  -*) ;;  # trainer flags straight away: start
  "") ;;
  *) rf_die "unknown subcommand '$1' (start, setup, data, launch, status, logs, stop)" ;;
esac

: "${TPU_NAME:?set TPU_NAME (the TPU VM / pod slice name)}"
: "${ZONE:?set ZONE (zone of the slice, e.g. us-west4-a)}"
BRANCH=${BRANCH:-main}
CONFIG=${CONFIG:-configs/pod.py}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
JAX_TPU=${JAX_TPU:-jax[tpu]==0.10.2}
# etils.epath reaches gs:// through fsspec + gcsfs when TensorFlow is not installed.
EXTRA_PIP=${EXTRA_PIP:-gcsfs}
DATA_EXTRAS=${DATA_EXTRAS-data}
# Remote paths stay unexpanded here ('~' is the worker's home).
REMOTE_DIR=${REMOTE_DIR:-'~/recfusion-jax'}
VENV=${VENV:-'~/recfusion-venv'}
RUN_DIR=${RUN_DIR:-'~/recfusion-run'}
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-300}
LOG_LINES=${LOG_LINES:-50}
WORKER=${WORKER:-all}
read -r -a SSH_FLAGS <<< "${GCLOUD_SSH_FLAGS:-}"

case $ACTION in
  start | setup | data | launch)
    [[ -n ${REPO:-} ]] || rf_die "set REPO to the git URL the TPU workers clone (e.g. REPO=https://github.com/ORG/recfusion-jax.git); there is no default"
    ;;
esac
case $ACTION in
  start | data | launch)
    [[ ${WORKDIR:-} == gs://* ]] || rf_die "set WORKDIR to a gs:// path (every worker writes checkpoints there), got '${WORKDIR:-}'"
    [[ ${DATA_DIR:-} == gs://* ]] || rf_die "set DATA_DIR to a gs:// path (the data set every worker reads), got '${DATA_DIR:-}'"
    ;;
esac
if [[ $ACTION != start && $ACTION != launch ]] && (($#)); then
  rf_die "trainer flags only go with start or launch, got: $*"
fi

# Values for the remote side, shell-quoted; '~' paths are expanded there.
remote_header() {
  local name
  echo "set -euo pipefail"
  for name in REPO BRANCH CONFIG WORKDIR DATA_DIR DATA_BUILD DATA_EXTRAS PYTHON_VERSION \
      JAX_TPU EXTRA_PIP STOP_TIMEOUT_S LOG_LINES RECFUSION_EXIT_PREEMPTED; do
    printf '%s=%q\n' "$name" "${!name:-}"
  done
  local path
  for name in REMOTE_DIR VENV RUN_DIR; do
    path=${!name}
    if [[ $path == '~/'* ]]; then
      printf '%s="$HOME"/%q\n' "$name" "${path#'~/'}"
    else
      printf '%s=%q\n' "$name" "$path"
    fi
  done
  local args=""
  (($#)) && args=$(printf '%q ' "$@") && args=${args% }
  printf 'TRAIN_ARGS=%q\n' "$args"
}

# What runs on the workers. Static text: every value comes from remote_header.
read -r -d '' REMOTE_LIB <<'REMOTE' || true
W=$(curl -sf -H 'Metadata-Flavor: Google' \
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
  2>/dev/null || hostname)
say() { echo "[worker $W] $*"; }
fail() { echo "[worker $W] error: $*" >&2; exit 1; }
uv_bin() {
  command -v uv 2>/dev/null && return
  [ -x "$HOME/.local/bin/uv" ] || python3 -m pip install --user -q uv \
    || curl -LsSf https://astral.sh/uv/install.sh | sh >&2
  echo "$HOME/.local/bin/uv"
}
trainer_alive() {
  [ -f "$RUN_DIR/trainer.pid" ] && kill -0 "$(cat "$RUN_DIR/trainer.pid")" 2>/dev/null
}
describe_exit() {
  case $1 in
    0) echo "finished" ;;
    "$RECFUSION_EXIT_PREEMPTED") echo "stopped after saving a checkpoint: run 'launch/tpu_pod.sh start' again to resume" ;;
    *) echo "failed (exit $1): see the log; 'launch/tpu_pod.sh start' resumes from the last checkpoint" ;;
  esac
}

do_setup() {
  if [ -d "$REMOTE_DIR/.git" ]; then
    cd "$REMOTE_DIR"
    git fetch origin && git checkout "$BRANCH" && git pull --ff-only origin "$BRANCH"
  else
    git clone --branch "$BRANCH" "$REPO" "$REMOTE_DIR"
    cd "$REMOTE_DIR"
  fi
  say "code at $(git rev-parse --short HEAD) ($BRANCH)"
  local uv
  uv=$(uv_bin)
  [ -x "$VENV/bin/python" ] || "$uv" venv --python "$PYTHON_VERSION" "$VENV"
  # Training needs the core package only: no TensorFlow, no torch on the workers.
  "$uv" pip install --python "$VENV/bin/python" -e "$REMOTE_DIR" "$JAX_TPU" $EXTRA_PIP
}

do_data() {
  if gcloud storage ls "$DATA_DIR/manifest.json" > /dev/null 2>&1; then
    say "data set present: $DATA_DIR"
    return
  fi
  [ -n "$DATA_BUILD" ] || fail "$DATA_DIR/manifest.json does not exist and DATA_BUILD is empty: set DATA_BUILD to the command that writes the data set into \$DATA_OUT, or point DATA_DIR at a built one"
  cd "$REMOTE_DIR"
  if [ -n "$DATA_EXTRAS" ]; then
    "$(uv_bin)" pip install --python "$VENV/bin/python" -e "${REMOTE_DIR}[${DATA_EXTRAS}]"
  fi
  export DATA_OUT="$HOME/recfusion-data-build"
  rm -rf "$DATA_OUT" && mkdir -p "$DATA_OUT"
  say "building the data set: $DATA_BUILD"
  PATH="$VENV/bin:$PATH" bash -c "$DATA_BUILD"
  [ -f "$DATA_OUT/manifest.json" ] || fail "DATA_BUILD finished without writing $DATA_OUT/manifest.json"
  gcloud storage rsync --recursive --exclude='^manifest\.json$' "$DATA_OUT" "$DATA_DIR"
  gcloud storage cp "$DATA_OUT/manifest.json" "$DATA_DIR/manifest.json"
  say "data set uploaded: $DATA_DIR"
}

do_launch() {
  mkdir -p "$RUN_DIR"
  if trainer_alive; then
    fail "a trainer is already running (pid $(cat "$RUN_DIR/trainer.pid")); 'launch/tpu_pod.sh stop' first"
  fi
  [ -x "$VENV/bin/python" ] || fail "no $VENV: run 'launch/tpu_pod.sh setup' first"
  # The wrapper keeps the trainer's exit code; setsid + nohup detach both from this ssh session.
  cat > "$RUN_DIR/run.sh" << 'RUN'
cd "$REMOTE_DIR"
echo "=== $(date -u +%FT%TZ) worker $W, code $(git rev-parse --short HEAD): $*"
"$VENV/bin/python" -m recfusion_jax.main "$@" &
echo $! > "$RUN_DIR/trainer.pid"
wait $! && code=0 || code=$?
echo "$code" > "$RUN_DIR/exit_code"
echo "=== $(date -u +%FT%TZ) exit $code"
RUN
  rm -f "$RUN_DIR/exit_code" "$RUN_DIR/trainer.pid"
  eval "set -- $TRAIN_ARGS"
  export REMOTE_DIR VENV RUN_DIR W
  local log="$RUN_DIR/worker-$W.log"
  setsid nohup bash "$RUN_DIR/run.sh" --config "$CONFIG" --workdir "$WORKDIR" \
    --config.data.dir="$DATA_DIR" --distributed "$@" >> "$log" 2>&1 < /dev/null &
  echo $! > "$RUN_DIR/session.pid"
  local waited=0
  while [ ! -s "$RUN_DIR/trainer.pid" ] && [ $waited -lt 100 ]; do sleep 0.1; waited=$((waited + 1)); done
  [ -s "$RUN_DIR/trainer.pid" ] || fail "the trainer did not start; see $log"
  say "trainer started (pid $(cat "$RUN_DIR/trainer.pid")), log $log"
}

do_status() {
  local log="$RUN_DIR/worker-$W.log"
  if trainer_alive; then
    say "running (pid $(cat "$RUN_DIR/trainer.pid"))"
  elif [ -f "$RUN_DIR/exit_code" ]; then
    say "not running; $(describe_exit "$(cat "$RUN_DIR/exit_code")")"
  else
    say "not running; no exit code recorded (never launched, or the VM was restarted)"
  fi
  [ ! -f "$log" ] || tail -n 3 "$log" | sed "s/^/[worker $W]   /"
}

do_logs() {
  tail -n "$LOG_LINES" "$RUN_DIR/worker-$W.log" | sed "s/^/[worker $W] /"
}

do_stop() {
  if ! trainer_alive; then
    say "no trainer running"
    return
  fi
  local pid session waited=0
  pid=$(cat "$RUN_DIR/trainer.pid")
  session=$(cat "$RUN_DIR/session.pid")
  kill -TERM "$pid"
  say "sent SIGTERM to the trainer (pid $pid); waiting up to ${STOP_TIMEOUT_S} s for its checkpoint"
  while kill -0 "$pid" 2> /dev/null && [ $waited -lt $((STOP_TIMEOUT_S * 10)) ]; do
    sleep 0.1; waited=$((waited + 1))
  done
  if kill -0 "$pid" 2> /dev/null; then
    say "still running after ${STOP_TIMEOUT_S} s: killing its process group"
    kill -KILL -- "-$session" 2> /dev/null || true
  fi
  # Let run.sh record the exit code, then nothing of the session may stay (Grain workers, the
  # multiprocessing resource tracker).
  waited=0
  while kill -0 "$session" 2> /dev/null && [ $waited -lt 50 ]; do sleep 0.1; waited=$((waited + 1)); done
  if kill -TERM -- "-$session" 2> /dev/null; then
    waited=0
    while kill -0 -- "-$session" 2> /dev/null && [ $waited -lt 20 ]; do
      sleep 0.1; waited=$((waited + 1))
    done
    kill -KILL -- "-$session" 2> /dev/null || true
  fi
  say "stopped; $(describe_exit "$(cat "$RUN_DIR/exit_code" 2> /dev/null || echo 137)")"
}
REMOTE

# One ssh call running one step of REMOTE_LIB on the given worker(s).
ssh_workers() {
  local worker=$1 step=$2
  shift 2
  local script
  script="$(remote_header "$@")"$'\n'"$REMOTE_LIB"$'\n'"do_$step"
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE")
  [[ -z ${PROJECT:-} ]] || cmd+=(--project "$PROJECT")
  cmd+=(--worker="$worker" "${SSH_FLAGS[@]}")
  if [[ ${DRY_RUN:-0} == 1 ]]; then  # copy-pasteable: the script as a quoted here-document
    printf '+'; printf ' %q' "${cmd[@]}"; printf ' --command "$(cat <<'"'"'SCRIPT'"'"'\n'
    printf '%s\nSCRIPT\n)"\n' "$script"
    return 0
  fi
  rf_log "$step on worker(s) $worker of $TPU_NAME"
  "${cmd[@]}" --command "$script"
}

case $ACTION in
  start)
    ssh_workers all setup
    ssh_workers 0 data
    ssh_workers all launch "$@"
    [[ ${DRY_RUN:-0} == 1 ]] || rf_log "started; follow with: $(basename "$0") status | logs | stop"
    ;;
  setup) ssh_workers all setup ;;
  data) ssh_workers 0 data ;;
  launch) ssh_workers all launch "$@" ;;
  status) ssh_workers all status ;;
  logs) ssh_workers "$WORKER" logs ;;
  stop) ssh_workers all stop ;;
esac
