"""HybridCache: the decode state of a model for a batch of rows: KV for attention sublayers, conv + SSM state for Mamba.

Rows may hold prefixes of different lengths: each attention sublayer writes new keys at its row's own positions and
masks what lies past them. KV is preallocated to max_len per row.

For an inference engine the rows are slots: a request takes one (`take`), runs forwards on any subset of the taken
rows (`select`), and gives it back (`release`). A forward can keep the Mamba state after every position it feeds
(`select(..., keep_positions=True)`), so speculative decoding can `rewind` each row to the last token it accepted.
The SSM state is stored in fp32 (the reference), bf16 or fp16; rounding to the low-precision types is to nearest or,
with `stochastic_rounding`, unbiased stochastic (kernels.stochastic_round), which keeps long decodes close to fp32.
The MTP block gets its own cache: `HybridCache(cfg, ..., pattern=cfg.mtp_pattern)`.
"""

from __future__ import annotations

import torch

from kernels import stochastic_round
from model.config import ModelConfig

Rows = slice | torch.Tensor
"""Selected rows: a slice when contiguous (views into the cache, no copies), else a LongTensor of row ids."""


class KVCache:
    def __init__(self, owner: HybridCache, cfg: ModelConfig, max_len: int, dtype, device):
        shape = (len(owner.lengths), cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.owner = owner
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write k, v (b, hkv, t, d) after the prefix of each selected row; return keys and values up to the longest
        row and the absolute positions (b, t) of the new tokens. Lengths advance once per forward (HybridCache.advance)."""
        rows, t = self.owner.active, k.shape[2]
        positions = self.owner.lengths[rows][:, None] + torch.arange(t, device=k.device)
        # Compiled decode attends over every position (masked) rather than a data-dependent span.
        span = self.k.shape[2] if torch.compiler.is_compiling() else int(positions.max()) + 1
        if span > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; {span} needed")
        if isinstance(rows, slice):
            index = positions[:, None, :, None].expand_as(k)
            self.k[rows].scatter_(2, index, k.to(self.k.dtype))
            self.v[rows].scatter_(2, index, v.to(self.v.dtype))
            return self.k[rows, :, :span], self.v[rows, :, :span], positions
        self.k[rows[:, None], :, positions] = k.transpose(1, 2).to(self.k.dtype)
        self.v[rows[:, None], :, positions] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[rows, :, :span], self.v[rows, :, :span], positions


class MambaCache:
    def __init__(self, owner: HybridCache, cfg: ModelConfig, dtype, ssm_dtype, device):
        rows = len(owner.lengths)
        self.owner = owner
        self.conv = torch.zeros(rows, cfg.mamba_conv_dim, cfg.conv_kernel - 1, dtype=dtype, device=device)
        self.ssm = torch.zeros(
            rows, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, dtype=ssm_dtype, device=device
        )
        self.history: tuple[torch.Tensor, torch.Tensor] | None = None
        """(conv (b, t, ...), ssm (b, t, ...)): the selected rows' states after each position of the current forward,
        in the cache dtypes, when keeping positions."""

    @property
    def keeps_positions(self) -> bool:
        """True when the forward must keep the state after every position (`store_positions`)."""
        return self.owner.keep_positions

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv, ssm) states of the selected rows."""
        rows = self.owner.active
        return self.conv[rows], self.ssm[rows]

    def store(self, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        """Write the selected rows' states; the SSM state is rounded to the cache dtype (stochastically if asked)."""
        self._write(conv.to(self.conv.dtype), self._rounded(ssm))

    def store_positions(self, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        """The selected rows' states after each of the t positions of this forward: conv (b, t, ch, K-1), ssm
        (b, t, h, p, n). Each SSM state is rounded to the cache dtype as `store` rounds it; all are kept for `rewind`
        and the last becomes the current state."""
        self.history = (conv.to(self.conv.dtype), self._rounded(ssm))
        self._write(self.history[0][:, -1], self.history[1][:, -1])

    def rewind(self, kept: torch.Tensor | None) -> None:
        """Set each selected row's state to the one after its first kept[i] positions of the current forward (None:
        every row keeps them all, and with them the last state, which store_positions wrote)."""
        conv, ssm = self.history
        self.history = None
        if kept is not None:
            pick = torch.arange(len(kept), device=kept.device)
            self._write(conv[pick, kept - 1], ssm[pick, kept - 1])  # rounded already

    def _rounded(self, ssm: torch.Tensor) -> torch.Tensor:
        if self.ssm.dtype != ssm.dtype and self.owner.stochastic_rounding:
            return stochastic_round(ssm, self.ssm.dtype, self.owner.generator)
        return ssm.to(self.ssm.dtype)

    def _write(self, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        rows = self.owner.active
        if isinstance(rows, slice):
            self.conv[rows].copy_(conv)
            self.ssm[rows].copy_(ssm)
        else:
            self.conv[rows] = conv
            self.ssm[rows] = ssm


class HybridCache:
    def __init__(
        self,
        cfg: ModelConfig,
        rows: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        ssm_dtype: torch.dtype = torch.float32,
        stochastic_rounding: bool = False,
        seed: int = 0,
        pattern: str | None = None,
    ):
        """`pattern` defaults to the model's main pattern; pass cfg.mtp_pattern for the MTP block's cache."""
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.active: Rows = slice(None)
        self.keep_positions = False
        self.stochastic_rounding = stochastic_rounding
        self.generator = torch.Generator(device).manual_seed(seed) if stochastic_rounding else None
        self.free = list(range(rows))
        makers = {
            "*": lambda: KVCache(self, cfg, max_len, dtype, device),
            "M": lambda: MambaCache(self, cfg, dtype, ssm_dtype, device),
        }
        self.layers = [makers[kind]() if kind in makers else None for kind in (pattern or cfg.main_pattern)]

    # --- slots ------------------------------------------------------------------------------------------------------
    def take(self) -> int:
        """A free row, emptied, for one request's lifetime."""
        if not self.free:
            raise RuntimeError("every cache row is taken")
        row = self.free.pop(0)
        self.reset(row)
        return row

    def reset(self, row: int) -> None:
        """Empty one row: length 0 and zero Mamba states (stale keys past the length are never read)."""
        self.lengths[row] = 0
        for layer in self.layers:
            if isinstance(layer, MambaCache):
                layer.conv[row] = 0
                layer.ssm[row] = 0

    def copy_rows(self, sources: list[int], targets: list[int]) -> None:
        """Make each target row hold what its source row holds: the same prefix (length, keys and values up to it)
        and the same Mamba states. Rows that fed the same tokens then continue as if each had fed them itself."""
        src = torch.tensor(sources, device=self.lengths.device)
        dst = torch.tensor(targets, device=self.lengths.device)
        self.lengths[dst] = self.lengths[src]
        span = int(self.lengths[src].max())
        for layer in self.layers:
            if isinstance(layer, KVCache):
                layer.k[dst, :, :span] = layer.k[src, :, :span]
                layer.v[dst, :, :span] = layer.v[src, :, :span]
            elif isinstance(layer, MambaCache):
                layer.conv[dst] = layer.conv[src]
                layer.ssm[dst] = layer.ssm[src]

    def release(self, row: int) -> None:
        self.free.append(row)
        self.free.sort()

    @property
    def rows_in_use(self) -> int:
        return len(self.lengths) - len(self.free)

    # --- forwards ---------------------------------------------------------------------------------------------------
    def select(self, rows: list[int] | None = None, keep_positions: bool = False, index: bool = False) -> HybridCache:
        """Make the next forwards read and write only `rows` (in this order; None: all). With keep_positions the Mamba
        sublayers keep the state after every position, for `rewind`. `index` selects through an index tensor even
        for contiguous rows (a compiled forward then sees one kind of selection, not slice bounds that vary).
        Returns self, for `model.model(ids, cache.select(...))`."""
        if rows is None:
            self.active = slice(None)
        elif not index and rows == list(range(rows[0], rows[0] + len(rows))):
            self.active = slice(rows[0], rows[0] + len(rows))
        else:
            self.active = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.keep_positions = keep_positions
        for layer in self.layers:
            if isinstance(layer, MambaCache):
                layer.history = None
        return self

    def advance(self, t: int) -> None:
        self.lengths[self.active] += t

    def rewind(self, kept: list[int], fed: int) -> None:
        """After a forward of `fed` tokens with keep_positions, keep only the first kept[i] (1..fed) of them in
        selected row i: lengths step back and Mamba states return to the state after the last kept token."""
        self.keep_positions = False
        partial = torch.tensor(kept, device=self.lengths.device) if min(kept) < fed else None
        if partial is not None:
            self.lengths[self.active] -= fed - partial
        for layer in self.layers:
            if isinstance(layer, MambaCache):
                layer.rewind(partial)

    def nbytes(self) -> int:
        """Bytes the cache holds (all rows)."""
        tensors = [t for layer in self.layers if layer is not None for t in vars(layer).values()
                   if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)
