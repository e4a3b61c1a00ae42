"""The Transformer's opt-in fast paths on a CPU: `accelerate(model)` (same maths as model.py, faster).

1. The training loss: `forward(..., targets=...)` uses `fromscratch.fast.cross_entropy`, which
   computes the label-smoothed cross-entropy without ever holding the (tokens × vocab) logits.
2. Fewer, larger kernels in training: each attention's projections that read the same input are
   one product (q|k|v in self-attention, k|v of the encoder output in cross-attention), and each
   `LayerNorm` becomes a `FastLayerNorm`, whose backward pass is written out (autograd through
   `LayerNorm.forward` records seven operations and keeps their intermediates), and each
   nn.Dropout a `fromscratch.fast.dropout.Dropout`, whose mask takes a quarter of the random
   draws (p rounded to a multiple of 1/65,536). Attention over at most 64 keys, in training,
   is `fromscratch.fast.attention.short_attention`: one batched product for all the (sentence,
   head) blocks instead of PyTorch's CPU flash kernel, which walks them one by one.
3. No work on padding in training: `padding_free_loss` runs every position-wise step (the
   products, norms, dropout and residuals of every layer, and the loss) on the real positions of
   the batch only, and gives attention its padded (B, T) layout (`RealPositions`). A
   length-sorted batch of `translate train` is ~6 % target padding; `bench/` pads a quarter of
   its sources.
4. Decoding one token at a time: `model.decode_step` becomes a `PackedDecoder`, which runs
   model.py's decoder layers for one position on a copy of their weights laid out for it
   (`fromscratch.fast.packed`: transposed, cut into column blocks that one `bmm` shares among the
   cores), with the self-attention's q|k|v fused into one product. On a CPU a one-token step is
   bound by how fast the weights stream from memory, and where they come from DRAM that layout
   streams them 3× faster than nn.Linear's (where the L3 cache holds them, a little slower:
   docs/performance.md). For many rows at once (a wide beam, a large batch) the
   step is compute-bound instead and the products go through the model's own layers. Decoding
   one source (`translate run` of a sentence, greedy or beam), the cross-attention's query and
   output projections are folded with the source's keys and values into two smaller products
   (`FoldedCrossAttention`), when the source is shorter than d_k tokens.

Unlike Llama's, it leaves the linear layers to MKL: `gemm.Linear` gives oneDNN at most 32
distinct product shapes per process (each costs memory never freed), and token-bucket batches
change shape at every step, so which products took oneDNN would depend on the run's history —
and a resumed run would no longer be bit-for-bit the uninterrupted one.

Only what it knows is accelerated: the packed step runs a model whose every decoder layer is
model.py's `DecoderLayer` with its `MultiHeadAttention`, `FeedForward` and `LayerNorm`s;
anything else leaves `decode_step` unset and decodes through `Transformer.decode`. Likewise
`padding_free_loss` takes only model.py's encoder and decoder layers (`padding_free_supported`).
`tests/transformer/test_transformer_fast.py` checks each path against the plain model.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromscratch.blocks import scaled_dot_product_attention
from fromscratch.fast.attention import applies as short_attention_applies
from fromscratch.fast.attention import short_attention
from fromscratch.fast.cross_entropy import linear_cross_entropy
from fromscratch.fast.dropout import Dropout
from fromscratch.fast.packed import PackedCopy, bias_blocks, blocked_matmul, fits_a_packed_copy, packed
from fromscratch.transformer.model import (
    DecoderLayer,
    EncoderLayer,
    FeedForward,
    LayerNorm,
    MultiHeadAttention,
    Transformer,
    next_token_loss,
)

PACKED_ROWS = 16  # up to this many rows a step streams weights (packed); beyond, it computes (nn.Linear)
VAR_MEAN_ROWS = 4  # up to this many rows a decoding step's LayerNorm takes var_mean (decoding_norm)


def accelerate(model: nn.Module) -> nn.Module:
    """Switch `model` to the fast paths (see the module docstring); returns it. Its parameters,
    their names and every result stay the same. Only exact types are replaced (a subclass may
    compute something else); models built of the Transformer's layers (the VLM's) take them too."""
    swap_layers(model)
    if not isinstance(model, Transformer):
        return model
    model.next_token_loss = fused_next_token_loss
    model.teacher_forced_loss = padding_free_loss if padding_free_supported(model) else None
    model.decode_step = PackedDecoder(model) if PackedDecoder.supports(model) else None
    return model


def swap_layers(model: nn.Module) -> None:
    """Give every MultiHeadAttention, LayerNorm and nn.Dropout of `model` its fast class (which
    adds no state)."""
    for module in model.modules():
        if type(module) is MultiHeadAttention:
            module.__class__ = FusedMultiHeadAttention
        elif type(module) is LayerNorm:
            module.__class__ = FastLayerNorm
        elif type(module) is nn.Dropout:
            module.__class__ = Dropout


class FusedMultiHeadAttention(MultiHeadAttention):
    """`MultiHeadAttention` whose projections of one input are one product: q|k|v when queries,
    keys and values all come from x, k|v when they come from another context. The weights are
    joined at each call (a copy of d_model² numbers per projection, against a product of
    rows × d_model² multiply-adds), so the parameters stay the model's own."""

    def forward(self, x, context, mask=None, is_causal=False, cache=None, rows=None, context_rows=None):
        """MultiHeadAttention.forward; or, given `rows` and `context_rows` (`RealPositions`), x
        (N, d_model) and context (M, d_model) hold only the real positions of a padded batch:
        the projections run on those, the attention on the (B, T) layout. Returns x's shape."""
        if cache is not None or self.record_weights:  # decoding (the packed step does it) or figures
            return super().forward(x, context, mask, is_causal, cache)
        if context is x:
            q, k, v = RealPositions.unpack_if(rows, self._joined(x, self.q_proj, self.k_proj, self.v_proj)).chunk(3, -1)
        else:
            q = RealPositions.unpack_if(rows, self.q_proj(x))
            k, v = RealPositions.unpack_if(context_rows, self._joined(context, self.k_proj, self.v_proj)).chunk(2, -1)
        # PyTorch's CPU flash kernel is slow in bfloat16 (its backward 4-5× the written-out
        # QKᵀ, softmax, ·V at translation lengths: 14 ms against 3 ms for 60 × 4 heads × 25 × 64),
        # so CPU autocast takes the written-out form.
        use_sdpa = self.use_sdpa and not (q.device.type == "cpu" and q.dtype == torch.bfloat16)
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)
        if short_attention_applies(q, k):  # training on short sequences: fast/attention.py
            out = short_attention(q, k, v, mask, is_causal)
        else:
            out = scaled_dot_product_attention(q, k, v, mask, is_causal, use_sdpa=use_sdpa)
        b, heads, t, head_dim = out.shape
        out = out.transpose(1, 2).reshape(b, t, heads * head_dim)  # (B, T, d_model)
        return self.out_proj(out if rows is None else rows.pack(out))

    @staticmethod
    def _joined(x: torch.Tensor, *layers: nn.Linear) -> torch.Tensor:
        weight = torch.cat([layer.weight for layer in layers])
        bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
        return F.linear(x, weight, bias)


