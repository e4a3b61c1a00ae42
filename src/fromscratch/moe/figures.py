"""Figures for the MoE README, each computed by the package's own code.

    python -m fromscratch.moe.figures OUT_DIR

writes `dispatch_combine.png` (how `MoEFeedForward` sorts token-slots by expert and combines
them back, on a real routing of 8 tokens), `load_balancing.png` (why the Switch loss multiplies
f by P: the three candidate losses and their gradients as a router drifts towards one expert)
and `capacity.png` (the fraction of token-slots dropped against the capacity factor). Needs
matplotlib (the `plot` extra).
"""

import sys
from pathlib import Path

import torch

from fromscratch.engine.plot import pyplot, save_figure
from fromscratch.moe.routing import MoEFeedForward, sort_by_expert, switch_load_balancing_loss

EXPERT_COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]


def plot_dispatch_combine(path, n_tokens: int = 8, n_experts: int = 4, top_k: int = 2) -> Path:
    """Left: the router's probabilities for each token, its top-k outlined. Middle: the k·T
    token-slots in slot order (slot j·T + n is token n's j-th choice) and, joined by lines, in
    expert order after the stable sort: each expert's slots are one contiguous slice, one grouped
    product. Right: each token's output is the gate-weighted sum of its k slots."""
    plt = pyplot()
    torch.manual_seed(3)
    layer = MoEFeedForward(16, n_experts, top_k, 8)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.6)
        _, probs, chosen, gates = layer.router(torch.randn(n_tokens, 16))
    expert_of_slot = chosen.t().reshape(-1)
    order, per_expert = sort_by_expert(expert_of_slot, torch.bincount(expert_of_slot, minlength=n_experts), None)

    fig, (ax_router, ax_slots, ax_combine) = plt.subplots(1, 3, figsize=(14, 5.2),
                                                          gridspec_kw={"width_ratios": [1, 1.5, 1]})
    ax_router.imshow(probs.numpy(), cmap="Greys", vmin=0, vmax=1)
    for n in range(n_tokens):
        for j in range(top_k):
            e = int(chosen[n, j])
            ax_router.add_patch(plt.Rectangle((e - 0.5, n - 0.5), 1, 1, fill=False, lw=2.5, color=EXPERT_COLOURS[e]))
            ax_router.text(e, n, f"{gates[n, j]:.2f}", ha="center", va="center", fontsize=8, color="tab:red")
    ax_router.set(xticks=range(n_experts), yticks=range(n_tokens), xlabel="expert", ylabel="token",
                  title=f"router: softmax over {n_experts} experts,\ntop-{top_k} outlined, renormalised gates")

    n_slots = top_k * n_tokens
    for position, slot in enumerate(order.tolist()):
        e = int(expert_of_slot[slot])
        for x, y in ((0, slot), (1, position)):
            ax_slots.add_patch(plt.Rectangle((x * 3 - 0.4, y - 0.4), 0.8, 0.8, color=EXPERT_COLOURS[e], alpha=0.8))
            ax_slots.text(x * 3, y, f"t{slot % n_tokens}", ha="center", va="center", fontsize=8, color="white")
        ax_slots.plot([0.45, 2.55], [slot, position], color=EXPERT_COLOURS[e], lw=0.8)
    start = 0
    for e, count in enumerate(per_expert.tolist()):
        if count:
            ax_slots.annotate(f"expert {e}: rows {start}..{start + count - 1}\none grouped product",
                              (3.5, start + (count - 1) / 2), fontsize=8, va="center", color=EXPERT_COLOURS[e])
        start += count
    ax_slots.set(xlim=(-1, 7.5), ylim=(n_slots - 0.5, -0.5), xticks=[0, 3],
                 xticklabels=["slots (j·T + n)", "sorted by expert"], yticks=[],
                 title="dispatch: one stable argsort, no loop over tokens")
    ax_slots.axhline(n_tokens - 0.5, xmin=0, xmax=0.17, color="black", lw=0.8, ls="--")
    ax_slots.text(-0.9, n_tokens / 2 - 0.5, "1st\nchoices", fontsize=7, va="center")
    ax_slots.text(-0.9, n_tokens * 1.5 - 0.5, "2nd\nchoices", fontsize=7, va="center")
    for side in ("top", "right", "left"):
        ax_slots.spines[side].set_visible(False)

    for n in range(n_tokens):
        parts = " + ".join(f"{gates[n, j]:.2f}·E{int(chosen[n, j])}(x)" for j in range(top_k))
        ax_combine.text(0, n, f"y{n} = {parts}", fontsize=9, va="center")
    ax_combine.set(xlim=(0, 1), ylim=(n_tokens - 0.5, -0.5), xticks=[], yticks=[],
                   title="combine: each slot's output written once,\nsummed over the k slots in order")
    for side in ("top", "right", "bottom", "left"):
        ax_combine.spines[side].set_visible(False)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return Path(path)


