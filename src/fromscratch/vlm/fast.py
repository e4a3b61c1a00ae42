"""The VLM package's opt-in fast paths on a CPU: `accelerate(model)` for a ViT, a CLIP or a VLM.
The same maths as vit.py, clip.py and model.py, in fewer and faster kernels:

1. Every `nn.Linear` becomes a `fromscratch.fast.gemm.Linear` (the same module with the same
   parameters; its class adds no state), whose training products run on the faster of MKL and
   oneDNN (see gemm.py).
2. The Transformer's own fast layers (`fromscratch.transformer.fast.swap_layers`): attention
   projections of one input in one product, and `FastLayerNorm`, whose backward pass is written
   out. Small models of short sequences (a ViT-Tiny, our VLM) spend a large share of a training
   step in such element-wise work.

Only exact types are replaced (a subclass may compute something else). `tests/vlm/test_vlm_fast.py`
checks that an accelerated model computes the plain model's outputs and gradients.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fromscratch.fast import gemm
from fromscratch.transformer.fast import swap_layers


def accelerate(model: nn.Module) -> nn.Module:
    """Switch `model` (a ViT, CLIP or VLM) to the fast paths of the module docstring; returns it.
    Its parameters, their names and every result stay the same."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = gemm.Linear  # a subclass that adds no state: the Parameters stay
    swap_layers(model)
    return model
