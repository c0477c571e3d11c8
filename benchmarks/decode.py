"""Decode throughput: the n3 engine against transformers' `generate` on the same weights and prompts.

    python benchmarks/decode.py                       # the tiny shape, batch 1 and 16, CPU
    python benchmarks/decode.py --checkpoint DIR --batch 1 4 --new-tokens 128

Both load the same safetensors (saved once), decode greedily a fixed number of new tokens from the same random
prompts with the same thread count, after a warm-up; each figure is the best of --repeats interleaved runs (the
machine may be shared). Prints tokens/s of each and a `ratio` line per batch size (n3 / transformers, prefill
included on both sides), then MTP self-speculation: tokens/s with --speculative draft tokens against plain decoding,
and the mean acceptance length. Without --checkpoint the tiny shape is first fitted for --fit-steps on a synthetic
language (a fixed random walk over a small alphabet), so that its MTP head has something to predict; random weights
accept almost no drafts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model as n3  # noqa: E402
import presets  # noqa: E402
from model.engine import Engine, EngineConfig, EngineStats, SamplingParams  # noqa: E402


def synthetic_batch(vocab: int, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences of a tiny language: from a random start, each token is one of two fixed successors of the previous
    one (probability 0.9 and 0.1). Predictable enough that an MTP head trained on it drafts well."""
    alphabet = 64
    successors = torch.randint(0, alphabet, (alphabet, 2), generator=torch.Generator().manual_seed(0))
    tokens = [torch.randint(0, alphabet, (batch,), generator=generator)]
    for _ in range(length - 1):
        pick = (torch.rand(batch, generator=generator) < 0.1).long()
        tokens.append(successors[tokens[-1], pick])
    return torch.stack(tokens, 1) % vocab


