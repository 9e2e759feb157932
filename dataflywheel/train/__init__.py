"""Training stage (DESIGN §6): SFT with packing, reward model, DPO and GRPO on one loop; `dataflywheel train`."""
