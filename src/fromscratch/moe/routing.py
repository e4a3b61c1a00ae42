"""The routed feed-forward layer of a sparse Mixture-of-Experts Llama: each token goes to k of
n_experts SwiGLU experts (Llama's `FeedForward`), and their outputs are mixed by a learned router.

Each part, and the paper it comes from:
- Top-k mixture — Shazeer et al. (2017), "Outrageously Large Neural Networks", §2.1:
  y = Σ_{i ∈ top-k} gᵢ(x)·Eᵢ(x). Mixtral (Jiang et al. 2024, §2.1) renormalises the k gate values
  to sum to 1 (`norm_topk`); Switch Transformers (Fedus et al. 2021, §2.1, eq. 1–2) route to a
  single expert (k = 1) with gate pᵢ(x).
- Router in float32 — Switch §2.4, "selective precision": the router's exponentials are where
  bfloat16 rounding hurts, so its logits are computed in float32 (autocast off) whatever the
  model's dtype.
- Router jitter — Switch's code, and ST-MoE §3.2 ("input jitter"): during training the router's
  input is multiplied by noise uniform in [1 − ε, 1 + ε]. The experts see the clean input.
- Expert capacity — Switch §2.2, eq. 3: an expert takes at most
  C = ⌈capacity_factor · k·T / n_experts⌉ of the k·T token-slots of a batch of T tokens. For k > 1
  slots queue as in GShard (Lepikhin et al. 2020, Algorithm 1): every token's first choice before
  any second choice, earlier tokens first. A dropped slot contributes 0, so the token passes on
  the residual stream alone. capacity_factor None: dropless (no slot is ever dropped).
- Load-balancing loss — Switch §2.2, eq. 4–6, normalised so that perfectly balanced routing gives
  1 for any k (`switch_load_balancing_loss`, where the normalisation is derived). Hugging Face
  pools all layers and lets balanced routing give k (its issues #31464, #43688): that convention
  is `hf_load_balancing_loss`, equal to `MixtralForCausalLM`'s `aux_loss`.
- Router z-loss — ST-MoE (Zoph et al. 2022) §3.3, eq. 5: the mean over tokens of
  logsumexp(logits)².
- Sigmoid scoring and auxiliary-loss-free balancing — DeepSeek-V3 (2024) §2.1.2, eq. 13–16, and
  Wang et al. (2024), "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts",
  Algorithm 1: scores sᵢ = sigmoid(logitᵢ); a per-expert bias bᵢ is added to the scores only to
  choose the top k (the gates are the unbiased scores), and after each optimizer step
  bᵢ ← bᵢ + u·sign(mean load − loadᵢ).
- Shared and fine-grained experts — DeepSeekMoE (Dai et al. 2024) §3.1–3.2: n_shared_experts
  experts see every token, their output added to the routed one; fine-grained experts are narrow
  ones (a small `expert_hidden_dim`).

Dispatch, with no Python loop over tokens. The k·T token-slots are sorted by expert with one
stable argsort, so each expert's tokens form one contiguous slice; each of the three SwiGLU
products is then one grouped matrix product over all experts (`torch.nn.functional.grouped_mm`,
which PyTorch ≥ 2.9 runs on CPUs for float32 and bfloat16 too, its gradients included), or, where
it is missing, one product per expert on its slice. The results are written to a buffer of one
row per (slot, token) — each row written once — and summed over the k slots in a fixed order,
so the output does not depend on thread scheduling. Decoding, where there are fewer slots than
experts, gathers each slot's expert weights and takes one batched product instead.

Departures: the losses are per layer (the model averages them over its sparse layers); with
sigmoid scoring the load-balancing loss and the router entropy use the scores normalised to sum
to 1 (as DeepSeek-V3's sequence-wise balance loss, eq. 19–20, does).
"""

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fromscratch.errors import UserError
from fromscratch.llama.model import FeedForward, LlamaConfig

ROUTER_SCORINGS = ("softmax", "sigmoid")
BALANCE_METHODS = ("aux", "bias", "none")
DISPATCH_METHODS = ("auto", "grouped", "loop", "gather")


# --- router ---------------------------------------------------------------------------------------


