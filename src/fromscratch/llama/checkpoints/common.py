"""What every Llama checkpoint reader produces, and the strict check before a model is built.

Each reader (Hugging Face, Meta, llama2.c, our runs: one module each) returns a `Checkpoint`: a
`LlamaConfig` and a state dict in Meta's key names (`layers.0.attention.wq.weight`, ...), which
model.py uses too, with where each tensor came from for error messages. `Checkpoint.check` then
requires every expected tensor with its shape and nothing extra, and `build_model` turns it into
a model without a random initialisation.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fromscratch.errors import UserError
from fromscratch.llama.config import LlamaConfig


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama checkpoint (Meta's names) and the shape `config` gives it."""
    d, hd, ffn = config.d_model, config.head_dim, config.hidden_dim
    shapes = {"tok_embeddings.weight": (config.vocab_size, d)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (d,)
        shapes[p + "attention.wq.weight"] = (config.n_heads * hd, d)
        shapes[p + "attention.wk.weight"] = (config.kv_heads * hd, d)
        shapes[p + "attention.wv.weight"] = (config.kv_heads * hd, d)
        shapes[p + "attention.wo.weight"] = (d, config.n_heads * hd)
        shapes[p + "ffn_norm.weight"] = (d,)
        shapes[p + "feed_forward.w1.weight"] = (ffn, d)
        shapes[p + "feed_forward.w2.weight"] = (d, ffn)
        shapes[p + "feed_forward.w3.weight"] = (ffn, d)
    shapes["norm.weight"] = (d,)
    if not config.tie_embeddings:
        shapes["output.weight"] = (config.vocab_size, d)
    return shapes


@dataclass
class Checkpoint:
    """A checkpoint read from disk, before it becomes a model.

    state_dict uses Meta's names; `origin[name]` says where a tensor came from ("file: key in
    file") and `stored_as(name)` what a missing one would have been called, for error messages.
    """

    path: Path
    format: str
    config: LlamaConfig
    config_source: str
    state_dict: dict[str, torch.Tensor]
    origin: dict[str, str] = field(default_factory=dict)
    stored_as: Callable[[str], str] = lambda name: name
    shapes: Callable[[LlamaConfig], dict[str, tuple[int, ...]]] = expected_shapes  # a model built on Llama brings its own

    def check(self) -> None:
        """Strict load semantics: every expected tensor present with its shape, nothing extra."""
        sd, tied = self.state_dict, self.config.tie_embeddings
        if tied and "output.weight" in sd:
            # Some writers store the tied matrix under both names, or only under the output's.
            out = sd.pop("output.weight")
            if "tok_embeddings.weight" not in sd:
                sd["tok_embeddings.weight"] = out
                self.origin["tok_embeddings.weight"] = self.origin.get("output.weight", "")
            elif not torch.equal(out, sd["tok_embeddings.weight"]):
                raise UserError(
                    f"{self.where('output.weight')}: the config ({self.config_source}) ties the output "
                    "layer to the embedding, but the checkpoint holds a different output matrix"
                )
        expected = self.shapes(self.config)
        for name, shape in expected.items():
            if name not in sd:
                raise UserError(
                    f"{self.path}: missing tensor {self.stored_as(name)!r} "
                    f"(expected shape {shape} from {self.config_source})"
                )
            if tuple(sd[name].shape) != shape:
                raise UserError(
                    f"{self.where(name)}: shape {tuple(sd[name].shape)} disagrees with "
                    f"{self.config_source}, which implies {shape}"
                )
        extra = [name for name in sd if name not in expected]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise UserError(f"{self.where(extra[0])}: unexpected tensor{more} for this model's checkpoint")

    def where(self, name: str) -> str:
        return self.origin.get(name) or f"{self.path}: tensor {name!r}"


def cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating-point tensors to `dtype`; None keeps each as stored."""
    if dtype is None:
        return sd
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}


def make_config(source: str, **fields) -> LlamaConfig:
    """LlamaConfig(**fields), naming the file the fields came from in any complaint about them."""
    try:
        return LlamaConfig(**fields)
    except (UserError, TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"{source}: {e}") from None


def build_model(cls: type, ckpt: Checkpoint, dtype: torch.dtype | None = torch.float32):
    """A `cls` (Llama, or a model built on it) holding a checked checkpoint's weights, in `dtype`
    (None: float32), in eval mode.

    The model is built on the meta device (shapes only, no memory, no random initialisation)
    and the checkpoint's tensors become its parameters: loading a 7B checkpoint needs the
    checkpoint's memory once, not twice."""
    with torch.device("meta"):
        model = cls(ckpt.config)
    sd = dict(ckpt.state_dict)  # already checked against the config: names and shapes
    if ckpt.config.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    dtype = dtype or torch.float32
    model.load_state_dict({name: tensor.to(dtype).contiguous() for name, tensor in sd.items()},
                          strict=True, assign=True)
    if ckpt.config.tie_embeddings:  # assign=True gave the two names two Parameters: one again
        model.output.weight = model.tok_embeddings.weight
    return model.eval()
