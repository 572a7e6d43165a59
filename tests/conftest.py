"""Test set-up: 8 simulated CPU devices, fp32 matmuls, set before JAX starts."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Full-precision matmuls so sharded and unsharded runs can be compared to 1e-5.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
