"""Low-precision training: which modules the recipe converts, the quantized GEMMs of each format, and a tiny model
that trains under emulated NVFP4 and FP8 as well as in full precision."""

import copy

import pytest
import torch
import torch.nn.functional as F

import model as n3
import presets
from kernels.fp8 import E5M2, fp8_quantize
from kernels.hadamard import random_hadamard_transform
from kernels.nvfp4 import nvfp4_fake_quantize
from model.errors import UserError
from model.lowp import QuantizedExperts, QuantizedLinear, convert, plan, quantized_linear
from presets.schema import PrecisionConfig
from tests.test_model import tiny_config


def test_recipe_plan_on_the_ultra_shape():
    cfg = presets.load("gb200")
    model = n3.build(cfg.model, device="meta")
    formats = plan(model, cfg.precision)
    layers = cfg.model.num_layers
    assert layers == 108
    kept = {int(name.split(".")[2]) for name, fmt in formats.items()
            if name.startswith("model.layers.") and name.endswith(".in_proj") and fmt == "bf16"}
    mamba_layers = [i for i, kind in enumerate(cfg.model.main_pattern) if kind == "M"]
    assert kept == {i for i in mamba_layers if i >= layers - 16}  # the final 16 sublayers stay BF16
    assert formats["model.layers.0.mixer.in_proj"] == "nvfp4"
    assert formats["model.layers.0.mixer.out_proj"] == "mxfp8"
    assert formats["model.layers.1.mixer.experts"] == "nvfp4"
    assert formats["model.layers.1.mixer.shared_experts.up_proj"] == "nvfp4"
    assert formats["model.layers.1.mixer.fc1_latent_proj"] == "bf16"
    assert formats["model.layers.7.mixer.q_proj"] == "bf16"
    assert formats["lm_head"] == "bf16"
    assert {fmt for name, fmt in formats.items() if name.startswith("mtp.")} == {"bf16"}
    assert plan(model, PrecisionConfig(compute="bf16")) == {}
    fp8 = plan(model, PrecisionConfig(compute="fp8"))
    assert fp8["model.layers.0.mixer.out_proj"] == "fp8" and fp8["model.layers.0.mixer.in_proj"] == "fp8"


def test_nvfp4_gemms_follow_the_recipe():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, 48, generator=gen, requires_grad=True)
    w = torch.randn(32, 48, generator=gen, requires_grad=True)
    dy = torch.randn(2, 20, 32, generator=gen)
    torch.manual_seed(1)
    y = quantized_linear(x, w, "nvfp4")
    y.backward(dy)
    wq = nvfp4_fake_quantize(w.detach(), (16, 16))
    x2, dy2 = x.detach().reshape(40, 48), dy.reshape(40, 32)
    torch.testing.assert_close(y.detach().reshape(40, 32), nvfp4_fake_quantize(x2) @ wq.T)
    torch.manual_seed(1)  # the same stochastic-rounding draws, in the same order as the backward
    dx = nvfp4_fake_quantize(dy2, stochastic=True) @ wq
    dw = nvfp4_fake_quantize(random_hadamard_transform(dy2.T), stochastic=True) @ nvfp4_fake_quantize(
        random_hadamard_transform(x2.T)).T
    torch.testing.assert_close(x.grad.reshape(40, 48), dx)
    torch.testing.assert_close(w.grad, dw)
    # Straight-through: close to the exact gradients, not equal to them.
    exact_dw = dy2.T @ x2
    assert 0 < (w.grad - exact_dw).norm() / exact_dw.norm() < 0.25


def test_fp8_and_mxfp8_gemms():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(24, 64, generator=gen, requires_grad=True)
    w = torch.randn(32, 64, generator=gen, requires_grad=True)
    dy = torch.randn(24, 32, generator=gen)
    y = quantized_linear(x, w, "fp8")
    y.backward(dy)
    (xq, sx), (wq, sw), (gq, sg) = fp8_quantize(x.detach()), fp8_quantize(w.detach()), fp8_quantize(dy, dtype=E5M2)
    torch.testing.assert_close(y.detach(), (xq.float() * sx) @ (wq.float() * sw).T)
    torch.testing.assert_close(x.grad, (gq.float() * sg) @ (wq.float() * sw))
    torch.testing.assert_close(w.grad, (gq.float() * sg).T @ (xq.float() * sx))
    x.grad = w.grad = None
    y = quantized_linear(x, w, "mxfp8")
    y.backward(dy)
    exact = x.detach() @ w.detach().T
    assert 0 < (y - exact).norm() / exact.norm() < 0.05
    assert (w.grad - dy.T @ x.detach()).norm() / (dy.T @ x.detach()).norm() < 0.05
    with pytest.raises(ValueError, match="unknown low-precision format"):
        quantized_linear(x, w, "int4")


