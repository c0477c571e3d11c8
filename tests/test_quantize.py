"""`n3 quantize`: the BPE arithmetic and plans (meta device), a real search and a recipe run on a small checkpoint,
the modelopt-format export against modelopt's own NVFP4QTensor, the reload, and the errors users meet."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import model as n3
import presets
from model.errors import UserError
from n3cli.main import main
from stages.quantize import checkpoint_config, dry_run, quantize
from stages.quantize.plan import lowest_bpe, make_plan
from tests.test_model import tiny_config

pytest.importorskip("modelopt.torch.quantization")


def small_config():
    """tiny_config with every GEMM input a multiple of 16 (NVFP4's block) and the conftest tokenizer's vocabulary."""
    return tiny_config(vocab_size=512, moe_intermediate_size=16, moe_shared_expert_intermediate_size=32,
                       intermediate_size=32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("quantize") / "ckpt"
    torch.manual_seed(0)
    n3.save_pretrained(n3.build(small_config()), path)
    tokenizer.save(path)
    return path


TOKENS = dict(calib_tokens=512, eval_tokens=512, seq_len=64)


@pytest.fixture(scope="module")
def searched(checkpoint):
    out = checkpoint.parent / "searched"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs: see tests/test_lowp.py::one_thread
    try:
        return quantize(checkpoint, out, budget=10.0, four_over_six="mse", **TOKENS), out
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def recipe(checkpoint):
    out = checkpoint.parent / "recipe"
    return quantize(checkpoint, out, recipe="nemotron", four_over_six=None, **TOKENS), out


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`n3 quantize ARGS` in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", *args])
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


# --- the plan on the meta device --------------------------------------------------------------------------------------
def test_nemotron_recipe_on_the_ultra_shape_is_5_02():
    result = dry_run(presets.shape("ultra"), budget=None, recipe="nemotron")
    assert 5.02 <= result.plan.bpe <= 5.03
    assert 350e9 < result.plan.bits / 8 < 353e9  # the report: 352 GB against 1,121 GB in BF16
    groups = {group: formats for group, formats, _, _ in result.plan.groups()}
    assert groups["routed experts"] == "nvfp4" and groups["shared experts"] == "fp8"
    assert groups["Mamba in_proj"] == groups["Mamba out_proj"] == "fp8"
    assert groups["attention"] == groups["MTP"] == groups["lm_head"] == "bf16"


def test_dry_run_budget_on_ultra(capsys):
    result = dry_run(presets.shape("ultra"), budget=5.03, recipe=None)
    assert result.plan.bpe <= 5.03
    assert dry_run(presets.shape("ultra"), budget=5.43, recipe=None).plan.bpe == pytest.approx(5.43, abs=0.005)
    status, out, err = cli(capsys, "--model", "ultra", "--bpe", "5.03", "--dry-run")
    assert status == 0, err
    assert "5.0222" in out and "routed experts" in out


def test_bad_budgets_are_clear_errors(capsys):
    model = n3.build(presets.shape("ultra"), device="meta")
    floor = lowest_bpe(make_plan(model))
    assert 4.5 < floor < 4.6
    for budget, message in [(4.0, "is below 4.52"), (16.5, "nothing needs quantizing"), (-1.0, "positive")]:
        with pytest.raises(UserError, match=message):
            dry_run(presets.shape("ultra"), budget=budget, recipe=None)
    with pytest.raises(UserError, match="gives 5.022 bits per element, above --bpe 5.0"):
        dry_run(presets.shape("ultra"), budget=5.0, recipe="nemotron")
    for args in [("--model", "ultra", "--bpe", "3", "--dry-run"), ("--model", "ultra", "--dry-run"),
                 ("--model", "ultra", "--recipe", "llama", "--dry-run"), ("--bpe", "x", "--dry-run"),
                 ("--model", "ultra", "--bpe", "5"), ("--bpe", "5")]:
        status, _, err = cli(capsys, *args)
        assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, (args, err)


# --- a real run -------------------------------------------------------------------------------------------------------
def stored(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def test_dry_run_of_a_checkpoint(checkpoint, capsys):
    status, out, err = cli(capsys, "-c", str(checkpoint), "--bpe", "10", "--dry-run")
    assert status == 0, err
    assert dry_run(checkpoint_config(checkpoint), budget=10.0, recipe=None).plan.bpe <= 10.0


def test_search_respects_the_budget_to_the_bit(searched, checkpoint):
    result, out = searched
    plan = result.plan
    assert plan.bpe <= 10.0
    assert {"nvfp4", "fp8"} <= set(plan.formats.values())
    tensors = stored(out)
    file_bits = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    assert file_bits == plan.bits  # the arithmetic is the checkpoint's, byte for byte
    assert plan.total_params == sum(p.numel() for p in n3.from_pretrained(checkpoint).parameters())
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["bpe"] == pytest.approx(plan.bpe) and report["quality"]["tokens"] == 512
    assert report["quality"]["kl"] >= 0 and report["quality"]["perplexity"] > 1


def test_export_is_modelopt_format_and_byte_identical_to_modelopt(recipe, checkpoint):
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    result, out = recipe
    original = n3.from_pretrained(checkpoint, dtype=torch.float32)
    tensors = stored(out)
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert hf_quant["quant_algo"] == "MIXED_PRECISION" and config["quant_method"] == "modelopt"
    layers = hf_quant["quantized_layers"]
    assert layers["backbone.layers.2.mixer.experts.0.up_proj"] == {"quant_algo": "NVFP4", "group_size": 16}
    assert layers["backbone.layers.0.mixer.in_proj"] == {"quant_algo": "FP8"}
    assert "backbone.layers.1.mixer.q_proj" not in layers and config["quantized_layers"] == layers
    # NVFP4 routed experts, max-scaled (--four-over-six off): modelopt's bytes.
    for e in range(6):
        for proj in ("up_proj", "down_proj"):
            weight = getattr(original.model.layers[2].mixer.experts, proj)[e]
            packed, scale, scale_2 = NVFP4QTensor.quantize(weight.clone(), 16)
            prefix = f"backbone.layers.2.mixer.experts.{e}.{proj}"
            assert torch.equal(tensors[f"{prefix}.weight"], packed._quantized_data)
            assert torch.equal(tensors[f"{prefix}.weight_scale"].view(torch.uint8), scale.view(torch.uint8))
            assert torch.equal(tensors[f"{prefix}.weight_scale_2"], scale_2.reshape(()))
            assert tensors[f"{prefix}.input_scale"].shape == () and tensors[f"{prefix}.input_scale"] > 0
    fp8 = original.model.layers[0].mixer.in_proj.weight
    assert tensors["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(tensors["backbone.layers.0.mixer.in_proj.weight_scale"], fp8.abs().max() / 448)
    assert tensors["backbone.layers.1.mixer.q_proj.weight"].dtype == torch.bfloat16
    assert tensors["backbone.layers.2.mixer.gate.e_score_correction_bias"].dtype == torch.float32
    assert (out / "tokenizer.json").is_file()


def test_four_over_six_experts_in_the_search(searched):
    result, out = searched
    tensors = stored(out)
    experts = [name for name, fmt in result.plan.formats.items() if name.endswith(".experts") and fmt == "nvfp4"]
    assert experts, result.plan.formats
    prefix = "backbone." + experts[0].removeprefix("model.") + ".0.up_proj"
    weight = n3.from_pretrained(out.parent / "ckpt", dtype=torch.float32).get_submodule(experts[0]).up_proj[0]
    from kernels.nvfp4 import nvfp4_quantize

    expected = nvfp4_quantize(weight, four_over_six="mse")
    assert torch.equal(tensors[f"{prefix}.weight"], expected.packed)
    assert torch.equal(tensors[f"{prefix}.weight_scale_2"], weight.abs().max() / (6 * 256))


def test_reload_is_exact_to_the_exported_codes(recipe):
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    result, out = recipe
    tensors = stored(out)
    loaded = n3.from_pretrained(out, dtype=torch.float32)
    state = loaded.state_dict()
    for e in range(6):
        prefix = f"backbone.layers.2.mixer.experts.{e}.down_proj"
        packed = NVFP4QTensor((16, 16), torch.float32, tensors[f"{prefix}.weight"])
        decoded = packed.dequantize(dtype=torch.float32, scale=tensors[f"{prefix}.weight_scale"],
                                    double_scale=tensors[f"{prefix}.weight_scale_2"], block_sizes={-1: 16})
        assert torch.equal(state["model.layers.2.mixer.experts.down_proj"][e], decoded)
    fp8 = tensors["backbone.layers.0.mixer.in_proj.weight"].float() * tensors["backbone.layers.0.mixer.in_proj.weight_scale"]
    assert torch.equal(state["model.layers.0.mixer.in_proj.weight"], fp8)
    assert torch.equal(state["model.layers.1.mixer.q_proj.weight"], tensors["backbone.layers.1.mixer.q_proj.weight"].float())
    # Logits of the reloaded model are those of a model holding exactly the decoded weights.
    rebuilt = n3.build(loaded.config)
    rebuilt.load_state_dict(state)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids), rebuilt(ids))
    assert n3.from_pretrained(out).lm_head.weight.dtype == torch.bfloat16  # served as the checkpoint's dtype
    assert result.quality.kl < 0.05 and abs(result.quality.perplexity / result.quality.reference_perplexity - 1) < 0.05


def test_bad_checkpoints_and_outputs(tmp_path, checkpoint, recipe):
    _, quantized = recipe
    with pytest.raises(UserError, match="does not exist"):
        quantize(tmp_path / "missing", tmp_path / "out", budget=8.0)
    with pytest.raises(UserError, match="already quantized"):
        quantize(quantized, tmp_path / "out", budget=8.0)
    with pytest.raises(UserError, match="is the checkpoint being quantized"):
        quantize(checkpoint, checkpoint, budget=8.0)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a checkpoint; refusing"):
        quantize(checkpoint, tmp_path / "notes", budget=8.0)
    bare = tmp_path / "bare"
    n3.save_pretrained(n3.build(small_config()), bare)  # no tokenizer
    with pytest.raises(UserError, match="no tokenizer.json"):
        quantize(bare, tmp_path / "out", budget=8.0)
    with pytest.raises(UserError, match="below"):
        quantize(checkpoint, tmp_path / "out", budget=2.0)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"]["quantized_layers"]["backbone.layers.0.mixer.in_proj"] = {"quant_algo": "W4A8_AWQ"}
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in quantized.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="W4A8_AWQ"):
        n3.from_pretrained(broken)
    assert not (tmp_path / "out").exists()
