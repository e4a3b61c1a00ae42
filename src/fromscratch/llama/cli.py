"""`fromscratch llama train|generate|convert`.

    fromscratch llama train --data FILE [FILE ...] --out DIR [--preset tiny] [--resume] ...
    fromscratch llama generate --checkpoint PATH --prompt TEXT [--temperature 0] ...
    fromscratch llama convert --checkpoint PATH --out DIR

`--checkpoint` is any format `Llama.from_pretrained` reads: a Hugging Face or Meta directory,
a llama2.c `.bin`, a `fromscratch llama train` run directory (its best checkpoint, else its
latest), or a hub name. Each verb calls the Python function a user would (`train`, `generate`,
`convert`).
"""

import sys
from pathlib import Path

from fromscratch.blocks import check_sampling_options
from fromscratch.blocks.search import check_ngram_size
from fromscratch.checkpoints.runs import run_checkpoint
from fromscratch.devices import resolve_device
from fromscratch.engine import add_train_arguments, engine_options
from fromscratch.errors import UserError
from fromscratch.inputs import checked_text
from fromscratch.llama.checkpoints import build_model, convert, find_tokenizer, read_checkpoint
from fromscratch.llama.fast import accelerate
from fromscratch.llama.model import Llama
from fromscratch.llama.tokenizer import Tokenizer
from fromscratch.llama.training import DEFAULTS, train


def register(commands) -> None:
    """`fromscratch llama ...`: the sub-commands this package contributes to the CLI."""
    llama = commands.add_parser("llama", help="Llama 2: train, generate, convert checkpoints")
    verbs = llama.add_subparsers(dest="verb", required=True, metavar="VERB")

    train = verbs.add_parser("train", help="train a Llama from scratch on text files")
    add_language_model_arguments(train, "model size (tiny, small, stories15m, 7b, ...)")
    train.set_defaults(func=train_command)

    generate = verbs.add_parser(
        "generate", help="continue a prompt with any checkpoint, printing as it goes",
        description="Continue --prompt with any checkpoint, printing each token as it is produced. "
                    "Stops after --max-new-tokens, at the end of the model's context, at EOS, or at BOS "
                    "(which starts the next document in text tokenized as `llama train` does).",
    )
    add_generate_arguments(generate, "Hugging Face or Meta directory, llama2.c .bin, or a training run directory")
    generate.set_defaults(func=generate_command)

    convert = verbs.add_parser("convert", help="write any supported checkpoint as a Hugging Face directory")
    convert.add_argument("--checkpoint", required=True, metavar="PATH")
    convert.add_argument("--out", required=True, metavar="DIR")
    convert.add_argument("--tokenizer", metavar="PATH",
                         help="copied into DIR (default: the one next to the checkpoint)")
    convert.set_defaults(func=convert_command)


def add_language_model_arguments(train, preset_help: str) -> None:
    """The flags of `llama train` (and of the models built on Llama): data, preset, tokenizer,
    context length, and the engine's."""
    train.add_argument("--data", nargs="+", required=True, metavar="FILE",
                       help="UTF-8 text files, or hf:NAME[:SPLIT[:FIELD]] for a hub dataset")
    train.add_argument("--preset", default="tiny", help=preset_help)
    train.add_argument("--tokenizer", help="a SentencePiece .model or tokenizer.json (default: train one)")
    train.add_argument("--vocab-size", type=int, default=2048, help="size of the tokenizer trained when none is given")
    train.add_argument("--seq-len", type=int, default=None, help="training context length (default: min(preset, 256))")
    add_train_arguments(train, DEFAULTS)


def add_generate_arguments(generate, checkpoint_help: str) -> None:
    """The flags of `llama generate` (and of the models built on Llama)."""
    generate.add_argument("--checkpoint", required=True, metavar="PATH", help=checkpoint_help)
    generate.add_argument("--tokenizer", metavar="PATH", help="default: the tokenizer found next to the checkpoint")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    generate.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N",
                          help="never repeat an N-gram, the prompt's included (default 0: off)")
    generate.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def train_command(args) -> None:
    train(args.data, args.out, preset=args.preset, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
          seq_len=args.seq_len, command=["fromscratch", *sys.argv[1:]], **engine_options(args))


class _EndOfText(Exception):
    """Raised from the streaming callback to stop decoding at a BOS token."""


def generate_command(args) -> None:
    """Print the prompt and its continuation token by token.

    Decoding stops at EOS, and also at BOS: in text tokenized the way `llama train` (and
    llama2.c) does it, a BOS starts the next document, so what follows is unrelated to the prompt.
    """
    generate_from_checkpoint(args, Llama, read_checkpoint)


