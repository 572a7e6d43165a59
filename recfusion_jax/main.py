r"""Entry point: ``python -m recfusion_jax.main --config configs/tiny.py --workdir DIR``.

Config fields can be overridden on the command line, e.g. ``--config.num_steps=1000``.
Launched as several processes (TPU pod slices, multi-GPU hosts, or several CPU processes), it
calls ``jax.distributed.initialize()`` first; see launch/.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

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


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  from recfusion_jax import writers  # pylint: disable=import-outside-toplevel
  writers.setup_logging()
  distributed = _DISTRIBUTED.value
  if distributed is None:
    distributed = _multi_process_environment()
  if distributed:
    # On TPU pods, SLURM and Open MPI, JAX detects coordinator and process ids itself; a
    # hand-rolled launch (launch/multi_gpu.sh, launch/local_multiprocess.sh) names them in
    # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
    explicit = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
      explicit = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**explicit)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  from recfusion_jax import train  # pylint: disable=import-outside-toplevel
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
