"""`n3 quantize`: post-training quantization of an n3 or Hugging Face NemotronH checkpoint to a bits-per-element budget.

    checkpoint -> per-layer formats (AutoQuantize search within --bpe, or the Nemotron recipe)
               -> activation ranges (modelopt max calibration) -> NVFP4 / FP8 / BF16 weights (n3's kernels)
               -> modelopt-format checkpoint -> reloaded (W4A16) and compared with the original on held-out tokens

Division of labour: nvidia-modelopt supplies the quantizer modules, the calibration, the AutoQuantize search and
the shape of hf_quant_config.json / quantization_config; n3 supplies the NVFP4 fake quantization it runs on the CPU
(kernels.nvfp4, registered as a modelopt backend), its routed-experts module, the BPE arithmetic over all
parameters, the Four-Over-Six weights, the export under the released hub names, and the reload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model.checkpoint import config_from_hf, from_pretrained, read_config, resolve_checkpoint
from model.config import ModelConfig
from model.errors import UserError
from model.hybrid import build
from model.tokenizer import Tokenizer
from stages.quantize.data import Quality, quality, token_batches
from stages.quantize.plan import QuantPlan, check_budget, ladder_plan, make_plan, recipe_plan
from stages.runtime.files import write_json

RECIPES = ("nemotron",)


@dataclass
class QuantizeResult:
    plan: QuantPlan
    method: str
    """How the formats were chosen, in words."""
    budget: float | None = None
    quality: Quality | None = None
    out: Path | None = None

    def report(self) -> dict:
        return {
            "method": self.method,
            "budget_bpe": self.budget,
            "bpe": self.plan.bpe,
            "bytes": self.plan.bits // 8,
            "bf16_bytes": self.plan.with_formats(lambda unit: "bf16").bits // 8,
            "parameters": self.plan.total_params,
            "groups": [
                {"group": g, "formats": f, "parameters": p, "bits": b, "bpe": b / p if p else 0.0}
                for g, f, p, b in self.plan.groups()
            ],
            "quality": asdict(self.quality) if self.quality else None,
            "formats": self.plan.formats,
        }


def dry_run(cfg: ModelConfig, budget: float | None, recipe: str | None) -> QuantizeResult:
    """The plan on the meta device: the recipe, or the data-free ladder for a budget (plan.LADDER)."""
    _check_method(budget, recipe)
    model = build(cfg, device="meta")
    if recipe:
        plan = recipe_plan(model)
        _check_recipe_fits(plan, budget)
        return QuantizeResult(plan, f"the {recipe} recipe", budget)
    plan = ladder_plan(model, budget)
    return QuantizeResult(plan, "dry run: the recipe's ordering, whole groups at a time (no sensitivities without "
                                "weights)", budget)


def checkpoint_config(checkpoint: Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory or run folder, without reading its weights (for dry runs)."""
    return config_from_hf(read_config(resolve_checkpoint(checkpoint)))


def quantize(
    checkpoint: Path, out: Path, budget: float | None = None, recipe: str | None = None, calib: Path | None = None,
    calib_tokens: int = 8192, eval_tokens: int = 8192, seq_len: int = 256, batch_size: int = 4,
    four_over_six: str | None = "mse", progress: Callable[[str], None] = lambda message: None,
) -> QuantizeResult:
    """Quantize `checkpoint` (a directory or run folder) into the directory `out`, and measure it.

    budget: bits per element to stay within (AutoQuantize search), or recipe: "nemotron" (and budget, if given, is
    checked against it). calib: a UTF-8 text file (default: the Python standard library's sources); its first
    calib_tokens tokens calibrate and score, the next eval_tokens measure quality, in batches of batch_size
    sequences of seq_len tokens. four_over_six: "mse", "mae" or None for the routed experts' NVFP4 scales.
    progress receives one line per phase.
    """
    from stages.quantize.calibrate import calibrate, input_amax, search
    from stages.quantize.export import write_checkpoint

    _check_method(budget, recipe)
    source, out = resolve_checkpoint(checkpoint), Path(out)
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the checkpoint being quantized; write somewhere else")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise UserError(f"--out {out} exists and is not a checkpoint; refusing to replace it")
    if read_config(source).get("quantization_config"):
        raise UserError(f"{source} is already quantized; quantize its unquantized original")
    progress(f"loading {source}")
    model = from_pretrained(source, dtype=torch.float32).eval()
    plan = make_plan(model)
    if recipe:
        plan = recipe_plan(model)
        _check_recipe_fits(plan, budget)
    else:
        check_budget(plan, budget)
    tokenizer = Tokenizer.load(source)
    calib_batches, eval_batches = token_batches(
        tokenizer, calib, model.config.vocab_size, seq_len, batch_size, calib_tokens, eval_tokens)
    if recipe:
        progress("calibrating activation ranges (modelopt max calibration)")
        quantized = calibrate(model, plan, four_over_six, calib_batches)
        method = f"the {recipe} recipe"
    else:
        progress("measuring per-layer sensitivity and searching formats (modelopt AutoQuantize)")
        plan.formats, quantized = search(model, plan, budget, four_over_six, calib_batches)
        if plan.bpe > budget:
            raise RuntimeError(f"the search returned {plan.bpe:.4f} BPE for a budget of {budget}")
        method = f"AutoQuantize within {budget} BPE"
    amax = input_amax(quantized, plan)
    del quantized
    progress(f"writing {out}")
    result = QuantizeResult(plan, method, budget, out=out)
    write_checkpoint(out, model, plan, amax, four_over_six, source, result.report())
    progress("measuring quality on held-out tokens")
    result.quality = quality(model, from_pretrained(out, dtype=torch.float32).eval(), eval_batches)
    write_json(out / "quantization_report.json", result.report())
    return result


def _check_method(budget: float | None, recipe: str | None) -> None:
    if budget is None and recipe is None:
        raise UserError("say what to reach: --bpe B (a bits-per-element budget) or --recipe nemotron")
    if recipe is not None and recipe not in RECIPES:
        raise UserError(f"unknown --recipe {recipe!r}; recipes: {', '.join(RECIPES)}")


def _check_recipe_fits(plan: QuantPlan, budget: float | None) -> None:
    if budget is not None and plan.bpe > budget:
        raise UserError(f"the nemotron recipe gives {plan.bpe:.3f} bits per element, above --bpe {budget}; "
                        "drop --recipe to search within the budget")
