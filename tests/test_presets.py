"""Presets: every hardware preset resolves, shapes hold the published values, and extends, --set and the strict
checks behave as documented in presets/loader.py."""

import json
import re

import pytest

import presets
from model.errors import UserError
from presets.loader import KEYS
from presets.schema import CHOICES

HARDWARE_SHAPE = {"cpu": "tiny", "h100": "small", "h200": "nano", "b200": "super", "gb200": "ultra"}


def write(path, text):
    path.write_text(text)
    return str(path)


def load_error(*args) -> str:
    with pytest.raises(UserError) as error:
        presets.load(*args)
    return str(error.value)


# --- the built-in presets --------------------------------------------------------------------------------------


def test_every_hardware_preset_resolves_to_its_shape():
    assert presets.names() == sorted(HARDWARE_SHAPE)
    assert presets.shapes() == ["nano", "small", "super", "tiny", "ultra"]
    for name, shape in HARDWARE_SHAPE.items():
        cfg = presets.load(name)
        assert (cfg.name, cfg.shape) == (name, shape)
        assert cfg.description
        assert cfg.model == presets.shape(shape)  # built-in presets take their shape as published


def test_cpu_is_the_default():
    cfg = presets.load()
    assert cfg.name == "cpu" and cfg.shape == "tiny"
    assert (cfg.precision.params, cfg.precision.compute, cfg.parallel.strategy) == ("fp32", "fp32", "none")
    assert (cfg.train.seq_len, cfg.train.micro_batch_size, cfg.train.global_batch_size) == (256, 8, 16)
    assert {cfg.kernels.ssd, cfg.kernels.conv1d, cfg.kernels.attention, cfg.kernels.moe} == {"torch"}


def test_cluster_plans():
    h200 = presets.load("h200")  # extends h100: precision and kernels inherited, parallel and train its own
    assert (h200.precision.params, h200.precision.compute, h200.kernels.ssd) == ("fp32", "bf16", "auto")
    assert (h200.parallel.strategy, h200.parallel.world_size, h200.parallel.expert) == ("fsdp", 32, 8)
    assert (h200.train.seq_len, h200.train.micro_batch_size, h200.train.global_batch_size) == (8192, 2, 512)
    gb200 = presets.load("gb200")
    assert (gb200.parallel.nodes, gb200.parallel.gpus_per_node, gb200.parallel.pipeline) == (128, 4, 4)
    assert (gb200.precision.compute, gb200.parallel.expert, gb200.train.global_batch_size) == ("nvfp4", 64, 3072)


@pytest.mark.parametrize(
    "shape, expected",
    [
        ("nano", dict(hidden_size=2688, num_layers=52, mtp_pattern="", n_routed_experts=128, num_experts_per_tok=6,
                      moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712, moe_latent_size=0,
                      mamba_num_heads=64, routed_scaling_factor=2.5, max_position_embeddings=1048576)),
        ("super", dict(hidden_size=4096, mtp_pattern="*E", n_routed_experts=512, num_experts_per_tok=22,
                       moe_intermediate_size=2688, moe_latent_size=1024, mamba_num_heads=128,
                       routed_scaling_factor=5.0)),
        ("ultra", dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=2, mamba_num_heads=256,
                       moe_intermediate_size=5120, moe_shared_expert_intermediate_size=10240, moe_latent_size=2048)),
        ("small", dict(hidden_size=2048, pattern="MEMEM*EMEMEM*EMEMEME/*E", num_attention_heads=16,
                       n_routed_experts=32, num_experts_per_tok=4, moe_latent_size=1024, max_position_embeddings=8192)),
        ("tiny", dict(vocab_size=4096, hidden_size=128, pattern="MEM*EMEM*E/*E", head_dim=32, mamba_head_dim=32,
                      mamba_groups=2, ssm_state_size=32, chunk_size=64, moe_latent_size=64, intermediate_size=256,
                      max_position_embeddings=1024)),
    ],
)
def test_shapes_hold_published_values(shape, expected):
    model = presets.shape(shape)
    assert {key: getattr(model, key) for key in expected} == expected
    assert model.vocab_size == (4096 if shape == "tiny" else 131072)
    assert (model.norm_eps, model.conv_kernel) == (1e-5, 4)


def test_every_choice_names_a_schema_key():
    assert set(CHOICES) <= set(KEYS)
    assert CHOICES["kernels.ssd"] == ("auto", "torch", "mamba_ssm")


