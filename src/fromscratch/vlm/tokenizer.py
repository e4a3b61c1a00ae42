"""A word-level vocabulary learnt from the training text: one token per word.

The VLM's texts (captions, questions, answers) come from small closed vocabularies (easy-VQA
and the scenes have well under 200 words; VQA-RAD about 1,200), so every word can be a token of
its own: a generated word is one decoding step, and one cross-attention map. Built with Hugging
Face `tokenizers` (a WordLevel model), saved as tokenizer.json with the run:

- text is NFKC-normalised and lower-cased; words are split at white space, and a run of
  punctuation at the end of a word ("shape?", "objects:") is a token of its own, so "shape"
  is the same token wherever it stands; inner punctuation stays ("x-ray", "1,000");
- `decode` joins the words with spaces and glues the end-of-word punctuation back, so
  `decode(encode(s)) == s` for normalised text (lower case, single spaces);
- a word not seen in training is `<unk>`;
- special tokens <pad>=0, <s>=1, </s>=2, <unk>=3, <sep>=4 (between a question and its answer).
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from fromscratch.errors import UserError
from fromscratch.transformer.tokenizer import BOS, EOS, PAD, TOKENIZER_FILE, UNK, BPETokenizer

SEP = "<sep>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, SEP]  # ids 0..4 in this order: the Transformer's four, then <sep>
END_PUNCTUATION = r"[?.,:;!]+"
_GLUE = re.compile(rf" ({END_PUNCTUATION})(?= |$)")

__all__ = ["WordTokenizer", "TOKENIZER_FILE", "SPECIAL_TOKENS"]


class WordTokenizer(BPETokenizer):
    """`train`, `encode`, `decode`, `id_to_token`; `save`, `load`, `encode_batch` and the ids of
    <pad>, <s>, </s>, <unk> are the Transformer tokenizer's (whose first four specials these are)."""

    sep_id = 4

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        if tokenizer.token_to_id(SEP) != self.sep_id:
            raise UserError(f"tokenizer has {SEP} at id {tokenizer.token_to_id(SEP)}, expected {self.sep_id}")

    @classmethod
    def train(cls, texts: Iterable[str], min_frequency: int = 1) -> "WordTokenizer":
        """Every word of `texts` seen at least `min_frequency` times becomes a token."""
        tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(END_PUNCTUATION + "$"), behavior="isolated"),
        ])
        trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=min_frequency,
                                            show_progress=False)
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    def id_to_token(self, i: int) -> str:
        return self.tokenizer.id_to_token(i)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, up to the first </s>, without <pad>, <s> and <sep>."""
        words = []
        for i in ids:
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id, self.sep_id):
                words.append(self.tokenizer.id_to_token(i))
        return _GLUE.sub(r"\1", " ".join(words))
