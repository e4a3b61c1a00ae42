"""A joint source/target byte-pair-encoding vocabulary (Vaswani et al. 2017, §5.1).

"Sentences were encoded using byte-pair encoding, which has a shared source-target vocabulary of
about 37000 tokens." One BPE (Sennrich et al. 2016) is learnt on the English and Indonesian
training text together, so the encoder and decoder embeddings can share one matrix (§3.4).

Built with Hugging Face `tokenizers`:
- byte-level pre-tokenisation (as GPT-2): any UTF-8 text is representable, so `<unk>` is never
  produced and `decode(encode(s)) == s` exactly;
- a space is prepended to every sentence (and removed again on decoding) so that a word is the
  same token at the start of a sentence as inside it;
- special tokens <pad>=0, <s>=1, </s>=2, <unk>=3, the ids `TransformerConfig` expects;
- optionally a source tag <NAME>=4 (`translate train --tag NAME`): the token a tagged source
  starts with (side constraints, Sennrich et al. 2016; domain tags, Kobus et al. 2017). It is kept
  in tokenizer.json as the template of `encode(text, add_special_tokens=True)`, so a saved run
  translates with it; `source_prefix` holds its id.

`encode` returns the BPE ids only; adding </s> and <s> is the batcher's job (`data.collate`), and
adding the source tag that of the training data (`data.TokenizedPairs`) and of `translate`.

`BPEDropout` segments training text stochastically (Provilkov et al. 2020, `translate train
--bpe-dropout P`): the same merges, each one skipped with probability P where it could apply, so a
word is seen split in several ways over the epochs.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from fromscratch.errors import UserError

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3 in this order
TOKENIZER_FILE = "tokenizer.json"


def tag_token(name: str) -> str:
    """The special token of source tag `name`: <name>."""
    if not name or any(c.isspace() or c in "<>" for c in name):
        raise UserError(f"--tag {name!r}: a tag is a corpus file name's start, without spaces or < >")
    if f"<{name}>" in SPECIAL_TOKENS:
        raise UserError(f"--tag {name!r}: <{name}> is already one of the special tokens {', '.join(SPECIAL_TOKENS)}")
    return f"<{name}>"


class BPETokenizer:
    """Joint English–Indonesian BPE: `train`, `encode`, `decode`, `save`, `load`."""

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, tokenizer: Tokenizer):
        for i, tok in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(tok) != i:
                raise UserError(f"tokenizer has {tok} at id {tokenizer.token_to_id(tok)}, expected {i}")
        self.tokenizer = tokenizer
        # What the template puts before a source: [] or the id of its tag.
        self.source_prefix: list[int] = tokenizer.encode("", add_special_tokens=True).ids

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2,
              source_tag: str | None = None) -> "BPETokenizer":
        """Learn BPE merges on `texts` (pass both languages) until `vocab_size` tokens. With
        `source_tag` NAME, the special token <NAME> (id 4) is the source prefix (module docstring)."""
        if vocab_size < len(SPECIAL_TOKENS) + 256:
            raise UserError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least 260")
        tag = None if source_tag is None else tag_token(source_tag)
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = normalizers.Prepend(" ")
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS + ([tag] if tag else []),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        if tag:
            tok.post_processor = processors.TemplateProcessing(single=f"{tag} $A",
                                                               special_tokens=[(tag, len(SPECIAL_TOKENS))])
        return cls(tok)

    @property
    def source_tag(self) -> str | None:
        """The NAME of the source tag <NAME>, or None."""
        return self.tokenizer.id_to_token(self.source_prefix[0])[1:-1] if self.source_prefix else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips the character offsets, which we never use (tokenizers ≥ 0.20).
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Detokenised text of `ids`, stopping at the first </s> and ignoring <s> and <pad>."""
        ids = list(ids)
        outside = [i for i in ids if not 0 <= i < self.vocab_size]
        if outside:  # the tokenizers library would drop them silently, or overflow on a negative one
            raise ValueError(f"ids {outside[:3]} are outside the tokenizer's {self.vocab_size} tokens")
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode([i for i in ids if i not in (self.pad_id, self.bos_id)],
                                     skip_special_tokens=False)

    def decode_batch(self, rows: Iterable[Sequence[int]]) -> list[str]:
        return [self.decode(r) for r in rows]

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json (into `path` if it is a directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        self.tokenizer.save(str(path))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPETokenizer":
        """Read tokenizer.json (from `path` or from the directory `path`)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"no tokenizer at {path}")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise UserError(f"cannot read tokenizer {path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# BPE-dropout (Provilkov et al. 2020)


def bpe_segment(symbols: list[str], ranks: dict[tuple[str, str], int], p: float = 0.0,
                draw=random.random) -> list[str]:
    """Apply BPE merges to one pre-tokenised word (a list of its byte symbols), the best-ranked
    adjacent pair first and the leftmost of equals, as `tokenizers` does; with `p` > 0 each pair
    that could be merged is skipped at that step with probability p (BPE-dropout, §2 of the
    paper), and the word stops merging when every candidate was skipped."""
    symbols = list(symbols)
    while len(symbols) > 1:
        best, best_rank = -1, None
        for i in range(len(symbols) - 1):
            rank = ranks.get((symbols[i], symbols[i + 1]))
            # Only a candidate that would be the best so far needs its draw: the others cannot win.
            if rank is not None and (best_rank is None or rank < best_rank) and not (p and draw() < p):
                best, best_rank = i, rank
        if best < 0:
            break
        symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
    return symbols


def check_bpe_dropout(p: float) -> None:
    """Refuse a BPE-dropout rate outside [0, 1) (at 1 no word would ever merge)."""
    if not 0 <= p < 1:
        raise UserError(f"--bpe-dropout must be a probability in [0, 1), got {p}")


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of range(start, start + length) for each pair, as one index array."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - ends + lengths, lengths) + np.arange(int(ends[-1]) if len(ends) else 0)


class BPEDropout:
    """Stochastic segmentations of a fixed list of texts, for training (Provilkov et al. 2020).

    Each text is held as the ids of its words' types (pre-tokenised as `tokenizer` does); each type
    has `variants` segmentations drawn once with BPE-dropout at rate `p` (seeded by `seed`), and
    `sample` picks one of them for every word of the asked texts independently. Drawing the
    variants once costs a Python loop per type, not per occurrence, and makes a sample a cheap
    gather that depends only on the numpy generator it is given.
    """

    def __init__(self, tokenizer: BPETokenizer, texts: Sequence[str], p: float, variants: int = 8, seed: int = 0):
        check_bpe_dropout(p)
        if variants < 1:
            raise ValueError(f"variants must be at least 1, got {variants}")
        tok = tokenizer.tokenizer
        model = json.loads(tok.to_str())["model"]
        if model.get("type") != "BPE":
            raise UserError(f"BPE-dropout needs a BPE tokenizer, not {model.get('type')}")
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        ranks = {pair: rank for rank, pair in enumerate(merges)}
        vocab = tok.get_vocab()
        self.p, self.variants = p, variants
        type_of: dict[str, int] = {}
        words, counts = [], []
        for text in texts:
            pieces = tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))
            counts.append(len(pieces))
            words.extend(type_of.setdefault(piece, len(type_of)) for piece, _ in pieces)
        self.word_types = np.asarray(words, dtype=np.int32)
        self.word_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        draw = random.Random(seed).random
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
        tokens, lengths = [], []
        for word in type_of:  # insertion order: type id order
            for _ in range(variants):
                ids = [vocab[s] for s in bpe_segment(list(word), ranks, p, draw)]
                tokens.extend(ids)
                lengths.append(len(ids))
        self.segment_tokens = np.asarray(tokens, dtype=dtype)
        self.segment_lengths = np.asarray(lengths, dtype=np.int64)
        self.segment_offsets = np.concatenate([[0], np.cumsum(self.segment_lengths)[:-1]]).astype(np.int64)

    @property
    def n_types(self) -> int:
        return len(self.segment_lengths) // self.variants

    def sample(self, rows: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
        """Token ids of texts `rows`, each word segmented by one of its variants chosen by `rng`."""
        rows = np.asarray(rows, dtype=np.int64)
        n_words = self.word_offsets[rows + 1] - self.word_offsets[rows]
        types = self.word_types[_ranges(self.word_offsets[rows], n_words)].astype(np.int64)
        chosen = types * self.variants + rng.integers(self.variants, size=len(types))
        lengths = self.segment_lengths[chosen]
        flat = self.segment_tokens[_ranges(self.segment_offsets[chosen], lengths)]
        ends = np.concatenate([[0], np.cumsum(lengths)])[np.cumsum(n_words)]  # each text's last token, exclusive
        return np.split(flat, ends[:-1])
