"""One SFT step of n3 against TRL's SFTTrainer, in the same process, on the same transformers NemotronH model, weights
and conversations, steps interleaved so both see the same machine load.

    python benchmarks/sft_step.py                            # the newest pretrain run (else a fresh tiny model), CPU
    python benchmarks/sft_step.py --checkpoint runs/cpu --rows 8 --seq-len 512 --steps 10

Both train on the built-in verifiable tasks' conversations in one chat template (TRL's training copy of the released
Nemotron 3 Nano template: TRL needs its {% generation %} marks for an assistant-only loss; n3 derives its masks from
any template), assistant tokens only, AdamW, fp32, the same rows of --seq-len tokens per step.

- n3 runs `n3 sft`'s path: masks by prefix rendering, best-fit packing into rows whose conversations cannot see each
  other (seq_idx through attention, the causal conv and the SSD scan), the shared training loop's optimizer step.
- TRL runs SFTTrainer's training step (compute_loss with the assistant masks, backward) and its optimizer, without the
  Trainer's logging and callbacks around them, with activation checkpointing off (TRL's default turns it on). TRL's
  best-fit packing is padding-free, and transformers' NemotronH refuses packed sequences without mamba_ssm (it cannot
  keep them apart in its PyTorch path), so on a CPU TRL packs with its "wrapped" strategy: conversations concatenated
  and cut into full rows, attending across each other.

Throughput counts the tokens that go through the model (padding left out): n3's rows are best-fit packed and hold a
little padding; TRL's wrapped rows hold none. The model has no MTP head (transformers' NemotronH has none).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import presets
from alternate import allocator
from peer_checkpoint import without_mtp
from model.checkpoint import from_pretrained
from model.tokenizer import Tokenizer
from stages.chat.data import build_chat_data
from stages.chat.packing import PackedChatBatches
from stages.envs.suite import parse_suite
from stages.runtime.checkpointing import newest_run
from stages.runtime.distributed import World
from stages.runtime.loop import TrainingJob, optimizer_step
from stages.runtime.losses import CausalLMObjective
from stages.runtime.optim import build_optimizer
from stages.runtime.progress import Quiet
from stages.sft import chat_options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="an n3 checkpoint or run folder (default: the newest "
                        "pretrain run under runs/, else a freshly initialised tiny model with the built-in tokenizer)")
    parser.add_argument("--rows", type=int, default=8, help="rows per step")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--problems", type=int, default=600, help="built-in problems per domain")
    parser.add_argument("--steps", type=int, default=10, help="measured steps of each, after 2 warm-up steps")
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="n3-sft-bench-") as scratch:
        _compare(args, Path(scratch))


def _compare(args, folder: Path) -> None:
    checkpoint = _checkpoint(args.checkpoint, folder / "model")
    print(f"model: {args.checkpoint or 'the newest pretrain run'} without its MTP head; {args.rows} rows x "
          f"{args.seq_len} tokens per step; allocator: {allocator()}")

    cfg = presets.load("cpu", [f"sft.train.seq_len={args.seq_len}", f"sft.train.micro_batch_size={args.rows}",
                               f"sft.train.global_batch_size={args.rows}", f"sft.problems={args.problems}",
                               "sft.train.mtp_depths=0", "sft.train.lr=1e-5", "sft.train.warmup_steps=0",
                               "sft.train.grad_clip=0", "sft.reasoning_off=0", "sft.reasoning_truncated=0"])
    tokenizer = Tokenizer.load(checkpoint)
    steps = {"n3": _n3_step(cfg, checkpoint, tokenizer, folder), "trl": _trl_step(cfg, checkpoint, folder)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    tokens: dict[str, list[int]] = {name: [] for name in steps}
    for i in range(args.steps + 2):
        for name, step in steps.items():
            start = time.perf_counter()
            count = step()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
                tokens[name].append(count)
    rate = {name: sum(tokens[name]) / sum(times[name]) for name in steps}
    for name in steps:
        print(f"{name}: {rate[name]:,.0f} tokens/s ({statistics.median(times[name]) * 1000:.0f} ms per step, "
              f"{statistics.mean(tokens[name]):,.0f} tokens per step)")
    print(f"ratio n3 / trl: {rate['n3'] / rate['trl']:.2f}x")


def _checkpoint(given: Path | None, out: Path) -> Path:
    """A checkpoint without MTP, written with the released template as its chat template."""
    given = given or newest_run(Path("runs"), "pretrain")
    without_mtp(given, out)
    import trl

    template = (Path(trl.__file__).parent / "chat_templates" / "nemotron_3_nano_training.jinja").read_text()
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": template}))
    return out


def _n3_step(cfg, checkpoint: Path, tokenizer: Tokenizer, folder: Path):
    data = build_chat_data(tokenizer, chat_options(cfg), None, parse_suite(cfg.sft.tasks))
    train = cfg.sft.train
    objective = CausalLMObjective(from_pretrained(checkpoint, dtype=torch.float32), 0).train()
    batches = PackedChatBatches(data.train, train.micro_batch_size, train.global_batch_size, seed=train.seed)
    job = TrainingJob(train, "fp32", World(0, 1, 0, torch.device("cpu")), objective, build_optimizer(objective, train),
                      batches, total_steps=10**6, run=folder, tokenizer=tokenizer, progress=Quiet(),
                      flops_per_token=0.0, peak_flops=None)
    per_step = round(data.train.stats.efficiency * train.global_batch_size * train.seq_len)
    index = iter(range(10**6))

    def step() -> int:
        optimizer_step(job, next(index))
        return per_step

    return step


def _trl_step(cfg, checkpoint: Path, folder: Path):
    import transformers
    import trl
    from datasets import Dataset

    from stages.envs.suite import suite_problems

    train = cfg.sft.train
    rows = [{"messages": p.messages()} for problems in suite_problems(parse_suite(cfg.sft.tasks), "train",
                                                                      cfg.sft.problems, train.seed).values()
            for p in problems]
    args = trl.SFTConfig(
        output_dir=str(folder / "trl"), per_device_train_batch_size=train.micro_batch_size, max_length=train.seq_len,
        # Activation checkpointing off (TRL's configs turn it on): it recomputes forwards, and memory is no concern here.
        activation_checkpointing=False,
        packing=True, packing_strategy="wrapped", assistant_only_loss=True, learning_rate=train.lr,
        weight_decay=train.weight_decay, adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2,
        max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no", dataloader_num_workers=0, seed=train.seed,
    )
    model = transformers.NemotronHForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before each step
    batches = iter(trainer.get_train_dataloader())
    model.train()

    def step() -> int:
        batch = next(batches)
        trainer.training_step(model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()

    return step


if __name__ == "__main__":
    main()
