"""The training runtime every training stage shares: corpus reading and packing, the objective and its losses,
AdamW with the Warmup-Stable-Decay schedule, metrics, checkpoints and resume, torchrun / DDP / FSDP2 setup, the loop."""
