"""Llama's tokenizer: SentencePiece BPE over raw text (Kudo & Richardson 2018).

Llama 2 §2.2, "Tokenizer": "We use the same tokenizer as Llama 1; it employs a bytepair encoding
(BPE) algorithm (Sennrich et al., 2016) using the implementation from SentencePiece (Kudo and
Richardson, 2018). As with Llama 1, we split all numbers into individual digits and use bytes to
decompose unknown UTF-8 characters. The total vocabulary size is 32k tokens."

`Tokenizer` reads Meta's `tokenizer.model` (SentencePiece) or a Hugging Face `tokenizer.json`;
`train_tokenizer` trains a new SentencePiece BPE model with Llama's settings (digits split,
byte fallback, whitespace kept as it is), e.g. a small vocabulary for a tiny model.
"""

import os
import re
from collections.abc import Iterable
from pathlib import Path

from fromscratch.errors import UserError

# Special tokens by the names the common Llama-family tokenizer.json files give them.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<eos>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class Tokenizer:
    """Text ↔ token ids. `path`: a SentencePiece `.model`, a `tokenizer.json`, or a folder
    holding `tokenizer.model` or `tokenizer.json`."""

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():
            found = [path / name for name in ("tokenizer.model", "tokenizer.json") if (path / name).is_file()]
            if not found:
                raise UserError(f"no tokenizer.model or tokenizer.json in {path}")
            path = found[0]
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path}")
        self.path = path
        if path.suffix == ".json":
            self._load_huggingface(path)
        else:
            self._load_sentencepiece(path)

    def _load_sentencepiece(self, path: Path):
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise UserError(f"{path} is not a SentencePiece model: {e}") from None
        self._hf = None
        self.vocab_size = self._sp.vocab_size()
        self.bos_id = _or_none(self._sp.bos_id())
        self.eos_id = _or_none(self._sp.eos_id())
        self.pad_id = _or_none(self._sp.pad_id())  # Llama 2's has none

    def _load_huggingface(self, path: Path):
        import tokenizers

        try:
            self._hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception
            raise UserError(f"{path} is not a Hugging Face tokenizer.json: {e}") from None
        self._sp = None
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._find(_BOS_NAMES)
        self.eos_id = self._find(_EOS_NAMES)
        self.pad_id = self._find(_PAD_NAMES)

    def _find(self, names) -> int | None:
        ids = [self._hf.token_to_id(name) for name in names]
        return next((i for i in ids if i is not None), None)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS in front and EOS at the end if asked (as Meta's)."""
        if not isinstance(text, str):  # SentencePiece would encode a list element-wise, a mix of ids and lists
            raise TypeError(f"encode takes one string, got {type(text).__name__}")
        if self._sp is not None:
            ids = self._sp.encode(text)
        else:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        if bos:
            ids = [self._special("bos", self.bos_id)] + ids
        if eos:
            ids = ids + [self._special("eos", self.eos_id)]
        return ids

    def _special(self, name: str, token_id: int | None) -> int:
        if token_id is None:
            raise UserError(f"tokenizer {self.path} has no {name.upper()} token")
        return token_id

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens (BOS, EOS, padding) are dropped."""
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)

    def stream_decoder(self):
        """A function that takes the next token id and returns the text it adds.

        Decoding tokens one by one loses SentencePiece's leading spaces and splits multi-byte
        characters, so this decodes the whole sequence and returns what is new, holding back a
        trailing incomplete character until its remaining bytes arrive.
        """
        ids: list[int] = []
        emitted = ""

        def push(token_id: int) -> str:
            nonlocal emitted
            ids.append(int(token_id))
            text = self.decode(ids)
            if text.endswith("\ufffd") or not text.startswith(emitted):
                return ""
            new, emitted = text[len(emitted):], text
            return new

        return push


def _or_none(token_id: int) -> int | None:
    return None if token_id < 0 else token_id


def train_tokenizer(files, vocab_size: int, out_prefix, kind: str = "sentencepiece") -> Path:
    """Train a SentencePiece BPE tokenizer on text `files` with Llama's settings; returns the
    path of the written `{out_prefix}.model` (a `.vocab` file is written beside it).

    Ids follow Llama's layout: unk 0, bos 1, eos 2, no padding. Numbers are split into digits
    and characters outside the vocabulary fall back to their UTF-8 bytes (so the vocabulary
    must hold 3 specials + 256 bytes + at least the alphabet).
    """
    if kind != "sentencepiece":
        raise UserError(f"unknown tokenizer kind {kind!r}; only 'sentencepiece' is supported")
    import sentencepiece

    files = [Path(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise UserError(f"tokenizer training files not found: {', '.join(missing) or '(none given)'}")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        sentencepiece.SentencePieceTrainer.train(
            input=",".join(str(f) for f in files),
            model_prefix=str(out_prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            split_digits=True,
            byte_fallback=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,  # keep text exactly, so decode(encode(t)) == t
            normalization_rule_name="identity",
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            input_sentence_size=2_000_000, shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,  # quiet
        )
    except RuntimeError as e:
        raise UserError(_training_error(str(e), vocab_size)) from None
    return out_prefix.with_name(out_prefix.name + ".model")


def _training_error(message: str, vocab_size: int) -> str:
    """SentencePiece's refusals of a vocabulary size, said in terms of --vocab-size (its own name
    the flags it suggests, which this command does not have)."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", message)
    if too_high:
        return (f"--vocab-size {vocab_size}: the text is too small for that many tokens; give at most "
                f"{too_high.group(2)}, or more text")
    too_small = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        return (f"--vocab-size {vocab_size} is too small: the text has {too_small.group(2)} distinct characters, "
                "and the vocabulary must hold them besides its specials and bytes; give more")
    if "!sentences_.empty()" in message:  # every line over its max_sentence_length, 4,192 bytes
        return ("SentencePiece found no line to learn from: it skips lines over 4,192 bytes; break the text "
                "into lines")
    return f"SentencePiece training failed: {message}"
