"""`fromscratch translate train | eval | run`: the command line over train.py and translate.py.

    fromscratch translate train --train PREFIX [PREFIX ...] --valid PREFIX --out DIR [--preset base] ...
    fromscratch translate eval  --checkpoint SPEC --test PREFIX [--beam 4]    (last line: BLEU x chrF y)
    fromscratch translate run   --checkpoint SPEC [--beam 4] [TEXT ...]       (else standard input: < FILE in batches)

SPEC is a `translate train` run, one checkpoint in it, a Hugging Face Marian (OPUS-MT)
directory, or a hub name (`Helsinki-NLP/opus-mt-en-id`).
"""

import argparse
import json
import sys
import time
from pathlib import Path

from fromscratch.blocks.search import check_ngram_size
from fromscratch.engine import add_train_arguments, engine_options
from fromscratch.errors import UserError
from fromscratch.inputs import checked_output, checked_text, stdin_is_a_file, stdin_lines
from fromscratch.transformer.config import ACTIVATIONS, TransformerConfig
from fromscratch.transformer.data import load_corpora, parse_repeats
from fromscratch.transformer.training import LABEL_SMOOTHING, RECIPES, SHAPE_FIELDS, paper_train_config, train
from fromscratch.transformer.translation import (
    POOLED_BATCHES,
    check_batch_size,
    evaluate_bleu,
    load_translator,
    run_length_penalty,
    translate,
)

RECIPE_FLAGS = sorted({name for r in RECIPES.values() for name in r["engine"]})  # engine flags a recipe sets


def recipe_defaults(name: str) -> str:
    """What each device's recipe sets model setting `name` to, for a flag's help."""
    return f"{RECIPES['cpu']['model'][name]} on a CPU, {RECIPES['gpu']['model'][name]} on a GPU"


