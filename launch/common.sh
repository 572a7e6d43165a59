# Shared by the launchers in this folder; sourced, never run. The supervisor needs bash >= 5.1
# (wait -n with process ids).
#
# Exit codes every launcher and the trainer agree on. The trainer exits with
# RECFUSION_EXIT_PREEMPTED after SIGTERM/SIGINT made it save a checkpoint: "resume me", i.e. run
# the same command again and training continues from that checkpoint.
export RECFUSION_EXIT_PREEMPTED=75  # EX_TEMPFAIL from sysexits.h

# The trainer command; tests replace it with a stub (word-split, so no quoted spaces).
read -r -a RF_TRAINER <<< "${RECFUSION_TRAINER:-python -m recfusion_jax.main}"

RF_NAME=${RF_NAME:-$(basename "$0")}

rf_log() { echo "[$RF_NAME] $*" >&2; }
rf_die() { echo "[$RF_NAME] error: $*" >&2; exit 2; }

# Runs a command, or under DRY_RUN=1 prints it (shell-quoted, copy-pasteable) instead.
rf_run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

rf_require_bash_51() {
  if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
    rf_die "bash >= 5.1 needed (wait -n with process ids), this is $BASH_VERSION"
  fi
}

rf_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# What an exit status means, for the messages.
rf_describe_status() {
  local status=$1
  if ((status == 0)); then
    echo "finished"
  elif ((status == RECFUSION_EXIT_PREEMPTED)); then
    echo "stopped after saving a checkpoint (exit $status: rerun the same command to resume)"
  elif ((status > 128)); then
    echo "killed by SIG$(kill -l $((status - 128)) 2>/dev/null || echo $((status - 128))) (exit $status)"
  else
    echo "failed with exit $status"
  fi
}

# ---------------------------------------------------------------------------------------------
# Process supervisor: starts trainer processes, each in its own session (setsid) so that its
# whole process group (Grain workers, the multiprocessing resource tracker) can be signalled and
# swept; forwards TERM and INT (HUP as TERM) to every trainer; stops the siblings when one
# process fails; exits with the worst status. Written by hand: no launcher in the JAX ecosystem
# supervises local processes this way.
#
#   rf_start NAME LOGFILE [VAR=value ...] -- COMMAND [ARGS...]    (LOGFILE "-": inherit stdout)
#   rf_supervise; status=$?
#
# Knobs: PEER_GRACE_S (default 15): after one process fails (any exit but 0 and 75), how long
# the others get to exit after SIGTERM before their process groups are killed;
# SHUTDOWN_GRACE_S (default 300): the same after the launcher itself got a signal or one process
# exited 75 (time for the trainers to save a checkpoint); a second signal kills at once.
# SWEEP_GRACE_S (default 5): how long leftovers of an exited process get between SIGTERM and
# SIGKILL.
# ---------------------------------------------------------------------------------------------
RF_PIDS=()
RF_LAUNCHER_PID=$BASHPID
declare -A RF_NAME_OF=() RF_LOG_OF=() RF_STATUS_OF=()
RF_ORDER=()  # pids in the order they exited