def candidate_losses(shift: torch.Tensor, n_tokens: int = 256, spread: float = 0.1) -> dict[str, torch.Tensor]:
    """Two experts; every token's logit difference (expert 0 minus 1) is shift + spread·noise, so
    tokens are nearly alike and a shift > 0 sends almost all of them to expert 0. Returns, for
    each value of `shift`, the Switch loss N·Σ fᵢ·Pᵢ, N·Σ fᵢ² and N·Σ Pᵢ², each with its gradient
    with respect to the shift (f is a count: no gradient flows through it)."""
    noise = torch.randn(n_tokens, generator=torch.Generator().manual_seed(0))
    results = {name: [] for name in ("f·P", "f²", "P²", "∂(f·P)", "∂(f²)", "∂(P²)")}
    for value in shift.tolist():
        s = torch.tensor(value, requires_grad=True)
        difference = s + spread * noise
        probs = torch.stack([torch.sigmoid(difference), torch.sigmoid(-difference)], dim=1)  # softmax of 2
        counts = torch.bincount(probs.argmax(dim=1), minlength=2)
        f = counts.float() / n_tokens  # a count: not a function autograd can differentiate
        losses = {"f·P": switch_load_balancing_loss(probs, counts, 1), "f²": 2 * (f * f).sum(),
                  "P²": 2 * (probs.mean(0) ** 2).sum()}
        for name, loss in losses.items():
            grad = torch.autograd.grad(loss, s, retain_graph=True)[0].item() if loss.requires_grad else 0.0
            results[name].append(loss.item())
            results[f"∂({name})"].append(grad)
    return {name: torch.tensor(values) for name, values in results.items()}


def plot_load_balancing(path) -> Path:
    """The three candidate losses against the router's drift towards expert 0, and their gradients."""
    plt = pyplot()
    shift = torch.linspace(-1.5, 1.5, 301)
    losses = candidate_losses(shift)
    fig, (ax_loss, ax_grad) = plt.subplots(1, 2, figsize=(12, 4.3))
    for name, colour in (("f·P", "tab:blue"), ("f²", "tab:orange"), ("P²", "tab:green")):
        ax_loss.plot(shift, losses[name], color=colour, label=f"N·Σ {name}")
        ax_grad.plot(shift, losses[f"∂({name})"], color=colour, label=f"∂/∂shift of N·Σ {name}")
    ax_loss.axhline(1, color="grey", lw=0.6, ls="--")
    ax_loss.set(xlabel="router shift towards expert 0 (logit units)", ylabel="loss (balanced = 1, collapsed = N = 2)",
                title="two experts, 256 near-identical tokens")
    ax_grad.set(xlabel="router shift towards expert 0 (logit units)", ylabel="gradient",
                title="f² is a step: no gradient; P² barely sees the collapse")
    for ax in (ax_loss, ax_grad):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return Path(path)


def dropped_fraction(capacity_factor: float, skew: float, n_tokens: int = 4096, n_experts: int = 8,
                     top_k: int = 2) -> float:
    """The fraction of token-slots `MoEFeedForward` drops at `capacity_factor`, with random tokens
    and a router whose logit for expert e is raised by skew·(n_experts − 1 − e)/(n_experts − 1)."""
    torch.manual_seed(0)
    layer = MoEFeedForward(32, n_experts, top_k, 8, capacity_factor=capacity_factor)
    x = torch.randn(n_tokens, 32)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0 / 32**0.5)
        ramp = skew * torch.linspace(1, 0, n_experts)  # a constant input feature carries the skew
        x[:, 0] = 1.0
        layer.router.weight[:, 0] = ramp
        layer(x)
    return layer.stats["dropped_fraction"].item()


def plot_capacity(path) -> Path:
    """Dropped fraction against the capacity factor, for a balanced and two skewed routers."""
    plt = pyplot()
    factors = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for skew, label in ((0.0, "random router (near balance)"), (1.0, "skewed router (+1 logit, ramp)"),
                        (3.0, "strongly skewed (+3 logits, ramp)")):
        ax.plot(factors, [100 * dropped_fraction(c, skew) for c in factors], "o-", ms=4, label=label)
    ax.set(xlabel="capacity factor (capacity = ⌈factor · k·T / E⌉ slots per expert)", ylabel="token-slots dropped (%)",
           title="8 experts, top-2, 4096 tokens: what capacity drops")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return Path(path)


def main(out_dir: str = ".") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(plot_dispatch_combine(out / "dispatch_combine.png"))
    print(plot_load_balancing(out / "load_balancing.png"))
    print(plot_capacity(out / "capacity.png"))


if __name__ == "__main__":
    main(*sys.argv[1:])
