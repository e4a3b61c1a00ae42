"""Translating text and scoring translations: what `translate run` and `translate eval` call.

`load_translator(SPEC)` gives a model and its tokenizer from anything `Transformer.from_pretrained`
reads: a `translate train` run (with its joint BPE, `tokenizer.json`) or a Hugging Face Marian
(OPUS-MT) directory or hub name (with its two SentencePiece models, `marian.MarianTokenizer`).
Both tokenizers give `encode(text) → ids` (no EOS) and `decode(ids) → text`.

`translate` decodes sentences in batches of similar length (beam 4 by default, §6.1) and puts
them back in order. Beam search keeps its batch full: as soon as a sentence is done, the next
takes its place (`decoding.generate`'s `pool`), instead of a batch thinning out to its last
sentences; with `length_penalty_style="hf"` and `length_penalty=1.0` (transformers'
default) its beam search is `MarianMTModel.generate`'s (see the Transformer README for the
settings under which the two agree). A sentence longer than the model's context is never cut
silently: it is split at sentence ends (". ", "! ", "? ") into pieces that fit — or, for one
sentence that alone does not fit, at the token limit — each piece is translated, and the pieces
are joined; `report` is told which line was split and into how many pieces.

`run_length_penalty(SPEC)` is the α a `translate train` run's recipe records for beam search
(`decoding.json`; the CPU recipe's small models stop early and take a larger α than §6.1's 0.6);
`translate eval|run` use it when no `--length-penalty` is given.
"""

import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch

from fromscratch.checkpoints.resolve import resolve_checkpoint
from fromscratch.checkpoints.runs import run_checkpoint
from fromscratch.checkpoints.safe import read_json_object
from fromscratch.errors import UserError
from fromscratch.transformer.checkpoints import MARIAN_HUB_FILES
from fromscratch.transformer.data import collate_source
from fromscratch.transformer.fast import accelerate
from fromscratch.transformer.model import Transformer
from fromscratch.transformer.tokenizer import TOKENIZER_FILE, BPETokenizer

logger = logging.getLogger(__name__)
SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")
DECODING_RECORD = "decoding.json"  # in a run directory: {"length_penalty": α} of the recipe that trained it
PAPER_LENGTH_PENALTY = 0.6  # α of §6.1
POOLED_BATCHES = 32  # beam search takes this many batches' worth of sentences at a time


