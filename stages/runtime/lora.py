"""LoRA through peft: low-rank adapters on chosen linear layers of a NemotronH, the rest frozen; checkpoints carry
plain weights, each adapted layer's weight merged as W + scaling x B A, so every consumer (transformers, vLLM, the
next stage) loads them as a full model. The training state keeps the adapters apart (resume)."""

from __future__ import annotations

import torch
from torch import nn

from model.errors import UserError
from presets.schema import LoRAConfig

GROUPS = {
    "attention": ("mixer.q_proj", "mixer.k_proj", "mixer.v_proj", "mixer.o_proj"),
    "mamba": ("mixer.in_proj", "mixer.out_proj"),
    "shared_experts": ("mixer.shared_experts.up_proj", "mixer.shared_experts.down_proj"),
    "mlp": ("mixer.up_proj", "mixer.down_proj"),
    "latent": ("mixer.fc1_latent_proj", "mixer.fc2_latent_proj"),
}
ADAPTER = "default"


def target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the nn.Linear modules that `targets` (groups of GROUPS or module-name suffixes) pick; a target that
    picks nothing is a UserError."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    chosen: list[str] = []
    for target in targets:
        suffixes = GROUPS.get(target, (target,))
        hits = [name for name in linears if any(name == s or name.endswith("." + s) for s in suffixes)]
        if not hits:
            raise UserError(f"sft.lora.targets: {target!r} matches no linear layer of this model; use "
                            f"{', '.join(GROUPS)} or a module name such as model.layers.0.mixer.in_proj")
        chosen += [name for name in hits if name not in chosen]
    return chosen


def adapter_parameters(model: nn.Module, config: LoRAConfig) -> int:
    """Parameters the adapters of `config` would add to `model` (rank x (in + out) per adapted layer)."""
    linears = dict(model.named_modules())
    return sum(config.rank * (linears[name].in_features + linears[name].out_features)
               for name in target_modules(model, config.targets))


def apply_lora(model: nn.Module, config: LoRAConfig) -> str:
    """Put adapters on the targets (peft), freeze every other weight; returns a one-line summary."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError("LoRA needs peft: pip install 'n3[sft]'") from None
    names = target_modules(model, config.targets)
    frozen = sum(p.numel() for p in model.parameters())
    inject_adapter_in_model(
        LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=names),
        model, adapter_name=ADAPTER,
    )
    for name, parameter in model.named_parameters():
        parameter.requires_grad = ".lora_" in name
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"LoRA rank {config.rank} on {len(names)} layers ({', '.join(config.targets)}): {trained:,} parameters "
            f"train, {frozen:,} frozen")


def merged_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A full state dict of `model` (keys as model.state_dict() names them, its values gathered) with each adapted
    layer folded back to one plain weight; a state without adapters comes back as it is."""
    scalings = {name: module.scaling[ADAPTER] for name, module in model.named_modules()
                if hasattr(module, "lora_A") and ADAPTER in getattr(module, "scaling", {})}
    if not scalings:
        return state
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        prefix, base, leaf = key.rpartition(".base_layer.")
        if base and prefix in scalings and leaf == "weight":
            a = state[f"{prefix}.lora_A.{ADAPTER}.weight"].float()
            b = state[f"{prefix}.lora_B.{ADAPTER}.weight"].float()
            value = (value.float() + scalings[prefix] * (b @ a)).to(value.dtype)
        out[f"{prefix}.{leaf}" if base else key] = value
    return out
