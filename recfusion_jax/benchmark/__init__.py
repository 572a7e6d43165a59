"""The benchmark runner, ``python -m recfusion_jax.benchmark`` (see ``runner`` for the protocol).

  registry    protocols, metrics, the models (ID baselines; content models as config changes)
  protocols   ProtocolData: one protocol/seed loaded from the data (the exported splits)
  fit         baselines and content models fitted into Rankers and scored
  report      aggregation over seeds, RESULTS.md, plots
  runner      run_benchmark: jobs, sharding over processes, --merge
  __main__    the CLI (absl flags + ml_collections config_flags)
"""

from recfusion_jax.benchmark.runner import Options, run_benchmark

__all__ = ["Options", "run_benchmark"]