def fit(model: n3.NemotronH, steps: int, depths: int = 2) -> None:
    """A short pretraining run on the synthetic language: next-token loss plus the MTP loss (weight 0.3 per depth)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for step in range(steps):
        ids = synthetic_batch(model.config.vocab_size, 16, 64, generator)
        h = model.model(ids)
        loss = torch.nn.functional.cross_entropy(model.logits(h[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        for k, hk in enumerate(model.mtp_hidden(h, ids, depths), start=1):
            logits = model.logits(hk[:, : -1 - k])
            loss = loss + 0.3 / depths * torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1 + k :].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  fit step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()


def bandwidth(device: torch.device) -> float:
    """Memory bandwidth in bytes/s: the best of a few copies of a 256 MiB buffer (each reads and writes it)."""
    source = torch.empty(64 * 2**20, device=device)
    target = torch.empty_like(source)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(5):
        sync()
        start = time.perf_counter()
        target.copy_(source)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / best


def decode_bytes(model: n3.NemotronH, batch: int, context: int) -> int:
    """Bytes a plain decode step of `batch` rows at `context` tokens must move at least: every weight it uses once
    (routed experts: as many as the batch can reach), the keys and values it attends over, the Mamba states it reads
    and writes. The MTP head is not used."""
    from model.moe import Experts

    cfg, size = model.config, model.lm_head.weight.element_size()
    total = batch * cfg.hidden_size * size  # embedding rows
    for module in [*model.model.layers, model.model.norm_f, model.lm_head]:
        for sub in module.modules():
            for p in sub.parameters(recurse=False):
                reach = min(1.0, batch * cfg.num_experts_per_tok / cfg.n_routed_experts) if isinstance(sub, Experts) else 1
                total += int(p.numel() * p.element_size() * reach)
    kv = 2 * cfg.num_key_value_heads * cfg.head_dim * size * context
    state = (cfg.mamba_conv_dim * (cfg.conv_kernel - 1) + cfg.mamba_inner * cfg.ssm_state_size) * 4 * 2
    return total + batch * (cfg.main_pattern.count("*") * kv + cfg.main_pattern.count("M") * state)


def best_of(repeats: int, runs: dict) -> dict:
    """Interleave the runs `repeats` times; the fastest time of each (and its last result)."""
    times = {name: float("inf") for name in runs}
    results = {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            times[name] = min(times[name], time.perf_counter() - start)
    return {name: (times[name], results[name]) for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="an HF NemotronH checkpoint (default: the tiny shape)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--speculative", type=int, default=3, help="MTP draft tokens (0 skips that part)")
    parser.add_argument("--fit-steps", type=int, default=300)
    parser.add_argument("--eager", action="store_true", help="do not compile the n3 decode step")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both models run there)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    with tempfile.TemporaryDirectory() as scratch:
        path = args.checkpoint
        if path is None:
            torch.manual_seed(0)
            model = n3.build(presets.shape("tiny"))
            if args.fit_steps:
                print(f"fitting the tiny shape for {args.fit_steps} steps on a synthetic language")
                fit(model, args.fit_steps)
            path = Path(scratch) / "tiny"
            n3.save_pretrained(model, path)
        device = torch.device(args.device)
        ours = n3.from_pretrained(path, device=device).eval()
        theirs = transformers.NemotronHForCausalLM.from_pretrained(path, dtype=ours.lm_head.weight.dtype).to(device).eval()
    cfg = ours.config
    print(f"model: {path if args.checkpoint else 'tiny shape'} ({sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M "
          f"parameters, pattern {cfg.pattern}), {args.prompt_len} prompt + {args.new_tokens} new tokens, greedy, "
          f"{args.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}, {device}")
    memory_speed = bandwidth(device)
    total = args.prompt_len + args.new_tokens
    greedy = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    prompt_generator = torch.Generator().manual_seed(2)
    prompts_by_batch, engines = {}, {}

    for batch in args.batch:
        prompts = synthetic_batch(cfg.vocab_size, batch, args.prompt_len, prompt_generator).to(device)
        prompts_by_batch[batch] = prompts
        engine = engines[batch] = Engine(ours, config=EngineConfig(max_batch=batch, max_len=total, compile=not args.eager))

        def run_n3(params=greedy):
            return [c.token_ids for c in engine.generate(prompts.tolist(), params)]

        def run_transformers():
            with torch.no_grad():
                out = theirs.generate(
                    prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                )
            return out[:, args.prompt_len :].tolist()

        start = time.perf_counter()
        run_n3()  # warm-up (and compilation)
        run_transformers()
        print(f"batch {batch}: warm-up {time.perf_counter() - start:.1f}s")
        first_token = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        timed = best_of(args.repeats, {"n3": run_n3, "transformers": run_transformers,
                                       "n3 prefill": lambda: run_n3(first_token)})
        tokens = batch * args.new_tokens
        (t_n3, out_n3), (t_hf, out_hf), (t_prefill, _) = timed["n3"], timed["transformers"], timed["n3 prefill"]
        same = sum(a == b for a, b in zip(out_n3, out_hf))
        print(f"batch {batch}: n3 {tokens / t_n3:.0f} tokens/s, transformers {tokens / t_hf:.0f} tokens/s "
              f"(same tokens in {same}/{batch} rows)")
        print(f"ratio batch={batch}: {t_hf / t_n3:.2f}")
        step_bytes = decode_bytes(ours, batch, args.prompt_len + args.new_tokens // 2)  # at the mean context
        bound = batch * memory_speed / step_bytes
        decode_rate = batch * (args.new_tokens - 1) / (t_n3 - t_prefill)
        print(f"batch {batch}: n3 decodes {decode_rate:.0f} tokens/s (prefill and first token excluded), "
              f"{decode_rate / bound:.0%} of the memory-bandwidth bound {bound:.0f} tokens/s "
              f"({step_bytes / 1e6:.2f} MB per step at {memory_speed / 1e9:.1f} GB/s)")

    if args.speculative and cfg.mtp_pattern:
        for batch in args.batch:
            prompts = prompts_by_batch[batch].tolist()
            plain = engines[batch]
            spec = Engine(ours, config=EngineConfig(
                max_batch=batch, max_len=total, speculative_tokens=args.speculative, compile=not args.eager,
            ))
            runs = {name: (lambda e=e: [c.token_ids for c in e.generate(prompts, greedy)])
                    for name, e in (("plain", plain), ("speculative", spec))}
            for run in runs.values():
                run()  # warm-up
            spec.stats = EngineStats(proposed=[0] * args.speculative, accepted=[0] * args.speculative)  # timed runs only
            timed = best_of(args.repeats, runs)
            (t_plain, out_plain), (t_spec, out_spec) = timed["plain"], timed["speculative"]
            rates = ", ".join(f"{r:.2f}" for r in spec.stats.acceptance_rate)
            tokens = batch * args.new_tokens
            print(f"MTP speculation batch={batch}, {args.speculative} drafts: {tokens / t_spec:.0f} tokens/s against "
                  f"plain {tokens / t_plain:.0f} tokens/s, speedup {t_plain / t_spec:.2f}, "
                  f"mean acceptance length {spec.stats.mean_acceptance_length:.2f} (per depth {rates}), "
                  f"same tokens as plain: {out_plain == out_spec}")


if __name__ == "__main__":
    main()
