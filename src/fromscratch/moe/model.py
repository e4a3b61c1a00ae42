"""A sparse Mixture-of-Experts Llama: Llama 2's blocks, with the SwiGLU feed-forward of the sparse
blocks replaced by a routed set of experts (`routing.MoEFeedForward`).

Jiang et al. (2024), "Mixtral of Experts", §2: Mixtral is Mistral 7B's transformer "with the
difference that [...] the feedforward blocks are replaced by Mixture-of-Expert layers", in every
layer, each token going to 2 of 8 SwiGLU experts (§2.1, eq. 1–2: y = Σᵢ softmax(Top2(x·W_g))ᵢ·
SwiGLUᵢ(x)). Switch Transformers (Fedus et al. 2021) and GShard (Lepikhin et al. 2020) replace
every other feed-forward layer instead (`moe_every = 2`). Everything else — RMSNorm, RoPE,
grouped-query attention, the KV cache, generation — is `fromscratch.llama`'s, imported: a block
is Llama's `TransformerBlock`, built by `Llama.make_block`, whose `feed_forward` is swapped.

The training loss (`forward(..., targets=...)` in training mode) is the cross-entropy plus the
router's losses, averaged over the sparse layers (`router_loss`): aux_loss_coef × the
load-balancing loss when balance is "aux" (Switch eq. 4–6, normalised so balanced routing
gives 1; or Hugging Face's convention, pooled over layers, balanced = k) and z_loss_coef × the
router z-loss (ST-MoE eq. 5). With reduction="sum" (what the training engine asks for) the
router's term is multiplied by the number of counted targets, so that the engine's division by
the global token count leaves it with weight aux_loss_coef whatever the batch is split into.

Where the code departs from the papers:
- The losses are those of the batch a forward sees. Under gradient accumulation or data
  parallelism that is each micro-batch: the load-balancing loss is then the token-weighted mean
  of the micro-batches' (GShard likewise computes it per group of tokens), which is not the loss
  of the whole batch, since f·P is not linear in the tokens. The z-loss, a mean over tokens, adds
  up exactly.
- Padding is not masked out of the router's losses or counts: the model trains on packed windows
  of text, which have none. (Hugging Face can mask it with the attention mask.)
- In evaluation mode the loss is the cross-entropy alone: what validation reports, comparable
  with a dense model's.
- Initialisation: as Llama's (N(0, 0.02), the projections into the residual stream scaled by
  1/√(2·n_layers)), the experts' down projections w2 (and the shared experts') included.
"""

import math

import torch
import torch.nn as nn

from fromscratch.blocks import KVCache
from fromscratch.llama.model import Llama, TransformerBlock
from fromscratch.moe import checkpoints
from fromscratch.moe.config import MoEConfig
from fromscratch.moe.routing import MoEFeedForward, hf_load_balancing_loss


def moe_feed_forward(config: MoEConfig) -> MoEFeedForward:
    """The routed feed-forward of one sparse block, as `config` describes it."""
    return MoEFeedForward(
        config.d_model, config.n_experts, config.top_k, config.expert_dim,
        n_shared_experts=config.n_shared_experts, router_scoring=config.router_scoring,
        norm_topk=config.norm_topk, capacity_factor=config.capacity_factor, balance=config.balance,
        aux_loss_coef=config.aux_loss_coef, z_loss_coef=config.z_loss_coef,
        router_jitter=config.router_jitter, dropout=config.dropout,
    )