def load_translator(spec: str | Path, device: str = "cpu", average: int | None = None):
    """(model in eval mode, tokenizer) from a run directory (its best checkpoint, else its latest;
    with `average`, the mean of its last `average` checkpoints), one checkpoint directory of a run,
    a Marian directory or a hub name. The model takes the fast paths (`fast.accelerate`: on a CPU
    the packed decoding step, which beam search's full batch needs), which compute the same."""
    path = resolve_checkpoint(spec, allow_patterns=MARIAN_HUB_FILES)
    model = accelerate(Transformer.from_pretrained(path, device, average))
    found = run_checkpoint(path)
    if found is None:  # a Marian directory (from_pretrained has read its config.json)
        from fromscratch.transformer.marian import MarianTokenizer

        return model, MarianTokenizer.from_directory(path, model.config)
    step_dir, run_dir = found
    tokenizer_path = next((p / TOKENIZER_FILE for p in (step_dir, run_dir) if (p / TOKENIZER_FILE).exists()), None)
    if tokenizer_path is None:
        raise UserError(f"no {TOKENIZER_FILE} in {step_dir} or {run_dir}: is this a `fromscratch translate train` run?")
    tokenizer = BPETokenizer.load(tokenizer_path)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(f"{tokenizer_path} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                        f"has {model.config.vocab_size}: they do not belong together")
    return model, tokenizer


def run_length_penalty(spec: str | Path) -> float:
    """The length penalty α beam search takes for `spec` when not told: the one its run's recipe
    recorded (`decoding.json`, written by `translate train`), else §6.1's 0.6 (a Marian directory,
    a hub name, a run trained before the record existed)."""
    found = run_checkpoint(spec) if Path(spec).exists() else None
    record = found[1] / DECODING_RECORD if found else None
    if record is None or not record.exists():
        return PAPER_LENGTH_PENALTY
    alpha = read_json_object(record).get("length_penalty")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < float("inf"):
        raise UserError(f"{record}: length_penalty should be a number ≥ 0, not {alpha!r}")
    return float(alpha)


def split_to_fit(text: str, ids: list[int], tokenizer, limit: int) -> list[list[int]]:
    """Token ids of `text` (`ids`) in pieces of at most `limit` tokens: whole sentences packed
    greedily, and a sentence longer than `limit` on its own cut every `limit` tokens."""
    if len(ids) <= limit:
        return [ids]
    texts: list[str] = []
    for sentence in SENTENCE_END.split(text):
        if texts and len(tokenizer.encode(f"{texts[-1]} {sentence}")) <= limit:
            texts[-1] = f"{texts[-1]} {sentence}"
        else:
            texts.append(sentence)
    pieces = []
    for piece in texts:
        piece_ids = tokenizer.encode(piece)
        pieces += [piece_ids[i:i + limit] for i in range(0, len(piece_ids), limit)]
    return pieces


def check_batch_size(batch_size: int) -> None:
    """Refuse a batch of fewer than one sentence, before any work."""
    if batch_size < 1:
        raise UserError(f"the batch size must be at least 1 sentence, got {batch_size}")


@torch.no_grad()
def translate(model, tokenizer, lines: list[str], beam_size: int = 4, batch_size: int = 64,
              length_penalty: float = PAPER_LENGTH_PENALTY, report: Callable[[str], None] | None = None,
              length_penalty_style: str = "gnmt", no_repeat_ngram_size: int = 0,
              line_numbers: list[int] | None = None) -> list[str]:
    """Detokenised translations of `lines`, in order. Sentences are decoded in batches of similar
    length; a line longer than the model's context is translated in pieces (module docstring),
    and `report` (default: a logged warning) is told so, naming the line by its number in
    `line_numbers` (default: 1, 2, …)."""
    check_batch_size(batch_size)
    if isinstance(lines, str):  # a string is a sequence too: it would be translated letter by letter
        raise TypeError("translate takes a list of sentences, not one string: pass [text]")
    bad = next((i for i, line in enumerate(lines) if not isinstance(line, str)), None)
    if bad is not None:
        raise TypeError(f"line {bad + 1} is {type(lines[bad]).__name__}, not a string")
    if line_numbers is not None and len(line_numbers) != len(lines):
        raise ValueError(f"{len(line_numbers)} line numbers for {len(lines)} lines")
    if not isinstance(beam_size, int) or isinstance(beam_size, bool):
        raise TypeError(f"beam_size must be an int, got {beam_size!r}")
    if beam_size > model.config.vocab_size:  # and memory for beam × vocabulary scores a sentence
        raise UserError(f"a beam of {beam_size} is more than the model's vocabulary of {model.config.vocab_size} "
                        "tokens")
    if not lines:
        return []
    report = report or logger.warning
    device = next(model.parameters()).device
    prefix = list(getattr(tokenizer, "source_prefix", ()))  # a source tag (`translate train --tag`), if any
    limit = model.config.max_seq_len - 1 - len(prefix)  # room for </s> and the tag
    pieces_of_line: list[list[list[int]]] = []
    for number, line in zip(line_numbers or range(1, len(lines) + 1), lines):
        ids = tokenizer.encode(line)
        pieces = [prefix + piece for piece in split_to_fit(line, ids, tokenizer, limit)]
        if len(pieces) > 1:
            which = f"line {number}" if len(lines) > 1 or line_numbers else "the input"
            report(f"{which} is {len(ids)} tokens long, more than the model's context of {limit}: "
                   f"translated in {len(pieces)} pieces")
        pieces_of_line.append(pieces)
    # Passed only when not the default, so a stand-in model's generate(src, beam_size, length_penalty) serves.
    style = {} if length_penalty_style == "gnmt" else {"length_penalty_style": length_penalty_style}
    if no_repeat_ngram_size:
        style["no_repeat_ngram_size"] = no_repeat_ngram_size
    flat = [piece for pieces in pieces_of_line for piece in pieces]
    order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
    out: list[str] = [""] * len(flat)
    # Beam search keeps `batch_size` sources at a time in one batch, each that is done giving its
    # place to the next (decoding.generate's `pool`); over groups of sources, to bound memory.
    group = batch_size * POOLED_BATCHES if beam_size > 1 else batch_size
    for start in range(0, len(order), group):
        rows = order[start : start + group]
        src = collate_source([flat[i] for i in rows], tokenizer.pad_id, tokenizer.eos_id).to(device)
        pool = {"pool": batch_size} if len(rows) > batch_size else {}
        generated = model.generate(src, beam_size=beam_size, length_penalty=length_penalty, **style, **pool)
        for i, row in zip(rows, generated.tolist()):
            out[i] = tokenizer.decode(row)
    translations, i = [], 0
    for pieces in pieces_of_line:
        translations.append(" ".join(out[i:i + len(pieces)]))
        i += len(pieces)
    return translations


def evaluate_bleu(model, tokenizer, src_lines: list[str], ref_lines: list[str], beam_size: int = 4,
                  batch_size: int = 64, length_penalty: float = PAPER_LENGTH_PENALTY, length_penalty_style: str = "gnmt",
                  no_repeat_ngram_size: int = 0) -> dict:
    """Translate `src_lines` and score against `ref_lines` with sacreBLEU (default 13a
    tokenisation, on detokenised text): {"bleu", "chrf", "hypotheses"}."""
    import sacrebleu

    if len(src_lines) != len(ref_lines):
        raise UserError(f"{len(src_lines)} source lines but {len(ref_lines)} references")
    hypotheses = translate(model, tokenizer, list(src_lines), beam_size, batch_size, length_penalty,
                           length_penalty_style=length_penalty_style, no_repeat_ngram_size=no_repeat_ngram_size)
    refs = [list(ref_lines)]
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, refs).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, refs).score,
        "hypotheses": hypotheses,
    }
