"""Figures for the Llama README: what RoPE does, and what grouped-query attention saves.

    python -m fromscratch.llama.figures OUT_DIR

writes `rope_rotation.png` and `kv_cache_memory.png`. Needs matplotlib (the `plot` extra).
"""

import sys
from pathlib import Path

import torch

from fromscratch.engine.plot import pyplot, save_figure
from fromscratch.llama.config import LlamaConfig
from fromscratch.llama.model import apply_rope, precompute_rope_rotations


def kv_cache_bytes(config: LlamaConfig, seq_len: int, batch_size: int = 1, bytes_per_value: int = 2) -> int:
    """Memory of a full KV cache: keys and values (2) for every layer, row, key/value head,
    position and head dimension. bytes_per_value 2 is fp16/bf16, the usual inference dtype."""
    return 2 * config.n_layers * batch_size * config.kv_heads * seq_len * config.head_dim * bytes_per_value


def plot_rope_rotation(path, head_dim: int = 64, theta: float = 10000.0) -> Path:
    """Left: one 2-D pair of a query rotated by RoPE at positions 0..15, for a fast, a middle and
    a slow frequency θⱼ. Right: q·k of random positive q and k placed m − n apart (mean of 100
    pairs), which decays as they move apart: RoFormer §3.4.3's long-term decay."""
    plt = pyplot()
    path = Path(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))

    positions = 16
    rotations = precompute_rope_rotations(head_dim, positions, theta)
    pair = torch.zeros(1, positions, 1, head_dim)
    pair[..., :] = torch.tensor([1.0, 0.0]).repeat(head_dim // 2)  # every pair starts at (1, 0)
    rotated = apply_rope(pair, rotations)[0, :, 0]  # (positions, head_dim)
    circle = torch.linspace(0, 2 * torch.pi, 200)
    for j, colour in [(0, "tab:red"), (head_dim // 8, "tab:blue"), (head_dim // 4, "tab:green")]:
        radius = 1.0 - 0.25 * (j / (head_dim // 4))  # nest the circles so they don't overlap
        xs, ys = radius * rotated[:, 2 * j], radius * rotated[:, 2 * j + 1]
        left.plot(radius * circle.cos(), radius * circle.sin(), color=colour, lw=0.5, alpha=0.3)
        left.plot(xs, ys, "o", color=colour, ms=5,
                  label=f"pair j={j}: θⱼ = {theta ** (-2 * j / head_dim):.3g} rad/position")
        for m in (0, 1, 2, 3, positions - 1):
            left.annotate(str(m), (xs[m], ys[m]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    left.set_aspect("equal")
    left.set_title("(x₂ⱼ, x₂ⱼ₊₁) rotated by m·θⱼ at positions m = 0..15")
    left.legend(fontsize=7, loc="center")

    generator = torch.Generator().manual_seed(0)
    max_distance, n_pairs = 512, 100
    q = torch.rand(n_pairs, 1, 1, head_dim, generator=generator)  # positive q, k show the decay
    k = torch.rand(n_pairs, 1, 1, head_dim, generator=generator)
    rotations = precompute_rope_rotations(head_dim, max_distance + 1, theta)
    queries = apply_rope(q.expand(-1, max_distance + 1, 1, head_dim), rotations)[:, :, 0]  # at m
    keys = apply_rope(k, rotations[:1])[:, :, 0]  # at n = 0
    scores = (queries * keys).sum(-1).mean(0)  # mean over the random pairs, per distance m − n
    right.plot(range(max_distance + 1), scores.numpy())
    right.set_xlabel("relative distance m − n")
    right.set_ylabel("q·k after RoPE")
    right.set_title("the score sees only m − n, and decays with it")

    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return path


def plot_kv_cache_memory(path, max_seq_len: int = 32768) -> Path:
    """KV-cache size (fp16, batch 1) against context length for the 7B and 70B shapes, with
    multi-head (n_kv_heads = n_heads), grouped-query (8) and multi-query (1) attention."""
    plt = pyplot()
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lengths = list(range(0, max_seq_len + 1, 512))
    for ax, name in zip(axes, ("7b", "70b")):
        base = LlamaConfig.from_preset(name)
        for label, kv_heads in [(f"MHA ({base.n_heads} kv heads)", base.n_heads),
                                ("GQA (8 kv heads)", 8), ("MQA (1 kv head)", 1)]:
            if kv_heads == base.kv_heads:
                label += f", as Llama 2 {name.upper()}"
            config = LlamaConfig.from_preset(name, n_kv_heads=kv_heads)
            ax.plot(lengths, [kv_cache_bytes(config, t) / 2**30 for t in lengths], label=label)
        ax.axvline(4096, color="grey", ls=":", lw=1)
        ax.text(4096, ax.get_ylim()[1] * 0.95, " Llama 2 context", fontsize=7, va="top")
        ax.set_title(f"Llama 2 {name.upper()} shape ({base.n_layers} layers, head_dim {base.head_dim})")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("KV cache, GiB (fp16, batch 1)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return path


def main(out_dir: str = ".") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(plot_rope_rotation(out / "rope_rotation.png"))
    print(plot_kv_cache_memory(out / "kv_cache_memory.png"))


if __name__ == "__main__":
    main(*sys.argv[1:])