def test_as_dict_is_nested_and_json_ready():
    values = presets.as_dict(presets.load("h100"))
    assert json.loads(json.dumps(values)) == values
    assert values["name"] == "h100"
    assert values["parallel"]["gpus_per_node"] == 8 and values["model"]["hidden_size"] == 2048


# --- layering: shape < extends chain < the preset's file < --set ---------------------------------------------


def test_extends_deep_merges_and_the_child_wins(tmp_path):
    base = 'shape = "small"\n[train]\nseq_len = 1024\nmicro_batch_size = 2\nglobal_batch_size = 16\n'
    write(tmp_path / "base.toml", base + "[model]\nmax_position_embeddings = 2048\n")
    child = write(tmp_path / "child.toml", 'extends = "base.toml"\n[train]\nseq_len = 512\n[model]\nnorm_eps = 1e-6\n')
    cfg = presets.load(child)
    assert cfg.name == "child" and cfg.shape == "small"
    assert (cfg.train.seq_len, cfg.train.micro_batch_size, cfg.train.global_batch_size) == (512, 2, 16)
    assert (cfg.model.max_position_embeddings, cfg.model.norm_eps, cfg.model.hidden_size) == (2048, 1e-6, 2048)


def test_a_file_extends_a_builtin_by_name(tmp_path):
    cfg = presets.load(write(tmp_path / "mine.toml", 'extends = "h100"\n[parallel]\ngpus_per_node = 4\n'))
    assert (cfg.shape, cfg.precision.compute, cfg.parallel.gpus_per_node, cfg.parallel.nodes) == ("small", "bf16", 4, 1)


def test_resolution_order(tmp_path):
    mine = write(tmp_path / "mine.toml", 'extends = "cpu"\n[model]\nmax_position_embeddings = 512\nhidden_size = 256\n')
    cfg = presets.load(mine, ["model.hidden_size=64"])
    assert cfg.model.vocab_size == 4096  # shape
    assert cfg.model.max_position_embeddings == 512  # the preset's [model] over the shape
    assert cfg.model.hidden_size == 64  # --set over the preset


def test_set_shape_switches_the_shape_before_model_overrides():
    cfg = presets.load("cpu", ["shape=small", "model.hidden_size=1024"])
    assert cfg.shape == "small" and cfg.model.pattern == "MEMEM*EMEMEM*EMEMEME/*E" and cfg.model.hidden_size == 1024


def test_set_values_are_typed_from_the_schema():
    cfg = presets.load("cpu", ["train.seq_len=128", "model.routed_scaling_factor=3", "model.norm_eps=1e-6",
                               "model.use_conv_bias=false", "precision.compute=bf16", "description=a b=c"])
    assert cfg.train.seq_len == 128 and type(cfg.train.seq_len) is int
    assert cfg.model.routed_scaling_factor == 3.0 and type(cfg.model.routed_scaling_factor) is float
    assert cfg.model.norm_eps == 1e-6 and cfg.model.use_conv_bias is False
    assert (cfg.precision.compute, cfg.description) == ("bf16", "a b=c")


@pytest.mark.parametrize(
    "text, value", [("true", True), ("1", True), ("Yes", True), ("FALSE", False), ("0", False), ("no", False)]
)
def test_set_bool_spellings(text, value):
    assert presets.load("cpu", [f"model.norm_topk_prob={text}"]).model.norm_topk_prob is value


def test_a_toml_int_is_accepted_for_a_float(tmp_path):
    cfg = presets.load(write(tmp_path / "mine.toml", 'extends = "cpu"\n[model]\nrouted_scaling_factor = 3\n'))
    assert type(cfg.model.routed_scaling_factor) is float


