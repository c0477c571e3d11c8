"""One training step (forward, loss, backward, AdamW step) of n3 against transformers' NemotronH, measured in the same
process on the same config, weights and batch, steps interleaved so both see the same machine load.

    python benchmarks/train_step.py                         # tiny shape, CPU, fp32: tokens/s of each and the ratio
    python benchmarks/train_step.py --shape small --device cuda --dtype bf16 --batch 4 --seq-len 4096

n3 runs its training path (runtime.losses.CausalLMObjective: fused linear cross-entropy, MoE statistics, residual
norms) twice, eagerly and with its blocks compiled (`train.compile`), from the same weights, and with --checkpointing
a third time, eagerly with activation checkpointing per sublayer; transformers runs `model(input_ids,
labels=labels).loss`. All without MTP (transformers has none), on the shape's main pattern; a `ratio` line per n3
variant: of the median rates, then the spread and median of each round's own ratio. With --mtp n3 alone also trains
its MTP depths, for its own throughput and MFU. With --profile a few more steps of each run under torch.profiler
(`_profiled_step`). benchmarks/long_step.py is this script with 4096-token defaults.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch

import presets
from model.checkpoint import save_pretrained
from model.hybrid import build
from stages.runtime.compiling import compile_blocks
from stages.runtime.distributed import DTYPES
from stages.runtime.losses import CausalLMObjective
from stages.runtime.metrics import flops_per_token, peak_flops
from stages.runtime.optim import build_optimizer


def main(doc: str = __doc__, batch: int = 8, seq_len: int = 256, checkpointing: bool = False) -> None:
    """Parse the command line with these defaults, measure, print (benchmarks/long_step.py calls it with its own)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seq-len", type=int, default=seq_len)
    parser.add_argument("--steps", type=int, default=10, help="measured steps of each, after 2 warm-up steps")
    parser.add_argument("--mtp", action="store_true", help="measure n3 alone with its MTP depths as configured")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=checkpointing,
                        help="also n3 eager with activation checkpointing per sublayer")
    parser.add_argument("--profile", type=int, nargs="?", const=3, default=0, metavar="STEPS",
                        help="then profile STEPS (3) more steps of each with torch.profiler: time per sublayer kind, "
                        "matmuls and SDPA against the rest, top ops")
    args = parser.parse_args()

    # The shape's context is raised to the sequence when it is shorter: attention has no position encoding, so the
    # weights are the same either way.
    context = max(args.seq_len, presets.shape(args.shape).max_position_embeddings)
    cfg = presets.load("cpu", [f"shape={args.shape}", f"train.seq_len={args.seq_len}",
                               f"model.max_position_embeddings={context}"])
    if not args.mtp:
        cfg.model.pattern = cfg.model.main_pattern
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len + 1), device=device)
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    tokens = inputs.numel()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    ours = build(cfg.model).to(device)
    depths = cfg.train.mtp_depths if args.mtp else 0
    weights = [1 / tokens] + [cfg.train.mtp_loss_scale / max(depths, 1) / tokens] * depths + [cfg.train.aux_loss_coeff]
    steps, models = {}, {}
    for name in ("n3 eager", "n3 compiled") + (("n3 checkpointed",) if args.checkpointing else ()):
        model = copy.deepcopy(ours)
        if name == "n3 compiled" and not compile_blocks(model, print):
            continue
        model.set_activation_checkpointing(name == "n3 checkpointed")
        steps[name] = _n3_step(CausalLMObjective(model, depths), cfg, inputs, labels, weights, autocast)
        models[name] = model
    if not args.mtp:
        steps["transformers"], models["transformers"] = _transformers_step(ours, cfg, inputs, labels, autocast)
    load = os.getloadavg()[0]
    times = {name: [] for name in steps}
    for i in range(args.steps + 2):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            loss = step()
            _sync(device)
            if i == 0:
                print(f"{name}: first-step loss {loss:.6f}")
            if i >= 2:
                times[name].append(time.perf_counter() - start)

    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    peak = peak_flops(device)
    flops = flops_per_token(cfg.model, args.seq_len, depths)
    print(f"shape {args.shape} ({'with' if depths else 'without'} MTP), {args.device} {args.dtype}, "
          f"batch {args.batch} x {args.seq_len}, median of {args.steps} steps, {torch.get_num_threads()} threads, "
          f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
    for name, r in rate.items():
        mfu = f", MFU {100 * r * flops / peak:.1f}%" if peak else ""
        spread = f"{tokens / max(times[name]):.0f}-{tokens / min(times[name]):.0f}"
        print(f"{name:>15}: {r:10.0f} tokens/s (range {spread}){mfu}")
    if "transformers" in rate:
        for name in [n for n in rate if n != "transformers"]:
            # Each round's own ratio too: its steps ran back to back, so a change of load between rounds cancels.
            rounds = sorted(peer / own for peer, own in zip(times["transformers"], times[name]))
            print(f"ratio {rate[name] / rate['transformers']:.2f} ({name}; round by round {rounds[0]:.2f}-"
                  f"{rounds[-1]:.2f}, median {statistics.median(rounds):.2f})")
    if args.profile:  # interleaved too, and medians: on a shared machine one step can be far off
        profiled, events = {name: [] for name in steps}, {}
        for _ in range(args.profile):
            for name, step in steps.items():
                ms, events[name] = _profiled_step(name, step, models[name], device)
                profiled[name].append(ms)
        for name in steps:
            _print_profile(name, profiled[name], events[name], device)


def _n3_step(objective, cfg, inputs, labels, weights, autocast):
    optimizer = build_optimizer(objective, cfg.train)

    def step() -> float:
        with autocast:
            out = objective(inputs, labels, weights)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out["head_sums"][0].item() / inputs.numel()

    return step


def _transformers_step(ours, cfg, inputs, labels, autocast):
    """transformers' NemotronHForCausalLM loaded from n3's weights, with the same optimizer settings."""
    import transformers

    from stages.runtime.optim import param_groups

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp)
        theirs = transformers.NemotronHForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(inputs.device)
    theirs.train()
    train = cfg.train
    optimizer = torch.optim.AdamW(  # the same optimizer n3 builds: the comparison is of the models' steps
        param_groups(theirs, train.weight_decay, train.no_decay), lr=train.lr,
        betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps, fused=True,
    )

    def step() -> float:
        with autocast:  # shift_labels: the labels are already the next tokens, as n3's
            loss = theirs(inputs, labels=labels, shift_labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, theirs


SUBLAYERS = {"M": "Mamba", "*": "attention", "E": "MoE", "-": "MLP",  # n3's pattern letters, then transformers'
             "mamba": "Mamba", "linear_attention": "Mamba", "attention": "attention", "full_attention": "attention",
             "moe": "MoE", "mlp": "MLP"}
MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def _profiled_step(name: str, step, model: torch.nn.Module, device: torch.device):
    """One step under torch.profiler. Returns the milliseconds of the step, of each kind of sublayer, forward and
    backward (marked by module hooks, host time; not in compiled blocks, inside which hooks do not run, nor in
    checkpointed ones), of the rest, and on CPU the self time of matmuls, of attention's SDPA kernel (the same
    kernels for n3 and transformers) and of everything else; and the profiler's events."""
    from torch.profiler import ProfilerActivity, profile, record_function

    layers = model.model.layers  # n3's and transformers' backbones both keep their sublayers here
    marks = name in ("n3 eager", "transformers")  # checkpointing reruns each sublayer inside its backward
    kinds = {id(layer): SUBLAYERS.get(getattr(layer, "kind", None) or layer.block_type, "?") for layer in layers}
    labels = [f"{kind} {way}" for kind in dict.fromkeys(kinds.values()) for way in ("forward", "backward")]
    ranges, hooks = [], []

    def enter(way):
        return lambda module, *_: ranges.append(record_function(f"{kinds[id(module)]} {way}").__enter__())

    def leave(*_):
        ranges.pop().__exit__(None, None, None)

    if marks:
        for layer in layers:
            hooks += [layer.register_forward_pre_hook(enter("forward")), layer.register_forward_hook(leave),
                      layer.register_full_backward_pre_hook(enter("backward")), layer.register_full_backward_hook(leave)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        wall = 1e3 * (time.perf_counter() - start)
    for hook in hooks:
        hook.remove()
    events = prof.key_averages()
    ms = {"step": wall}
    if marks:
        spans = {e.key: e.cpu_time_total / 1e3 for e in events}
        ms |= {label: spans[label] for label in labels}
        ms["the rest (embedding, head and loss, optimizer)"] = wall - sum(spans[label] for label in labels)
    if device.type == "cpu":  # on a GPU the time is the kernels', which are not named for their aten ops
        matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e3
        sdpa = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key) / 1e3
        ms |= {f"matmuls ({', '.join(MATMULS)})": matmul, "SDPA, forward and backward": sdpa,
               "everything else": wall - matmul - sdpa}
    return ms, events


def _print_profile(name: str, rounds: list[dict[str, float]], events, device: torch.device, rows: int = 12) -> None:
    """The median of each figure over the profiled rounds, then the ops with the most self time in the last."""
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print(f"\n{name}: median of {len(rounds)} profiled steps")
    for key, ms in median.items():
        print(f"  {ms:7.1f} ms ({100 * ms / median['step']:5.1f}%) {key}")
    own = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=own, row_limit=rows, max_name_column_width=60))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
