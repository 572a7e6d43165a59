"""What the ``data_prep`` command lines share."""

from __future__ import annotations

from absl import app
from absl import flags


def parsed_flags(argv: list[str]) -> flags.FlagValues:
  """The flags of a build CLI, after checking that it got no positional arguments and an
  ``--out_dir``."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  if not f.out_dir:  # not required=True: that would break other CLIs' parsing in one process
    raise app.UsageError("--out_dir is required")
  return f
