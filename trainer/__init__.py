"""ddim-deploy's trainer: U-Nets, datasets, the training loop, EMA and checkpoints (PyTorch)."""