class MoELlama(Llama):
    """Llama whose sparse blocks (`config.sparse_layers`) route each token to top_k of n_experts
    experts. After each forward, `router_stats[i]` holds sparse block i's routing statistics
    (detached): load_balancing_loss, z_loss, tokens_per_expert (E,), dropped_tokens,
    dropped_fraction, router_entropy (see `MoEFeedForward`)."""

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.sparse_layers = config.sparse_layers
        self.router_stats: dict[int, dict[str, torch.Tensor]] = {}
        residual_std = 0.02 / math.sqrt(2 * config.n_layers)  # Llama's, for the projections into the stream
        for layer in self.moe_layers():
            nn.init.normal_(layer.experts.w2, mean=0.0, std=residual_std)
            if layer.shared_experts is not None:
                nn.init.normal_(layer.shared_experts.w2.weight, mean=0.0, std=residual_std)

    @staticmethod
    def make_block(layer_index: int, config: MoEConfig) -> nn.Module:
        block = TransformerBlock(layer_index, config)
        if config.is_sparse(layer_index):
            block.feed_forward = moe_feed_forward(config)
        return block

    def moe_layers(self) -> list[MoEFeedForward]:
        return [self.layers[i].feed_forward for i in self.sparse_layers]

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                pad_lengths: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """Logits (B, T, vocab_size) float32, or with targets (B, T) the loss: in training mode the
        cross-entropy plus `router_loss()` (times the number of counted targets for
        reduction="sum"), in evaluation mode the cross-entropy alone. Other arguments as
        `Llama.forward`."""
        h = self.hidden_states(input_ids, cache, pad_lengths)
        self.router_stats = {i: layer.stats for i, layer in zip(self.sparse_layers, self.moe_layers())}
        if targets is None:
            return self.output(h).float()
        loss = self.next_token_loss(h, self.output, targets, reduction=reduction)
        if not self.training:
            return loss
        weight = (targets != -100).sum() if reduction == "sum" else 1  # -100: next_token_loss's ignore_index
        return loss + weight * self.router_loss()

    def load_balancing_loss(self) -> torch.Tensor:
        """The last forward's load-balancing loss: the mean over sparse layers of each layer's
        Switch loss (balanced routing: 1), or under aux_loss_convention "hf" the loss of all
        layers' tokens pooled, as `MixtralForCausalLM.aux_loss` (balanced: k)."""
        layers = self.moe_layers()
        if self.config.aux_loss_convention == "hf":
            return hf_load_balancing_loss([layer.router_logits for layer in layers], self.config.n_experts,
                                          self.config.top_k)
        return torch.stack([layer.load_balancing_loss for layer in layers]).mean()

    def z_loss(self) -> torch.Tensor:
        """The last forward's router z-loss, averaged over the sparse layers."""
        return torch.stack([layer.z_loss for layer in self.moe_layers()]).mean()

    def router_loss(self) -> torch.Tensor:
        """What training adds to the cross-entropy: z_loss_coef·z-loss, plus aux_loss_coef·load-
        balancing loss when balance is "aux"."""
        loss = self.config.z_loss_coef * self.z_loss()
        if self.config.balance == "aux":
            loss = loss + self.config.aux_loss_coef * self.load_balancing_loss()
        return loss

    @torch.no_grad()
    def update_bias(self, all_reduce: bool | None = None) -> None:
        """DeepSeek-V3's bias balancing, for balance "bias": every sparse layer's expert bias moves
        by bias_update_rate towards balancing the load counted since the last call (see
        `MoEFeedForward.update_bias`). Call after each optimizer step."""
        for layer in self.moe_layers():
            layer.update_bias(self.config.bias_update_rate, all_reduce)

    def num_active_parameters(self) -> int:
        """Parameters that act on each token: all but the (n_experts − top_k) experts a token does
        not go to, in every sparse layer."""
        idle_fraction = 1 - self.config.top_k / self.config.n_experts
        idle = sum(idle_fraction * sum(w.numel() for w in layer.experts.parameters()) for layer in self.moe_layers())
        return self.num_parameters() - round(idle)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32) -> "MoELlama":
        """Load a Hugging Face Mixtral directory, a `fromscratch moe train` run, or a hub name
        (see checkpoints.py)."""
        return checkpoints.build_model(cls, checkpoints.read_checkpoint(path, dtype), dtype)

    def save_pretrained(self, out_dir, tokenizer_path=None):
        """Write a Hugging Face Mixtral directory that `from_pretrained` and
        `transformers.MixtralForCausalLM` load."""
        return checkpoints.save_pretrained(self, out_dir, tokenizer_path=tokenizer_path)
