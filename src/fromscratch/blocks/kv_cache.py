"""The KV cache: what attention layers keep between decoding steps (an implementation device,
not part of any paper).

When a model generates one token at a time, the keys and values of the positions already
decoded never change (the causal mask keeps an earlier position from depending on a later one),
so each attention layer stores them and the next step feeds in only the new position: O(T)
attention work per token instead of O(T²), and one pass over the weights instead of one per
position. One class serves every model in the package, in three modes:

    KVCache(n_layers)                 growing: each step's keys are appended (torch.cat); needs
                                      no length in advance
    KVCache(n_layers, max_len=N)      preallocated: a (B, n_kv_heads, N, head_dim) buffer per
                                      layer, filled in place, so a step copies only its own keys
    KVCache(n_layers, static=True)    a fixed context (the encoder output of cross-attention,
                                      image patches): stored on the first step, reused after

A cache holds as many key/value heads as the layer produces, which is where grouped- and
multi-query attention save memory (n_heads / n_kv_heads times less than multi-head attention).
`length` counts the positions held; the model advances it once per forward, after every layer
has stored its keys. In beam search's full batch, where a prompt takes the rows of one that is
done and starts at position 0 beside the others, rows hold different numbers of positions:
`row_lengths` (B,) then counts each row's, each step writes each row's key after its own
(`update_rows`), and `row_mask` tells attention which positions each row may see.
`reorder` moves rows along with the beams of beam search: a preallocated
cache copies, in place, only the rows whose content changes (beam search keeps a beam in its
parent's row where it can, so most rows stay), and rows that leave shrink it to a view of its
first rows; it never holds a second buffer.
"""

import torch

from fromscratch.errors import UserError


