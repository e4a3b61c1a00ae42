"""Weights laid out for one-row products: what makes decoding one token at a time fast on a CPU.

A decoding step multiplies one row per sequence by every weight matrix, so it costs the time to
stream the weights from memory. nn.Linear stores W as (out, in); for one row MKL streams that
layout at ~8 GB/s on one core. Here each matrix is kept transposed and cut into column blocks
stacked as a batch, so that one `torch.bmm` shares the blocks among the cores and streams them at
25–34 GB/s on the 2-core AMD EPYC of `bench/`, whose weights come from DRAM. On hosts whose L3
cache holds the weights the three layouts stream alike, the blocks 16–35 % slower than the best
of them (docs/performance.md, "Where the L3 holds the weights"). Used by every model's packed
decoding step (`fromscratch.llama.fast`, `fromscratch.transformer.fast`).
"""

from functools import partial

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook


def column_blocks(weight: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """nn.Linear's (out, in) weight W → Wᵀ cut into `n_blocks` column blocks: (n_blocks, in, out/n_blocks)."""
    d_out, d_in = weight.shape
    return weight.t().reshape(d_in, n_blocks, d_out // n_blocks).transpose(0, 1).contiguous()


def blocked_matmul(x: torch.Tensor, blocks: torch.Tensor, bias_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ (+ b) for x (B, in), W in `column_blocks` form and b in `bias_blocks` form → (B, out).
    One bmm (baddbmm with a bias): a block per batch entry."""
    n_blocks, _, block_out = blocks.shape
    rows = x.expand(n_blocks, *x.shape)
    if bias_blocks is None:
        out = torch.bmm(rows, blocks)  # (n_blocks, B, out/n_blocks)
    else:  # the bias added inside the product's kernel: one operation instead of two
        out = torch.baddbmm(bias_blocks, rows, blocks)
    if x.size(0) == 1:  # (n_blocks, 1, out/n_blocks) is already the row's layout: one view
        return out.view(1, n_blocks * block_out)
    return out.transpose(0, 1).reshape(x.size(0), n_blocks * block_out)


def bias_blocks(bias: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """nn.Linear's (out,) bias cut as `blocks` cuts its weight's columns: (n_blocks, 1, out/n_blocks)."""
    n_blocks, _, block_out = blocks.shape
    return bias.detach().reshape(n_blocks, 1, block_out).contiguous()


def packed(weight: torch.Tensor) -> torch.Tensor:
    """`column_blocks` with the number of blocks chosen by `n_column_blocks`."""
    return column_blocks(weight.detach(), n_column_blocks(weight.size(0)))


def n_column_blocks(d_out: int) -> int:
    """How many column blocks to cut a matrix with `d_out` columns into.

    Chosen by timing whole decoding steps of `stories15m` on 2 cores: blocks of ~16 columns for
    the layers' matrices were fastest (far faster than one block per core), but only two blocks
    per core for the 32,000-wide classifier; and always a multiple of the core count, so that no
    core waits for another.
    """
    cores = torch.get_num_threads()
    target = 2 * cores if d_out >= 4096 else max(cores, d_out // 16)
    for n in range(target, 0, -1):
        if d_out % n == 0 and (n % cores == 0 or n < cores):
            return n
    return 1


# PyTorch's fused and foreach optimizers write the parameters without bumping their version
# counters, so every optimizer step in the process counts as a write to every model.
_optimizer_steps = 0
# Assigning a parameter or a submodule anywhere in the process (`block.weight = Parameter(...)`,
# `model.layers[0] = other`) runs PyTorch's global registration hooks: counted here, so that a
# model's parameter list is walked again only after something may have changed it.
_registrations = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _count_registration(module, name, value) -> None:
    global _registrations
    _registrations += 1


PACK_MAX_BYTES = 2**30  # models with more parameter bytes decode through their own forward instead


def fits_a_packed_copy(model: nn.Module) -> bool:
    """Whether a packed copy of `model`'s weights applies and is affordable: every parameter on
    a CPU (the packed products are for CPU decoding), and at most PACK_MAX_BYTES of them (the copy
    doubles their memory)."""
    parameters = list(model.parameters())
    return (all(p.device.type == "cpu" for p in parameters)
            and sum(p.numel() * p.element_size() for p in parameters) <= PACK_MAX_BYTES)


register_optimizer_step_post_hook(_count_optimizer_step)
nn.modules.module.register_module_parameter_registration_hook(_count_registration)
nn.modules.module.register_module_module_registration_hook(_count_registration)


class PackedCopy:
    """A packed copy of `model`'s weights, `pack(model)`, made on first use and made again
    whenever the weights change, so that it never serves stale weights; None while
    `supports(model)` says the packed step does not apply. That check walks the whole model, so
    it runs only when the weights change: moving the model to a GPU, converting its dtype or
    swapping a block for another all replace parameters.

    The weights change when a parameter is replaced (a registration, above), its storage is
    replaced (`p.data = ...`, `model.to(...)`: its data_ptr) or written in place (its version
    counter: load_state_dict, in-place ops), and after any optimizer step (a fused AdamW step
    leaves the version counters alone). Checked once per search (`for_one_search`), or before
    every step called directly; walking the modules for the parameter list each time cost ~0.5 ms
    a token (a tenth of a `mixtral-tiny` step), so the list is kept until a registration happens
    somewhere."""

    def __init__(self, model: nn.Module, pack, supports=lambda model: True):
        self.model, self.pack, self.supports = model, pack, supports
        self.packed, self.key = None, ()  # () is no model's key: the first call makes the copy
        self.parameters, self.registrations = [], -1

    def weights_key(self) -> tuple | None:
        """A value that changes whenever the weights may have (above); None when that cannot be
        told: tensors made under torch.inference_mode() keep no version counter."""
        if self.registrations != _registrations:
            self.parameters, self.registrations = list(self.model.parameters()), _registrations
        if any(p.is_inference() for p in self.parameters):
            return None
        return _optimizer_steps, _registrations, *[(p.data_ptr(), p._version) for p in self.parameters]

    def current(self):
        key = self.weights_key()
        if key is None or key != self.key:
            self.packed = None  # free the stale copy before making anew
            self.packed = self.pack(self.model) if self.supports(self.model) else None
            self.key = key
        return self.packed

    def current_for_step(self):
        """The copy a decoding step may use now (None: the model's own path must run)."""
        return self.current()

    def __call__(self, *args, **kwargs):
        """One decoding step, the weights checked first."""
        return self.run_step(self.current_for_step(), *args, **kwargs)

    def for_one_search(self):
        """The step function for one whole search (greedy, sampled or beam): the weights are
        checked once, here, instead of before every token, since nothing can change them while
        a search runs. The check is ~0.15 ms a token in the Transformer's ~6 ms `base` step."""
        return partial(self.run_step, self.current_for_step())

    def run_step(self, packed, *args, **kwargs):
        """The model's decoding step with `packed` (the copy, or None for the model's own path)."""
        raise NotImplementedError