class RealPositions:
    """The real (non-padding) positions of a right-padded batch, laid end to end.

    A linear layer, a LayerNorm, the FFN, dropout and the residual sums treat each position
    alone, so on a padded batch they can run on the N real positions only, (N, d) instead of
    (B, T, d); only attention needs the (B, T) layout, and gets it from `unpack` (zeros at
    padding, which the masks hide). `pack` (B, T, …) → (N, …) and `unpack` (N, …) → (B, T, …)
    are an index_select and an index_copy, both differentiable; views where nothing is padding."""

    def __init__(self, real: torch.Tensor):  # (B, T) bool, True at real positions
        self.batch_shape = real.shape
        self.index = None if real.all() else real.flatten().nonzero().squeeze(1)  # (N,)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return x.flatten(0, 1)
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return x.view(*self.batch_shape, *x.shape[1:])
        out = x.new_zeros(self.batch_shape.numel(), *x.shape[1:])
        return out.index_copy(0, self.index, x).view(*self.batch_shape, *x.shape[1:])

    @staticmethod
    def unpack_if(rows: "RealPositions | None", x: torch.Tensor) -> torch.Tensor:
        return x if rows is None else rows.unpack(x)


def padding_free_supported(model: Transformer) -> bool:
    """Whether every layer of `model` is one `padding_free_loss` knows (a subclass may compute
    something else): model.py's layers, with the fused attention, the FFN and the LayerNorms."""
    def known(layer, layer_type, attentions):
        return (type(layer) is layer_type and all(type(a) is FusedMultiHeadAttention for a in attentions)
                and type(layer.feed_forward) is FeedForward and all(type(n) in NORMS for n in layer.norms))
    return (all(known(layer, EncoderLayer, [layer.self_attention]) for layer in model.encoder_layers)
            and all(known(layer, DecoderLayer, [layer.self_attention, layer.cross_attention])
                    for layer in model.decoder_layers))