class KVCache:
    """Keys and values of `n_layers` attention layers, each (B, n_kv_heads, T, head_dim)."""

    def __init__(self, n_layers: int, max_len: int | None = None, static: bool = False):
        if static and max_len is not None:
            raise ValueError("a static cache holds a fixed context; it has no max_len")
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.max_len, self.static = max_len, static
        self.length = 0  # positions held (preallocated, growing); advanced by the model
        # Positions held by each row when rows differ (beam search's `pool`, where prompts join
        # as others finish; preallocated only); `length` is then the most any row holds.
        self.row_lengths: torch.Tensor | None = None

    def allocate(self, batch_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        """Allocate every layer's (B, n_kv_heads, max_len, head_dim) buffers now, rather than on
        the first update (so that their memory is taken, and measurable, up front)."""
        shape = (batch_size, n_kv_heads, self.max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.keys]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.values]
        return self

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def holds(self, layer: int) -> bool:
        """Whether a static cache already holds `layer`'s context."""
        return self.keys[layer] is not None

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `layer`'s keys and values of the new positions, (B, n_kv_heads, T, head_dim),
        after the `length` held ones; return all of them, (B, n_kv_heads, length + T, head_dim).
        A static cache stores the context as it is and returns it."""
        if self.static:
            self.keys[layer], self.values[layer] = keys, values
            return keys, values
        start, t = self.length, keys.size(2)
        if self.row_lengths is not None:
            return self.update_rows(layer, keys, values)
        if self.max_len is None:  # growing
            if start:
                keys = torch.cat([self.keys[layer][:, :, :start], keys], dim=2)
                values = torch.cat([self.values[layer][:, :, :start], values], dim=2)
            self.keys[layer], self.values[layer] = keys, values
            return keys, values
        if start + t > self.max_len:
            raise UserError(f"{start + t} positions overflow a KV cache of {self.max_len}")
        if self.keys[layer] is None:
            b, h, _, d = keys.shape
            self.keys[layer] = keys.new_zeros(b, h, self.max_len, d)
            self.values[layer] = values.new_zeros(b, h, self.max_len, d)
        self.keys[layer].narrow(2, start, t).copy_(keys)
        self.values[layer].narrow(2, start, t).copy_(values)
        return self.keys[layer].narrow(2, 0, start + t), self.values[layer].narrow(2, 0, start + t)

    def update_rows(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`update` when rows hold different numbers of positions: the one new position of each
        row, (B, n_kv_heads, 1, head_dim), goes after that row's own; returns the first `length`
        + 1 positions of every row, of which row b may see the first row_lengths[b] + 1
        (`row_mask`). What lies beyond a row's own (an earlier occupant's keys, zeros) is finite."""
        if keys.size(2) != 1 or self.max_len is None:
            raise ValueError("rows of different lengths take one position at a time, in a preallocated cache")
        if self.length + 1 > self.max_len:
            raise UserError(f"{self.length + 1} positions overflow a KV cache of {self.max_len}")
        if self.keys[layer] is None:
            b, h, _, d = keys.shape
            self.keys[layer] = keys.new_zeros(b, h, self.max_len, d)
            self.values[layer] = values.new_zeros(b, h, self.max_len, d)
        rows = torch.arange(keys.size(0), device=keys.device)
        self.keys[layer][rows, :, self.row_lengths] = keys[:, :, 0]
        self.values[layer][rows, :, self.row_lengths] = values[:, :, 0]
        return self.keys[layer].narrow(2, 0, self.length + 1), self.values[layer].narrow(2, 0, self.length + 1)

    def row_mask(self) -> torch.Tensor:
        """(B, 1, 1, length + 1): True where row b's next query may attend (its own positions and
        the new one), for `update_rows`'s keys."""
        positions = torch.arange(self.length + 1, device=self.row_lengths.device)
        return (positions <= self.row_lengths[:, None])[:, None, None, :]

    def advance(self, n_positions: int) -> None:
        """Count `n_positions` more as held (the model calls this once every layer has updated)."""
        if self.row_lengths is not None:
            self.row_lengths += n_positions
            self.length = int(self.row_lengths.max())
            return
        self.length += n_positions

    def restart_rows(self, rows: torch.Tensor) -> None:
        """Rows `rows` hold no position any more: a new prompt starts in them (rows of different
        lengths only). `length` stays the most any row holds."""
        self.row_lengths.index_fill_(0, rows, 0)
        self.length = int(self.row_lengths.max())

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (B',), in that order: beam search moves each beam's cache along
        with it, and repeating a row makes several beams of one prompt."""
        if self.max_len is None or self.static:  # new tensors
            for layer, (k, v) in enumerate(zip(self.keys, self.values)):
                if k is not None:
                    self.keys[layer], self.values[layer] = k.index_select(0, rows), v.index_select(0, rows)
            return
        # Row i takes row rows[i]: only the rows that change are copied, and only the positions
        # filled so far.
        targets = (rows != torch.arange(len(rows), device=rows.device)).nonzero().squeeze(1)
        sources = rows[targets]
        held = self.length  # positions to copy
        if self.row_lengths is not None:
            grows = any(k is not None and len(rows) > k.size(0) for k in self.keys)  # then every row is copied
            if not grows:  # only those the moved rows hold
                held = int(self.row_lengths[sources].max()) if len(sources) else 0
            self.row_lengths = self.row_lengths[rows]
            self.length = int(self.row_lengths.max()) if len(rows) else 0  # the longest row may have left
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[layer] = moved(k, len(rows), targets, sources, held)
                self.values[layer] = moved(v, len(rows), targets, sources, held)


def moved(buffer: torch.Tensor, n_rows: int, targets: torch.Tensor, sources: torch.Tensor, n: int) -> torch.Tensor:
    """`buffer` (B, heads, max_len, head_dim) as n_rows rows, where row targets[i] holds what
    row sources[i] held in its first n positions. In place (the sources are read before any
    target is written) when n_rows ≤ B, and the result is a view of the first n_rows rows;
    a larger n_rows takes a new buffer."""
    held = buffer.narrow(2, 0, n).index_select(0, sources) if len(targets) else None  # read first
    if n_rows > buffer.size(0):
        grown = buffer.new_zeros((n_rows, *buffer.shape[1:]))  # zeros: rows of differing lengths read past their own
        grown.narrow(0, 0, buffer.size(0)).narrow(2, 0, n).copy_(buffer.narrow(2, 0, n))
        buffer = grown
    buffer = buffer.narrow(0, 0, n_rows)
    if held is not None:
        buffer.narrow(2, 0, n).index_copy_(0, targets, held)
    return buffer
