"""Meta's own Llama downloads: `params.json` + `consolidated.00.pth`, `.01.pth`, ... (model-parallel
shards, merged here).

Pickled files are opened only with `torch.load(weights_only=True)` (`fromscratch.checkpoints.safe`).
"""

from pathlib import Path

import torch

from fromscratch.checkpoints.safe import read_json_object, tensors_only, torch_load
from fromscratch.config import json_field
from fromscratch.errors import UserError
from fromscratch.llama.checkpoints.common import Checkpoint, cast, make_config

# How Meta's model parallelism (fairscale) split each matrix across consolidated.NN.pth files:
# ColumnParallelLinear splits the output features (dim 0), RowParallelLinear the input ones
# (dim 1); norms are replicated. The embedding is a ParallelEmbedding split along the model
# dimension (dim 1) in Llama 1 and 2, a VocabParallelEmbedding split along the vocabulary
# (dim 0) in Llama 3; the shard shapes tell which.
_COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                    "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight")
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


def merge_meta_shards(shards: list[dict[str, torch.Tensor]], d_model: int) -> dict[str, torch.Tensor]:
    """Undo Meta's model-parallel split: one state dict from consolidated.00.pth, .01.pth, ..."""
    if len(shards) == 1:
        return dict(shards[0])
    merged = {}
    for name in shards[0]:
        parts = [shard[name] for shard in shards]
        if name.endswith(_COLUMN_PARALLEL):
            dim = 0
        elif name.endswith(_ROW_PARALLEL):
            dim = 1
        elif name == "tok_embeddings.weight" and parts[0].ndim == 2:
            dim = 0 if parts[0].shape[1] == d_model else 1
        else:  # replicated: the norms
            merged[name] = parts[0]
            continue
        try:
            merged[name] = torch.cat(parts, dim=dim)
        except (RuntimeError, IndexError):
            shapes = ", ".join(str(tuple(p.shape)) for p in parts)
            raise UserError(
                f"tensor {name!r}: its shards have shapes {shapes}, which do not join along dim {dim}"
            ) from None
    return merged


def read_meta(directory: Path, dtype: torch.dtype | None = torch.float32) -> Checkpoint:
    params_path = directory / "params.json"
    params = read_json_object(params_path)
    source = str(params_path)
    files = sorted(directory.glob("consolidated.*.pth"))
    if not files:
        raise UserError(f"{directory}: has params.json but no consolidated.*.pth weights")
    d_model = json_field(params, "dim", int, source)
    if json_field(params, "use_scaled_rope", bool, source, False):
        raise UserError(f"{params_path}: use_scaled_rope (Llama 3.1's RoPE scaling) is not implemented")
    rope_theta = json_field(params, "rope_theta", float, source, 10000.0)
    fields = dict(
        d_model=d_model,
        n_layers=json_field(params, "n_layers", int, source),
        n_heads=json_field(params, "n_heads", int, source),
        n_kv_heads=json_field(params, "n_kv_heads", int | None, source, None),
        multiple_of=json_field(params, "multiple_of", int, source, 256),
        ffn_dim_multiplier=json_field(params, "ffn_dim_multiplier", float | None, source, None),
        norm_eps=json_field(params, "norm_eps", float, source, 1e-5),
        rope_theta=rope_theta,
        # params.json does not record the context length: Llama 2's 4096, Llama 3's (θ = 500000) 8192
        max_seq_len=json_field(params, "max_seq_len", int, source, 8192 if rope_theta >= 500000 else 4096),
    )
    vocab_size = json_field(params, "vocab_size", int | None, source, -1)
    shards = [tensors_only(torch_load(f), f) for f in files]
    for f, shard in zip(files[1:], shards[1:]):
        if shard.keys() != shards[0].keys():
            odd = sorted(shard.keys() ^ shards[0].keys())[0]
            raise UserError(f"{f}: tensor {odd!r} is in only one of {files[0].name} and {f.name}")
    try:
        sd = merge_meta_shards(shards, d_model)
    except UserError as e:
        raise UserError(f"{directory}: {e}") from None
    sd.pop("rope.freqs", None)  # Llama 1's precomputed RoPE frequencies; recomputed by the model
    if vocab_size is None or vocab_size <= 0:  # "defined later by tokenizer": read the embedding
        if "tok_embeddings.weight" not in sd:
            raise UserError(f"{params_path}: vocab_size is {vocab_size} and there is no tok_embeddings")
        vocab_size = sd["tok_embeddings.weight"].shape[0]
    config = make_config(source, vocab_size=vocab_size, tie_embeddings="output.weight" not in sd, **fields)
    where = files[0].name if len(files) == 1 else f"{files[0].name}..{files[-1].name}"
    origin = {name: f"{directory / where}: tensor {name!r}" for name in sd}
    return Checkpoint(directory, "meta", config, source, cast(sd, dtype), origin)
