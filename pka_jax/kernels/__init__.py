"""Opt-in accelerator kernels (Pallas, Triton on NVIDIA GPUs): the cross-entropy, PKA's
training attention, LayerNorm and a block's second half. Each is checked against the XLA path
in Pallas's interpreter on a CPU."""