rf_start() {
  local name=$1 log=$2
  shift 2
  local vars=()
  while (($#)) && [[ $1 != -- ]]; do vars+=("$1"); shift; done
  [[ ${1:-} == -- ]] || rf_die "rf_start: missing -- before the command"
  shift
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '+ env'; printf ' %q' "${vars[@]}" setsid "$@"
    [[ $log == - ]] && printf '\n' || printf ' > %q 2>&1\n' "$log"
    return 0
  fi
  [[ $- != *m* ]] || rf_die "job control must be off (setsid would fork and hide the pid)"
  # The subshell restores SIGINT (bash ignores it in background jobs) and becomes the session
  # leader through setsid's exec, so $! is the trainer's pid, session id and process group id.
  if [[ $log == - ]]; then
    ( trap - INT QUIT; exec env "${vars[@]}" setsid "$@" ) < /dev/null &
  else
    ( trap - INT QUIT; exec env "${vars[@]}" setsid "$@" ) < /dev/null > "$log" 2>&1 &
  fi
  local pid=$!
  # Whatever ends this shell early (a bug, set -e, SIGKILL excepted), no trainer may outlive it.
  trap 'rf_kill_all_groups' EXIT
  # Signals that arrive while the others start are remembered and forwarded by rf_supervise.
  trap 'rf_on_signal TERM' TERM
  trap 'rf_on_signal INT' INT
  trap 'rf_on_signal HUP' HUP
  RF_PIDS+=("$pid")
  RF_NAME_OF[$pid]=$name
  RF_LOG_OF[$pid]=$log
  if [[ $log == - ]]; then rf_log "started $name (pid $pid)"; else rf_log "started $name (pid $pid), log $log"; fi
}

# Signals a process group; falls back to the pid if the group is not there (yet or any more).
rf_signal_group() {
  kill -s "$1" -- "-$2" 2>/dev/null || kill -s "$1" "$2" 2>/dev/null || true
}

rf_group_alive() { kill -0 -- "-$1" 2>/dev/null; }

# After a trainer exited: nothing of its group may outlive it (Grain workers, resource tracker).
rf_sweep_group() {
  local pgid=$1 waited=0
  rf_group_alive "$pgid" || return 0
  rf_signal_group TERM "$pgid"
  while rf_group_alive "$pgid" && ((waited < ${SWEEP_GRACE_S:-5} * 10)); do
    sleep 0.1; ((waited += 1))
  done
  if rf_group_alive "$pgid"; then
    rf_log "leftover processes of ${RF_NAME_OF[$pgid]} (group $pgid) ignored SIGTERM; killing them"
    rf_signal_group KILL "$pgid"
  fi
}

rf_kill_all_groups() {
  # A child forked by this shell (the clock's sleep) can run the EXIT trap if signalled before
  # it execs; only the launcher itself may act on it.
  [[ $BASHPID == "$RF_LAUNCHER_PID" ]] || return 0
  local pid
  for pid in "${RF_PIDS[@]}"; do
    [[ -n ${RF_STATUS_OF[$pid]:-} ]] && ! rf_group_alive "$pid" && continue
    rf_log "launcher exiting: killing what is left of ${RF_NAME_OF[$pid]} (group $pid)"
    rf_signal_group KILL "$pid"
  done
}

RF_PENDING_SIGNAL=""
RF_SIGNALS_SEEN=0
rf_on_signal() { RF_PENDING_SIGNAL=$1; ((RF_SIGNALS_SEEN += 1)); }

rf_supervise() {
  local -a live=("${RF_PIDS[@]}")
  ((${#live[@]})) || return 0
  local stopping="" deadline=0 tick done_pid status pid
  while ((${#live[@]})); do
    # Blocks until a child exits, a trapped signal arrives or the clock child (a short sleep;
    # wait -n has no timeout) ends. Statuses come from `wait PID` below, not from wait -n: bash
    # drops finished jobs from the table wait -n reads (it then says "no such job"), while
    # `wait PID` also finds them among the saved statuses of exited background processes.
    sleep "${RF_TICK_S:-1}" < /dev/null > /dev/null 2>&1 &
    tick=$!
    wait -n "${live[@]}" "$tick" 2>/dev/null || true
    kill -s KILL "$tick" 2>/dev/null || true  # KILL: a child that has not exec'd yet must not run traps
    wait "$tick" 2>/dev/null || true
    local running=" $(jobs -rp | tr '\n' ' ') $(jobs -sp | tr '\n' ' ') "
    for done_pid in "${live[@]}"; do
      [[ $running == *" $done_pid "* ]] && continue
      status=0
      wait "$done_pid" || status=$?
      RF_STATUS_OF[$done_pid]=$status
      RF_ORDER+=("$done_pid")
      local -a still=()
      for pid in "${live[@]}"; do [[ $pid == "$done_pid" ]] || still+=("$pid"); done
      live=("${still[@]}")
      rf_log "${RF_NAME_OF[$done_pid]} (pid $done_pid) $(rf_describe_status "$status")"
      if ((status != 0)) && [[ ${RF_LOG_OF[$done_pid]} != - && -s ${RF_LOG_OF[$done_pid]} ]]; then
        rf_log "last lines of ${RF_LOG_OF[$done_pid]}:"
        tail -n 5 "${RF_LOG_OF[$done_pid]}" | sed 's/^/    /' >&2
      fi
      if ((status == RECFUSION_EXIT_PREEMPTED)) && [[ -z $stopping ]] && ((${#live[@]})); then
        # It saved a checkpoint; the others are saving the same step: give them the full grace.
        stopping=signal
        deadline=$((SECONDS + ${SHUTDOWN_GRACE_S:-300}))
        rf_log "sending SIGTERM to the other ${#live[@]} process(es) (SIGKILL in" \
          "${SHUTDOWN_GRACE_S:-300} s)"
        for pid in "${live[@]}"; do kill -s TERM "$pid" 2>/dev/null || true; done
      elif ((status != 0 && status != RECFUSION_EXIT_PREEMPTED)) && [[ $stopping != peer ]] \
          && ((${#live[@]})); then
        # A dead peer leaves the others blocked in collectives: a short grace, then SIGKILL.
        local peer_deadline=$((SECONDS + ${PEER_GRACE_S:-15}))
        if [[ $stopping == signal ]]; then
          # They were already sent the stop signal (forwarded, or after a peer's exit 75): a
          # second one tells them nothing more; only the grace gets shorter.
          ((peer_deadline < deadline)) && deadline=$peer_deadline
          rf_log "${RF_NAME_OF[$done_pid]} ended with exit $status while the other" \
            "${#live[@]} process(es) stop (SIGKILL in $((deadline - SECONDS)) s)"
        else
          deadline=$peer_deadline
          rf_log "stopping the other ${#live[@]} process(es) because ${RF_NAME_OF[$done_pid]}" \
            "ended with exit $status (SIGTERM now, SIGKILL after ${PEER_GRACE_S:-15} s)"
          for pid in "${live[@]}"; do kill -s TERM "$pid" 2>/dev/null || true; done
        fi
        stopping=peer
      fi
      rf_sweep_group "$done_pid"  # after warning the others: it may take SWEEP_GRACE_S
    done
    if [[ -n $RF_PENDING_SIGNAL ]]; then
      local sig=$RF_PENDING_SIGNAL
      RF_PENDING_SIGNAL=""
      if ((RF_SIGNALS_SEEN > 1)); then
        rf_log "second signal: killing ${#live[@]} process group(s) now"
        for pid in "${live[@]}"; do rf_signal_group KILL "$pid"; done
      elif ((${#live[@]})); then
        if [[ -z $stopping ]]; then  # a peer failure already running keeps its shorter deadline
          stopping=signal
          deadline=$((SECONDS + ${SHUTDOWN_GRACE_S:-300}))
        fi
        # A closed terminal (HUP) must not kill the trainers unsaved: they get TERM.
        local forward=$sig
        [[ $sig == HUP ]] && forward=TERM
        rf_log "got SIG$sig: sending SIG$forward to ${#live[@]} process(es); they save a" \
          "checkpoint and exit $RECFUSION_EXIT_PREEMPTED (SIGKILL in $((deadline - SECONDS)) s;" \
          "signal again to kill now)"
        for pid in "${live[@]}"; do kill -s "$forward" "$pid" 2>/dev/null || true; done
      fi
    fi
    if [[ -n $stopping ]] && ((deadline > 0 && SECONDS >= deadline && ${#live[@]})); then
      for pid in "${live[@]}"; do
        rf_log "${RF_NAME_OF[$pid]} (pid $pid) still running after SIGTERM; killing its process group"
        rf_signal_group KILL "$pid"
      done
      deadline=0
    fi
  done
  trap - TERM INT HUP EXIT
  rf_worst_status
}

# Worst status over all processes: a failure (anything but 0 and the preempted code; the first
# one to happen, i.e. the cause rather than the siblings stopped because of it) over "resume me"
# over success.
rf_worst_status() {
  local pid status preempted=0
  for pid in "${RF_ORDER[@]}"; do
    status=${RF_STATUS_OF[$pid]}
    if ((status != 0 && status != RECFUSION_EXIT_PREEMPTED)); then
      rf_log "exit $status: ${RF_NAME_OF[$pid]} $(rf_describe_status "$status")"
      return "$status"
    fi
    ((status == RECFUSION_EXIT_PREEMPTED)) && preempted=1
  done
  if ((preempted)); then
    rf_log "exit $RECFUSION_EXIT_PREEMPTED: checkpoint saved; run the same command again to resume"
    return "$RECFUSION_EXIT_PREEMPTED"
  fi
  return 0
}
