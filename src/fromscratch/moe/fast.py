"""The MoE's opt-in fast path for decoding on a CPU: the routed feed-forward for one position
per row, registered with Llama's packed decoding step (`fromscratch.llama.fast`).

`fromscratch.llama.accelerate(model)` packs a model's weights for the one-token steps of
generation when it knows every block (llama/fast.py, `PACKED_FEED_FORWARDS`). Registering
`MoEFeedForward` here makes an `MoELlama` qualify: its attention then runs on Llama's packed
layout, and its routed feed-forward on `PackedMoEFeedForward`.

Why not the layer's own one-token path (`MoEFeedForward`'s "gather" dispatch)? It gathers each
slot's expert weights into a new tensor: a copy of k experts' weights per token and layer, as
large as the product that follows. Here each expert's w1|w3 and w2 are packed once in Llama's
column-block layout, and a step multiplies each expert that some row chose, on those rows, in
place: the same arithmetic, reading the weights once. Routing (float32, top-k, capacity in the
GShard order) and the combine (a buffer of one row per slot, summed over the k slots in order)
are the layer's own functions, except that Mixtral's router is taken in three operations
(`route`); `tests/moe/test_moe_generate.py` checks the step against `MoELlama.forward`. At
batch 1 (`one_row`) there is nothing to sort: the row's k experts are multiplied in turn and
their gated outputs summed, a few operations per expert instead of the sort, count and scatter. Routing statistics (`router_stats`) are only recorded by forward.
"""

import torch
import torch.nn.functional as F

from fromscratch.llama.fast import PACKED_FEED_FORWARDS, PackedSwiGLU, blocked_matmul, packed
from fromscratch.moe.routing import MoEFeedForward, sort_by_expert


class PackedMoEFeedForward:
    """`MoEFeedForward.forward` (evaluation mode) for one position per row: x (B, d_model) → (B, d_model)."""

    def __init__(self, layer: MoEFeedForward):
        self.layer = layer
        experts = layer.experts
        self.w13 = [packed(torch.cat([w1, w3])) for w1, w3 in zip(experts.w1, experts.w3)]  # gate|up, per expert
        self.w2 = [packed(w2) for w2 in experts.w2]
        self.shared = None if layer.shared_experts is None else PackedSwiGLU(layer.shared_experts)
        router = layer.router
        mixtral_router = router.scoring == "softmax" and router.norm_topk and router.expert_bias is None
        self.router_weight = router.weight.detach().float().t().contiguous() if mixtral_router else None  # (d_model, E)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's k experts and their gates, (B, k) each, as `Router.forward` chooses them.
        Mixtral's router (softmax scores, the k gates renormalised, no bias) in three operations:
        softmax is monotonic, so the top k of the logits are the top k of the probabilities, and
        the k probabilities renormalised are the softmax of the k logits alone."""
        if self.router_weight is None:
            return self.layer.router(x)[2:]
        top = torch.mm(x.float(), self.router_weight).topk(self.layer.top_k, dim=-1)
        return top.indices, torch.softmax(top.values, dim=-1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        n_rows, k = x.size(0), layer.top_k
        chosen, gates = self.route(x)  # (B, k) each
        capacity = layer.capacity(n_rows)
        if n_rows == 1 and (capacity is None or capacity >= 1):
            return self.one_row(x, chosen[0].tolist(), gates[0])
        expert_of_slot = chosen.t().reshape(-1)  # (k·B,): slot j·B + b is row b's j-th choice
        gate_of_slot = gates.t().reshape(-1)
        slots_per_expert = torch.bincount(expert_of_slot, minlength=layer.n_experts)
        kept_slots, kept_per_expert = sort_by_expert(expert_of_slot, slots_per_expert, layer.capacity(n_rows))
        weighted = torch.zeros(k * n_rows, x.size(-1), dtype=torch.float32, device=x.device)  # a dropped slot stays 0
        for e, slots in enumerate(kept_slots.split(kept_per_expert.tolist())):
            if len(slots):
                gate, up = blocked_matmul(x[slots % n_rows], self.w13[e]).chunk(2, dim=-1)
                y = blocked_matmul(F.silu(gate) * up, self.w2[e])
                weighted[slots] = y.float() * gate_of_slot[slots, None]
        out = weighted.view(k, n_rows, -1).sum(dim=0)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.to(x.dtype)

    def one_row(self, x: torch.Tensor, experts: list[int], gates: torch.Tensor) -> torch.Tensor:
        """The same for a single row (generation at batch 1), without sorting: its k experts are
        different, so each holds one slot and no capacity drops it. x (1, d_model); experts, its
        k choices; gates (k,) float32. The k outputs are summed in slot order, as above."""
        out = torch.zeros(1, x.size(-1), dtype=torch.float32, device=x.device)
        for slot, e in enumerate(experts):
            gate, up = blocked_matmul(x, self.w13[e]).chunk(2, dim=-1)
            out += blocked_matmul(F.silu(gate) * up, self.w2[e]).float() * gates[slot]
        if self.shared is not None:
            out = out + self.shared(x)
        return out.to(x.dtype)


PACKED_FEED_FORWARDS[MoEFeedForward] = PackedMoEFeedForward
