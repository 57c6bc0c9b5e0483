"""Training: one loop (loop.py) and the stages that feed it (pretrain, sft, reward, rl)."""
