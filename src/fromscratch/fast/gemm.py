"""`Linear`: nn.Linear whose products run on the faster of PyTorch's two CPU matrix libraries.

A linear layer costs three matrix products per training step: y = x·Wᵀ forward, then ∂x = g·W and
∂W = gᵀ·x backward (g = ∂loss/∂y). On a CPU, PyTorch sends every float32 product to MKL. It also
ships oneDNN (its compiler's CPU backend), which takes ordinary tensors through
`torch.ops.mkldnn._linear_pointwise(x, W, bias)` = x·Wᵀ + bias. Measured on the 2-core AMD EPYC
that runs `bench/` (`bench/bench_llama.py`, section "gemm"), at the shapes of Llama training
oneDNN computes x·Wᵀ and g·W faster than MKL (by 10–50%, most for the classifier's x·Wᵀ), while
MKL is faster for gᵀ·x. So `Linear` takes each product from the library that is faster for it.

oneDNN compiles a kernel for every distinct shape it meets and keeps it: ~0.8 MB each here, never
freed, so a stream of new shapes (prompts of every length, decoding without a cache) grows
the process without bound. Training steps repeat the same few shapes, so `Linear` uses oneDNN
only when gradients are being computed, and for at most MAX_ONEDNN_SHAPES distinct shapes (a
training run with ever-changing shapes gets MKL after those); inference goes to MKL.

It is an nn.Linear (same parameters, state-dict names and initialisation), and it behaves exactly
like one wherever the oneDNN path does not apply: without gradients, on GPUs, under autocast, for
dtypes other than float32, inside torch.compile, or when PyTorch was built without oneDNN.
`tests/test_gemm.py` checks outputs and gradients against F.linear.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

USE_ONEDNN = True  # module-wide switch, for measurements and tests
MAX_ONEDNN_SHAPES = 32  # distinct product shapes given to oneDNN; later new ones go to MKL
_onednn_shapes: set[tuple[int, int, int]] = set()


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = _onednn_available()


def use_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the products of x (…, in) with weight (out, in) go through oneDNN: a gradient is
    wanted from them (a training step, whose shapes repeat), on CPU in float32, eagerly, without
    autocast, and the shape is one oneDNN has seen or one of its first MAX_ONEDNN_SHAPES (each new
    shape costs ~0.8 MB that is never freed: this bounds it even when shapes never repeat)."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if not (USE_ONEDNN and _ONEDNN and torch.is_grad_enabled()
            and any(t.requires_grad for t in tensors)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.layout == torch.strided
                    for t in tensors)):
        return False
    shape = (x.numel() // max(1, x.size(-1)), *weight.shape)  # (rows, out, in)
    if shape not in _onednn_shapes:
        if len(_onednn_shapes) >= MAX_ONEDNN_SHAPES:
            return False
        _onednn_shapes.add(shape)
    return True


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ (+ bias) by oneDNN, no autograd: x (N, in), weight (out, in) → (N, out)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def matmul_transposed(x: torch.Tensor, weight: torch.Tensor, onednn: bool) -> torch.Tensor:
    """x·Wᵀ for 2-D x (N, in) and weight (out, in), by oneDNN if `onednn` (from `use_onednn`,
    asked outside any autograd.Function, where gradient mode is off) else by MKL."""
    return onednn_linear(x, weight) if onednn else x @ weight.t()


class _OneDNNLinear(torch.autograd.Function):
    """y = x·Wᵀ + b with y and ∂x from oneDNN and ∂W = gᵀ·x from MKL (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        x_rows = x.reshape(-1, x.size(-1))  # (N, in)
        return onednn_linear(x_rows, weight, bias).view(*x.shape[:-1], weight.size(0))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.size(-1))  # (N, out)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_linear(g, weight.t()).view(x.shape)  # g·W = g·(Wᵀ)ᵀ
        if ctx.needs_input_grad[1]:
            grad_weight = g.t() @ x.reshape(-1, x.size(-1))  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(dim=0)
        return grad_x, grad_weight, grad_bias


class Linear(nn.Linear):
    """nn.Linear computed by `_OneDNNLinear` where `use_onednn` applies, by F.linear elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_onednn(x, self.weight, self.bias):
            return _OneDNNLinear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
