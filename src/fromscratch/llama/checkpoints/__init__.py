"""Llama checkpoints in every format people actually have: read them all, write Hugging Face's.

`Llama.from_pretrained(SPEC)` reads, recognised by what is on disk (`detect.py`):

    Hugging Face directory   config.json + model.safetensors | model-0000i-of-0000n.safetensors
                             (+ .index.json) | pytorch_model.bin | pytorch_model-0000i-of-0000n.bin
                                                                            (huggingface.py)
    Meta directory           params.json + consolidated.00.pth ... (model-parallel shards, merged)
                                                                            (meta.py)
    llama2.c .bin            version 0 (bare 7-int header), 1 (float32) or 2 (int8 "Q8_0") files
    llama2.c training .pt    {"model_args": ..., "model": state_dict} written by its train.py
                                                                            (llama2c.py)
    our training runs        RUN_DIR (its best checkpoint, else its latest) or
                             RUN_DIR/checkpoints/step-N                     (runs.py)
    a hub name               meta-llama/Llama-2-7b-hf: fetched into the Hugging Face cache

Every reader produces the same thing, a `LlamaConfig` and a state dict in Meta's key names
(`layers.0.attention.wq.weight`, ...), which `model.py` uses too (`common.py`). One function then
checks it strictly (no tensor missing, none extra, every shape as the config says) and builds the
model. Files are read by `fromscratch.checkpoints.safe`: pickles only with
`torch.load(weights_only=True)`, which refuses any pickle that would import or call code, and
weights only when they are floating point.
"""

from pathlib import Path

from fromscratch.llama.checkpoints.common import Checkpoint, build_model, expected_shapes
from fromscratch.llama.checkpoints.detect import read_checkpoint
from fromscratch.llama.checkpoints.huggingface import (
    config_from_hf,
    config_to_hf,
    find_tokenizer,
    hf_key_to_meta,
    hf_to_meta_permute,
    meta_key_to_hf,
    meta_to_hf_permute,
    write_hf,
)
from fromscratch.llama.checkpoints.llama2c import export_llama2c
from fromscratch.llama.checkpoints.meta import merge_meta_shards

__all__ = [
    "Checkpoint", "build_model", "expected_shapes", "read_checkpoint", "config_from_hf", "config_to_hf",
    "find_tokenizer", "hf_key_to_meta", "hf_to_meta_permute", "meta_key_to_hf", "meta_to_hf_permute", "write_hf",
    "export_llama2c", "merge_meta_shards", "save_pretrained", "convert",
]


def save_pretrained(model, out_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """Write `model` as a Hugging Face directory that `LlamaForCausalLM.from_pretrained` loads."""
    return write_hf(model.config, model.state_dict(), out_dir, tokenizer_path)


def convert(checkpoint_path: str | Path, out_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """Any supported checkpoint -> a Hugging Face directory, its tokenizer carried along if found.

    Weights keep the dtype they were stored in (a bf16 Meta download stays bf16).
    """
    ckpt = read_checkpoint(checkpoint_path, dtype=None)
    tokenizer_path = tokenizer_path or find_tokenizer(ckpt.path)
    return write_hf(ckpt.config, ckpt.state_dict, out_dir, tokenizer_path)
