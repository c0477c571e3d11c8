"""Calibration and held-out tokens, and the quality of a quantized model against the original on held-out tokens.

Text is the user's file (--calib) or, offline and by default, the Python standard library's own sources (code,
docstrings and comments in English), read in a fixed order. The first tokens calibrate; the following ones, never
seen by calibration, measure quality.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model.errors import UserError
from model.tokenizer import Tokenizer


def builtin_text(chars: int) -> str:
    """About `chars` characters of the standard library's .py sources, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    pieces, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        pieces.append(text)
        total += len(text)
        if total >= chars:
            break
    if total < chars:
        raise UserError(f"the Python standard library sources under {root} are missing; pass a text file with --calib")
    return "\n".join(pieces)


def token_batches(
    tokenizer: Tokenizer, text_file: Path | None, vocab_size: int, seq_len: int, batch_size: int,
    calib_tokens: int, eval_tokens: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(calibration batches, held-out batches), each batch (batch_size, seq_len + 1) token ids."""
    per_batch = batch_size * (seq_len + 1)
    calib_batches, eval_batches = math.ceil(calib_tokens / per_batch), math.ceil(eval_tokens / per_batch)
    needed = (calib_batches + eval_batches) * per_batch
    if text_file is None:
        ids = tokenizer.encode(builtin_text(chars=needed * 6))
    else:
        try:
            ids = tokenizer.encode(Path(text_file).read_text(encoding="utf-8", errors="replace"))
        except OSError as err:
            raise UserError(f"cannot read --calib {text_file}: {err.strerror}") from None
    if len(ids) < needed:
        raise UserError(f"the calibration text has {len(ids)} tokens; {needed} are needed for "
                        f"{calib_tokens} calibration and {eval_tokens} held-out tokens at --seq-len {seq_len}")
    if max(ids[:needed]) >= vocab_size:
        raise UserError(f"the tokenizer produces ids up to {max(ids[:needed])} but the model's vocabulary has "
                        f"{vocab_size}: tokenizer and checkpoint do not belong together")
    batches = list(torch.tensor(ids[:needed]).view(-1, batch_size, seq_len + 1))
    return batches[:calib_batches], batches[calib_batches:]


@dataclass
class Quality:
    perplexity: float
    reference_perplexity: float
    kl: float
    """Mean KL(reference || quantized) of the next-token distributions, nats per token."""
    tokens: int


@torch.no_grad()
def quality(reference: torch.nn.Module, quantized: torch.nn.Module, batches: list[torch.Tensor]) -> Quality:
    """Perplexity of both models and the KL of their logits on held-out batches."""
    nll_ref = nll_q = kl = 0.0
    tokens = 0
    for batch in batches:
        inputs, labels = batch[:, :-1], batch[:, 1:].flatten()
        log_ref = F.log_softmax(reference(inputs).float().flatten(0, 1), -1)
        log_q = F.log_softmax(quantized(inputs).float().flatten(0, 1), -1)
        nll_ref += F.nll_loss(log_ref, labels, reduction="sum").item()
        nll_q += F.nll_loss(log_q, labels, reduction="sum").item()
        kl += F.kl_div(log_q, log_ref, log_target=True, reduction="sum").item()
        tokens += labels.numel()
    return Quality(math.exp(nll_q / tokens), math.exp(nll_ref / tokens), kl / tokens, tokens)