def padding_free_loss(model: Transformer, src_ids, tgt_ids, targets, label_smoothing: float) -> torch.Tensor | None:
    """`model(src_ids, tgt_ids, targets=targets, label_smoothing=...)` with every position-wise
    step on the real positions only (`RealPositions`): the same value and gradients, without the
    products, norms and dropout of the padding. model.py's layers, sub-layer by sub-layer, in
    their order. Returns None for a batch without padding, or under torch.compile (which cannot
    trace a number of positions that depends on the data): `forward` then takes its own route."""
    if torch.compiler.is_compiling():
        return None
    pad = model.config.pad_id
    # A source position that is padding is hidden from every query, so nothing reads it. A target
    # position is dropped only after the row's last real target: a padding target inside the row
    # (a masked-out token) still feeds the positions after it.
    src_real = src_ids != pad
    tgt_lengths = ((targets != pad) * torch.arange(1, targets.size(1) + 1, device=targets.device)).amax(dim=1)
    tgt_real = torch.arange(targets.size(1), device=targets.device) < tgt_lengths[:, None]  # (B, T)
    if src_real.all() and tgt_real.all():
        return None
    src_mask = src_real[:, None, None, :]
    src_rows, tgt_rows = RealPositions(src_real), RealPositions(tgt_real)
    x = src_rows.pack(model.embed(src_ids, model.src_embedding))  # (N_src, d_model)
    for layer in model.encoder_layers:
        x = layer.residual(x, 0, lambda h: layer.self_attention(h, h, mask=src_mask, rows=src_rows,
                                                                context_rows=src_rows))
        x = layer.residual(x, 1, layer.feed_forward)
    memory = x if model.encoder_norm is None else model.encoder_norm(x)
    y = tgt_rows.pack(model.embed(tgt_ids, model.tgt_embedding))  # (N_tgt, d_model)
    for layer in model.decoder_layers:
        y = layer.residual(y, 0, lambda h: layer.self_attention(h, h, is_causal=True, rows=tgt_rows,
                                                                context_rows=tgt_rows))
        y = layer.residual(y, 1, lambda h: layer.cross_attention(h, memory, mask=src_mask, rows=tgt_rows,
                                                                 context_rows=src_rows))
        y = layer.residual(y, 2, layer.feed_forward)
    hidden = y if model.decoder_norm is None else model.decoder_norm(y)
    return linear_cross_entropy(hidden, model.output_projection.weight, tgt_rows.pack(targets),
                                ignore_index=pad, reduction="sum", bias=model.logits_bias,
                                label_smoothing=label_smoothing)


