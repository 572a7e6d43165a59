"""Low-level array kernels shared by the losses (no model state, no configs)."""
