"""Triton kernels, one module per fused op family (installed as rlhf_fast.kernels)."""
