"""Llama 2 (Touvron et al. 2023), from scratch: the model, its checkpoints, generation and training.

    from fromscratch.llama import Llama, Tokenizer, accelerate
    model = accelerate(Llama.from_pretrained("stories15M.bin"))      # or a HF/Meta dir, a run, a hub name
    tokenizer = Tokenizer("tokenizer.model")
    ids = model.generate([tokenizer.encode("Once upon a time")], max_new_tokens=50, temperature=0.8)
    print(tokenizer.decode(ids[0]))

    from fromscratch.llama import train
    train("input.txt", "runs/mine", preset="tiny", max_steps=1000)   # what `fromscratch llama train` runs
"""

from fromscratch.llama.checkpoints import convert, export_llama2c
from fromscratch.llama.config import LlamaConfig
from fromscratch.llama.fast import accelerate
from fromscratch.llama.generation import generate
from fromscratch.llama.model import Attention, FeedForward, Llama, RMSNorm, TransformerBlock, apply_rope
from fromscratch.llama.tokenizer import Tokenizer, train_tokenizer
from fromscratch.llama.training import train

__all__ = [
    "Llama", "LlamaConfig", "RMSNorm", "Attention", "FeedForward", "TransformerBlock", "apply_rope", "generate",
    "accelerate", "train", "Tokenizer", "train_tokenizer", "convert", "export_llama2c",
]
