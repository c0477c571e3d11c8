"""The kernel core: one function per hot op, each a PyTorch reference with fast paths chosen at run time."""

from kernels.attention import attention
from kernels.backends import configure
from kernels.conv import causal_conv1d, causal_conv1d_step
from kernels.moe import group_by_expert, grouped_mm
from kernels.ssd import ssd_chunk_scan, ssd_step

__all__ = [
    "attention",
    "causal_conv1d",
    "causal_conv1d_step",
    "configure",
    "group_by_expert",
    "grouped_mm",
    "ssd_chunk_scan",
    "ssd_step",
]
