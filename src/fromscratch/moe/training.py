"""Training the MoE Llama from scratch on text: Llama's language-modelling task on the shared engine,
with what routing adds.

`train` (what `fromscratch moe train` runs) is `fromscratch.llama.training`'s, given this task and
`MoEConfig`, and the routing flags as overrides of the preset (n_experts, top_k, balance,
capacity_factor). The run directory is Llama's (tokenizer, task.json, the engine's files), its
run.json says "moe", and `MoELlama.from_pretrained(RUN_DIR)` loads it.

What the task adds to Llama's:
- the loss is the model's training loss, cross-entropy plus the router's losses scaled to the
  engine's summed convention (see model.py);
- after each optimizer step (`after_step`), balance "bias" moves every layer's expert bias from
  the load counted over all the step's micro-batches, summed over processes;
- each row of metrics.csv (`step_metrics`) holds, per sparse block i, the share of the step's
  token-slots each expert took (`moe{i}_load{e}`), the busiest expert's load over the mean
  (`moe{i}_max_mean`, 1 = balanced, E/k = every token on it), the router's entropy in nats
  (`moe{i}_entropy`), the dropped fraction of slots (`moe{i}_dropped`), the load-balancing and
  z-losses (`moe{i}_lb_loss`, `moe{i}_z_loss`), and the router term added to the loss
  (`router_loss`), all over the whole global batch;
- FLOPs per token count the active parameters only (the top_k experts of each sparse block).
"""

import torch

from fromscratch.engine.distributed import all_reduce_sum
from fromscratch.llama.training import LanguageModelTask, _train
from fromscratch.moe.config import MoEConfig
from fromscratch.moe.model import MoELlama

# What a step sums per sparse block, after the E token-slot counts: one row of `step_sums` each.
_SUMS = ("dropped_tokens", "entropy_x_tokens", "lb_loss_x_tokens", "z_loss_x_tokens", "router_loss_x_tokens",
         "tokens")


class MoELanguageModelTask(LanguageModelTask):
    model_name = "moe"

    def __init__(self, model_config: MoEConfig, batch_size: int, seq_len: int, seed: int,
                 eval_rows: int = 64, settings: dict | None = None):
        super().__init__(model_config, batch_size, seq_len, seed, eval_rows, settings, model_class=MoELlama)
        self.step_sums: torch.Tensor | None = None  # (sparse blocks, E + len(_SUMS)) float64, on the model's device

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        loss, n_tokens = super().loss(model, batch)
        if self.model.training:  # training micro-batches only, not evaluation
            with torch.no_grad():
                router_loss = self.model.router_loss()
                rows = [torch.cat([stats["tokens_per_expert"].double(), torch.stack([
                    stats["dropped_tokens"].double(), stats["router_entropy"].double() * n_tokens,
                    stats["load_balancing_loss"].double() * n_tokens, stats["z_loss"].double() * n_tokens,
                    router_loss.double() * n_tokens, torch.tensor(float(n_tokens), dtype=torch.float64,
                                                                  device=router_loss.device),
                ])]) for stats in self.model.router_stats.values()]
                sums = torch.stack(rows)
                self.step_sums = sums if self.step_sums is None else self.step_sums + sums
        return loss, n_tokens

    def after_step(self, model, dist) -> None:
        if self.model_config.balance == "bias":
            model.update_bias(all_reduce=dist.enabled)

    def step_metrics(self, dist) -> dict[str, float]:
        """The routing columns of this step's metrics.csv row (module docstring), over the global
        batch: called on every process, after the step."""
        sums = all_reduce_sum(self.step_sums, dist).cpu()
        self.step_sums = None
        n_experts = self.model_config.n_experts
        row = {}
        for i, layer_sums in zip(self.model.sparse_layers, sums):
            slots = layer_sums[:n_experts]
            dropped, entropy, lb_loss, z_loss, _, tokens = layer_sums[n_experts:].tolist()
            share = slots / slots.sum()
            row.update({f"moe{i}_load{e}": share[e].item() for e in range(n_experts)})
            row[f"moe{i}_max_mean"] = share.max().item() * n_experts
            row[f"moe{i}_entropy"] = entropy / tokens
            row[f"moe{i}_dropped"] = dropped / slots.sum().item()
            row[f"moe{i}_lb_loss"] = lb_loss / tokens
            row[f"moe{i}_z_loss"] = z_loss / tokens
        router_loss, tokens = sums[0, -2:].tolist()  # the model's: the same in every block's row
        row["router_loss"] = router_loss / tokens
        return row

    def flops_per_token(self) -> float:
        idle = self.model.num_parameters() - self.model.num_active_parameters()
        return super().flops_per_token() - 6 * idle


def train(data: str | list[str], out: str, *, preset: str = "tiny", tokenizer: str | None = None,
          vocab_size: int = 2048, seq_len: int | None = None, n_experts: int | None = None,
          top_k: int | None = None, balance: str | None = None, capacity_factor: float | None = None,
          command: list[str] | None = None, **engine) -> dict:
    """Train an MoE Llama on text files (or `hf:NAME[:SPLIT[:FIELD]]` hub datasets) into the run
    directory `out`; what `fromscratch moe train` runs.

    preset: an `MoEConfig` preset; n_experts, top_k, balance ("aux" | "bias" | "none"),
    capacity_factor: override the preset's (None: keep it). The other arguments are
    `fromscratch.llama.train`'s (tokenizer, vocab_size, seq_len, and the engine's options).
    Returns the engine's result: {"step", "train", "eval", "best", "run_dir"}.
    """
    overrides = {name: value for name, value in dict(n_experts=n_experts, top_k=top_k, balance=balance,
                                                     capacity_factor=capacity_factor).items() if value is not None}
    return _train(MoELanguageModelTask, MoEConfig, [data] if isinstance(data, str) else list(data), out, preset,
                  tokenizer, vocab_size, seq_len, command, engine, model_overrides=overrides)
