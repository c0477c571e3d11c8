"""Dry-run plans: the published shapes give the published parameter counts, and every preset plans on meta."""

import subprocess
import sys
from pathlib import Path

import pytest

import presets
from model.hybrid import build
from stages.plan import plan_run, stage_parameters

N3 = Path(sys.executable).parent / "n3"


def test_ultra_counts():
    plan = plan_run(presets.load("gb200"))
    total, active = plan.params.without_mtp()
    assert 549e9 <= total <= 561e9 and 549e9 <= plan.params.total <= 561e9
    assert abs(plan.params.total - total - 11.2e9) < 0.05e9  # MTP adds 11.2B
    # Active counts one embedding row per token, as the Nemotron 3 reports do: 54.99B, which they state as 55B.
    assert 55.0 <= round(active / 1e9, 1) <= 56.0
    assert plan.weight_bytes["bf16"] == 2 * plan.params.total


def test_super_and_nano_counts():
    super_total, super_active = plan_run(presets.load("b200")).params.without_mtp()
    assert abs(super_total - 120.6e9) < 0.1e9
    assert 12.0e9 < super_active < 12.3e9  # "120B-A12B"; 12.77B counting the whole embedding table
    nano = plan_run(presets.load("h200")).params
    assert abs(nano.total - 31.6e9) < 0.05e9 and nano.by_block.get("mtp") is None
    assert abs(nano.active - 3.2e9) < 0.05e9  # the Nano report: 3.2B active (3.6B with embeddings)


def test_layout_and_memory_arithmetic():
    plan = plan_run(presets.load("gb200"))
    assert plan.layout == {"world": 512, "data": 128, "tensor": 1, "pipeline": 4, "expert": 64, "context": 1}
    assert plan.grad_accumulation == 3072 // 128
    p = plan.params
    stages = stage_parameters(build(plan.config.model, device="meta"), 4)
    assert sum(d for d, _ in stages) == p.total - p.routed and sum(r for _, r in stages) == p.routed
    want = max(dense / 128 + routed / (64 * 2) for dense, routed in stages)  # FSDP over 128, experts 64 x 2
    assert plan.params_per_device == int(want)
    assert plan.state_bytes_per_device == int(want * 16)  # fp32 weights + fp32 grads + two fp32 Adam moments
    even = (p.total - p.routed) / (4 * 128) + p.routed / (4 * 64 * 2)
    assert even < want < 1.1 * even  # lm_head and the MTP head make the last stage the heaviest


def test_gemm_formats_follow_the_precision_recipe():
    """gb200 pretrains Ultra in NVFP4: the last 15% of layers (16 of 108), attention, the latent projections, MTP
    and the output layer stay BF16, Mamba out_proj runs in MXFP8, every other GEMM in NVFP4."""
    plan = plan_run(presets.load("gb200"))
    formats, model = plan.gemm_formats, plan.config.model
    assert set(formats) == {"nvfp4", "mxfp8", "bf16"}
    early_mamba = model.main_pattern[:92].count("M")
    assert formats["mxfp8"] == early_mamba * model.mamba_inner * model.hidden_size  # out_proj, bias-free
    assert 0.79 < formats["nvfp4"] / sum(formats.values()) < 0.81  # 448.0B of 559.2B
    assert plan_run(presets.load("cpu")).gemm_formats == {}


@pytest.mark.parametrize("preset", presets.names())
def test_every_preset_dry_runs_from_the_cli(preset):
    result = subprocess.run([str(N3), "pretrain", "--preset", preset, "--dry-run"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Parameters" in result.stdout and "per device" in result.stdout
    assert ("GEMM weights by format (nvfp4 recipe): nvfp4" in result.stdout) == (preset in ("b200", "gb200"))