def centered_and_rstd(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x − μ and r = 1/√(σ² + ε) over the last dimension, in two passes (the mean, then the mean
    square of the centred values) instead of `torch.var_mean`'s one Welford pass, which was the
    slowest kernel of a CLIP encoding after the products (108 ms of 1.86 s in bench_vlm.py's
    profile, 2.1 ms a call on 800 × 768; alone, 1.8 ms against 1.1–1.6 ms for these two passes)."""
    centered = x - x.mean(dim=-1, keepdim=True)
    return centered, torch.rsqrt(centered.square().mean(dim=-1, keepdim=True) + eps)


class _LayerNorm(torch.autograd.Function):
    """y = x̂·γ + β with x̂ = (x − μ)·r, r = 1/√(σ² + ε), over the last dimension (d values).

    Backward, with g = ∂L/∂y and ĝ = g·γ:
        ∂L/∂γ = Σ g·x̂,   ∂L/∂β = Σ g   (sums over every position)
        ∂L/∂x = r · (ĝ − mean(ĝ) − x̂ · mean(ĝ·x̂))   (means over the d values)"""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        centered, rstd = centered_and_rstd(x, eps)
        x_hat = centered.mul_(rstd)
        ctx.save_for_backward(x_hat, rstd, weight)
        return torch.addcmul(bias, x_hat, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x_hat, rstd, weight = ctx.saved_tensors
        d = x_hat.size(-1)
        grad_weight = (grad * x_hat).reshape(-1, d).sum(dim=0)
        grad_bias = grad.reshape(-1, d).sum(dim=0)
        g = grad * weight
        grad_x = g - g.mean(dim=-1, keepdim=True) - x_hat * (g * x_hat).mean(dim=-1, keepdim=True)
        return grad_x.mul_(rstd), grad_weight, grad_bias, None


class FastLayerNorm(LayerNorm):
    """`LayerNorm` with the written-out backward of `_LayerNorm`, and a forward in a few fast
    kernels (`centered_and_rstd`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _LayerNorm.apply(x, self.weight, self.bias, self.eps)
        centered, rstd = centered_and_rstd(x, self.eps)
        return torch.addcmul(self.bias, centered.mul_(rstd), self.weight)


def fused_next_token_loss(hidden, output_projection, logits_bias, targets, ignore_index, label_smoothing,
                          reduction="sum"):
    """`model.next_token_loss` computed by `linear_cross_entropy`: same arguments, same value and
    gradients, without the (B, T, vocab) logits.

    Under torch.compile it is model.py's own loss: `linear_cross_entropy` walks the rows in chunks
    with a Python loop, whose number of turns the compiler bakes into the graph, so every new
    number of target positions (token-bucket batches bring one at almost every step) compiled the
    model anew; and the compiler fuses the plain loss's softmax itself."""
    if torch.compiler.is_compiling():
        return next_token_loss(hidden, output_projection, logits_bias, targets, ignore_index, label_smoothing,
                               reduction)
    return linear_cross_entropy(hidden.flatten(0, 1), output_projection.weight, targets.flatten(),
                                ignore_index=ignore_index, reduction=reduction, bias=logits_bias,
                                label_smoothing=label_smoothing)


def decoding_norm(norm: LayerNorm):
    """`norm` (one of NORMS) for the rows of one decoding step. For a few rows, in six kernels
    instead of `FastLayerNorm`'s eight, the statistics in one `var_mean` pass: at batch 1 the
    launches of a step's small kernels, not their arithmetic, are what costs. For more rows
    `var_mean` is the slower (256 × 256: 237 µs against 42 µs, measured), so a beam search's many
    rows take the module's own forward (after `accelerate`, `FastLayerNorm`'s two passes)."""
    weight, bias = norm.weight.detach(), norm.bias.detach()
    eps = torch.tensor(norm.eps, dtype=weight.dtype)  # a Python float would be converted at every call

    def forward(x: torch.Tensor) -> torch.Tensor:  # (B, d_model) → (B, d_model)
        if x.size(0) > VAR_MEAN_ROWS:
            return norm.forward(x)  # no Module.__call__ hooks on the way
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
        return torch.addcmul(bias, (x - mean).mul_(var.add_(eps).rsqrt_()), weight)

    return forward


class PackedLinear:
    """One nn.Linear for the rows of one decoding step: blocked (streamed) for a few rows, the
    layer itself for many."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.blocks, self.weight = packed(weight), weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.bias_blocks = None if bias is None else bias_blocks(bias, self.blocks)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) → (B, out)
        if x.size(0) > PACKED_ROWS:
            return F.linear(x, self.weight, self.bias)
        return blocked_matmul(x, self.blocks, self.bias_blocks)


def _linear(*layers: nn.Linear) -> PackedLinear:
    """The products of `layers`, which read the same input, fused into one."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    return PackedLinear(weight, bias)


class FoldedCrossAttention:
    """Cross-attention of a decoding step's rows to one source, folded into two products.

    The source's keys K_h and values V_h of head h (S × d_k each) are fixed for a whole search, so

        scores_h = (x W_h^Q + b_h^Q) K_hᵀ / √d_k = x (W_h^Q K_hᵀ / √d_k) + b_h^Q K_hᵀ / √d_k
        output   = Σ_h softmax(scores_h) (V_h W_h^O) + b^O

    (W_h^Q: the d_model × d_k columns of head h; W_h^O: its d_k × d_model rows). The query
    projection and the keys become one d_model → h·S product, the values and the output
    projection one h·S → d_model product, and no attention kernel runs. A step streams
    2·d_model·h·S weights instead of the two projections' 2·d_model², fewer whenever h·S < d_model:
    a source shorter than d_k tokens. A padded key gets the most negative finite score through
    the bias, as `scaled_dot_product_attention` masks it."""

    def __init__(self, query: PackedLinear, out: PackedLinear, keys: torch.Tensor, values: torch.Tensor,
                 src_mask: torch.Tensor | None):
        keys, values = keys[0], values[0]  # (n_heads, S, d_k): the one source's
        n_heads, src_len, head_dim = keys.shape
        scale = 1 / math.sqrt(head_dim)
        query_weight = query.weight.view(n_heads, head_dim, -1)  # W_h^Q as nn.Linear holds it: (h, d_k, d_model)
        score_weight = torch.bmm(keys, query_weight).mul_(scale).view(n_heads * src_len, -1)  # (h·S, d_model)
        score_bias = torch.bmm(keys, query.bias.view(n_heads, head_dim, 1)).mul_(scale).view(-1)  # (h·S,)
        if src_mask is not None:
            padded = ~src_mask.reshape(-1).repeat(n_heads)
            score_bias = score_bias.masked_fill(padded, torch.finfo(score_bias.dtype).min)
        out_weight = out.weight.view(-1, n_heads, head_dim).permute(1, 2, 0)  # W_h^O: (h, d_k, d_model)
        value_weight = torch.bmm(values, out_weight).view(n_heads * src_len, -1)  # V_h W_h^O: (h·S, d_model)
        self.scores = PackedLinear(score_weight, score_bias)
        self.output = PackedLinear(value_weight.t(), out.bias)  # as nn.Linear's (out, in)
        self.n_heads, self.src_len = n_heads, src_len

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, d_model) → (B, d_model)
        scores = self.scores(x).view(x.size(0), self.n_heads, self.src_len)
        return self.output(scores.softmax(dim=-1).view(x.size(0), -1))


class PackedDecoderLayer:
    """`DecoderLayer.forward` for one position: its products packed, its LayerNorm modules."""

    def __init__(self, layer: DecoderLayer):
        self_attention, cross, ffn = layer.self_attention, layer.cross_attention, layer.feed_forward
        self.layer_index, self.n_heads, self.head_dim = self_attention.layer_index, self_attention.n_heads, \
            self_attention.head_dim
        self.norms = [decoding_norm(norm) for norm in layer.norms]
        self.norm_first, self.use_sdpa = layer.norm_first, self_attention.use_sdpa
        self.qkv = _linear(self_attention.q_proj, self_attention.k_proj, self_attention.v_proj)
        self.self_out = _linear(self_attention.out_proj)
        self.cross_q, self.cross_out = _linear(cross.q_proj), _linear(cross.out_proj)
        self.cross_k, self.cross_v = cross.k_proj, cross.v_proj  # projected once, on the first step
        self.w_1, self.w_2, self.activation = _linear(ffn.w_1), _linear(ffn.w_2), ffn.activation
        # (keys, their version, their FoldedCrossAttention) of the last one-source search: ~1 MB a `base` layer
        self.folded = None

    def residual(self, x: torch.Tensor, i: int, sublayer) -> torch.Tensor:
        """`ResidualLayer.residual` in eval mode (no dropout)."""
        norm = self.norms[i]
        return x + sublayer(norm(x)) if self.norm_first else norm(x + sublayer(x))

    def heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, d_model) → (B, n_heads, 1, head_dim)
        return x.view(x.size(0), self.n_heads, 1, self.head_dim)

    def self_attention(self, x: torch.Tensor, cache, self_mask) -> torch.Tensor:
        # (B, 3·d_model) → q, k, v, each (B, n_heads, 1, head_dim)
        q, k, v = self.qkv(x).view(x.size(0), 3, self.n_heads, 1, self.head_dim).unbind(1)
        keys, values = cache.self_attention.update(self.layer_index, k, v)
        # Rows of different lengths (a mask): the written-out maths, 1.5–1.7× faster than PyTorch's
        # CPU kernel for 256 rows over 20–60 keys (measured, 2 threads).
        out = scaled_dot_product_attention(q, keys, values, self_mask, use_sdpa=self.use_sdpa and self_mask is None)
        return self.self_out(out.reshape(x.size(0), -1))

    def context_keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention's keys and values of an encoder output (B, S, d_model): each (B, n_heads, S, d_k)."""
        b, s, _ = memory.shape
        split = lambda t: t.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        return split(self.cross_k(memory)), split(self.cross_v(memory))

    def cross_attention(self, x: torch.Tensor, memory, src_mask, cache) -> torch.Tensor:
        cross = cache.cross_attention
        if not cross.holds(self.layer_index):  # the encoder output's keys and values, once
            cross.update(self.layer_index, *self.context_keys_values(memory))
        keys, values = cross.keys[self.layer_index], cross.values[self.layer_index]
        if keys.size(0) == 1 and keys.size(2) < self.head_dim:  # one source of fewer than d_k tokens
            # Made once a search, and again after a reorder or when a new source takes the row.
            if self.folded is None or self.folded[0] is not keys or self.folded[1] != keys._version:
                self.folded = keys, keys._version, FoldedCrossAttention(self.cross_q, self.cross_out, keys, values,
                                                                        src_mask)
            return self.folded[2](x)
        out = scaled_dot_product_attention(self.heads(self.cross_q(x)), keys, values, src_mask, use_sdpa=self.use_sdpa)
        return self.cross_out(out.reshape(x.size(0), -1))

    def __call__(self, x: torch.Tensor, memory, src_mask, cache, self_mask=None) -> torch.Tensor:
        """x (B, d_model), one position → (B, d_model). self_mask: which cached positions each row
        sees, when rows differ in length (`KVCache.row_mask`)."""
        x = self.residual(x, 0, lambda h: self.self_attention(h, cache, self_mask))
        x = self.residual(x, 1, lambda h: self.cross_attention(h, memory, src_mask, cache))
        return self.residual(x, 2, lambda h: self.w_2(self.activation(self.w_1(h))))


