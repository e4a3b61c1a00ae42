"""Choosing the next token from the model's logits: greedy, temperature, top-k and nucleus (top-p).

Every generator of the package (the Transformer's translations, Llama and the MoE, image
captions) draws its tokens through `sample_next_token`:

- temperature τ: p_i ∝ exp(z_i / τ); τ = 0 is greedy (the argmax), τ > 1 flattens;
- top-k: keep the k largest logits, renormalise;
- top-p (Holtzman et al. 2020): keep the smallest set of most likely tokens whose probability
  reaches p, renormalise.
"""

import math

import torch

from fromscratch.errors import UserError


def check_sampling_options(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """Refuse impossible settings before any work: NaN or negative temperature, k < 1, p ∉ (0, 1]."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"temperature must be ≥ 0 (and a number), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be ≥ 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:  # also refuses NaN
        raise UserError(f"top_p must be in (0, 1], got {top_p}")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, set the rest to −∞. logits: (B, V)."""
    kth_largest = logits.topk(min(k, logits.size(-1)), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens until their total probability reaches p,
    set the rest to −∞. logits: (B, V).

    As in Meta's `sample_top_p`, a token is dropped when the tokens ranked above it already sum
    to more than p, so the most likely token always survives.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_above > p)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from (B, V) logits → (B,). temperature 0 is greedy (argmax).

    Raises UserError when the logits hold NaN: a model with broken weights (or one that
    overflowed in half precision) would otherwise "sample" garbage without a word."""
    if torch.isnan(logits).any():
        raise UserError("the model produced NaN logits (are its weights corrupt, or did half precision "
                        "overflow?); refusing to sample from them")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