class Router(nn.Module):
    """Scores every expert for every token, in float32, and picks each token's top k.

    weight (n_experts, d_model): the logits are x·weightᵀ (Mixtral's `gate`). expert_bias
    (n_experts,) is DeepSeek-V3's bᵢ, a buffer (it is not trained by gradients, and checkpoints
    keep it), present only when `use_expert_bias`. It stays float32 as long as the model's
    parameters do (mixed precision by autocast); a model cast whole to bfloat16 would store it
    in bfloat16, whose spacing near 1 (2⁻⁷) swallows small update rates.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, scoring: str = "softmax",
                 norm_topk: bool = True, jitter: float = 0.0, use_expert_bias: bool = False):
        super().__init__()
        self.top_k, self.scoring, self.norm_topk, self.jitter = top_k, scoring, norm_topk, jitter
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, mean=0.0, std=0.02)
        self.register_buffer("expert_bias", torch.zeros(n_experts) if use_expert_bias else None)

    def forward(self, x: torch.Tensor):
        """x (N, d_model) → logits (N, E) and the router distribution probs (N, E) (under sigmoid
        scoring, the scores normalised to sum to 1), both float32; chosen (N, k) expert indices,
        best first; gates (N, k) float32, their weights."""
        with torch.autocast(x.device.type, enabled=False):
            x32 = x.float()
            if self.training and self.jitter > 0:
                x32 = x32 * torch.empty_like(x32).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            logits = x32 @ self.weight.float().t()  # (N, E)
        if self.scoring == "softmax":
            scores = torch.softmax(logits, dim=-1)
            probs = scores
        else:  # DeepSeek-V3 eq. 15: independent per-expert affinities
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(dim=-1, keepdim=True)
        choice_scores = scores if self.expert_bias is None else scores + self.expert_bias  # eq. 16
        chosen = choice_scores.topk(self.top_k, dim=-1).indices  # (N, k)
        gates = scores.gather(-1, chosen)  # the bias chooses, never weighs
        if self.norm_topk:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return logits, probs, chosen, gates


# --- experts and dispatch -------------------------------------------------------------------------


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` takes x's device and dtype: CPUs (float32, bfloat16; checked on
    torch 2.13), CUDA for bfloat16 (its documented case)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    return x.device.type == "cuda" and x.dtype == torch.bfloat16


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, rows_per_group: torch.Tensor,
                   method: str) -> torch.Tensor:
    """x·weight[g]ᵀ for each group g of consecutive rows of x.

    x (M, in) sorted by group; weight (G, out, in); rows_per_group (G,), summing to M → (M, out).
    method "grouped": one `F.grouped_mm`; "loop": one F.linear per group (a loop over experts,
    never over tokens).
    """
    if method == "grouped":
        if torch.is_autocast_enabled(x.device.type):  # autocast skips grouped_mm: cast as F.linear would
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
        group_ends = rows_per_group.cumsum(0, dtype=torch.int32)
        return F.grouped_mm(x, weight.transpose(1, 2), offs=group_ends)
    slices = x.split(rows_per_group.tolist())
    return torch.cat([F.linear(rows, w) for rows, w in zip(slices, weight)])


class Experts(nn.Module):
    """n_experts SwiGLU experts with stacked weights; expert e computes what Llama's FeedForward
    does: w2[e]·(silu(w1[e]·x) ⊙ w3[e]·x).

    w1[e] (gate) and w3[e] (up) are (hidden_dim, d_model) and w2[e] (down) is (d_model, hidden_dim),
    each exactly the `.weight` of FeedForward's Linear of that name, so one expert's slice is
    contiguous. Hugging Face's MixtralExperts fuses them: gate_up_proj[e] = cat(w1[e], w3[e]) along
    dim 0 (gate rows first) and down_proj[e] = w2[e].
    """

    def __init__(self, n_experts: int, d_model: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, d_model))  # gate
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, hidden_dim))  # down
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, d_model))  # up
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, mean=0.0, std=0.02)

    def forward(self, x_sorted: torch.Tensor, rows_per_expert: torch.Tensor, method: str) -> torch.Tensor:
        """x_sorted (M, d_model), rows grouped by expert, rows_per_expert (E,) → (M, d_model)."""
        gate = grouped_linear(x_sorted, self.w1, rows_per_expert, method)  # (M, hidden_dim)
        up = grouped_linear(x_sorted, self.w3, rows_per_expert, method)
        return grouped_linear(F.silu(gate) * up, self.w2, rows_per_expert, method)

    def gathered(self, x: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        """Each row through its own expert by gathering that expert's weights: x (S, d_model),
        expert_of_row (S,) → (S, d_model). For a few rows (decoding) this beats sorting."""
        rows = x.unsqueeze(1)  # (S, 1, d_model)
        gate = torch.bmm(rows, self.w1[expert_of_row].transpose(1, 2))  # (S, 1, hidden_dim)
        up = torch.bmm(rows, self.w3[expert_of_row].transpose(1, 2))
        return torch.bmm(F.silu(gate) * up, self.w2[expert_of_row].transpose(1, 2)).squeeze(1)


def sort_by_expert(expert_of_slot: torch.Tensor, slots_per_expert: torch.Tensor,
                   capacity: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots grouped by expert, each group in slot order, less those beyond `capacity`.

    expert_of_slot (S,); slots_per_expert (E,) its counts → kept_slots (M,), the slot indices in
    expert order, and kept_per_expert (E,), the length of each expert's group (M in all).
    """
    order = torch.argsort(expert_of_slot, stable=True)  # (S,)
    if capacity is None:
        return order, slots_per_expert
    group_starts = slots_per_expert.cumsum(0) - slots_per_expert  # (E,)
    queue_position = torch.arange(len(order), device=order.device) - group_starts[expert_of_slot[order]]
    return order[queue_position < capacity], slots_per_expert.clamp(max=capacity)