def markov_batches(seed: int, vocab: int = 64, batch: int = 8, length: int = 65):
    """Sequences where each token has 4 possible successors: loss can fall to log 4 but not memorise a batch."""
    successors = torch.randint(0, vocab, (vocab, 4), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.empty(batch, length, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        for t in range(1, length):
            ids[:, t] = successors[ids[:, t - 1], torch.randint(0, 4, (batch,), generator=gen)]
        yield ids


def train(model, steps: int = 60) -> list[float]:
    """AdamW on fresh Markov batches with the main and MTP losses; returns the main loss per step."""
    torch.manual_seed(3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    device = next(model.parameters()).device
    for _, ids in zip(range(steps), markov_batches(seed=4)):
        inputs, labels = ids[:, :-1].to(device), ids[:, 1:].to(device)
        hidden = model.model(inputs)
        loss = cross_entropy(model.logits(hidden), labels)
        main = loss.item()
        for k, depth in enumerate(model.mtp_hidden(hidden, inputs, 2), start=1):  # MTP: 0.3 / 2 per depth
            loss = loss + 0.15 * cross_entropy(model.logits(depth)[:, :-k], labels[:, k:])
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
            assert missing == [], f"no gradient reached {missing}"
        optimizer.step()
        losses.append(main)
    return losses


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


@pytest.fixture
def one_thread():
    """Tiny GEMMs gain nothing from a second thread, and lose a lot to its synchronisation when cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("compute", ["nvfp4", "fp8"])
def test_tiny_model_trains_in_low_precision_close_to_full_precision(compute, one_thread):
    """The stated gap: over the last 10 of 60 steps the mean loss is within 0.05 nats (3%) of the fp32 run's."""
    torch.manual_seed(5)
    reference = n3.build(tiny_config())
    quantized = copy.deepcopy(reference)
    conversion = convert(quantized, PrecisionConfig(compute=compute))
    assert conversion.backend == "emulated" and "not installed" in conversion.summary()
    converted = {fmt for fmt in conversion.formats.values()}
    assert converted == ({"bf16", "nvfp4", "mxfp8"} if compute == "nvfp4" else {"bf16", "fp8"})
    assert isinstance(quantized.model.layers[2].mixer.experts, QuantizedExperts)
    assert isinstance(quantized.model.layers[0].mixer.in_proj, QuantizedLinear)
    full, low = train(reference), train(quantized)
    tail = lambda losses: sum(losses[-10:]) / 10  # noqa: E731
    assert tail(full) < 0.45 * full[0]  # it learned
    assert abs(tail(low) - tail(full)) < 0.05, (tail(low), tail(full))


def test_conversion_keeps_parameters_and_checkpoints(tmp_path):
    model = n3.build(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {id(p) for p in model.parameters()}
    convert(model, PrecisionConfig(compute="nvfp4"))
    assert {id(p) for p in model.parameters()} == params  # the optimizer built before still holds them
    assert model.state_dict().keys() == before.keys()
    n3.save_pretrained(model, tmp_path / "ckpt")
    loaded = n3.from_pretrained(tmp_path / "ckpt")
    assert all(torch.equal(loaded.state_dict()[k], before[k]) for k in before)
    assert convert(n3.build(tiny_config()), PrecisionConfig(compute="bf16")).formats == {}
    with pytest.raises(ValueError, match="backend"):
        convert(n3.build(tiny_config()), PrecisionConfig(compute="fp8"), backend="triton")


@pytest.mark.gpu
def test_fp8_training_runs_real_fp8_gemms_on_cuda():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9+")
    model = n3.build(tiny_config(hidden_size=64, moe_latent_size=32), device="cuda")
    conversion = convert(model, PrecisionConfig(compute="fp8"), backend="emulated")
    assert conversion.backend == "scaled_mm"
    x = torch.randn(64, 64, device="cuda")
    w = torch.randn(32, 64, device="cuda")
    fast = quantized_linear(x, w, "fp8")
    (xq, sx), (wq, sw) = fp8_quantize(x), fp8_quantize(w)
    torch.testing.assert_close(fast, (xq.float() * sx) @ (wq.float() * sw).T, rtol=1e-3, atol=1e-3)
    losses = train(model, steps=5)
    assert losses[-1] < losses[0]


@pytest.mark.gpu
def test_transformer_engine_linear_matches_the_emulation():
    pytest.importorskip("transformer_engine.pytorch")
    model = n3.build(tiny_config(hidden_size=64, moe_latent_size=32), device="cuda")
    conversion = convert(model, PrecisionConfig(compute="fp8"))
    assert conversion.backend == "transformer_engine"
    linear = model.model.layers[0].mixer.in_proj
    x = torch.randn(32, 64, device="cuda")
    expected = quantized_linear(x, linear.weight, "fp8")
    torch.testing.assert_close(linear(x).float(), expected.float(), rtol=0.05, atol=0.05)


def test_precision_module_lists_are_preset_data(tmp_path):
    cfg = presets.load("cpu", ["precision.compute=nvfp4", "precision.bf16_modules=lm_head, mtp.*",
                               "precision.fp8_modules=", "precision.bf16_last_layers=0.5"])
    assert cfg.precision.bf16_modules == ["lm_head", "mtp.*"] and cfg.precision.fp8_modules == []
    formats = plan(n3.build(tiny_config(), device="meta"), cfg.precision)
    assert formats["model.layers.1.mixer.q_proj"] == "nvfp4" and formats["model.layers.0.mixer.out_proj"] == "nvfp4"
    assert formats["model.layers.2.mixer.experts"] == "nvfp4" and formats["model.layers.3.mixer.in_proj"] == "bf16"
    bad = tmp_path / "bad.toml"
    bad.write_text('extends = "b200"\n[precision]\nbf16_modules = "lm_head"\n')
    with pytest.raises(UserError, match="'precision.bf16_modules' in .*bad.toml must be a list of strings"):
        presets.load(str(bad))
