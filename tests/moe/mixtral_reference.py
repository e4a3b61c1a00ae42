"""Hugging Face's `MixtralForCausalLM` as the reference, and our model holding its weights.

The weights are copied here, in the test, from the HF model's own in-memory layout (transformers
5: fused `gate_up_proj` and `down_proj` per layer), not through `moe/checkpoints.py`: the experts
and routers are renamed here, and the rest takes only the Llama loader's key renaming and q/k
permutation (`helpers.hf_llama_weights_to_ours`), which test_llama_checkpoints checks on their own.
"""

import torch
import transformers
from helpers import hf_llama_weights_to_ours

from fromscratch.moe import MoEConfig, MoELlama


def hf_mixtral_config(config: MoEConfig) -> transformers.MixtralConfig:
    return transformers.MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.expert_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads, head_dim=config.head_dim, max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings, num_local_experts=config.n_experts,
        num_experts_per_tok=config.top_k, router_aux_loss_coef=config.aux_loss_coef, router_jitter_noise=0.0,
        sliding_window=None,
    )


def randomize_(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Weights far from any initialisation, norms included, and routers sharp enough to route."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.5 if name.endswith("gate.weight") else std)
    return model.eval()


def hf_state_dict_to_ours(hf_model, config: MoEConfig) -> dict[str, torch.Tensor]:
    """The experts and routers renamed here; the rest is a Llama's (`helpers.hf_llama_weights_to_ours`)."""
    ours, rest = {}, {}
    for key, tensor in hf_model.state_dict().items():
        layer = key.split(".")[2] if key.startswith("model.layers.") else None
        if key.endswith("mlp.gate.weight"):
            ours[f"layers.{layer}.feed_forward.router.weight"] = tensor
        elif key.endswith("mlp.experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)  # (E, 2h, d): gate rows first
            ours[f"layers.{layer}.feed_forward.experts.w1"] = gate
            ours[f"layers.{layer}.feed_forward.experts.w3"] = up
        elif key.endswith("mlp.experts.down_proj"):
            ours[f"layers.{layer}.feed_forward.experts.w2"] = tensor
        else:
            rest[key] = tensor
    return {**ours, **hf_llama_weights_to_ours(rest, config.n_heads, config.kv_heads)}


def hf_and_ours(config: MoEConfig, seed: int = 0):
    """A randomly initialised MixtralForCausalLM and our MoELlama holding the same weights."""
    torch.manual_seed(seed)
    hf = randomize_(transformers.MixtralForCausalLM(hf_mixtral_config(config)))
    ours = MoELlama(config).eval()
    ours.load_state_dict(hf_state_dict_to_ours(hf, config), strict=True)
    return hf, ours


# Small Mixtral-shaped configs: grouped-query attention, tied embeddings, Switch's top-1.
PARITY_CONFIGS = {
    "top2-gqa": MoEConfig.from_preset("tiny", vocab_size=300, n_layers=3, n_experts=4, top_k=2),
    "top2-tied-mha": MoEConfig.from_preset("tiny", vocab_size=300, n_kv_heads=None, tie_embeddings=True,
                                           n_experts=6, top_k=2, expert_hidden_dim=48),
    "top1": MoEConfig.from_preset("tiny", vocab_size=300, n_experts=4, top_k=1),
}
