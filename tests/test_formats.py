"""Low-precision formats against the byte-exact references: modelopt's NVFP4QTensor / MXFP8QTensor and torchao's
NVFP4Tensor / to_mx (dev extra), plus the properties the recipe relies on (2-D blocks, SR, Four-Over-Six, Hadamard)."""

import warnings

import pytest
import torch

from kernels.fp8 import (
    E4M3, E5M2, e4m3_decode, e4m3_encode, e8m0_decode, e8m0_encode, fp8_quantize, mxfp8_dequantize, mxfp8_quantize,
    scaled_mm,
)
from kernels.hadamard import hadamard_matrix, random_hadamard_matrix, random_hadamard_transform
from kernels.nvfp4 import (
    E2M1_GRID, block_scales, e2m1_decode, e2m1_encode, nvfp4_fake_quantize, nvfp4_quantize, pack_fp4, unpack_fp4,
)

SHAPES = [(64, 128), (48, 256), (272, 48), (512, 512)]
DISTRIBUTIONS = ["normal", "uniform", "student_t", "row_scaled", "cauchy"]
"""row_scaled: rows whose scales span e^(+-9), so that some blocks are tiny next to the tensor max; student_t (2 dof)
and cauchy: heavy tails."""


def sample(distribution: str, shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if distribution == "normal":
        return torch.randn(shape, generator=gen)
    if distribution == "uniform":
        return torch.rand(shape, generator=gen) * 10 - 3
    if distribution == "student_t":
        return torch.randn(shape, generator=gen) / (torch.randn(shape, generator=gen).square()
                                                     + torch.randn(shape, generator=gen).square()).div(2).sqrt()
    if distribution == "row_scaled":
        return torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape[0], 1, generator=gen) * 3)
    return torch.tan((torch.rand(shape, generator=gen) - 0.5) * torch.pi)  # Cauchy


def modelopt_nvfp4(x):
    qtensor = pytest.importorskip("modelopt.torch.quantization.qtensor")
    packed, scale, scale_2 = qtensor.NVFP4QTensor.quantize(x.clone(), 16)
    return packed._quantized_data, scale, scale_2


