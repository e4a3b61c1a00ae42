"""MoE checkpoints: Hugging Face Mixtral directories in and out, our `moe train` runs, hub names.

`MoELlama.from_pretrained(SPEC)` reads

    Hugging Face Mixtral   config.json (model_type "mixtral") + model.safetensors, or shards
                           model-0000i-of-0000n.safetensors (+ .index.json), or pytorch_model*.bin
    our training runs      RUN_DIR (its best checkpoint, else its latest) or RUN_DIR/checkpoints/step-N
    a hub name             mistralai/Mixtral-8x7B-v0.1: fetched into the Hugging Face cache

through Llama's machinery (`fromscratch.llama.checkpoints`): the same `Checkpoint`, strict check
(every tensor present with its shape, nothing extra), safe file reading and meta-device build.
What is Mixtral's is here: its config.json fields and its expert tensors.

Hugging Face keeps the attention, norms and embeddings under Llama's names. The experts come in
two layouts, both read:

    per expert (the hub's files; what transformers 4 and 5 write)
        model.layers.i.block_sparse_moe.gate.weight            (E, d)        → router.weight
        model.layers.i.block_sparse_moe.experts.e.w1.weight    (h, d)        → experts.w1[e]
        model.layers.i.block_sparse_moe.experts.e.w2.weight    (d, h)        → experts.w2[e]
        model.layers.i.block_sparse_moe.experts.e.w3.weight    (h, d)        → experts.w3[e]
    fused (transformers 5's MixtralExperts in memory)
        model.layers.i.mlp.gate.weight                         (E, d)        → router.weight
        model.layers.i.mlp.experts.gate_up_proj                (E, 2h, d)    → cat(w1, w3) on dim 1
        model.layers.i.mlp.experts.down_proj                   (E, d, h)     → experts.w2

`save_pretrained` writes the per-expert layout, which `MixtralForCausalLM` loads. Mixtral's
routing is softmax top-k, renormalised, dropless, in every layer, with no shared experts and no
expert bias: a model that routes otherwise cannot be written as one, and is refused.
"""

import re
from collections import defaultdict
from pathlib import Path

import torch

from fromscratch.checkpoints.huggingface import read_weights, write_model_directory
from fromscratch.checkpoints.resolve import resolve_checkpoint
from fromscratch.checkpoints.runs import run_checkpoint
from fromscratch.checkpoints.safe import read_json_object
from fromscratch.config import json_field
from fromscratch.errors import UserError
from fromscratch.llama.checkpoints import Checkpoint, build_model, config_from_hf, config_to_hf, meta_key_to_hf
from fromscratch.llama.checkpoints import expected_shapes as llama_shapes
from fromscratch.llama.checkpoints.common import cast
from fromscratch.llama.checkpoints.detect import HUB_FILES
from fromscratch.llama.checkpoints.huggingface import hf_key_to_meta, hf_tensors, hf_to_meta_layout, write_hf_files
from fromscratch.llama.checkpoints.runs import read_run
from fromscratch.moe.config import MoEConfig

__all__ = ["build_model", "expected_shapes", "read_checkpoint", "read_mixtral", "save_pretrained", "mixtral_config"]

EXPERT_WEIGHTS = ("w1", "w2", "w3")  # gate, down, up


