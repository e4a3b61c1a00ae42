"""A cross-entropy over a large vocabulary that never holds all the logits.

The language-modelling loss is F.cross_entropy(h · Wᵀ, targets) over every position of the
batch. With Llama 2's 32k vocabulary the logits are the largest tensor of a training step
(8 × 256 tokens: 262 MB in float32, plus as much again for their gradient). `linear_cross_entropy`
computes the same value and gradients a chunk of rows at a time, from one softmax pass per chunk,
reusing one buffer, so the (rows, vocab) logits never exist whole: less memory, and fewer passes
over it. Its products go through `gemm` (oneDNN where that is faster on a CPU).
`tests/fast/test_cross_entropy.py` checks it against F.cross_entropy.
"""

import torch

from fromscratch.errors import UserError
from fromscratch.fast.gemm import matmul_transposed, use_onednn
class _LinearCrossEntropy(torch.autograd.Function):
    """Σᵢ of the (label-smoothed) cross-entropy of softmax(hᵢ·Wᵀ + b) against targetᵢ, over the
    rows of h, a chunk of rows at a time.

    With label smoothing ε (PyTorch's convention: ε spread over the whole vocabulary of size V)
    a row's loss is (1 − ε)(lse − z_target) + ε(lse − mean z), with lse = logsumexp(z).
    The loss is the end of the graph, so its gradient with respect to the logits is known in
    the forward pass: softmax(z) − (1 − ε)·onehot(target) − ε/V. Forward therefore turns each
    chunk's probabilities into that gradient in place, takes the products that need it
    (∂h = g·W, ∂W += gᵀ·h, ∂b += Σ g), and drops it: the (rows, vocab) logits never exist whole.
    Backward only scales the stored gradients by the incoming one.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ignore_index: int, label_smoothing: float, chunk_rows: int,
                onednn: bool):
        needs_grad = any(ctx.needs_input_grad[:3])
        w = weight.to(h.dtype)
        vocab = w.size(0)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if needs_grad else None
        # The first chunk's product initialises ∂W; without rows there is none, and ∂W is 0.
        new_grad_weight = torch.empty_like if h.size(0) else torch.zeros_like
        grad_weight = new_grad_weight(weight, dtype=torch.float32) if needs_grad else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=h.device) if needs_grad and bias is not None else None
        # One (chunk_rows, vocab) buffer serves every chunk: a fresh one each time would cost page
        # faults on every chunk (each is tens of MB).
        rows_per_chunk = min(chunk_rows, h.size(0))
        probs_buffer = torch.empty(rows_per_chunk, vocab, dtype=torch.float32, device=h.device)
        for start in range(0, h.size(0), chunk_rows):
            h_chunk, t_chunk = h[start:start + chunk_rows], targets[start:start + chunk_rows]
            n = len(t_chunk)
            keep = t_chunk != ignore_index
            t_safe = t_chunk.masked_fill(~keep, 0)
            rows = torch.arange(n, device=h.device)
            logits = matmul_transposed(h_chunk, w, onednn).float()  # (rows, vocab)
            if bias is not None:
                logits += bias.float()
            probs = torch.softmax(logits, dim=-1, out=probs_buffer[:n])
            losses = token_losses(logits, probs, rows, t_safe)  # lse − z_target
            if label_smoothing:
                lse = losses + logits[rows, t_safe]
                losses = (1 - label_smoothing) * losses + label_smoothing * (lse - logits.mean(dim=-1))
            total += (losses * keep).sum()
            if needs_grad:
                grad = probs  # becomes softmax − (1 − ε)·onehot − ε/V, in place
                grad[rows, t_safe] -= 1.0 - label_smoothing
                if label_smoothing:
                    grad -= label_smoothing / vocab
                if not keep.all():
                    grad[~keep] = 0.0
                if grad_bias is not None:
                    grad_bias += grad.sum(dim=0)
                grad = grad.to(h.dtype)
                grad_h[start:start + chunk_rows] = matmul_transposed(grad, w.t(), onednn)  # g·W
                if start == 0:  # the first chunk's product initialises ∂W
                    torch.mm(grad.t().float(), h_chunk.float(), out=grad_weight)
                else:
                    grad_weight.addmm_(grad.t().float(), h_chunk.float())
        ctx.save_for_backward(grad_h, grad_weight.to(weight.dtype) if needs_grad else None,
                              grad_bias.to(bias.dtype) if grad_bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_weight, grad_bias = ctx.saved_tensors
        scaled = [g * grad_total if g is not None else None for g in (grad_h, grad_weight, grad_bias)]
        return (*scaled, None, None, None, None, None)


def token_losses(logits: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    """−log p(target) of each row, from its softmax: one pass over the logits fewer than
    log_softmax followed by exp. Where p(target) underflows float32 (a loss above ~69), the loss
    is taken exactly from the logits instead: logsumexp(z) − z_target."""
    p_target = probs[rows, targets]
    losses = -torch.log(p_target)
    tiny = p_target < 1e-30
    if tiny.any():
        exact = torch.logsumexp(logits[tiny], dim=-1) - logits[rows[tiny], targets[tiny]]
        losses = losses.masked_scatter(tiny, exact)
    return losses


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", chunk_rows: int | None = None,
                         bias: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T + bias, targets, label_smoothing=...) for h (N, d), weight
    (vocab, d), targets (N,), computed a chunk of rows at a time so the (N, vocab) logits are
    never held whole.

    With Llama 2's 32k vocabulary the logits are the largest tensor of a training step
    (8 × 256 tokens: 262 MB in float32, plus as much again for their gradient); skipping them
    saves that memory and the passes over it. chunk_rows defaults to ~8M logits per chunk.
    """
    if reduction not in ("mean", "sum"):
        raise UserError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    chunk_rows = chunk_rows or max(1, 2**23 // weight.size(0))
    total = _LinearCrossEntropy.apply(h, weight, bias, targets, ignore_index, label_smoothing, chunk_rows,
                                      use_onednn(h, weight))
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)


def lm_cross_entropy(hidden: torch.Tensor, output: torch.nn.Linear, targets: torch.Tensor,
                     ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """`llama.model.next_token_loss` computed by `linear_cross_entropy`: same arguments, same
    value and gradients. hidden (B, T, d), targets (B, T)."""
    return linear_cross_entropy(hidden.flatten(0, 1), output.weight, targets.flatten(),
                                ignore_index=ignore_index, reduction=reduction)
