"""One RL step of n3 against TRL's GRPOTrainer, in the same process, on the same weights, prompts, group size, reply
length, sampling and reward, steps interleaved so both see the same machine load.

    python benchmarks/rlvr_step.py --threads 1               # the newest SFT run (else a fresh tiny model), CPU
    python benchmarks/rlvr_step.py --checkpoint runs/cpu-sft --prompts 64 --steps 2

A step, on both sides: `--prompts` training prompts of the built-in environments (math levels 1-2 and instructions
levels 1-3, half each, in one seeded order), `--group` samples of each at temperature 1 (top-p 1, no top-k), reasoning
on (the chat template's enable_thinking, as `n3 rlvr` samples), replies of at most `--max-tokens` tokens, each scored
by the environment's own checker on the answer after the reasoning, GRPO advantages per group ((r - mean) / std),
then one AdamW step of the DAPO loss (token mean, clip 0.2 / 0.28, no KL, no reference), gradient clipping at 1.

- n3 runs `n3 rlvr`'s step (stages.rlvr.rl_step): the in-process engine samples every reply at once (continuous
  batching, its compiled decode step, as the cpu preset serves), zero-variance groups are dropped (DAPO's dynamic
  sampling, n3's default; `--keep-zero-variance` trains on them as TRL does), replies packed into rows whose
  documents cannot see each other, then the new weights go into the engine. Its rows are --seq-len 512 tokens, 8 per
  forward (rlvr's own 4096-token rows are for long replies: on the cpu preset the engine's context is the row length,
  and its compiled decode step attends over all of it).
- TRL runs GRPOTrainer's training step (generation with transformers' `generate` on the CPU, the reward function,
  compute_loss on the padded prompt + reply rows, backward) and its optimizer, without the Trainer's logging and
  callbacks around them, with activation checkpointing off (TRL's default turns it on, which recomputes the
  forward in the backward); one generation per optimizer step (steps_per_generation = num_iterations = 1), so no
  old-policy forward. Its reward function separates the answer from the reasoning as n3's engine does (the tokens
  after `</think>`, special tokens skipped; the script checks this against n3's replies). transformers' continuous
  batching (TRL's use_transformers_continuous_batching) refuses NemotronH's Mamba layers, so it is plain generate.

Both models are the checkpoint without its MTP head (transformers' NemotronH has none; n3's RL does not train it), in
fp32, with the checkpoint's own chat template (the script checks that both sides render the prompts to the same
ids). The replies are sampled, so the two sides' tokens per step differ a little: they are printed beside the times,
since reply length decides generation time, with the positions each side's training forward runs (n3: packed rows,
padding included; TRL: every reply padded to the longest prompt plus the longest reply). On shared cores pass
--threads 1: two OpenMP threads wait on a descheduled one. TRL's step allocates and frees batch x positions x
vocabulary tensors; under glibc's defaults their pages fault in again every step, so compare with freed memory kept
too (the settings alternate.allocator names); the first line printed names the allocator settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import presets
from alternate import WARMUP, allocator, alternate
from peer_checkpoint import without_mtp
from model.checkpoint import from_pretrained
from model.tokenizer import Tokenizer
from stages import rlvr as rlvr_stage
from stages.envs.environments import blend_prompts, load_environments
from stages.rlvr import rl_step
from stages.rollout.backend import engine_backend, rollout_context
from stages.rollout.learner import PolicyObjective, rollout_table
from stages.runtime import distributed
from stages.runtime.checkpointing import newest_run
from stages.runtime.distributed import World
from stages.runtime.optim import build_optimizer
from stages.runtime.settings import configure_kernels

ENVS = "math:1-2,instructions:1-3"
"""Environments whose checkers are cheap (code runs programs in a sandbox, which would cost both sides alike)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="an n3 checkpoint or run folder (default: the newest SFT "
                        "run under runs/, else a freshly initialised tiny model with the built-in tokenizer)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per step (the cpu preset's rlvr.prompts_per_step)")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt (rlvr's default)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens a reply may take, reasoning included")
    parser.add_argument("--envs", default=ENVS, help="environments, as rlvr.envs")
    parser.add_argument("--seq-len", type=int, default=512, help="n3's packed rows (rlvr.train.seq_len), also the "
                        "engine's context")
    parser.add_argument("--rows", type=int, default=8, help="n3's rows per forward (rlvr.train.micro_batch_size)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (1 when the "
                        "cores are shared with other work)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps of each, after 2 warm-up steps")
    parser.add_argument("--keep-zero-variance", action="store_true",
                        help="n3 trains on groups whose rewards are all equal, as TRL does (n3 drops them by default)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="n3-rlvr-bench-") as scratch:
        _compare(args, Path(scratch))


def _compare(args, folder: Path) -> None:
    source = args.checkpoint or newest_run(Path("runs"), "sft")
    checkpoint = folder / "model"
    without_mtp(source, checkpoint)
    total = args.steps + WARMUP
    cfg = presets.load("cpu", [
        f"rlvr.envs={args.envs}", f"rlvr.prompts_per_step={args.prompts}", f"rlvr.group_size={args.group}",
        f"rlvr.max_tokens={args.max_tokens}", "rlvr.reasoning=true", "rlvr.temperature=1.0", "rlvr.top_p=1.0",
        "rlvr.top_k=0", f"rlvr.filter_zero_variance={str(not args.keep_zero_variance).lower()}",
        f"rlvr.train.seq_len={args.seq_len}", f"rlvr.train.micro_batch_size={args.rows}", "rlvr.train.lr=1e-5",
        "rlvr.train.min_lr=1e-5", f"rlvr.train.steps={total}",
    ])
    rl = cfg.rlvr
    print(f"model: {source or 'a fresh tiny model'} without its MTP head; {rl.prompts_per_step} prompts x "
          f"{rl.group_size} samples per step, replies of at most {rl.max_tokens} tokens; {args.envs}; "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}; allocator: {allocator()}")
    envs = load_environments(rl.envs, rl.weights)
    plan = blend_prompts(envs, rl.weights, rl.prompts_per_step * total, "train", rl.train.seed)
    tokenizer = Tokenizer.load(checkpoint)
    n3 = _N3Step(cfg, checkpoint, plan, envs, tokenizer, folder / "n3")
    trl_step = _TRLStep(cfg, checkpoint, plan, envs, tokenizer, folder)
    times, outs = alternate({"n3": n3, "trl": trl_step}, total,
                            after_first=lambda: _check_same_inputs(n3.rollouts, trl_step, tokenizer))
    for name, figures in outs.items():
        split = ", ".join(f"{key} {statistics.median(o['seconds'][key] for o in figures):.2f} s"
                          for key in figures[0]["seconds"])
        tokens = [o["tokens"] for o in figures]
        print(f"{name}: {statistics.median(times[name]):.2f} s per step ({split}); "
              f"{statistics.mean(tokens):,.0f} tokens generated per step ({', '.join(map(str, tokens))}), "
              f"mean reward {statistics.mean(o['reward'] for o in figures):.3f}, "
              f"{statistics.mean(o['forward'] for o in figures):,.0f} positions through the training forward")
    print(f"ratio (TRL's seconds per step over n3's): {statistics.median(times['trl']) / statistics.median(times['n3']):.2f}x; "
          f"load average {os.getloadavg()[0]:.2f}")


def answer(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The reply's answer as n3's engine separates it from a thought the prompt opened: the tokens after `</think>`
    (none when the thought never ends), special tokens skipped."""
    if tokenizer.end_think_id not in ids:
        return ""
    return tokenizer.decode(ids[ids.index(tokenizer.end_think_id) + 1 :], skip_special=True)


class _N3Step:
    """`n3 rlvr`'s step, its arguments built as stages.rlvr.rlvr builds them (one process)."""

    def __init__(self, cfg, checkpoint: Path, plan: list, envs: dict, tokenizer: Tokenizer, run: Path):
        world = World(0, 1, 0, torch.device("cpu"))
        self.cfg = dataclasses.replace(cfg, rlvr=dataclasses.replace(
            cfg.rlvr, train=rollout_table(cfg.rlvr.train, world, cfg.parallel.data)))
        configure_kernels(self.cfg)
        train = self.cfg.rlvr.train
        model = from_pretrained(checkpoint, dtype=torch.float32)
        self.objective = distributed.prepare_model(PolicyObjective(model), self.cfg, world, train=train)
        self.optimizer = build_optimizer(self.objective, train)
        context = rollout_context([p.messages for p in plan], tokenizer, self.cfg.rlvr.max_tokens, train.seq_len,
                                  enable_thinking=self.cfg.rlvr.reasoning)  # as stages.rlvr sizes it
        self.backend = engine_backend(checkpoint, self.cfg, lambda message: None, max_len=context,
                                      max_batch=self.cfg.rlvr.engine_batch)
        self.plan, self.envs, self.world, self.run, self.pad_id = plan, envs, world, run, tokenizer.pad_id or 0
        self.rollouts: list = []
        backend_rollout = self.backend.rollout

        def keep(*a, **k):  # the replies, for the check that both sides see the same prompts and answers
            self.rollouts = backend_rollout(*a, **k)
            return self.rollouts

        self.backend.rollout = keep
        self.forward_tokens = 0
        pack = rlvr_stage.rank_micro_batches

        def counted(*a, **k):  # positions through the learner's forward: packed rows, padding included
            batches = pack(*a, **k)
            self.forward_tokens = sum(mb.input_ids.numel() for mb in batches)
            return batches

        rlvr_stage.rank_micro_batches = counted

    def __call__(self, step: int) -> dict:
        n = self.cfg.rlvr.prompts_per_step
        record = rl_step(self.cfg, step, self.plan[step * n : (step + 1) * n], self.envs, self.backend,
                         self.objective, self.optimizer, reference=None, world=self.world, run=self.run,
                         pad_id=self.pad_id)
        seconds = record["seconds"]
        return {"tokens": record["generated_tokens"], "reward": record["reward"], "forward": self.forward_tokens,
                "seconds": {"generate": seconds["generate"], "score": seconds["score"],
                            "train": seconds["logprobs"] + seconds["update"]}}


class _TRLStep:
    """GRPOTrainer's training step and optimizer step, without the Trainer's loop around them."""

    def __init__(self, cfg, checkpoint: Path, plan: list, envs: dict, tokenizer: Tokenizer, folder: Path):
        import transformers
        import trl
        from datasets import Dataset

        rl, train = cfg.rlvr, cfg.rlvr.train
        self.tokenizer, self.envs = tokenizer, envs
        self.seconds: dict[str, float] = {}
        self.generated = self.forward = 0
        self.rewards: list[float] = []
        self.prompt_ids: list[list[int]] = []
        args = trl.GRPOConfig(
            output_dir=str(folder / "trl"), per_device_train_batch_size=rl.prompts_per_step * rl.group_size,
            num_generations=rl.group_size, max_completion_length=rl.max_tokens, temperature=rl.temperature,
            top_p=rl.top_p, top_k=rl.top_k, chat_template_kwargs={"enable_thinking": rl.reasoning},
            beta=rl.kl_coeff, loss_type="dapo", epsilon=rl.clip_low, epsilon_high=rl.clip_high, scale_rewards="group",
            # Activation checkpointing off (TRL's configs turn it on): it recomputes forwards, and memory is no concern here.
            activation_checkpointing=False,
            num_iterations=1, steps_per_generation=1, gradient_accumulation_steps=1, shuffle_dataset=False,
            mask_truncated_completions=False, learning_rate=train.lr, lr_scheduler_type="constant",
            weight_decay=train.weight_decay, adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2,
            adam_epsilon=train.adam_eps, max_grad_norm=train.grad_clip, optim="adamw_torch_fused", use_vllm=False,
            bf16=False, fp16=False, use_cpu=True, report_to=[], save_strategy="no", log_completions=False,
            dataloader_num_workers=0, seed=train.seed,
        )
        model = transformers.NemotronHForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        # Stop where n3's engine stops a chat reply: the end of the turn or the eos token.
        model.generation_config.eos_token_id = [tokenizer.im_end_id, tokenizer.eos_id]
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
        rows = [{"prompt": p.messages, "env": p.env, "data": json.dumps(p.data)} for p in plan]
        self.trainer = trl.GRPOTrainer(model=model, reward_funcs=self._reward, args=args,
                                       train_dataset=Dataset.from_list(rows), processing_class=hf_tokenizer)
        self.trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
        self.trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before each step
        generate = self.trainer._generate

        def timed_generate(prompts):  # tokenizing, `generate` and decoding, for the breakdown
            start = time.perf_counter()
            out = generate(prompts)
            self.seconds["generate"] = time.perf_counter() - start
            self.prompt_ids = out[0]
            return out

        self.trainer._generate = timed_generate
        self.batches = iter(self.trainer.get_train_dataloader())
        self.model = model.train()

    def _reward(self, prompts, completions, completion_ids, env, data, **_) -> list[float]:
        start = time.perf_counter()
        scores = [self.envs[e].score(json.loads(d), answer(self.tokenizer, ids)).reward
                  for e, d, ids in zip(env, data, completion_ids)]
        self.seconds["score"] = time.perf_counter() - start
        self.generated = sum(len(ids) for ids in completion_ids)
        # the padded rows compute_loss runs: the longest prompt (left-padded) + the longest reply (right-padded)
        self.forward = len(completion_ids) * (max(map(len, self.prompt_ids)) + max(map(len, completion_ids)))
        self.rewards = scores
        return scores

    def __call__(self, step: int) -> dict:
        start = time.perf_counter()
        self.trainer.training_step(self.model, next(self.batches), None)
        self.trainer.accelerator.clip_grad_norm_(self.model.parameters(), self.trainer.args.max_grad_norm)
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        self.trainer.state.global_step += 1
        total = time.perf_counter() - start
        seconds = dict(self.seconds)
        seconds["train"] = total - seconds["generate"] - seconds["score"]
        return {"tokens": self.generated, "reward": statistics.mean(self.rewards), "forward": self.forward,
                "seconds": seconds}


def _check_same_inputs(rollouts: list, trl_step: _TRLStep, tokenizer: Tokenizer) -> None:
    """Both sides rendered the first step's prompts to the same token ids, and TRL's reward reads the answer n3's
    engine returned for the same tokens."""
    n3_prompts = [group[0].prompt_ids for group in rollouts]
    trl_prompts = [list(ids) for ids in trl_step.prompt_ids[:: len(rollouts[0])]]
    if n3_prompts != trl_prompts:
        raise SystemExit("the two sides rendered the prompts differently: not the same inputs")
    differ = sum(answer(tokenizer, r.token_ids) != r.content for group in rollouts for r in group)
    if differ:
        raise SystemExit(f"{differ} replies: TRL's reward would read another answer than n3's engine returns")


if __name__ == "__main__":
    main()
