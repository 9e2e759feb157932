"""Training stage (SFT with packing, RM, DPO, GRPO): lands with its issue."""
