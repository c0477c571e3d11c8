"""One training step (forward, loss, backward, AdamW step) of n3 against transformers' NemotronH, measured in the same
process on the same config, weights and batch, steps interleaved so both see the same machine load.

    python benchmarks/train_step.py                         # tiny shape, CPU, fp32: tokens/s of each and the ratio
    python benchmarks/train_step.py --shape small --device cuda --dtype bf16 --batch 4 --seq-len 4096

n3 runs its training path (runtime.losses.CausalLMObjective: fused linear cross-entropy, MoE statistics, residual
norms) twice, eagerly and with its blocks compiled (`train.compile`), from the same weights;
transformers runs `model(input_ids, labels=labels).loss`. All without MTP (transformers has none), on the shape's
main pattern; a `ratio` line per n3 variant. With --mtp n3 alone also trains its MTP depths, for its own throughput
and MFU.
"""

from __future__ import annotations

import argparse
import copy
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="measured steps of each, after 2 warm-up steps")
    parser.add_argument("--mtp", action="store_true", help="measure n3 alone with its MTP depths as configured")
    args = parser.parse_args()

    cfg = presets.load("cpu", [f"shape={args.shape}", f"train.seq_len={args.seq_len}"])
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
    steps = {}
    for name in ("n3 eager", "n3 compiled"):
        model = copy.deepcopy(ours)
        if name == "n3 compiled" and not compile_blocks(model, print):
            continue
        steps[name] = _n3_step(CausalLMObjective(model, depths), cfg, inputs, labels, weights, autocast)
    if not args.mtp:
        steps["transformers"] = _transformers_step(ours, cfg, inputs, labels, autocast)
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
          f"batch {args.batch} x {args.seq_len}, median of {args.steps} steps, {torch.get_num_threads()} threads")
    for name, r in rate.items():
        mfu = f", MFU {100 * r * flops / peak:.1f}%" if peak else ""
        print(f"{name:>12}: {r:10.0f} tokens/s{mfu}")
    if "transformers" in rate:
        for name in [n for n in rate if n != "transformers"]:
            print(f"ratio {rate[name] / rate['transformers']:.2f} ({name})")


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

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