def generate_from_checkpoint(args, model_class: type, read) -> None:
    """`generate_command` for Llama or a model built on it: `read(spec)` returns the checked
    `Checkpoint` that `--checkpoint` names, and a `model_class` is built from it."""
    prompt_text = checked_text(args.prompt, "--prompt")
    check_sampling_options(args.temperature, args.top_k, args.top_p)
    check_ngram_size(args.no_repeat_ngram, "--no-repeat-ngram")
    device = resolve_device(args.device)
    ckpt = read(args.checkpoint)
    model = accelerate(build_model(model_class, ckpt).to(device).eval())
    tokenizer = checkpoint_tokenizer(args, ckpt.path)
    check_tokenizer_fits(tokenizer, model, ckpt.path)
    print_generation(model, tokenizer, prompt_text, args)


def checkpoint_tokenizer(args, checkpoint_path: Path) -> Tokenizer:
    """--tokenizer, or the one found next to the checkpoint."""
    tokenizer_path = Path(args.tokenizer) if args.tokenizer else find_tokenizer(checkpoint_path)
    if tokenizer_path is None:
        raise UserError(f"no tokenizer.model or tokenizer.json next to {args.checkpoint}; pass --tokenizer PATH")
    return Tokenizer(tokenizer_path)


def check_tokenizer_fits(tokenizer: Tokenizer, model, checkpoint_path: Path) -> None:
    """Refuse a tokenizer with more tokens than the model, or, for a run of ours (whose model is
    made for its tokenizer), with fewer: the model would generate ids it cannot decode. A Hugging
    Face model may pad its embedding past its tokenizer, so there fewer is allowed."""
    model_size, size = model.config.vocab_size, tokenizer.vocab_size
    if size > model_size or (size < model_size and run_checkpoint(checkpoint_path) is not None):
        raise UserError(f"the tokenizer {tokenizer.path} has {size} tokens but the model {model_size}: they do not "
                        "belong together; pass the model's own --tokenizer")


def print_generation(model, tokenizer: Tokenizer, prompt_text: str, args) -> None:
    """Continue `prompt_text` with `model` (Llama, or a model built on it) as `llama generate`'s
    flags say, printing the text as it grows (the tokenizer checked by `check_tokenizer_fits`)."""
    prompt = tokenizer.encode(prompt_text, bos=tokenizer.bos_id is not None)
    context = model.config.max_seq_len
    if len(prompt) >= context:
        how = "longer than" if len(prompt) > context else "as long as"
        raise UserError(
            f"--prompt is {len(prompt)} tokens long, {how} the model's whole context of {context} "
            "tokens (max_seq_len), which leaves no room to generate; shorten it"
        )
    max_new_tokens = args.max_new_tokens
    if max_new_tokens > context - len(prompt):
        max_new_tokens = context - len(prompt)
        print(f"note: generating at most {max_new_tokens} tokens, where the model's context of "
              f"{context} tokens ends", file=sys.stderr)

    ids, shown = list(prompt), ""
    stops = {tokenizer.bos_id, tokenizer.eos_id} - {None}

    def show(final: bool = False) -> None:
        # Decoding token by token would lose SentencePiece's spaces and split multi-byte
        # characters: decode the whole text and print what is new, holding back a trailing
        # incomplete character (U+FFFD) until its remaining bytes arrive.
        nonlocal shown
        text = tokenizer.decode(ids)
        if text.startswith(shown) and (final or not text.endswith("\ufffd")):
            sys.stdout.write(text[len(shown):] + ("\n" if final else ""))
            sys.stdout.flush()
            shown = text
        elif final:
            sys.stdout.write("\n")

    def stream(new_ids):  # called by generate after every step, one id per row (one row here)
        token = new_ids[0]
        if token is None or token in stops:
            raise _EndOfText
        ids.append(token)
        show()

    try:  # the first call of stream() prints the prompt (as the tokenizer reads it back) too
        model.generate([prompt], max_new_tokens=max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed, stream=stream, no_repeat_ngram_size=args.no_repeat_ngram)
    except _EndOfText:
        pass
    show(final=True)


def convert_command(args) -> None:
    if args.tokenizer and not Path(args.tokenizer).is_file():
        raise UserError(f"--tokenizer {args.tokenizer}: no such file")
    out = convert(args.checkpoint, args.out, tokenizer_path=args.tokenizer)
    print(f"wrote a Hugging Face checkpoint to {out}")
