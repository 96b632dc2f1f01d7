"""rlhf_fast: fused kernels for the loss side of LLM RL fine-tuning (PPO, GRPO, DPO)."""
# (Public API exports are wired in once every op module has landed.)