class PackedTransformer:
    """`model`'s decoder weights laid out for decoding one position per row."""

    def __init__(self, model: Transformer):
        self.model = model
        with torch.no_grad():
            self.layers = [PackedDecoderLayer(layer) for layer in model.decoder_layers]
            self.output = PackedLinear(model.output_projection.weight, model.logits_bias)
        self.scale = math.sqrt(model.config.d_model) if model.config.scale_embeddings else 1.0

    def step(self, tokens: torch.Tensor, memory, src_mask, cache) -> torch.Tensor:
        """The position after the `cache.length` decoded ones: tokens (B,) → float32 logits (B, vocab)."""
        model, t, self_cache = self.model, cache.length, cache.self_attention
        if t + 1 > model.config.max_seq_len:
            model.embed(tokens[:, None], model.tgt_embedding, t)  # raises the model's own error
        # Each row's own position when rows differ in length (beam search's pool), else the one t.
        rows_differ = self_cache.row_lengths is not None
        position = model.positions[self_cache.row_lengths if rows_differ else t]  # (B or 1, d_model)
        self_mask = self_cache.row_mask() if rows_differ else None
        x = model.tgt_embedding.weight[tokens] * self.scale + position  # (B, d_model)
        for layer in self.layers:
            x = layer(x, memory, src_mask, cache, self_mask)
        cache.self_attention.advance(1)
        if model.decoder_norm is not None:
            x = model.decoder_norm(x)
        return self.output(x).float()


