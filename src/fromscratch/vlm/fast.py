"""The VLM package's opt-in fast paths on a CPU: `accelerate(model)` for a ViT, a CLIP or a VLM.
The same maths as vit.py, clip.py and model.py, in fewer and faster kernels:

1. Every `nn.Linear` becomes a `fromscratch.fast.gemm.Linear` (the same module with the same
   parameters; its class adds no state), whose training products run on the faster of MKL and
   oneDNN (see gemm.py).
2. Every Transformer `LayerNorm` becomes a `FastLayerNorm`: the same parameters, with its
   backward pass written out. Autograd through `LayerNorm.forward` records seven operations
   and keeps their intermediate tensors; `FastLayerNorm` keeps x̂ = (x − μ)/σ and 1/σ only and
   computes the gradient in one expression (below). Small models of short sequences (a ViT-Tiny,
   our VLM) spend a large share of a training step in such element-wise work.

Only exact types are replaced (a subclass may compute something else). `tests/vlm/test_vlm_fast.py`
checks that an accelerated model computes the plain model's outputs and gradients.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fromscratch.fast import gemm
from fromscratch.transformer.model import LayerNorm


class _LayerNorm(torch.autograd.Function):
    """y = x̂·γ + β with x̂ = (x − μ)·r, r = 1/√(σ² + ε), over the last dimension (d values).

    Backward, with g = ∂L/∂y and ĝ = g·γ:
        ∂L/∂γ = Σ g·x̂,   ∂L/∂β = Σ g   (sums over every position)
        ∂L/∂x = r · (ĝ − mean(ĝ) − x̂ · mean(ĝ·x̂))   (means over the d values)"""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
        rstd = torch.rsqrt(var + eps)
        x_hat = (x - mean).mul_(rstd)
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
    """`LayerNorm` with the written-out backward of `_LayerNorm` (and a three-kernel forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _LayerNorm.apply(x, self.weight, self.bias, self.eps)
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
        return torch.addcmul(self.bias, (x - mean).mul_(torch.rsqrt(var + self.eps)), self.weight)


def accelerate(model: nn.Module) -> nn.Module:
    """Switch `model` (a ViT, CLIP or VLM) to the fast paths of the module docstring; returns it.
    Its parameters, their names and every result stay the same."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = gemm.Linear  # subclasses that add no state: the Parameters stay
        elif type(module) is LayerNorm:
            module.__class__ = FastLayerNorm
    return model