def register(subparsers) -> None:
    """`fromscratch translate ...`: the sub-commands this package contributes to the CLI."""
    translate_parser = subparsers.add_parser(
        "translate", help="the Transformer (Vaswani et al. 2017): English → Indonesian",
        description="Train, evaluate and run the English→Indonesian Transformer.",
    )
    verbs = translate_parser.add_subparsers(dest="translate_command", required=True, metavar="VERB")

    train_p = verbs.add_parser(
        "train", help="train on parallel text",
        description="Train a Transformer on line-aligned PREFIX.en / PREFIX.id files. A PREFIX may also be "
                    "demo:train / demo:test (the shipped everyday corpus) or opus100:SPLIT (the hub; needs "
                    "fromscratch[hub]); relative prefixes are also looked up under $FROMSCRATCH_DATA.",
    )
    train_p.add_argument("--train", nargs="+", required=True, metavar="PREFIX", help="training corpora")
    train_p.add_argument("--valid", required=True, metavar="PREFIX", help="validation corpus")
    train_p.add_argument("--preset", default=None, choices=list(TransformerConfig.PRESETS),
                         help=f"model size (default: the device's recipe: {recipe_defaults('preset')})")
    train_p.add_argument("--vocab-size", type=int, default=None,
                         help="joint BPE vocabulary size (default: the device's recipe: "
                              f"{recipe_defaults('vocab_size')})")
    train_p.add_argument("--batch-tokens", type=int, default=None,
                         help="padded tokens per side in a batch (default: the device's recipe: "
                              f"{recipe_defaults('batch_tokens')}, §5.1's); replaces --batch-size")
    train_p.add_argument("--max-tokens", type=int, default=None,
                         help="skip training pairs with a side longer than this many tokens, its end token "
                              f"included (default: the device's recipe: {recipe_defaults('max_tokens')})")
    train_p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    for name in SHAPE_FIELDS:
        train_p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, metavar="N",
                             help=f"override the preset's {name}")
    train_p.add_argument("--activation", default=None, choices=ACTIVATIONS,
                         help="the FFN's non-linearity (default: relu, §3.3; swish is Marian's, gelu ViT's)")
    train_p.add_argument("--norm-first", action=argparse.BooleanOptionalAction, default=None,
                         help="pre-norm layers (Xiong et al. 2020); --no-norm-first: the paper's post-norm")
    train_p.add_argument("--repeat", nargs="+", default=[], metavar="NAME=N",
                         help="put the pairs of each training file whose name starts with NAME N times into "
                              "every epoch (over-sampling a corpus; e.g. --repeat tatoeba=4 iwslt17=2)")
    train_p.add_argument("--tag", default=None, metavar="NAME",
                         help="put the token <NAME> before the sources of the training files whose name starts with "
                              "NAME, and before every source the model validates and translates: it learns that "
                              "corpus's style and translates in it (e.g. --tag tatoeba; Sennrich et al. 2016); auto: the "
                              "training file whose words are most like the validation targets'")
    train_p.add_argument("--bpe-dropout", type=float, default=0.0, metavar="P",
                         help="segment each training batch anew, skipping each BPE merge with probability P "
                              "(BPE-dropout, Provilkov et al. 2020; e.g. 0.1); validation and translation keep "
                              "the plain segmentation (default: 0, off)")
    train_p.add_argument("--label-smoothing", type=float, default=LABEL_SMOOTHING, metavar="EPSILON",
                         help="ε_ls of the training loss: the target keeps 1 - ε of the probability and the "
                              f"vocabulary shares ε (§5.4; default: {LABEL_SMOOTHING}, the paper's); val_nll is unsmoothed")
    train_p.add_argument("--bleu-samples", type=int, default=200,
                         help="validation pairs translated (greedy) for val_bleu at each evaluation (default: 200)")
    add_train_arguments(train_p, paper_train_config())
    # What the device's recipe sets (training.RECIPES) stays unset here unless given.
    train_p.set_defaults(**{name: None for name in RECIPE_FLAGS})
    for action in train_p._actions:  # argparse has no public way to reword a shared flag's help
        if action.dest == "batch_size":
            action.help = "not used by translate: batches are sized by --batch-tokens"
        elif action.dest == "lr":
            action.help = "multiplier on the noam schedule of §5.3 (default: the recipe's; 1.0 is the paper)"
        elif action.dest == "warmup_steps":
            action.help = "noam warm-up steps (default: the recipe's; 4000 in §5.3)"
        elif action.dest == "weight_decay":
            action.help = ("AdamW's decoupled weight decay λ, on the weight matrices only (default: the recipe's: "
                           f"{RECIPES['cpu']['engine']['weight_decay']} on a CPU, 0 on a GPU, §5.3's Adam)")
        elif action.dest == "cooldown":
            action.help = action.help.replace("; 0 = off", "; 0 = off (default: the recipe's: "
                                              f"{RECIPES['cpu']['engine']['cooldown']} on a CPU, 0 on a GPU)")
    train_p.set_defaults(func=cmd_train)

    checkpoint_help = "a run directory or one checkpoint in it, a Marian directory, or a hub name"
    eval_p = verbs.add_parser("eval", help="BLEU and chrF on a test corpus",
                              description="Translate PREFIX.en and score it against PREFIX.id with sacreBLEU. "
                                          "The last line printed is 'BLEU <score> chrF <score>'.")
    eval_p.add_argument("--checkpoint", required=True, metavar="SPEC", help=checkpoint_help)
    eval_p.add_argument("--test", required=True, metavar="PREFIX", help="test corpus")
    eval_p.add_argument("--beam", type=int, default=4, help="beam size; 1 = greedy (default: 4, §6.1)")
    eval_p.add_argument("--batch-size", type=int, default=64,
                        help="sentences decoded at a time (default: 64); beam search keeps that many in its "
                             "batch, each that is done giving its place to the next")
    eval_p.add_argument("--output", metavar="FILE",
                        help="also write the translations here, a line for each line of PREFIX.en (empty for a "
                             "pair that was skipped)")
    eval_p.add_argument("--average", type=int, default=None, metavar="N",
                        help="the mean of the run's last N checkpoints (§6.1), not its best one")
    add_decoding_arguments(eval_p)
    eval_p.add_argument("--device", default="auto")
    eval_p.set_defaults(func=cmd_eval)

    run_p = verbs.add_parser("run", help="translate sentences",
                             description="Translate the TEXT arguments, or standard input line by line: from "
                                         "a terminal or a pipe each line as soon as it arrives, from a file "
                                         "(< FILE) many lines at a time, in batches. A line longer than the "
                                         "model's context is translated in pieces (split at sentence ends), "
                                         "with a note on standard error.")
    run_p.add_argument("--checkpoint", required=True, metavar="SPEC", help=checkpoint_help)
    run_p.add_argument("--beam", type=int, default=4, help="beam size; 1 = greedy (default: 4)")
    run_p.add_argument("--batch-size", type=int, default=64,
                       help="sentences decoded at a time, for TEXT arguments and standard input read from a "
                            "file (default: 64)")
    run_p.add_argument("--device", default="auto")
    run_p.add_argument("--average", type=int, default=None, metavar="N",
                       help="the mean of the run's last N checkpoints (§6.1), not its best one")
    add_decoding_arguments(run_p)
    run_p.add_argument("text", nargs="*", metavar="TEXT", help="English sentences (default: read standard input)")
    run_p.set_defaults(func=cmd_run)


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--length-penalty", type=float, default=None, metavar="ALPHA",
                        help="beam search ranks by log P / ((5 + length) / 6)^ALPHA (default: the one the run's "
                             "recipe records, 1.2 for the CPU recipe's; else 0.6, §6.1)")
    parser.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N",
                        help="never produce an N-gram twice in a translation (default: 0, off)")


