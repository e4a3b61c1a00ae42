"""Building blocks every model of the package shares: attention, the KV cache, sampling and search.

Each paper's own pieces (LayerNorm, RMSNorm, RoPE, SwiGLU, ...) stay in the model that introduced
them (`fromscratch.transformer`, `fromscratch.llama`) and later models import them from there;
what lives here is what no single paper owns.
"""

from fromscratch.blocks.attention import scaled_dot_product_attention
from fromscratch.blocks.kv_cache import KVCache
from fromscratch.blocks.sampling import check_sampling_options, sample_next_token, top_k_filter, top_p_filter
from fromscratch.blocks.search import NextTokenLogits, beam_search, gnmt_length_penalty, sample

__all__ = [
    "scaled_dot_product_attention", "KVCache", "check_sampling_options", "sample_next_token", "top_k_filter",
    "top_p_filter", "NextTokenLogits", "beam_search", "gnmt_length_penalty", "sample",
]
