"""Transformer checkpoints: our training runs, and Hugging Face Marian (OPUS-MT) directories.

`Transformer.from_pretrained(SPEC)` takes what `fromscratch.checkpoints.resolve` resolves: a
`fromscratch translate train` run directory (its best checkpoint, else its latest), one
checkpoint directory inside a run, a Hugging Face Marian directory, or a hub name such as
`Helsinki-NLP/opus-mt-en-id`. Marian's layout and its conversion are in `marian.py`.

Whatever the source, the state dict is checked strictly against the config before any tensor
is copied: a missing, unexpected or mis-shaped tensor is a UserError naming it and both shapes.
"""

from pathlib import Path

import torch

from fromscratch.checkpoints.resolve import resolve_checkpoint
from fromscratch.checkpoints.runs import average_last_checkpoints, read_run, run_checkpoint
from fromscratch.devices import resolve_device
from fromscratch.errors import UserError
from fromscratch.transformer.config import TransformerConfig

MODEL_NAME = "transformer"  # as recorded in the run.json of `translate train` runs


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`state` must hold exactly the model's tensors, each with the model's shape (ties counted once)."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise UserError(f"{source}: missing tensor {name!r} (expected shape {tuple(tensor.shape)})")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise UserError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)} but its "
                            f"model config implies {tuple(tensor.shape)}; the config and weights disagree")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UserError(f"{source}: unexpected tensor {extra[0]!r}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def build(cls, config: TransformerConfig, state: dict[str, torch.Tensor], source: str, device="cpu"):
    """A `cls` model with `state` as its weights, after checking them, in eval mode on `device`."""
    with torch.device("meta"):
        model = cls(config)
    check_state_dict(model, state, source)
    model.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=True, assign=True)
    if config.share_embeddings:  # assign=True gave the output layer a Parameter of its own: tie again
        model.output_projection.weight = model.src_embedding.weight
    return model.to(resolve_device(device)).eval()


def load_model(cls, spec, device: str = "cpu", average: int | None = None):
    """The model `spec` names (see the module docstring); with `average`, the mean of the
    weights of a run's last `average` checkpoints (§6.1)."""
    path = resolve_checkpoint(spec, allow_patterns=MARIAN_HUB_FILES)
    if average is not None:  # 0 or less is refused there, not taken for no averaging
        state, config_dict, chosen = average_last_checkpoints(path, average, MODEL_NAME)
        config = TransformerConfig.from_dict(config_dict, source=str(chosen[-1]))
        return build(cls, config, state, f"{path} (the mean of {len(chosen)} checkpoints)", device)
    if run_checkpoint(path) is not None:
        state, config_dict, step_dir, _ = read_run(path, MODEL_NAME)
        config = TransformerConfig.from_dict(config_dict, source=str(step_dir))
        return build(cls, config, state, str(step_dir), device)
    if (Path(path) / "config.json").is_file():
        from fromscratch.transformer import marian

        config, state = marian.read_marian(Path(path))
        return build(cls, config, state, str(path), device)
    raise UserError(f"{path}: neither a `fromscratch translate train` run (checkpoints.json) nor a "
                    "Hugging Face Marian directory (config.json)")


MARIAN_HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                    "pytorch_model.bin.index.json", "*.spm", "vocab.json", "tokenizer_config.json",
                    "generation_config.json"]


def save_marian(model, out_dir, tokenizer_dir=None) -> Path:
    """Write `model` as a Hugging Face Marian directory (with the Marian tokenizer of `tokenizer_dir`)."""
    from fromscratch.transformer import marian

    return marian.write_marian(model, out_dir, tokenizer_dir)