def _decoding(args: argparse.Namespace) -> dict:
    _check_beam(args.beam)
    check_ngram_size(args.no_repeat_ngram, "--no-repeat-ngram")
    if args.length_penalty is not None and not 0 <= args.length_penalty < float("inf"):  # nan fails both
        raise UserError(f"--length-penalty must be a number ≥ 0, got {args.length_penalty}")
    length_penalty = run_length_penalty(args.checkpoint) if args.length_penalty is None else args.length_penalty
    return dict(beam_size=args.beam, length_penalty=length_penalty, no_repeat_ngram_size=args.no_repeat_ngram)


def cmd_train(args: argparse.Namespace) -> None:
    result = train(args.train, args.valid, args.out, preset=args.preset, vocab_size=args.vocab_size,
                   batch_tokens=args.batch_tokens, max_tokens=args.max_tokens, dropout=args.dropout,
                   norm_first=args.norm_first, shape={name: getattr(args, name) for name in SHAPE_FIELDS},
                   activation=args.activation,
                   bleu_samples=args.bleu_samples, repeats=parse_repeats(args.repeat), tag=args.tag,
                   bpe_dropout=args.bpe_dropout, label_smoothing=args.label_smoothing,
                   command=["fromscratch", *sys.argv[1:]], **engine_options(args))
    print(json.dumps({"step": result["step"], **result["eval"], "best": result["best"], "run_dir": result["run_dir"]}))


def _check_beam(beam: int) -> None:
    if beam < 1:
        raise UserError(f"--beam must be at least 1, got {beam}")


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> None:
    check_batch_size(args.batch_size)
    decoding = _decoding(args)
    output = checked_output(args.output, "--output") if args.output else None  # before the decoding
    test = load_corpora([args.test], max_chars=None)
    model, tokenizer = load_translator(args.checkpoint, args.device, args.average)
    print(f"{len(test)} pairs from {args.test}, beam {args.beam}", file=sys.stderr)
    start = time.perf_counter()
    scores = evaluate_bleu(model, tokenizer, test.src, test.tgt, batch_size=args.batch_size, **decoding)
    seconds = time.perf_counter() - start
    print(f"translated in {seconds:.1f} s ({len(test) / seconds:.1f} sentences/s)", file=sys.stderr)
    if output:
        # A line for each line of PREFIX.en, so that the two line up: a skipped pair's stays empty.
        lines = [""] * (len(test) + test.skipped.total)
        for number, hypothesis in zip(test.origins.line_of_each(), scores["hypotheses"]):
            lines[number - 1] = hypothesis
        output.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    print(f"BLEU {scores['bleu']:.2f} chrF {scores['chrf']:.2f}")


def cmd_run(args: argparse.Namespace) -> None:
    check_batch_size(args.batch_size)
    decoding = _decoding(args)
    texts = [checked_text(text, f"argument {i}") for i, text in enumerate(args.text, start=1)]
    model, tokenizer = load_translator(args.checkpoint, args.device, args.average)
    if texts:
        for line in translate(model, tokenizer, texts, batch_size=args.batch_size, report=_note, **decoding):
            print(line, flush=True)
        return
    if stdin_is_a_file():
        translate_stdin_file(model, tokenizer, args.batch_size, decoding)
        return
    # One line at a time, so a pipe gets each translation as soon as it is ready.
    for number, line in enumerate(stdin_lines(), start=1):
        text = line.strip()
        report = lambda message: _note(f"standard input, line {number}: {message}")  # noqa: E731
        print(translate(model, tokenizer, [text], report=report, **decoding)[0] if text else "", flush=True)


def translate_stdin_file(model, tokenizer, batch_size: int, decoding: dict) -> None:
    """Standard input that is a file: its lines translated `batch_size` × POOLED_BATCHES at a time
    (beam search's full batch, `translate`), printed in order; an empty line stays empty. When a
    line cannot be read (not UTF-8), the lines before it are translated and printed first."""
    lines: list[str] = []  # the lines read and not yet translated
    printed = 0  # lines printed so far

    def translate_lines() -> None:
        nonlocal lines, printed
        numbers = [printed + i for i, text in enumerate(lines, start=1) if text]
        report = lambda message: _note(f"standard input, {message}")  # noqa: E731
        done = iter(translate(model, tokenizer, [text for text in lines if text], batch_size=batch_size,
                              report=report, line_numbers=numbers, **decoding))
        for text in lines:
            print(next(done) if text else "")
        sys.stdout.flush()
        printed, lines = printed + len(lines), []

    reading = stdin_lines()
    while True:
        try:
            line = next(reading, None)
        except UserError:
            translate_lines()
            raise
        if line is None:
            break
        lines.append(line.strip())
        if len(lines) == batch_size * POOLED_BATCHES:
            translate_lines()
    translate_lines()