ATTENTIONS = (MultiHeadAttention, FusedMultiHeadAttention)  # what the packed step knows
NORMS = (LayerNorm, FastLayerNorm)


class PackedDecoder(PackedCopy):
    """`model.decode_step` after `accelerate`: a `PackedTransformer` of the model's current
    weights, made on the first call and made again whenever a parameter is replaced or written in
    place."""

    def __init__(self, model: Transformer):
        super().__init__(model, PackedTransformer, self.supports)

    @staticmethod
    def supports(model: Transformer) -> bool:
        """Whether every decoder layer is one the packed step knows, on a CPU, and the copy affordable."""
        known = all(
            type(layer) is DecoderLayer and type(layer.self_attention) in ATTENTIONS
            and type(layer.cross_attention) in ATTENTIONS and type(layer.feed_forward) is FeedForward
            and all(type(norm) in NORMS for norm in layer.norms)
            for layer in model.decoder_layers
        )
        return known and fits_a_packed_copy(model)

    def current_for_step(self):
        return None if self.model.training else self.current()  # in training, dropout would apply

    def run_step(self, packed: PackedTransformer | None, tokens: torch.Tensor, memory, src_mask, cache) -> torch.Tensor:
        """tokens (B,) at the position after the cached ones → float32 logits (B, vocab)."""
        if packed is None:  # dropout would apply; or moved to a GPU
            hidden = self.model.decode(tokens[:, None], memory, src_mask, cache)[:, -1]
            return self.model.logits(hidden).float()
        return packed.step(tokens, memory, src_mask, cache)
