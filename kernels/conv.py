"""Depthwise causal conv1d with SiLU, as Mamba-2 applies it to xBC, over a sequence and one step at a time.

The conv state is the last K-1 inputs (b, channels, K-1): exactly what the next output needs.
With `seq_idx` (packed rows, see kernels.documents) a tap reaching into an earlier document reads zero, as the
zero padding before a document run alone would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backends import fast_path


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (b, t, ch); weight (ch, K); bias (ch,) or None; initial_state (b, ch, K-1) or None (zeros); seq_idx (b, t)
    document index per token or None (one document per row); the initial state belongs to a row's first document.

    Returns silu(conv(x)) (b, t, ch) in x's dtype and the new conv state (b, ch, K-1) of the last document.
    """
    history, t = weight.shape[-1] - 1, x.shape[1]
    if initial_state is None:
        padded = F.pad(x, (0, 0, history, 0))
    else:
        padded = torch.cat([initial_state.to(x.dtype).transpose(1, 2), x], dim=1)
    state = padded[:, t:].transpose(1, 2)
    if seq_idx is not None:
        # The document of every padded position: what comes before the row belongs to its first document.
        docs = torch.cat([seq_idx[:, :1].expand(-1, history), seq_idx], dim=1)
        state = state.masked_fill((docs[:, t:] != seq_idx[:, -1:])[:, None], 0)
    if fast_path("conv1d", x.is_cuda) == "causal_conv1d" and _fits_causal_conv1d(x, initial_state, seq_idx):
        from causal_conv1d import causal_conv1d_fn

        if seq_idx is None:
            y = causal_conv1d_fn(x.transpose(1, 2), weight, bias, initial_states=initial_state, activation="silu")
        else:  # seq_idx only in its channel-last layout (channels contiguous, strides multiples of 8), as int32
            y = causal_conv1d_fn(x.contiguous().transpose(1, 2), weight, bias, seq_idx=seq_idx.to(torch.int32),
                                 activation="silu")
        return y.transpose(1, 2), state
    # A sum of K shifted copies rather than F.conv1d: on (b, t, ch) as it comes, with no transposes, and under
    # torch.compile one fused loop forward and backward, where the depthwise convolution is an opaque library call
    # whose backward costs several times its forward. Accumulated in fp32 at least, as the convolution does.
    windows = [padded[:, k : k + t] for k in range(history + 1)]  # window k: what tap k reads at each position
    if seq_idx is not None:
        windows[:history] = [w.masked_fill((docs[:, k : k + t] != seq_idx)[..., None], 0)
                             for k, w in enumerate(windows[:history])]
    f = torch.promote_types(x.dtype, torch.float32)
    taps = weight.to(f).T.contiguous()  # (K, ch): each tap a contiguous row
    y = windows[0].to(f) * taps[0]
    for k in range(1, history + 1):
        y = y + windows[k].to(f) * taps[k]
    if bias is not None:
        y = y + bias.to(f)
    return F.silu(y.to(x.dtype)), state


def _fits_causal_conv1d(x: torch.Tensor, initial_state: torch.Tensor | None, seq_idx: torch.Tensor | None) -> bool:
    """Whether causal_conv1d_fn takes these inputs: with seq_idx it refuses an initial state, and its channel-last
    kernel wants a multiple of 8 channels."""
    return seq_idx is None or (initial_state is None and x.shape[-1] % 8 == 0)


def causal_conv1d_step(
    x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: x (b, ch), state (b, ch, K-1). Returns silu(conv) (b, ch) and the new state."""
    window = torch.cat([state.to(x.dtype), x[..., None]], dim=-1)  # (b, ch, K)
    y = (window * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return F.silu(y), window[..., 1:]