def expected_shapes(config: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an MoE checkpoint (our names) and the shape `config` gives it: Llama's,
    with each sparse block's feed-forward replaced by the router, the stacked experts, the expert
    bias (balance "bias") and the shared experts."""
    shapes = llama_shapes(config)
    d, h, n_experts = config.d_model, config.expert_dim, config.n_experts
    shared = config.n_shared_experts * h
    for i in config.sparse_layers:
        p = f"layers.{i}.feed_forward."
        for w in EXPERT_WEIGHTS:
            del shapes[f"{p}{w}.weight"]
        shapes[p + "router.weight"] = (n_experts, d)
        if config.balance == "bias":
            shapes[p + "router.expert_bias"] = (n_experts,)
        shapes[p + "experts.w1"] = (n_experts, h, d)
        shapes[p + "experts.w2"] = (n_experts, d, h)
        shapes[p + "experts.w3"] = (n_experts, h, d)
        if shared:
            shapes[p + "shared_experts.w1.weight"] = (shared, d)
            shapes[p + "shared_experts.w2.weight"] = (d, shared)
            shapes[p + "shared_experts.w3.weight"] = (shared, d)
    return shapes


# --- reading ----------------------------------------------------------------------------------


def read_checkpoint(spec: str | Path, dtype: torch.dtype | None = torch.float32) -> Checkpoint:
    """Read the MoE checkpoint `spec` names — a Mixtral directory (or a file in it), a `moe train`
    run, or a hub name — and check it strictly against its own config. Floating-point weights
    are cast to `dtype`; None keeps them as stored."""
    path = resolve_checkpoint(spec, allow_patterns=HUB_FILES)
    directory = path if path.is_dir() else path.parent
    if (directory / "config.json").exists():
        ckpt = read_mixtral(directory, dtype)
    elif run_checkpoint(directory) is not None:
        ckpt = read_run(directory, dtype, model_name="moe", config_class=MoEConfig, shapes=expected_shapes)
    else:
        raise UserError(f"{path}: not a Mixtral checkpoint (a directory with config.json) nor a "
                        "`fromscratch moe train` run (checkpoints.json)")
    ckpt.check()
    return ckpt


# transformers' MixtralConfig defaults, for keys a config.json leaves out
MIXTRAL_DEFAULTS = {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 4096 * 32,
                    "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001,
                    "router_jitter_noise": 0.0}


def config_from_mixtral(hf: dict, source: str) -> MoEConfig:
    """Our config for a Mixtral config.json. Its aux-loss coefficient is Hugging Face's, whose
    pooled loss is balanced at k: the config keeps that convention (and no z-loss, as Mixtral)."""
    hf = {**MIXTRAL_DEFAULTS, **hf}
    fields = config_from_hf(hf, source, model_type="mixtral")
    window = json_field(hf, "sliding_window", int | None, source, None)
    if window is not None and window < fields["max_seq_len"]:
        raise UserError(f"{source}: sliding_window {window} is shorter than max_position_embeddings "
                        f"{fields['max_seq_len']}; sliding-window attention is not implemented here")
    fields.update(
        n_experts=json_field(hf, "num_local_experts", int, source),
        top_k=json_field(hf, "num_experts_per_tok", int, source),
        expert_hidden_dim=fields["ffn_hidden_dim"],  # intermediate_size: each expert's width
        aux_loss_coef=json_field(hf, "router_aux_loss_coef", float, source),
        aux_loss_convention="hf", z_loss_coef=0.0,
        router_jitter=json_field(hf, "router_jitter_noise", float, source),
    )
    return MoEConfig.from_dict(fields, source=source)


_ROUTER = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight")
_PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w[123])\.weight")
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")


def mixtral_key_to_ours(key: str) -> str | None:
    """A Mixtral key's name in our state dict: Llama's names for the rest, `layers.i.feed_forward.
    router.weight` for a gate, `layers.i.feed_forward.experts.w2` for fused down_proj; None for
    keys that are not one tensor of ours (per-expert and gate_up_proj ones are assembled)."""
    if m := _ROUTER.fullmatch(key):
        return f"layers.{m.group(1)}.feed_forward.router.weight"
    if (m := _FUSED.fullmatch(key)) and m.group(2) == "down_proj":
        return f"layers.{m.group(1)}.feed_forward.experts.w2"
    return hf_key_to_meta(key)


def our_key_to_mixtral(name: str) -> str:
    """What a tensor of ours is called in the Mixtral files we write (for messages about missing ones)."""
    m = re.fullmatch(r"layers\.(\d+)\.feed_forward\.(router\.weight|experts\.(w[123]))", name)
    if m is None:
        return meta_key_to_hf(name)
    prefix = f"model.layers.{m.group(1)}.block_sparse_moe"
    return f"{prefix}.gate.weight" if m.group(3) is None else f"{prefix}.experts.*.{m.group(3)}.weight"


def read_mixtral(directory: Path, dtype: torch.dtype | None = torch.float32) -> Checkpoint:
    config_path = directory / "config.json"
    source = str(config_path)
    config = config_from_mixtral(read_json_object(config_path), source)
    shapes = expected_shapes(config)
    sd, origin = {}, {}
    per_expert = defaultdict(dict)  # our stacked name → {expert index: (tensor, where)}
    for key, tensor, where in read_weights(directory, skip=lambda key: key.endswith("rotary_emb.inv_freq")):
        if m := _PER_EXPERT.fullmatch(key):
            per_expert[f"layers.{m.group(1)}.feed_forward.experts.{m.group(3)}"][int(m.group(2))] = (tensor, where)
            continue
        m = _FUSED.fullmatch(key)
        if m and m.group(2) == "gate_up_proj":
            prefix = f"layers.{m.group(1)}.feed_forward.experts."
            fused_shape = (config.n_experts, 2 * config.expert_dim, config.d_model)
            if tuple(tensor.shape) != fused_shape:
                raise UserError(f"{where}: shape {tuple(tensor.shape)} disagrees with {source}, which implies "
                                f"{fused_shape}")
            sd[prefix + "w1"], sd[prefix + "w3"] = (part.contiguous() for part in tensor.chunk(2, dim=1))
            origin[prefix + "w1"] = origin[prefix + "w3"] = where
            continue
        name = mixtral_key_to_ours(key) or key
        if tuple(tensor.shape) == shapes.get(name):  # a wrong shape is reported by check()
            tensor = hf_to_meta_layout(name, tensor, config)
        sd[name], origin[name] = tensor, where
    for name, experts in per_expert.items():
        sd[name], origin[name] = _stack_experts(name, experts, shapes, config, directory, source)
    return Checkpoint(directory, "huggingface mixtral", config, source, cast(sd, dtype), origin,
                      stored_as=our_key_to_mixtral, shapes=expected_shapes)


def _stack_experts(name: str, experts: dict, shapes: dict, config: MoEConfig, directory: Path,
                   source: str) -> tuple[torch.Tensor, str]:
    """One (E, ...) tensor from the per-expert tensors of one layer and weight, each checked."""
    layer, w = re.fullmatch(r"layers\.(\d+)\.feed_forward\.experts\.(w[123])", name).groups()
    key = f"model.layers.{layer}.block_sparse_moe.experts.{{}}.{w}.weight"
    extra = sorted(set(experts) - set(range(config.n_experts)))
    if extra or name not in shapes:
        _, where = experts[extra[0] if extra else min(experts)]
        raise UserError(f"{where}: unexpected tensor for a model of {config.n_experts} experts in "
                        f"layers {config.sparse_layers} ({source})")
    expert_shape = shapes[name][1:]
    for e in range(config.n_experts):
        if e not in experts:
            raise UserError(f"{directory}: missing tensor {key.format(e)!r} (expected shape {expert_shape} "
                            f"from {source})")
        tensor, where = experts[e]
        if tuple(tensor.shape) != expert_shape:
            raise UserError(f"{where}: shape {tuple(tensor.shape)} disagrees with {source}, which implies "
                            f"{expert_shape}")
    where = experts[0][1].rsplit(": tensor", 1)[0]
    return torch.stack([experts[e][0] for e in range(config.n_experts)]), f"{where}: tensors {key.format('*')!r}"


# --- writing ----------------------------------------------------------------------------------


def check_mixtral_compatible(config: MoEConfig) -> None:
    """UserError unless `MixtralForCausalLM` computes what this config does."""
    differences = [
        (config.moe_every != 1, f"moe_every={config.moe_every} (Mixtral: every block sparse)"),
        (config.n_shared_experts != 0, f"n_shared_experts={config.n_shared_experts} (Mixtral has none)"),
        (config.router_scoring != "softmax", f"router_scoring={config.router_scoring!r} (Mixtral: softmax)"),
        (not config.norm_topk, "norm_topk=False (Mixtral renormalises the k gates)"),
        (config.capacity_factor is not None, f"capacity_factor={config.capacity_factor} (Mixtral is dropless)"),
        (config.balance == "bias", "balance='bias' (Mixtral has no expert bias to choose experts with)"),
    ]
    for differs, what in differences:
        if differs:
            raise UserError(f"this model routes with {what}: a Mixtral checkpoint cannot hold it")


def mixtral_config(config: MoEConfig) -> dict:
    """A config.json that transformers' MixtralForCausalLM reads as this exact model."""
    hf = config_to_hf(config)
    hf.update(
        architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=config.expert_dim,
        num_local_experts=config.n_experts, num_experts_per_tok=config.top_k,
        # HF's loss is balanced at k: the Switch convention's coefficient is k times smaller there.
        router_aux_loss_coef=config.aux_loss_coef / (config.top_k if config.aux_loss_convention == "switch" else 1),
        router_jitter_noise=config.router_jitter, output_router_logits=False, sliding_window=None,
    )
    return hf


def mixtral_tensors(config: MoEConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights under Mixtral's names: Llama's part as Llama writes it, the experts one by one."""
    tensors = hf_tensors(config, state_dict)  # attention, norms, embeddings (the experts are not Llama's)
    for i in config.sparse_layers:
        p, prefix = f"layers.{i}.feed_forward.", f"model.layers.{i}.block_sparse_moe."
        tensors[prefix + "gate.weight"] = state_dict[p + "router.weight"].detach().cpu().clone()
        for w in EXPERT_WEIGHTS:
            for e, weight in enumerate(state_dict[p + f"experts.{w}"].detach().cpu()):
                tensors[prefix + f"experts.{e}.{w}.weight"] = weight.clone()
    return tensors


def save_pretrained(model, out_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """Write `model` as a Hugging Face Mixtral directory, all at once or not at all."""
    config = model.config
    check_mixtral_compatible(config)
    tensors = mixtral_tensors(config, model.state_dict())
    return write_model_directory(out_dir, lambda tmp: write_hf_files(tmp, mixtral_config(config), tensors,
                                                                     tokenizer_path))
