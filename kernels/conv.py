"""Depthwise causal conv1d with SiLU, as Mamba-2 applies it to xBC, over a sequence and one step at a time.

The conv state is the last K-1 inputs (b, channels, K-1): exactly what the next output needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backends import fast_path


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, initial_state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (b, t, ch); weight (ch, K); bias (ch,) or None; initial_state (b, ch, K-1) or None (zeros).

    Returns silu(conv(x)) (b, t, ch) in x's dtype and the new conv state (b, ch, K-1).
    """
    history, t = weight.shape[-1] - 1, x.shape[1]
    if initial_state is None:
        padded = F.pad(x, (0, 0, history, 0))
    else:
        padded = torch.cat([initial_state.to(x.dtype).transpose(1, 2), x], dim=1)
    state = padded[:, t:].transpose(1, 2)
    if fast_path("conv1d", x.is_cuda) == "causal_conv1d":
        from causal_conv1d import causal_conv1d_fn

        y = causal_conv1d_fn(x.transpose(1, 2), weight, bias, initial_states=initial_state, activation="silu")
        return y.transpose(1, 2), state
    # A sum of K shifted copies rather than F.conv1d: on (b, t, ch) as it comes, with no transposes, and under
    # torch.compile one fused loop forward and backward, where the depthwise convolution is an opaque library call
    # whose backward costs several times its forward. Accumulated in fp32 at least, as the convolution does.
    f = torch.promote_types(x.dtype, torch.float32)
    taps = weight.to(f).T.contiguous()  # (K, ch): each tap a contiguous row
    y = padded[:, :t].to(f) * taps[0]
    for k in range(1, history + 1):
        y = y + padded[:, k : k + t].to(f) * taps[k]
    if bias is not None:
        y = y + bias.to(f)
    return F.silu(y.to(x.dtype)), state


def causal_conv1d_step(
    x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: x (b, ch), state (b, ch, K-1). Returns silu(conv) (b, ch) and the new state."""
    window = torch.cat([state.to(x.dtype), x[..., None]], dim=-1)  # (b, ch, K)
    y = (window * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return F.silu(y), window[..., 1:]
