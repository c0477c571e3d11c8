"""Token counts as people write them: 4k = 4096, 1m = 1048576 (RULER's lengths are powers of two)."""

from __future__ import annotations

from model.errors import UserError

UNITS = {"k": 1 << 10, "m": 1 << 20}


def parse_length(text: str) -> int:
    """'4k' -> 4096, '1m' -> 1048576, '1000' -> 1000."""
    raw = text.strip().lower()
    scale = UNITS.get(raw[-1:], 1)
    number = raw[:-1] if scale > 1 else raw
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise UserError(f"{text!r} is not a length (examples: 4096, 4k, 128k, 1m)") from None
    if value < 1:
        raise UserError(f"{text!r}: a length must be positive")
    return value


def parse_lengths(text: str) -> list[int]:
    """'4k,8k' -> [4096, 8192], sorted, duplicates dropped."""
    return sorted({parse_length(part) for part in text.split(",") if part.strip()})


def length_label(n: int) -> str:
    """4096 -> '4k', 1048576 -> '1m', 1000 -> '1000'."""
    for unit, size in (("m", 1 << 20), ("k", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
