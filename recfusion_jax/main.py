r"""Entry point: ``python -m recfusion_jax.main --config configs/tiny.py --workdir DIR``.

Config fields can be overridden on the command line, e.g. ``--config.num_steps=1000``.
Launched as several processes (TPU pod slices, multi-GPU hosts, or several CPU processes), it
calls ``jax.distributed.initialize()`` first; see launch/.

Exit status: 0 done; 75 (``train.EXIT_PREEMPTED``, ``RECFUSION_EXIT_PREEMPTED`` in
launch/common.sh) after SIGTERM/SIGINT made it save a checkpoint: run the same command again to
resume; 2 a bad config or flag (one message, before anything compiles); 1 any other failure,
including a NaN/Inf that stopped training and no usable checkpoint in the workdir.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from recfusion_jax import config_lib, config_validation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize(); default: when the environment "
    "says this is one of several processes (JAX_COORDINATOR_ADDRESS, TPU pod, SLURM...).")
flags.mark_flags_as_required(["config", "workdir"])


def _multi_process_environment() -> bool:
  keys = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
          "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
  return any(os.environ.get(k) for k in keys) and os.environ.get("SLURM_NTASKS", "2") != "1"


def _fail(message: str, status: int) -> None:
  logging.error("%s", message)
  print(message, file=sys.stderr)
  sys.exit(status)


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  from recfusion_jax import checkpointing, train, writers  # pylint: disable=import-outside-toplevel
  writers.setup_logging()
  try:
    # The recipe's fields for this protocol; the command line's overrides still win.
    config = config_lib.config_from_flag(_CONFIG.name)
    # Device-free checks, before JAX starts anything; the CLI must train (num_steps >= 1).
    config_validation.validate(config, training=True)
  except ValueError as e:   # ConfigError, or a recipe table naming no field
    _fail(str(e), 2)
  distributed = _DISTRIBUTED.value
  if distributed is None:
    distributed = _multi_process_environment()
  if distributed:
    # On TPU pods, SLURM and Open MPI, JAX detects coordinator and process ids itself; a
    # hand-rolled launch (launch/multi_gpu.sh, launch/local_multiprocess.sh) names them in
    # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. It also installs JAX's
    # preemption service, which owns SIGTERM from here on (see checkpointing.PreemptionWatch).
    explicit = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
      explicit = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
    # A dead peer is noticed after this many seconds without its heartbeat (JAX's default is
    # 100); set it lower (e.g. 20) so the survivors of a dead process end promptly.
    timeout = os.environ.get("RECFUSION_HEARTBEAT_TIMEOUT_S")
    if timeout:
      explicit["heartbeat_timeout_seconds"] = int(timeout)
    jax.distributed.initialize(**explicit)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except config_validation.ConfigError as e:
    _fail(str(e), 2)
  except train.Preempted as e:
    logging.warning("%s", e)
    sys.exit(train.EXIT_PREEMPTED)
  except (train.NonFiniteError, checkpointing.CheckpointError) as e:
    _fail(f"error: {e}", 1)


if __name__ == "__main__":
  app.run(main, flags_parser=config_validation.parse_flags)