# --- the layer ------------------------------------------------------------------------------------


class MoEFeedForward(nn.Module):
    """A sparse feed-forward: y = Σ_{i ∈ top-k(x)} gᵢ(x)·Eᵢ(x) (+ the shared experts' output).

    d_model, n_experts, top_k; expert_hidden_dim: each expert's SwiGLU width.
    n_shared_experts: always-active experts of width expert_hidden_dim (DeepSeekMoE), computed as
        one FeedForward of width n_shared_experts·expert_hidden_dim: SwiGLU's hidden units are
        independent, so that is exactly the sum of n_shared_experts experts (DeepSeek's code does
        the same).
    router_scoring: "softmax" (Mixtral, Switch) or "sigmoid" (DeepSeek-V3).
    norm_topk: divide the k gate values by their sum.
    capacity_factor: None = dropless; otherwise each expert takes at most
        ⌈capacity_factor·k·T/n_experts⌉ token-slots of a batch of T tokens, in training and
        evaluation alike (a single token never overflows: its k slots go to k experts).
    balance: "aux" adds aux_loss_coef × the Switch load-balancing loss to `router_loss`; "bias"
        balances by DeepSeek-V3's expert bias instead (call `update_bias` after each optimizer
        step); "none" does neither. The loss is computed (for logging) in every case.
    aux_loss_coef: α of Switch eq. 4 (10⁻² there). z_loss_coef: c_z of ST-MoE (10⁻³ there).
    router_jitter: ε of the router's input noise during training (10⁻² in Switch's code).
    dropout: on the output, as Llama's FeedForward.
    dispatch: "auto"; or, for tests and measurements, "grouped" (F.grouped_mm), "loop" (one
        product per expert), "gather" (each slot's expert weights gathered).

    After each forward: `load_balancing_loss`, `z_loss` and `router_logits` (N, E) float32 carry
    gradients; `router_loss` is what to add to the training loss; `stats` holds detached tensors
    for logging: load_balancing_loss, z_loss, tokens_per_expert (E,) (token-slots each expert was
    chosen for), dropped_tokens (slots over capacity), dropped_fraction (of the k·N slots),
    router_entropy (mean over tokens of the router distribution's entropy, in nats).
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, expert_hidden_dim: int,
                 n_shared_experts: int = 0, router_scoring: str = "softmax", norm_topk: bool = True,
                 capacity_factor: float | None = None, balance: str = "aux",
                 aux_loss_coef: float = 1e-2, z_loss_coef: float = 1e-3, router_jitter: float = 0.0,
                 dropout: float = 0.0, dispatch: str = "auto"):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise UserError(f"top_k ({top_k}) must be between 1 and n_experts ({n_experts})")
        for name, value, choices in (("router_scoring", router_scoring, ROUTER_SCORINGS),
                                     ("balance", balance, BALANCE_METHODS),
                                     ("dispatch", dispatch, DISPATCH_METHODS)):
            if value not in choices:
                raise UserError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise UserError(f"capacity_factor must be positive or None (dropless); got {capacity_factor}")
        if not 0 <= router_jitter < 1:
            raise UserError(f"router_jitter must be in [0, 1); got {router_jitter}")
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.balance, self.aux_loss_coef, self.z_loss_coef = balance, aux_loss_coef, z_loss_coef
        self.dropout, self.dispatch = dropout, dispatch
        self.router = Router(d_model, n_experts, top_k, router_scoring, norm_topk, router_jitter,
                             use_expert_bias=balance == "bias")
        self.experts = Experts(n_experts, d_model, expert_hidden_dim)
        self.shared_experts = None
        if n_shared_experts:
            # FeedForward reads only d_model, hidden_dim and dropout from its config (the output
            # dropout is applied once, to the sum, below).
            self.shared_experts = FeedForward(LlamaConfig(
                d_model=d_model, n_heads=1, ffn_hidden_dim=n_shared_experts * expert_hidden_dim))
        # Token-slots chosen per expert in training forwards since the last update_bias: a plain
        # tensor, not a buffer, because DDP overwrites buffers with rank 0's at every forward.
        # (Activation checkpointing, which re-runs forward, would count a micro-batch twice.)
        self.observed_load = torch.zeros(n_experts, dtype=torch.long)
        self.load_balancing_loss = self.z_loss = self.router_logits = None
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_model) → (..., d_model), of x's dtype. Sets the losses and `stats`."""
        x_flat = x.reshape(-1, x.size(-1))  # (N, d_model)
        n_tokens, k = x_flat.size(0), self.top_k
        logits, probs, chosen, gates = self.router(x_flat)  # (N, E), (N, E), (N, k), (N, k)
        # Slot j·N + n is token n's j-th choice, so a stable sort queues first choices first.
        expert_of_slot = chosen.t().reshape(-1)  # (k·N,)
        gate_of_slot = gates.t().reshape(-1)  # (k·N,)
        slots_per_expert = torch.bincount(expert_of_slot, minlength=self.n_experts)  # (E,)
        capacity = self.capacity(n_tokens)

        method = self.dispatch_method(x_flat, len(expert_of_slot))
        if method == "gather":
            y_of_slot = self.experts.gathered(x_flat.repeat(k, 1), expert_of_slot)  # (k·N, d_model)
            kept_per_expert = slots_per_expert
            if capacity is not None:
                kept_slots, kept_per_expert = sort_by_expert(expert_of_slot, slots_per_expert, capacity)
                kept = torch.zeros_like(gate_of_slot).index_fill_(0, kept_slots, 1.0)
                gate_of_slot = gate_of_slot * kept  # a dropped slot weighs 0
            weighted = y_of_slot.float() * gate_of_slot[:, None]
        else:
            kept_slots, kept_per_expert = sort_by_expert(expert_of_slot, slots_per_expert, capacity)
            x_sorted = x_flat[kept_slots % n_tokens]  # (M, d_model), grouped by expert
            y_sorted = self.experts(x_sorted, kept_per_expert, method)  # (M, d_model)
            weighted_sorted = y_sorted.float() * gate_of_slot[kept_slots, None]
            weighted = weighted_sorted.new_zeros(k * n_tokens, x.size(-1)).index_copy_(
                0, kept_slots, weighted_sorted)  # (k·N, d_model), in slot order
        out = weighted.view(k, n_tokens, -1).sum(dim=0)  # (N, d_model); a dropped slot adds 0
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_flat)
        out = F.dropout(out.to(x.dtype), self.dropout, self.training)

        self.router_logits = logits
        self.load_balancing_loss = switch_load_balancing_loss(probs, slots_per_expert, k)
        self.z_loss = router_z_loss(logits)
        dropped = (slots_per_expert - kept_per_expert).sum()
        self.stats = {
            "load_balancing_loss": self.load_balancing_loss.detach(),
            "z_loss": self.z_loss.detach(),
            "tokens_per_expert": slots_per_expert,
            "dropped_tokens": dropped,
            "dropped_fraction": dropped / max(1, k * n_tokens),
            "router_entropy": router_entropy(probs.detach()),
        }
        if self.training and self.balance == "bias":
            if self.observed_load.device != x.device:  # the model moved, or was built on the meta device
                self.observed_load = (torch.zeros_like(self.observed_load, device=x.device)
                                      if self.observed_load.is_meta else self.observed_load.to(x.device))
            self.observed_load += slots_per_expert
        return out.view(x.shape)

    def capacity(self, n_tokens: int) -> int | None:
        """Switch eq. 3: how many of the k·n_tokens token-slots of a batch each expert takes
        (None: dropless)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * self.top_k * n_tokens / self.n_experts)

    def dispatch_method(self, x: torch.Tensor, n_slots: int) -> str:
        """`dispatch`, or for "auto": gather when there are fewer slots than experts (decoding),
        where sorting would leave most experts empty; else grouped_mm where PyTorch has it."""
        if self.dispatch != "auto":
            return self.dispatch
        if n_slots < self.n_experts:
            return "gather"
        return "grouped" if grouped_mm_supported(x) else "loop"

    @property
    def router_loss(self) -> torch.Tensor:
        """What the last forward adds to the training loss: z_loss_coef·z-loss, plus
        aux_loss_coef·load-balancing loss when balance is "aux"."""
        loss = self.z_loss_coef * self.z_loss
        if self.balance == "aux":
            loss = loss + self.aux_loss_coef * self.load_balancing_loss
        return loss

    @torch.no_grad()
    def update_bias(self, rate: float, all_reduce: bool | None = None) -> None:
        """Auxiliary-loss-free balancing (Wang et al. 2024, Algorithm 1): bᵢ ← bᵢ + rate·sign(mean
        load − loadᵢ), the load being the token-slots each expert was chosen for in training
        forwards since the last call (every micro-batch of the step); then those counts reset.
        Call after each optimizer step. all_reduce: first sum the counts over the processes of
        torch.distributed, so each applies the same update; None: when it is initialised."""
        if self.balance != "bias":
            raise UserError(f"update_bias needs balance='bias' (this layer has {self.balance!r})")
        if all_reduce is None:
            all_reduce = dist.is_available() and dist.is_initialized()
        load = self.observed_load.clone()
        if all_reduce:
            dist.all_reduce(load)
        load = load.float()
        bias = self.router.expert_bias
        bias += rate * torch.sign(load.mean() - load).to(bias.device, bias.dtype)
        self.observed_load.zero_()


# --- balancing losses -----------------------------------------------------------------------------


def switch_load_balancing_loss(probs: torch.Tensor, slots_per_expert: torch.Tensor,
                               top_k: int) -> torch.Tensor:
    """Switch eq. 4–6, made 1 for perfectly balanced routing whatever k: N·Σᵢ fᵢ·Pᵢ.

    probs (T, E): each token's router distribution; Pᵢ = its mean over the T tokens (eq. 6), the
    part that carries the gradient. slots_per_expert (E,): how many of the k·T token-slots chose
    expert i; fᵢ = that / (k·T) (eq. 5 counts argmax tokens, which is the same for k = 1).
    Why k·T: Σᵢ Pᵢ = 1 and Σᵢ fᵢ = 1, so balanced routing (fᵢ = Pᵢ = 1/N) gives N·N·(1/N²) = 1.
    Counting f over the T tokens instead, as Hugging Face does, gives Σᵢ fᵢ = k and a balanced
    value of k: the same loss times k. (DeepSeek-V3's eq. 18 divides by k·T the same way.)
    """
    n_tokens, n_experts = probs.shape
    fraction_routed = slots_per_expert.float() / max(1, top_k * n_tokens)  # fᵢ
    mean_probability = probs.mean(dim=0)  # Pᵢ
    return n_experts * (fraction_routed * mean_probability).sum()


def hf_load_balancing_loss(router_logits: Sequence[torch.Tensor], n_experts: int,
                           top_k: int) -> torch.Tensor:
    """Hugging Face's `load_balancing_loss_func` (MixtralForCausalLM's `aux_loss`, without an
    attention mask): f and P pooled over the tokens of all layers before their product, f counted
    over tokens, so balanced routing gives k rather than 1. router_logits: one (T, E) tensor per
    sparse layer (`MoEFeedForward.router_logits`); softmax routing, as in Mixtral."""
    slots_per_expert = torch.zeros(n_experts, device=router_logits[0].device)
    probability_sum = torch.zeros(n_experts, device=router_logits[0].device)
    n_rows = 0
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # (T, E)
        chosen = probs.topk(top_k, dim=-1).indices
        slots_per_expert = slots_per_expert + torch.bincount(chosen.flatten(), minlength=n_experts)
        probability_sum = probability_sum + probs.sum(dim=0)
        n_rows += probs.size(0)
    return n_experts * ((slots_per_expert / n_rows) * (probability_sum / n_rows)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE §3.3, eq. 5: (1/T)·Σ_t (log Σᵢ e^{logit_tᵢ})², which keeps the router's logits small.
    logits (T, E) → scalar."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of −Σᵢ pᵢ·log pᵢ (nats): log E for a uniform router, 0 for a certain one."""
    return torch.special.entr(probs).sum(dim=-1).mean()
