"""Which experts a trained MoE uses, and for what: what `fromscratch moe inspect` shows.

`expert_usage` runs text through the model and counts, for every sparse block and expert, the
token-slots it was chosen for, split by the id of the token in the slot (the router's choices,
read from each `Router`'s output by a forward hook, so the expert bias of balance "bias" counts
as it does in the model). `plot_expert_usage` draws the token share of each expert in each block
as a heatmap, each cell also naming the tokens that expert receives most often.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from fromscratch.engine.plot import pyplot, save_figure
from fromscratch.moe.model import MoELlama


@dataclass
class ExpertUsage:
    """counts (sparse blocks, E, vocab): token-slots of each token id each expert was chosen for.
    layers: the sparse blocks' indices, one per row; top_k: the slots of each token."""

    layers: list[int]
    counts: torch.Tensor
    top_k: int

    @property
    def shares(self) -> torch.Tensor:
        """(sparse blocks, E): each expert's share of its block's token-slots (rows sum to 1)."""
        per_expert = self.counts.sum(dim=-1).double()
        return per_expert / per_expert.sum(dim=-1, keepdim=True).clamp(min=1)

    def top_tokens(self, row: int, expert: int, n: int) -> list[tuple[int, int, float]]:
        """The n token ids expert `expert` of sparse block number `row` receives most often:
        (token id, slots, fraction of that token's occurrences routed to this expert)."""
        counts = self.counts[row, expert]
        occurrences = self.counts[row].sum(dim=0) / self.top_k  # (vocab,): each token's k slots, once
        values, ids = counts.topk(min(n, counts.numel()))
        return [(int(i), int(c), c.item() / occurrences[i].item()) for i, c in zip(ids, values) if c > 0]


@torch.no_grad()
def expert_usage(model: MoELlama, tokens: torch.Tensor, seq_len: int, batch_size: int = 16) -> ExpertUsage:
    """Count the router's choices over `tokens` (1-D ids), read as consecutive windows of
    `seq_len` tokens (a trailing partial window is dropped), `batch_size` windows at a time."""
    config = model.config
    n_windows = len(tokens) // seq_len
    windows = tokens[: n_windows * seq_len].view(n_windows, seq_len).to(model.tok_embeddings.weight.device)
    counts = torch.zeros(len(model.sparse_layers), config.n_experts * config.vocab_size, dtype=torch.long)
    chosen_by_layer = {}

    def record(row):
        def hook(router, inputs, outputs):
            chosen_by_layer[row] = outputs[2]  # (N, k) expert indices
        return hook

    handles = [layer.router.register_forward_hook(record(row)) for row, layer in enumerate(model.moe_layers())]
    was_training = model.training
    model.eval()
    try:
        for batch in windows.split(batch_size):
            model(batch)
            token_ids = batch.reshape(-1, 1)  # (N, 1): the token in each row the router saw
            for row, chosen in chosen_by_layer.items():
                flat = (chosen * config.vocab_size + token_ids).flatten().cpu()
                counts[row] += torch.bincount(flat, minlength=counts.size(1))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return ExpertUsage(list(model.sparse_layers), counts.view(len(model.sparse_layers), config.n_experts, -1),
                       config.top_k)


def plot_expert_usage(usage: ExpertUsage, token_text, path, title: str = "", n_tokens: int = 3) -> Path:
    """A heatmap of `usage.shares` (rows: sparse blocks, columns: experts), each cell annotated
    with its share and the `n_tokens` tokens that expert receives most often (`token_text(id)`
    gives a token's text). Needs matplotlib."""
    plt = pyplot()
    shares = usage.shares.numpy()
    n_rows, n_experts = shares.shape
    fig, ax = plt.subplots(figsize=(1.5 + 1.45 * n_experts, 1.2 + 1.05 * n_rows))
    image = ax.imshow(shares, cmap="viridis", vmin=0, vmax=max(shares.max(), 2 / n_experts), aspect="auto")
    for row in range(n_rows):
        for e in range(n_experts):
            words = [repr(token_text(i))[1:-1][:8] for i, _, _ in usage.top_tokens(row, e, n_tokens)]
            colour = "black" if shares[row, e] > 0.6 * image.get_clim()[1] else "white"
            ax.text(e, row, f"{100 * shares[row, e]:.1f}%\n" + "\n".join(words), ha="center", va="center",
                    fontsize=7, color=colour)
    ax.set_xticks(range(n_experts), [f"expert {e}" for e in range(n_experts)], fontsize=8)
    ax.set_yticks(range(n_rows), [f"block {i}" for i in usage.layers], fontsize=8)
    ax.set_title(title or "token share of each expert (balanced: 1/E each), and its most frequent tokens",
                 fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, label="share of the block's token-slots")
    fig.tight_layout()
    return save_figure(fig, path)
