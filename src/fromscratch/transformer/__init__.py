"""The Transformer (Vaswani et al. 2017), from scratch: English → Indonesian translation.

    from fromscratch.transformer import load_translator, translate
    model, tokenizer = load_translator("runs/enid")           # a run, a Marian dir, or a hub name
    print(translate(model, tokenizer, ["Where is the station?"], beam_size=4,
                    length_penalty=run_length_penalty("runs/enid")))  # the run's recipe's α; else 0.6

    from fromscratch.transformer import train
    train(["corpus"], "valid", "runs/enid", preset="small")   # what `fromscratch translate train` runs
"""

from fromscratch.transformer.config import TransformerConfig
from fromscratch.transformer.model import (
    DecoderLayer,
    EncoderLayer,
    FeedForward,
    LayerNorm,
    MultiHeadAttention,
    Transformer,
    sinusoidal_positions,
)
from fromscratch.transformer.tokenizer import BPETokenizer
from fromscratch.transformer.training import TranslationTask, train, train_demo
from fromscratch.transformer.translation import evaluate_bleu, load_translator, run_length_penalty, translate

__all__ = [
    "Transformer", "TransformerConfig", "LayerNorm", "MultiHeadAttention", "FeedForward", "EncoderLayer",
    "DecoderLayer", "sinusoidal_positions", "BPETokenizer", "TranslationTask", "train", "train_demo",
    "translate", "evaluate_bleu", "load_translator", "run_length_penalty",
]
