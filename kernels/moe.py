"""MoE dispatch: group token copies by expert, then one matmul per expert over its contiguous rows.

Fast path: `torch._grouped_mm` (one kernel for all experts) on CUDA in bf16, with its own autograd. Everywhere else
the custom op `n3::grouped_mm`, which loops over experts (never over tokens) forward and backward. Being one opaque op
with a static output shape, it lets torch.compile take in a whole MoE block: dynamo cannot trace a per-expert split,
whose sizes change every step. (On CPU, torch._grouped_mm measured no faster than the loop, wants 16-byte aligned
strides, and its autograd there is broken in current PyTorch.)
"""

from __future__ import annotations

import torch

from kernels.backends import fast_path


def group_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """expert_ids (tokens, k) -> (order, inverse, counts): `order` lists the flat (token * k + slot) copies sorted by
    expert, stable; `inverse` is its inverse permutation; counts (num_experts,) how many rows each expert gets."""
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    # scatter_add rather than bincount: its output shape does not depend on the data, so it compiles
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    return order, inverse, counts


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x (rows, in), grouped by expert in order; weight (experts, out, in). Returns (rows, out):
    row r of expert e is x[r] @ weight[e].T."""
    if fast_path("moe", x.is_cuda) == "grouped_mm" and x.dtype == torch.bfloat16:
        # Under autocast the weights are still fp32 master copies; the grouped kernel wants one dtype.
        return torch._grouped_mm(x, weight.to(x.dtype).transpose(-2, -1), offs=counts.cumsum(0).to(torch.int32))
    return _grouped_mm(x, weight.to(x.dtype), counts)


ROW_TILE = 8
"""The loop multiplies an expert's rows in whole tiles of this many: MKL rounds a row differently in a call of fewer
rows or in a partial last tile, so a token's expert output would otherwise depend on how many other tokens chose
that expert. With whole tiles every row rounds alike whatever the batch (measured on CPU for row counts up to 1,500),
and the documents of a packed row stay bitwise apart."""


@torch.library.custom_op("n3::grouped_mm", mutates_args=())
def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    sizes = counts.tolist()
    out = x.new_empty(x.shape[0], weight.shape[1])
    for expert, rows, target in zip(weight.unbind(0), x.split(sizes), out.split(sizes)):
        n = len(rows)
        whole = n - n % ROW_TILE
        if whole:
            torch.mm(rows[:whole], expert.T, out=target[:whole])
        if whole == n:
            continue
        if n >= ROW_TILE:  # the last whole tile, overlapping the ones before: its last rows are the ones left
            target[whole:] = (rows[n - ROW_TILE :] @ expert.T)[ROW_TILE - (n - whole) :]
        else:  # fewer rows than a tile: padded with zeros
            tile = rows.new_zeros(ROW_TILE, rows.shape[1])
            tile[:n] = rows
            target.copy_((tile @ expert.T)[:n])
    return out


@torch.library.custom_op("n3::grouped_mm_weight_grad", mutates_args=())
def _grouped_weight_grad(grad: torch.Tensor, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The weight gradient of `grouped_mm`: (experts, out, in), expert e's block grad_e.T @ x_e."""
    sizes = counts.tolist()
    return torch.stack([g.T @ rows for g, rows in zip(grad.split(sizes), x.split(sizes))])


@_grouped_mm.register_fake
def _(x, weight, counts):
    return x.new_empty(x.shape[0], weight.shape[1])


@_grouped_weight_grad.register_fake
def _(grad, x, counts):
    return x.new_empty(counts.shape[0], grad.shape[1], x.shape[1])


def _setup_context(ctx, inputs, output):
    x, weight, counts = inputs
    ctx.save_for_backward(x, weight, counts)


def _backward(ctx, grad):
    x, weight, counts = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = _grouped_mm(grad, weight.transpose(-2, -1), counts) if ctx.needs_input_grad[0] else None
    grad_weight = _grouped_weight_grad(grad, x, counts) if ctx.needs_input_grad[1] else None
    return grad_x, grad_weight, None


_grouped_mm.register_autograd(_backward, setup_context=_setup_context)


def permute_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[order] for a permutation `order` whose inverse is `inverse`: the gradient is a gather too, not the
    scatter-add autograd would use for a general index."""
    return _PermuteRows.apply(x, order, inverse)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None
