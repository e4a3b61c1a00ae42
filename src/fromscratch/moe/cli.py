"""`fromscratch moe train|generate|inspect`.

    fromscratch moe train --data FILE [FILE ...] --out DIR [--preset tiny] [--n-experts E] [--top-k K]
                          [--balance aux|bias|none] [--capacity-factor F] [--resume] ...
    fromscratch moe generate --checkpoint PATH --prompt TEXT [--temperature 0] ...
    fromscratch moe inspect --checkpoint PATH --data FILE --out PNG

`--checkpoint` is anything `MoELlama.from_pretrained` reads: a Hugging Face Mixtral directory,
a `moe train` run directory (its best checkpoint, else its latest), or a hub name. The flags of
train and generate are `llama train`'s and `llama generate`'s, plus the routing ones.
"""

import sys
from pathlib import Path

import torch

from fromscratch.devices import resolve_device
from fromscratch.engine import engine_options
from fromscratch.errors import UserError
from fromscratch.inputs import checked_output
from fromscratch.llama.checkpoints import build_model
from fromscratch.llama.cli import (
    add_generate_arguments,
    add_language_model_arguments,
    check_tokenizer_fits,
    checkpoint_tokenizer,
    generate_from_checkpoint,
)
from fromscratch.llama.data import check_sources, paragraphs_from_file
from fromscratch.moe.checkpoints import read_checkpoint
from fromscratch.moe.usage import expert_usage, plot_expert_usage
from fromscratch.moe.model import MoELlama
from fromscratch.moe.routing import BALANCE_METHODS
from fromscratch.moe.training import train


def register(commands) -> None:
    """`fromscratch moe ...`: the sub-commands this package contributes to the CLI."""
    moe = commands.add_parser("moe", help="sparse Mixture-of-Experts Llama (Mixtral): train, generate, inspect")
    verbs = moe.add_subparsers(dest="verb", required=True, metavar="VERB")

    train_parser = verbs.add_parser("train", help="train an MoE Llama from scratch on text files")
    add_language_model_arguments(train_parser, "model size (tiny, small, mixtral-tiny, mixtral-8x7b)")
    train_parser.add_argument("--n-experts", type=int, default=None, help="experts per sparse block (default: the preset's)")
    train_parser.add_argument("--top-k", type=int, default=None, help="experts each token goes to (default: the preset's)")
    train_parser.add_argument("--balance", choices=BALANCE_METHODS, default=None,
                              help="aux: load-balancing loss; bias: DeepSeek-V3's expert bias; none (default: aux)")
    train_parser.add_argument("--capacity-factor", type=float, default=None,
                              help="drop token-slots beyond capacity_factor·k·T/E per expert (default: dropless)")
    train_parser.set_defaults(func=train_command)

    generate = verbs.add_parser(
        "generate", help="continue a prompt with an MoE checkpoint, printing as it goes",
        description="Continue --prompt with an MoE checkpoint, printing each token as it is produced; "
                    "the flags and the stopping rules are `llama generate`'s.",
    )
    add_generate_arguments(generate, "Hugging Face Mixtral directory, a `moe train` run directory, or a hub name")
    generate.set_defaults(func=generate_command)

    inspect = verbs.add_parser("inspect", help="which experts the router uses, and for which tokens")
    inspect.add_argument("--checkpoint", required=True, metavar="PATH")
    inspect.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text to route")
    inspect.add_argument("--out", required=True, metavar="PNG", help="the heatmap to write")
    inspect.add_argument("--tokenizer", metavar="PATH", help="default: the tokenizer found next to the checkpoint")
    inspect.add_argument("--max-tokens", type=int, default=50_000, help="route at most this many tokens of --data")
    inspect.add_argument("--top", type=int, default=5, help="tokens to list per expert")
    inspect.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    inspect.set_defaults(func=inspect_command)


def train_command(args) -> None:
    train(args.data, args.out, preset=args.preset, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
          seq_len=args.seq_len, n_experts=args.n_experts, top_k=args.top_k, balance=args.balance,
          capacity_factor=args.capacity_factor, command=["fromscratch", *sys.argv[1:]], **engine_options(args))


def generate_command(args) -> None:
    generate_from_checkpoint(args, MoELlama, read_checkpoint)


def inspect_command(args) -> None:
    """Route --data through the model; print each expert's share and most frequent tokens per
    sparse block, and draw them (`moe/usage.py`)."""
    if args.max_tokens < 1 or args.top < 1:
        raise UserError("--max-tokens and --top must be at least 1")
    check_sources([args.data])  # as `moe train` checks its data
    checked_output(args.out, "--out", ".png")
    device = resolve_device(args.device)
    ckpt = read_checkpoint(args.checkpoint)
    tokenizer = checkpoint_tokenizer(args, ckpt.path)
    model = build_model(MoELlama, ckpt).to(device)
    check_tokenizer_fits(tokenizer, model, ckpt.path)
    ids: list[int] = []
    for paragraph in paragraphs_from_file(Path(args.data)):  # as `moe train` tokenizes
        ids += tokenizer.encode(paragraph, bos=tokenizer.bos_id is not None)
        if len(ids) >= args.max_tokens:
            break
    seq_len = min(model.config.max_seq_len, 256, len(ids[: args.max_tokens]))
    usage = expert_usage(model, torch.tensor(ids[: args.max_tokens]), seq_len)

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id]) or f"<{token_id}>"  # special tokens decode to nothing

    n_routed = int(usage.counts[0].sum()) // model.config.top_k
    print(f"{n_routed:,} tokens of {args.data} routed (top-{model.config.top_k} of {model.config.n_experts} experts)")
    for row, layer in enumerate(usage.layers):
        print(f"block {layer}:")
        for e, share in enumerate(usage.shares[row].tolist()):
            tokens = ", ".join(f"{token_text(i)!r} {fraction:.0%}" for i, _, fraction in usage.top_tokens(row, e, args.top))
            print(f"  expert {e}: {share:6.1%}  {tokens}")
    print("(each token: the share of its occurrences routed to that expert)")
    out = plot_expert_usage(usage, token_text, args.out, title=f"{ckpt.path.name}: token share of each expert")
    print(f"wrote {out}")
