"""Sparse Mixture-of-Experts Llama, from scratch: Llama 2's blocks with a routed feed-forward
(Mixtral, Switch, DeepSeek's balancing), its checkpoints, generation and training.

    from fromscratch.moe import MoELlama, MoEConfig, accelerate
    model = accelerate(MoELlama.from_pretrained("mistralai/Mixtral-8x7B-v0.1"))  # or a HF dir, a run
    ids = model.generate([[1, 415, 2936]], max_new_tokens=50, temperature=0.8)
    print(model.router_stats)   # per sparse layer: load-balancing loss, z-loss, load per expert, ...

    from fromscratch.moe import train
    train("input.txt", "runs/moe", preset="tiny", n_experts=8, top_k=2, balance="bias", max_steps=1000)

The routed layer is `routing.py`; the model `model.py`; the packed decoding step `fast.py`
(registered with `fromscratch.llama.fast` on import); Mixtral checkpoints `checkpoints.py`.
"""

from fromscratch.llama.fast import accelerate
from fromscratch.llama.generation import generate
from fromscratch.moe import fast  # noqa: F401  (registers the packed decoding step of MoEFeedForward)
from fromscratch.moe.config import MoEConfig
from fromscratch.moe.model import MoELlama
from fromscratch.moe.routing import MoEFeedForward, hf_load_balancing_loss, router_z_loss, switch_load_balancing_loss
from fromscratch.moe.training import train

__all__ = [
    "MoELlama", "MoEConfig", "MoEFeedForward", "generate", "train", "accelerate",
    "switch_load_balancing_loss", "hf_load_balancing_loss", "router_z_loss",
]