# --- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.seq_len=long", "'train.seq_len' in --set must be an integer, got 'long'"),
        ("train.seq_len=1.5", "'train.seq_len' in --set must be an integer, got '1.5'"),
        ("model.routed_scaling_factor=big", "'model.routed_scaling_factor' in --set must be a number, got 'big'"),
        ("model.use_conv_bias=maybe", "'model.use_conv_bias' in --set must be true or false, got 'maybe'"),
        ("precision.compute=fp16", "'precision.compute' in --set must be one of fp32 | bf16 | fp8 | nvfp4, got 'fp16'"),
        ("kernels.ssd=triton", "'kernels.ssd' in --set must be one of auto | torch | mamba_ssm, got 'triton'"),
        ("parallel.strategy=tp", "'parallel.strategy' in --set must be one of none | ddp | fsdp"),
        ("shape=huge", "'shape' in --set must be one of nano | small | super | tiny | ultra, got 'huge'"),
        ("model.hiden_size=64", "unknown key 'model.hiden_size' in --set; did you mean 'model.hidden_size'?"),
        ("seq_len=64", "unknown key 'seq_len' in --set; did you mean 'train.seq_len'?"),
        ("train.seq_len", "--set expects key=value, got 'train.seq_len'"),
        ("model=1", "'model' in --set is a table; set one of its keys"),
        ("train.micro_batch_size=0", "preset cpu: train.micro_batch_size must be at least 1, got 0"),
        ("train.micro_batch_size=3", "train.global_batch_size (16) must be a multiple of train.micro_batch_size"),
        ("parallel.expert=3", "parallel.expert (3) must divide model.n_routed_experts (8)"),
        ("parallel.expert=2", "parallel.expert (2) must divide the data-parallel degree (1)"),
        ("parallel.tensor=3", "the world (1 devices) is not a multiple of parallel.tensor x pipeline x context (3)"),
        ("train.seq_len=4096", "train.seq_len (4096) exceeds the model's context (max_position_embeddings 1024)"),
        ("model.num_key_value_heads=3", "preset cpu: num_attention_heads must be a multiple of num_key_value_heads"),
    ],
)
def test_bad_set_is_a_one_line_user_error(override, message):
    error = load_error("cpu", [override])
    assert message in error and "\n" not in error


def test_unknown_key_in_a_file_names_key_file_and_closest(tmp_path):
    mine = write(tmp_path / "mine.toml", 'extends = "cpu"\n[train]\nseq_length = 128\n')
    error = load_error(mine)
    assert re.fullmatch(r"unknown key 'train.seq_length' in \S*mine.toml; did you mean 'train.seq_len'\?", error)


def test_an_error_names_the_file_in_the_chain_it_came_from(tmp_path):
    write(tmp_path / "base.toml", 'extends = "cpu"\n[precision]\ncompute = "fp16"\n')
    error = load_error(write(tmp_path / "child.toml", 'extends = "base.toml"\n'))
    assert "'precision.compute' in" in error and "base.toml" in error and "child.toml" not in error


@pytest.mark.parametrize(
    "text, message",
    [
        ("[train]\nseq_len = \"long\"\n", "'train.seq_len' in {} must be an integer, got 'long'"),
        ("[model]\nuse_conv_bias = 1\n", "'model.use_conv_bias' in {} must be true or false, got 1"),
        ("train = 3\n", "'train' in {} must be a table ([train]), got 3"),
        ("name = \"x\"\n", "unknown key 'name' in {}"),
        ("[model]\nnum_key_value_heads = 3\n", "preset mine: num_attention_heads must be a multiple"),
        ("[train\n", "{} is not valid TOML"),
        ("extends = 3\n", "'extends' in {} must be a preset name or a path, got 3"),
    ],
)
def test_bad_file_is_a_user_error(tmp_path, text, message):
    mine = write(tmp_path / "mine.toml", text)
    assert message.format(mine) in load_error(mine)


def test_unknown_preset_lists_the_available_ones():
    assert load_error("h300") == (
        "unknown preset 'h300'; available: b200, cpu, gb200, h100, h200 (or a path to a .toml file)"
    )
    assert "preset file nowhere/mine.toml not found" in load_error("nowhere/mine.toml")


def test_bad_extends_names_the_file(tmp_path):
    error = load_error(write(tmp_path / "mine.toml", 'extends = "h300"\n'))
    assert error.startswith("unknown preset 'h300' (extends in ") and "mine.toml" in error
    error = load_error(write(tmp_path / "mine.toml", 'extends = "missing.toml"\n'))
    assert error.startswith("preset file missing.toml not found (extends in ")


def test_extends_cycle(tmp_path):
    write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    error = load_error(str(tmp_path / "a.toml"))
    assert re.fullmatch(r"extends cycle: \S*a.toml -> \S*b.toml -> \S*a.toml", error)
    assert load_error(write(tmp_path / "self.toml", 'extends = "self.toml"\n')).startswith("extends cycle")
