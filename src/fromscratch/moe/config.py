"""The shapes of a sparse Mixture-of-Experts Llama: every `LlamaConfig` field, plus the routed
feed-forward's (`routing.MoEFeedForward`), with presets for tests, CPU training and Mixtral.

Which blocks are sparse: block i (0-based) when (i + 1) is a multiple of `moe_every`, so 1 makes
every block sparse (Mixtral) and 2 every other one, the second of each pair (GShard, Switch). The
dense blocks keep Llama's SwiGLU of width `hidden_dim`; each expert has width `expert_dim`
(`expert_hidden_dim`, or `hidden_dim` when unset).
"""

from dataclasses import dataclass

from fromscratch.errors import UserError
from fromscratch.llama.config import LlamaConfig
from fromscratch.moe.routing import BALANCE_METHODS, ROUTER_SCORINGS

AUX_LOSS_CONVENTIONS = ("switch", "hf")


@dataclass
class MoEConfig(LlamaConfig):
    n_experts: int = 8
    top_k: int = 2  # experts per token (k); 1 is Switch routing
    moe_every: int = 1  # 1: every block sparse; 2: every other one
    n_shared_experts: int = 0  # always-active experts of width expert_dim (DeepSeekMoE)
    expert_hidden_dim: int | None = None  # None → hidden_dim, the dense SwiGLU's width
    router_scoring: str = "softmax"  # or "sigmoid" (DeepSeek-V3)
    norm_topk: bool = True  # renormalise the k gate values to sum to 1 (Mixtral)
    capacity_factor: float | None = None  # None: dropless
    balance: str = "aux"  # "aux" (load-balancing loss), "bias" (DeepSeek-V3's expert bias), "none"
    aux_loss_coef: float = 1e-2  # α of Switch eq. 4
    aux_loss_convention: str = "switch"  # "switch": per layer, balanced = 1; "hf": pooled, balanced = k
    z_loss_coef: float = 1e-3  # c_z of ST-MoE eq. 5
    router_jitter: float = 0.0  # ε of the router's input noise in training
    bias_update_rate: float = 1e-3  # u of DeepSeek-V3's bias update (γ = 0.001 there)

    PRESETS = {
        # For tests: two sparse blocks of four experts.
        "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                     max_seq_len=256, n_experts=4, top_k=2, expert_hidden_dim=96),
        # Trains on a CPU: 8 narrow experts, top-2, in 4 blocks (~6M parameters with a 2k vocabulary,
        # ~2M active per token).
        "small": dict(vocab_size=32000, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, multiple_of=32,
                      max_seq_len=512, n_experts=8, top_k=2, expert_hidden_dim=256),
        # llama2.c's stories15m shape with each SwiGLU turned into 8 experts, top-2, and 2 key/value heads.
        "mixtral-tiny": dict(vocab_size=32000, d_model=288, n_layers=6, n_heads=6, n_kv_heads=2, multiple_of=32,
                             max_seq_len=256, tie_embeddings=True, n_experts=8, top_k=2),
        # Mixtral 8x7B as published (Jiang et al. 2024, Table 1; its config.json): with its
        # training settings, Hugging Face's pooled aux loss at 0.02 and no z-loss.
        "mixtral-8x7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                             ffn_hidden_dim=14336, max_seq_len=32768, rope_theta=1e6, n_experts=8, top_k=2,
                             aux_loss_coef=0.02, aux_loss_convention="hf", z_loss_coef=0.0),
    }

    def validate(self) -> None:
        super().validate()
        if self.n_experts < 1:
            raise UserError(f"n_experts must be at least 1, got {self.n_experts}")
        if not 1 <= self.top_k <= self.n_experts:
            raise UserError(f"top_k ({self.top_k}) must be between 1 and n_experts ({self.n_experts})")
        if not 1 <= self.moe_every <= self.n_layers:
            raise UserError(f"moe_every ({self.moe_every}) must be between 1 and n_layers ({self.n_layers}), "
                            "so that at least one block is sparse")
        if self.n_shared_experts < 0:
            raise UserError(f"n_shared_experts must be ≥ 0, got {self.n_shared_experts}")
        if self.expert_hidden_dim is not None and self.expert_hidden_dim < 1:
            raise UserError(f"expert_hidden_dim must be at least 1, got {self.expert_hidden_dim}")
        for name, choices in (("router_scoring", ROUTER_SCORINGS), ("balance", BALANCE_METHODS),
                              ("aux_loss_convention", AUX_LOSS_CONVENTIONS)):
            if getattr(self, name) not in choices:
                raise UserError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        if self.aux_loss_convention == "hf" and self.router_scoring != "softmax":
            raise UserError("aux_loss_convention 'hf' (Mixtral's aux_loss) is defined for softmax routing; "
                            f"router_scoring is {self.router_scoring!r}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise UserError(f"capacity_factor must be positive or null (dropless), got {self.capacity_factor}")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not 0 <= self.router_jitter < 1:
            raise UserError(f"router_jitter must be in [0, 1), got {self.router_jitter}")

    @property
    def expert_dim(self) -> int:
        """Each expert's SwiGLU width."""
        return self.hidden_dim if self.expert_hidden_dim is None else self.expert_hidden_dim

    def is_sparse(self, layer_index: int) -> bool:
        return (layer_index + 1) % self.moe_every == 0

    @property
    def sparse_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_sparse(i)]
