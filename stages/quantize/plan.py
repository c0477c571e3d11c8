"""The quantization plan: the format each GEMM weight is stored in, and the bits per element (BPE) that gives.

BPE = stored bits / all parameters (REFERENCE.md section 3). A quantized weight costs NVFP4 4 + 8/16 bits or FP8 8 bits
per element plus two fp32 scalars per stored tensor (weight_scale_2 or weight_scale, and input_scale); everything
else is stored in BF16 (16 bits) except the router's expert bias, which stays fp32 (it only ranks experts, and ties
there change routing). Everything here works on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from model.errors import UserError
from model.moe import Experts

BITS = {"nvfp4": 4.5, "fp8": 8, "bf16": 16}
SCALAR_BITS = 64
"""Two fp32 scalars per quantized weight tensor."""
FP32_KEEP = ("e_score_correction_bias",)

NEMOTRON_RECIPE = {
    "routed experts": "nvfp4",  # with Four-Over-Six
    "shared experts": "fp8",
    "Mamba in_proj": "fp8",
    "Mamba out_proj": "fp8",
}
"""The Nemotron 3 Ultra release (5.02-5.03 BPE): everything else BF16, the MTP head included."""

LADDER = [
    *NEMOTRON_RECIPE.items(),
    *((group, "fp8") for group in ("dense MLP", "latent projections", "attention", "MTP", "lm_head")),
    *((group, "nvfp4") for group in ("shared experts", "dense MLP", "Mamba in_proj", "Mamba out_proj",
                                     "latent projections", "attention", "MTP", "lm_head")),
]
"""Without weights there is no sensitivity to measure: a dry run meets a --bpe budget by taking these steps in order,
a whole group at a time, until the plan fits (the report's recipe first, then FP8, then NVFP4 for the rest)."""


def group_of(name: str) -> str:
    """The report's layer group of a GEMM module (an n3 module name) or of any other parameter."""
    leaf = name.rsplit(".", 1)[-1]
    if name.startswith("mtp."):
        return "MTP"
    if name.endswith(".experts") or ".experts." in name:
        return "routed experts"
    if ".shared_experts." in name:
        return "shared experts"
    if leaf in ("in_proj", "out_proj"):
        return f"Mamba {leaf}"
    if leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
        return "attention"
    if leaf.endswith("latent_proj"):
        return "latent projections"
    if name == "lm_head":
        return "lm_head"
    if leaf in ("up_proj", "down_proj"):
        return "dense MLP"
    return "other"


def _tensor_group(key: str) -> str:
    """Group of a state-dict entry that is not a GEMM weight."""
    if key.startswith("mtp."):
        return "MTP"
    if "embeddings" in key:
        return "embeddings"
    if ".gate." in key:
        return "router"
    if "norm" in key:
        return "norms"
    return "Mamba conv and SSM"


@dataclass
class Unit:
    """One GEMM weight the plan chooses a format for: a Linear, or a layer's routed experts (all of them together)."""

    name: str
    group: str
    params: int
    tensors: int
    """Weight tensors it is stored as: 1, or 2 per routed expert (up and down)."""
    nvfp4: bool
    """Its input width is a multiple of 16, NVFP4's block (else it can be FP8 or BF16 only)."""

    @property
    def experts(self) -> bool:
        """A layer's routed experts (main model or MTP): NVFP4 there uses Four-Over-Six."""
        return self.name.endswith(".experts")


@dataclass
class QuantPlan:
    units: list[Unit]
    formats: dict[str, str]
    """Unit name -> nvfp4 | fp8 | bf16."""
    fixed: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Group -> (parameters, stored bits) of everything that is not a unit."""
    total_params: int = 0

    def unit_bits(self, unit: Unit, fmt: str | None = None) -> int:
        """Stored bits of a unit in `fmt` (default: its planned format)."""
        fmt = fmt or self.formats[unit.name]
        return int(unit.params * BITS[fmt]) + (unit.tensors * SCALAR_BITS if fmt != "bf16" else 0)

    def with_formats(self, choose) -> QuantPlan:
        """The same model with unit formats chosen by choose(unit)."""
        return QuantPlan(self.units, {u.name: choose(u) for u in self.units}, self.fixed, self.total_params)

    @property
    def bits(self) -> int:
        return sum(self.unit_bits(u) for u in self.units) + sum(bits for _, bits in self.fixed.values())

    @property
    def bpe(self) -> float:
        return self.bits / self.total_params

    def groups(self) -> list[tuple[str, str, int, int]]:
        """(group, formats, parameters, stored bits) per group, quantized groups first."""
        rows: dict[str, list] = {}
        for unit in self.units:
            row = rows.setdefault(unit.group, [{}, 0, 0])
            fmt = self.formats[unit.name]
            row[0][fmt] = row[0].get(fmt, 0) + unit.params
            row[1] += unit.params
            row[2] += self.unit_bits(unit)
        for group, (params, bits) in self.fixed.items():
            row = rows.setdefault(group, [{}, 0, 0])
            row[0]["bf16"] = row[0].get("bf16", 0) + params
            row[1] += params
            row[2] += bits
        out = []
        for group, (mix, params, bits) in rows.items():
            shares = sorted(mix.items(), key=lambda kv: -kv[1])
            label = " + ".join(f"{fmt} {share / params:.0%}" if len(shares) > 1 else fmt for fmt, share in shares)
            out.append((group, label, params, bits))
        return sorted(out, key=lambda row: (row[3] / max(row[2], 1), row[0]))


def units_of(model: nn.Module) -> list[Unit]:
    """Every Linear and every layer's routed experts, in module order."""
    units = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            units.append(Unit(name, group_of(name), module.weight.numel(), 1, module.in_features % 16 == 0))
        elif isinstance(module, Experts):
            experts, width, latent = module.up_proj.shape
            params = module.up_proj.numel() + module.down_proj.numel()
            units.append(Unit(name, group_of(name), params, 2 * experts, width % 16 == 0 and latent % 16 == 0))
    return units


def make_plan(model: nn.Module) -> QuantPlan:
    """The plan with every unit in BF16. Counts come from the state dict: the meta device works."""
    units = units_of(model)
    covered = {f"{u.name}.weight" for u in units} | {f"{u.name}.{p}" for u in units for p in ("up_proj", "down_proj")}
    fixed: dict[str, tuple[int, int]] = {}
    parameters = {name for name, _ in model.named_parameters()}
    for key, tensor in model.state_dict().items():
        if key in covered:
            continue
        bits = 32 if key.endswith(FP32_KEEP) else 16
        params, total = fixed.get(_tensor_group(key), (0, 0))
        params += tensor.numel() if key in parameters else 0  # buffers are stored but are not parameters
        fixed[_tensor_group(key)] = (params, total + tensor.numel() * bits)
    return QuantPlan(units, {u.name: "bf16" for u in units}, fixed, sum(p.numel() for p in model.parameters()))


def recipe_plan(model: nn.Module, recipe: dict[str, str] = NEMOTRON_RECIPE) -> QuantPlan:
    """The fixed per-group recipe (NVFP4 falls back to FP8 for a weight NVFP4 cannot hold)."""
    plan = make_plan(model)
    for unit in plan.units:
        plan.formats[unit.name] = _allowed(unit, recipe.get(unit.group, "bf16"))
    return plan


def ladder_plan(model: nn.Module, budget: float) -> QuantPlan:
    """A plan within `budget` without sensitivities: LADDER's steps in order until the BPE fits."""
    plan = make_plan(model)
    check_budget(plan, budget)
    for group, fmt in LADDER:
        if plan.bpe <= budget:
            break
        for unit in plan.units:
            if unit.group == group:
                plan.formats[unit.name] = _allowed(unit, fmt)
    return plan


def _allowed(unit: Unit, fmt: str) -> str:
    return "fp8" if fmt == "nvfp4" and not unit.nvfp4 else fmt


def lowest_bpe(plan: QuantPlan) -> float:
    """The BPE with every unit in NVFP4 (FP8 where NVFP4 cannot hold it): the least any plan reaches."""
    return plan.with_formats(lambda unit: _allowed(unit, "nvfp4")).bpe


def check_budget(plan: QuantPlan, budget: float) -> None:
    """UserError for a budget no plan can meet, or one that needs no quantization."""
    floor = lowest_bpe(plan)
    unquantized = plan.with_formats(lambda unit: "bf16").bpe
    if not budget > 0:
        raise UserError(f"--bpe must be a positive number of bits per element, got {budget}")
    if budget < floor:
        raise UserError(
            f"--bpe {budget} is below {floor:.3f}, the least this model reaches with every quantizable weight in "
            "NVFP4 (embeddings, norms, routers and Mamba's conv and SSM parameters stay 16-bit)"
        )
    if budget >= unquantized:
        raise UserError(f"--bpe {budget} is at or above the unquantized {unquantized:.3f} bits per element: "
                        "nothing needs quantizing")
