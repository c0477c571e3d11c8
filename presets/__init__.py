"""Presets: hardware targets (cpu, h100, h200, b200, gb200) and model shapes (tiny, small, nano, super, ultra) as TOML.

`load("h100", ["train.seq_len=2048"])` resolves a preset to a validated RunConfig; see loader.py for the layering.
"""

from presets.loader import (
    DEFAULT_PRESET,
    as_dict,
    check_extend,
    check_mtp_boost,
    check_train,
    load,
    names,
    shape,
    shapes,
)
from presets.schema import RunConfig

__all__ = ["DEFAULT_PRESET", "RunConfig", "as_dict", "check_extend", "check_mtp_boost", "check_train", "load", "names",
           "shape", "shapes"]
