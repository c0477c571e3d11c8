"""One training step (forward, loss, backward, AdamW step) at 4096 tokens, n3 against transformers' NemotronH on the
same weights and batch: benchmarks/train_step.py's measurement with long-sequence defaults.

    python benchmarks/long_step.py            # tiny shape, CPU, fp32, batch 1 x 4096: tokens/s of each and the ratios
    python benchmarks/long_step.py --profile  # then 3 profiled steps of each: sublayers, matmuls and SDPA, top ops
    python benchmarks/long_step.py --seq-len 8192 --shape small --device cuda --dtype bf16

At 4096 tokens attention, quadratic in the sequence, weighs far more than at train_step.py's 256 tokens; the shape's
context (max_position_embeddings) is raised to the sequence. n3 runs eagerly, with `train.compile`, and eagerly with
activation checkpointing per sublayer (the memory long sequences need, paid for in recomputation); the other
options are train_step.py's.
"""

from __future__ import annotations

from train_step import main

if __name__ == "__main__":
    main(__doc__, batch=1, seq_len=4096, checkpointing=True)