def torchao_nvfp4(x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nvfp4 = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    tensor = nvfp4.NVFP4Tensor.to_nvfp4(x.contiguous(), 16, per_tensor_scale=nvfp4.per_tensor_amax_to_scale(x.abs().amax()))
    return tensor.qdata, tensor.scale, tensor.per_tensor_scale


# --- E2M1 -------------------------------------------------------------------------------------------------------------
def test_e2m1_grid_ties_saturation_and_sign():
    grid = torch.tensor(E2M1_GRID)
    assert torch.equal(e2m1_decode(e2m1_encode(grid)), grid)
    assert torch.equal(e2m1_encode(-grid[1:]), torch.arange(9, 16, dtype=torch.uint8))
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert e2m1_decode(e2m1_encode(ties)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # to the even mantissa
    assert e2m1_decode(e2m1_encode(torch.tensor([0.26, 5.01, 7.0, 1e9, -1e9]))).tolist() == [0.5, 6.0, 6.0, 6.0, -6.0]
    assert e2m1_encode(torch.tensor([-0.1, -0.0])).tolist() == [8, 0]  # negatives rounding to 0 keep the sign


def test_fp4_packing_order():
    codes = torch.tensor([[1, 2, 3, 15]], dtype=torch.uint8)
    assert pack_fp4(codes).tolist() == [[0x21, 0xF3]]  # element 2k low nibble, 2k+1 high
    assert torch.equal(unpack_fp4(pack_fp4(codes)), codes)


# --- NVFP4 against modelopt and torchao -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_nvfp4_is_byte_identical_to_modelopt(distribution, dtype):
    for seed, shape in enumerate(SHAPES):
        x = sample(distribution, shape, seed).to(dtype)
        ours = nvfp4_quantize(x)
        packed, scale, scale_2 = modelopt_nvfp4(x)
        assert torch.equal(ours.packed, packed)
        assert torch.equal(ours.block_scale.view(torch.uint8), scale.view(torch.uint8))
        assert torch.equal(ours.global_scale, scale_2)


def _near_tie(values: torch.Tensor, rounding) -> torch.Tensor:
    """Where `rounding` changes under a nudge of 4 fp32 ulps: halfway cases that the order of fp32 operations decides."""
    return rounding(values * (1 - 2**-21)) != rounding(values * (1 + 2**-21))


def _where_torchao_may_differ(x, ours):
    """torchao floors block scales at 2^-6 (E4M3's smallest normal; n3 and modelopt at the smallest subnormal, 2^-9) and
    computes x * ((1 / s_g) / s_b) and (amax_b / 6) / s_g where modelopt computes x / (s_b * s_g) and amax_b / (6 s_g):
    the two agree except at near-ties. Returns (blocks, elements) where a difference is allowed."""
    block_amax = x.float().abs().reshape(x.shape[0], -1, 16).amax(-1)
    ideal = block_amax / (6 * ours.global_scale)
    blocks = (ours.block_scale.float() < 2**-6) | _near_tie(ideal, lambda v: v.to(torch.float8_e4m3fn).float())
    scaled = x.float() / (ours.block_scale.float() * ours.global_scale).repeat_interleave(16, 1)
    elements = blocks.repeat_interleave(16, 1) | _near_tie(scaled, e2m1_encode)
    return blocks, elements


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_nvfp4_is_byte_identical_to_torchao_on_fp32(distribution):
    for seed, shape in enumerate(SHAPES):
        x = sample(distribution, shape, seed)
        ours = nvfp4_quantize(x)
        packed, scale, scale_2 = torchao_nvfp4(x)
        blocks, elements = _where_torchao_may_differ(x, ours)
        assert torch.equal(ours.global_scale, scale_2)
        assert torch.all((ours.block_scale.view(torch.uint8) == scale.view(torch.uint8)) | blocks)
        assert torch.all((unpack_fp4(ours.packed) == unpack_fp4(packed)) | elements)
        if distribution in ("normal", "uniform", "student_t"):
            assert blocks.float().mean() < 1e-3 and elements.float().mean() < 1e-3  # rare; no block hits the floor


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_nvfp4_bf16_against_torchao(distribution):
    for seed, shape in enumerate(SHAPES):
        x = sample(distribution, shape, seed).bfloat16()
        ours = nvfp4_quantize(x)
        packed, scale, _ = torchao_nvfp4(x)
        blocks, _ = _where_torchao_may_differ(x, ours)
        assert torch.all((ours.block_scale.view(torch.uint8) == scale.view(torch.uint8)) | blocks)
        same = (unpack_fp4(ours.packed) == unpack_fp4(packed))[~(ours.block_scale.float() < 2**-6).repeat_interleave(16, 1)]
        assert same.float().mean() >= 0.995


def test_all_zero_and_tiny_blocks_dequantize_equal():
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    x[0] = 0  # all-zero blocks
    x[1, :16] = 1e-12  # far below what a block scale can resolve next to the tensor max
    x[2, 16:32] = torch.linspace(-3e-9, 3e-9, 16)
    ours = nvfp4_quantize(x)
    reference = ours.dequantize()
    packed, scale, scale_2 = modelopt_nvfp4(x)
    mo = e2m1_decode(unpack_fp4(packed)) * (scale.float() * scale_2).repeat_interleave(16, 1)
    packed, scale, scale_2 = torchao_nvfp4(x)
    ao = e2m1_decode(unpack_fp4(packed)) * (scale.float() * scale_2).repeat_interleave(16, 1)
    assert torch.equal(reference, mo) and torch.equal(reference, ao)
    assert torch.all(reference[0] == 0) and torch.all(reference[1, :16] == 0) and torch.all(reference[2, 16:32] == 0)
    assert torch.all(nvfp4_fake_quantize(torch.zeros(4, 32)) == 0)  # an all-zero tensor: no 0/0


def test_dequantize_matches_the_definition():
    x = sample("normal", (32, 64), 3)
    q = nvfp4_quantize(x)
    expected = e2m1_decode(unpack_fp4(q.packed)) * (q.block_scale.float() * q.global_scale).repeat_interleave(16, 1)
    assert torch.equal(q.dequantize(), expected)
    assert torch.equal(nvfp4_fake_quantize(x), expected)
    assert (q.dequantize() - x).abs().max() <= x.abs().max() / 6 * 1.07  # half the widest grid step (4 to 6)


def test_2d_blocks_serve_the_transposed_copy():
    w = sample("student_t", (48, 64), 5)
    q = nvfp4_quantize(w, block=(16, 16))
    assert q.block_scale.shape == (3, 4)
    assert torch.equal(nvfp4_fake_quantize(w.T.contiguous(), block=(16, 16)), q.dequantize().T)
    tile_max = w.reshape(3, 16, 4, 16).abs().amax(dim=(1, 3))
    torch.testing.assert_close(q.block_scale.float() * 6 * q.global_scale, tile_max, rtol=0.07, atol=0)


def test_fake_quantize_pads_partial_blocks():
    x = sample("normal", (5, 40), 6)
    padded = torch.nn.functional.pad(x, (0, 8, 0, 11))
    assert torch.equal(nvfp4_fake_quantize(x, block=(16, 16)), nvfp4_fake_quantize(padded, block=(16, 16))[:5, :40])


# --- stochastic rounding ----------------------------------------------------------------------------------------------
def test_stochastic_rounding_to_fp4_is_unbiased_and_beats_nearest_on_average():
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(4096, generator=gen) * 12 - 6
    draws = torch.stack([e2m1_decode(e2m1_encode(x, stochastic=True, generator=gen)) for _ in range(300)])
    grid = torch.tensor(E2M1_GRID)
    lower = grid[(torch.searchsorted(grid, x.abs(), right=True) - 1).clamp(max=6)]
    upper = grid[torch.searchsorted(grid, lower, right=True).clamp(max=7)]
    assert torch.all((draws.abs() == lower) | (draws.abs() == upper))  # always one of the two neighbours
    mean = draws.mean(0)
    assert (mean - x).mean().abs() < 0.01
    nearest = e2m1_decode(e2m1_encode(x))
    assert (mean - x).abs().mean() < 0.2 * (nearest - x).abs().mean()
    on_grid = torch.tensor([0.0, 1.5, -4.0, 6.0])
    assert torch.equal(e2m1_decode(e2m1_encode(on_grid, stochastic=True)), on_grid)
    # Through NVFP4 (same scales as round-to-nearest, elements rounded stochastically): unbiased too.
    g = sample("normal", (16, 64), 8)
    sr = torch.stack([nvfp4_fake_quantize(g, stochastic=True, generator=gen) for _ in range(300)]).mean(0)
    assert (sr - g).abs().mean() < 0.3 * (nvfp4_fake_quantize(g) - g).abs().mean()


# --- Four-Over-Six ----------------------------------------------------------------------------------------------------
def test_four_over_six_lowers_gaussian_weight_error():
    w = sample("normal", (512, 512), 9)
    mse = lambda y: (y - w).square().mean()  # noqa: E731
    base = mse(nvfp4_fake_quantize(w))
    four_six = nvfp4_quantize(w, four_over_six="mse")
    assert mse(four_six.dequantize()) <= 0.85 * base  # the paper: about 16% lower
    four = block_scales(w.reshape(512, 32, 16).abs().amax(-1), four_six.global_scale, target=4.0)
    chose_four = four_six.block_scale.view(torch.uint8) == four.view(torch.uint8)
    assert 0.3 < chose_four.float().mean() < 0.6  # the paper: about 45% of blocks
    assert torch.allclose(four_six.global_scale, w.abs().max() / (6 * 256))
    mae = lambda y: (y - w).abs().mean()  # noqa: E731
    assert mae(nvfp4_fake_quantize(w, four_over_six="mae")) < mae(nvfp4_fake_quantize(w))


def test_four_over_six_never_loses_to_six_per_block():
    w = sample("student_t", (64, 128), 10)
    six = (nvfp4_fake_quantize(w) - w).square().reshape(64, 8, 16).sum(-1)
    # Same global scale for both so the per-block choice is the only difference.
    amax = w.abs().amax()
    ours = nvfp4_quantize(w, four_over_six="mse")
    plain = nvfp4_quantize(w, amax=amax * 448 / 256)  # the "6" candidate under Four-Over-Six's global scale
    best = (ours.dequantize() - w).square().reshape(64, 8, 16).sum(-1)
    assert torch.all(best <= (plain.dequantize() - w).square().reshape(64, 8, 16).sum(-1))
    assert best.sum() < six.sum()


# --- FP8, E8M0, MXFP8 -------------------------------------------------------------------------------------------------
def test_e4m3_and_e8m0_codes():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = ~e4m3_decode(codes).isnan()
    assert finite.sum() == 254  # 0x7F and 0xFF are NaN
    assert torch.equal(e4m3_encode(e4m3_decode(codes[finite])), codes[finite])
    assert e4m3_decode(e4m3_encode(torch.tensor([1e6, -1e6, 449.0, 0.0]))).tolist() == [448.0, -448.0, 448.0, 0.0]
    assert e4m3_decode(e4m3_encode(torch.tensor([2**-10, 2**-9 * 1.5]))).tolist() == [0.0, 2**-8]  # ties to even
    powers = torch.exp2(torch.arange(-127, 128).float())
    assert torch.equal(e8m0_encode(powers), torch.arange(0, 255).to(torch.uint8))
    assert torch.equal(e8m0_decode(torch.arange(0, 255).to(torch.uint8)), powers)
    assert e8m0_decode(torch.tensor([255], dtype=torch.uint8)).isnan().all()
    assert e8m0_encode(torch.tensor([3.0]), "ceil").item() == 129 and e8m0_encode(torch.tensor([3.0]), "floor").item() == 128


def test_per_tensor_fp8_matches_modelopt_export():
    w = sample("student_t", (64, 96), 11)
    data, scale = fp8_quantize(w)
    assert scale == w.abs().max() / 448
    expected = (w / (w.abs().max() / 448)).to(torch.float8_e4m3fn)  # modelopt's to_quantized_weight for FP8
    assert torch.equal(data.view(torch.uint8), expected.view(torch.uint8))
    grad, grad_scale = fp8_quantize(w * 1e-6, dtype=E5M2)
    assert grad.dtype == E5M2 and grad.float().abs().max() == 57344.0


@pytest.mark.parametrize("distribution", ["normal", "cauchy", "row_scaled"])
def test_mxfp8_matches_torchao_floor_and_modelopt_ceil(distribution):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
        qtensor = pytest.importorskip("modelopt.torch.quantization.qtensor")
    x = sample(distribution, (64, 256), 12)
    scale, data = mx.to_mx(x, torch.float8_e4m3fn, 32)
    ours, ours_scale = mxfp8_quantize(x, rounding="floor")
    assert torch.equal(ours_scale, scale.view(torch.uint8).reshape(64, 8))
    assert torch.equal(ours.view(torch.uint8), data.view(torch.uint8))
    qt, mo_scale = qtensor.MXFP8QTensor.quantize(x)
    ours, ours_scale = mxfp8_quantize(x)
    assert torch.equal(ours_scale, mo_scale) and torch.equal(ours.view(torch.uint8), qt._quantized_data.view(torch.uint8))
    deq = mxfp8_dequantize(ours, ours_scale)
    assert torch.equal(deq, qt.dequantize(dtype=torch.float32, scale=mo_scale))
    block_max = x.abs().reshape(64, 8, 32).amax(-1)
    deq_max = deq.abs().reshape(64, 8, 32).amax(-1)
    assert torch.all((deq_max - block_max).abs() <= block_max * 2**-4)  # ceil never saturates the block max


# --- Hadamard and the FP8 GEMM ----------------------------------------------------------------------------------------
def test_random_hadamard_is_orthonormal_and_preserves_gemms():
    for q in (hadamard_matrix(16), random_hadamard_matrix(16)):
        torch.testing.assert_close(q @ q.T, torch.eye(16))
    assert torch.all(random_hadamard_matrix(16).abs() == 0.25)
    assert not torch.equal(random_hadamard_matrix(16), hadamard_matrix(16))
    gen = torch.Generator().manual_seed(13)
    grad, x = torch.randn(40, 24, generator=gen), torch.randn(40, 32, generator=gen)  # (tokens, out), (tokens, in)
    transformed = random_hadamard_transform(grad.T) @ random_hadamard_transform(x.T).T
    torch.testing.assert_close(transformed, grad.T @ x, rtol=1e-5, atol=1e-5)
    # It spreads an outlier over its block of 16.
    spike = torch.zeros(1, 16)
    spike[0, 3] = 8.0
    assert torch.all(random_hadamard_transform(spike).abs() == 2.0)


def test_scaled_mm_emulation():
    gen = torch.Generator().manual_seed(14)
    a, b = torch.randn(8, 32, generator=gen), torch.randn(32, 16, generator=gen)
    (qa, sa), (qb, sb) = fp8_quantize(a), fp8_quantize(b)
    out = scaled_mm(qa, qb, sa, sb, torch.float32)
    torch.testing.assert_close(out, (qa.float() * sa) @ (qb.float() * sb))
    assert (out - a @ b).abs().max() < 0.1 * (a @ b).abs().max()
    assert qa.dtype == E4M3


@pytest.mark.gpu
def test_scaled_mm_fast_path_matches_the_emulation():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9+")
    gen = torch.Generator().manual_seed(15)
    a, b = torch.randn(64, 128, generator=gen).cuda(), torch.randn(128, 32, generator=gen).cuda()
    (qa, sa), (qb, sb) = fp8_quantize(a), fp8_quantize(b, dtype=E5M2)
    fast = scaled_mm(qa, qb, sa, sb, torch.float32)
    emulated = ((qa.float() @ qb.float()) * (sa * sb))
    torch.testing.assert_close(fast, emulated, rtol=1e-3, atol=1e-3)
