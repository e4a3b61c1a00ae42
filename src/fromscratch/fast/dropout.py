"""`Dropout`: nn.Dropout whose random mask costs about a quarter of PyTorch's on a CPU.

Dropout (Srivastava et al. 2014; the Transformer's §5.4) zeroes each value with probability p
and scales the values it keeps by 1/(1 − p), so that the expectation is unchanged. On a CPU,
PyTorch draws one random float per value for the mask (`bernoulli_`, from the mt19937 generator):
in a training step of the Transformer's `base` (16 × (32 + 32) tokens, alone on the 2-core AMD
EPYC) those draws were the most expensive kernel after the products, 64 ms of ~1.2 s.

One draw of 64 random bits holds four independent 16-bit numbers, each uniform on 0 … 65,535,
and a value is dropped when its number is below round(p · 65,536). So `Dropout` draws a quarter
as many words: on this CPU, a mask of 512 × 512 values takes 0.35 ms instead of 1.5 ms
(`bench/bench_transformer.py` measures the whole step). The price is that p is rounded to a
multiple of 1/65,536 (0.1 drops with probability 0.1000061); the kept values are scaled by
1/(1 − that probability), so the expectation stays exact.

It is an nn.Dropout (same arguments, no state), and it is PyTorch's own wherever this path does
not apply: in eval mode, on GPUs (whose generator is fast), inside torch.compile (which fuses
dropout itself), or with `inplace=True`. It draws from the same global generator, so
`torch.manual_seed` makes it reproducible. `tests/fast/test_dropout.py` checks the rate, the
independence of the four numbers of a word, the scale and the gradient.
"""

import torch
import torch.nn as nn

LEVELS = 1 << 16  # a 16-bit number takes this many values


def dropped_fraction(p: float) -> float:
    """The probability with which `dropout` drops a value: p rounded to a multiple of 1/65,536."""
    return round(p * LEVELS) / LEVELS


def keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool mask of `shape`, each value False (dropped) with probability `dropped_fraction(p)`,
    independently: four 16-bit numbers from each 64-bit random word."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None)  # every one of the 64 bits uniform (random_() alone leaves the sign bit 0)
    numbers = words.view(torch.int16)[:n].view(shape)  # uniform on −32,768 … 32,767
    return numbers >= int(dropped_fraction(p) * LEVELS) - LEVELS // 2


class _Dropout(torch.autograd.Function):
    """y = x · keep · scale; ∂L/∂x = ∂L/∂y · keep · scale. Keeps the mask as one byte per value."""

    @staticmethod
    def forward(ctx, x, keep, scale: float):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of x with the mask of `keep_mask` (p rounded as it says)."""
    q = dropped_fraction(p)
    if q == 0.0:
        return x
    if q == 1.0:
        return x * 0.0
    return _Dropout.apply(x, keep_mask(x.shape, p, x.device), 1.0 / (1.0 - q))


class Dropout(nn.Dropout):
    """nn.Dropout with the cheaper mask of `dropout` on a CPU in training (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or self.inplace or x.device.type != "cpu"
                or torch.compiler.is_compiling()):
            return super().forward(x)
        return dropout(x, self.p)
