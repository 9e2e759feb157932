"""Training stage (docs/training.md): SFT with packing, reward model, DPO and GRPO on one loop; `dataflywheel train`."""
