"""Parallel text for the Transformer: reading, cleaning and token-bucket batching.

Vaswani et al. (2017) §5.1: "Sentence pairs were batched together by approximate sequence length.
Each training batch contained a set of sentence pairs containing approximately 25000 source
tokens and 25000 target tokens." `token_batches` does exactly that.

Corpora come in the "Moses" format OPUS distributes: two line-aligned UTF-8 files `PREFIX.en`
and `PREFIX.id`, line i of one translating line i of the other. `read_parallel` reads any number
of such prefixes; a few other names are understood by `load_corpora`:

    PREFIX            the files PREFIX.en / PREFIX.id (looked up under $FROMSCRATCH_DATA too)
    demo:train        the shipped everyday-sentences corpus (`demo_corpus`), its training split
    demo:test         ... and its held-out split
    opus100:SPLIT     OPUS-100 en-id from the Hugging Face hub (train / validation / test)

Real corpora have bad lines. None of them crashes the reader and none is dropped silently: every
skipped pair is recorded with its file and line in a `SkipReport`, and one summary line is logged,
e.g. "skipped 3 pairs: 2 empty (tatoeba.en:17, tatoeba.id:20), 1 undecodable (x.id:99)".
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from fromscratch import demo_corpus
from fromscratch.errors import UserError

logger = logging.getLogger(__name__)

SRC_LANG, TGT_LANG = "en", "id"
DEFAULT_MAX_CHARS = 1000  # per side; longer lines are almost always alignment debris
ENV_DATA = "FROMSCRATCH_DATA"


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class SkipReport:
    """Which pairs were dropped and why: reason -> ["file:line", ...] in reading order."""

    reasons: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.reasons.setdefault(reason, []).append(where)

    def extend(self, other: "SkipReport") -> None:
        for reason, wheres in other.reasons.items():
            self.reasons.setdefault(reason, []).extend(wheres)

    @property
    def total(self) -> int:
        return sum(len(w) for w in self.reasons.values())

    def count(self, reason: str) -> int:
        return len(self.reasons.get(reason, []))

    def __bool__(self) -> bool:
        return self.total > 0

    def summary(self, examples: int = 3) -> str:
        """One line: 'skipped 3 pairs: 2 empty (a.en:1, a.id:5), 1 undecodable (a.id:9)'."""
        parts = []
        for reason, wheres in self.reasons.items():
            shown = ", ".join(wheres[:examples]) + (", …" if len(wheres) > examples else "")
            parts.append(f"{len(wheres)} {reason} ({shown})")
        noun = "pair" if self.total == 1 else "pairs"
        return f"skipped {self.total} {noun}: " + ", ".join(parts)


@dataclass
class ParallelCorpus:
    """Aligned sentence pairs. `origins[i]` says where pair i came from ("tatoeba.en:17")."""

    src: list[str]
    tgt: list[str]
    origins: list[str]
    skipped: SkipReport = field(default_factory=SkipReport)

    def __post_init__(self) -> None:
        assert len(self.src) == len(self.tgt) == len(self.origins)

    def __len__(self) -> int:
        return len(self.src)

    def select(self, indices: Iterable[int]) -> "ParallelCorpus":
        indices = list(indices)
        return ParallelCorpus(
            [self.src[i] for i in indices],
            [self.tgt[i] for i in indices],
            [self.origins[i] for i in indices],
            self.skipped,
        )

    @staticmethod
    def concat(corpora: Sequence["ParallelCorpus"]) -> "ParallelCorpus":
        out = ParallelCorpus([], [], [])
        for c in corpora:
            out.src += c.src
            out.tgt += c.tgt
            out.origins += c.origins
            out.skipped.extend(c.skipped)
        return out


def _read_lines(path: Path) -> list[bytes]:
    """Raw lines of a file, split on b"\\n" only.

    Splitting bytes rather than `str.splitlines()` matters: the latter also breaks on U+2028,
    U+0085 and form feeds, which do occur inside sentences and would silently misalign the pair.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not data:
        return []
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the usual trailing newline, not an extra empty line
        lines.pop()
    return lines


def _decode(line: bytes) -> str | None:
    """UTF-8 text of one line without surrounding whitespace (CR included); None if undecodable."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.replace("\ufeff", "").strip()


def read_parallel(
    prefix: str | os.PathLike,
    src_lang: str = SRC_LANG,
    tgt_lang: str = TGT_LANG,
    max_chars: int | None = DEFAULT_MAX_CHARS,
    log: bool = True,
) -> ParallelCorpus:
    """Read the line-aligned pair PREFIX.{src_lang} / PREFIX.{tgt_lang}.

    Raises UserError when a file is missing or the two files have different line counts.
    Pairs with an empty side, a side longer than `max_chars` characters, or a line that is not
    valid UTF-8 are dropped and recorded in `corpus.skipped` (and logged when `log`).
    """
    src_path, tgt_path = _pair_paths(prefix, src_lang, tgt_lang)
    src_raw, tgt_raw = _read_lines(src_path), _read_lines(tgt_path)
    if len(src_raw) != len(tgt_raw):
        raise UserError(
            f"{src_path} has {len(src_raw)} lines but {tgt_path} has {len(tgt_raw)}; "
            "a parallel corpus must be line-aligned"
        )
    corpus = ParallelCorpus([], [], [])
    skipped = corpus.skipped
    src_name, tgt_name = src_path.name, tgt_path.name
    for i, (s_raw, t_raw) in enumerate(zip(src_raw, tgt_raw), start=1):
        s, t = _decode(s_raw), _decode(t_raw)
        if s is None or t is None:
            skipped.add("undecodable", f"{src_name if s is None else tgt_name}:{i}")
        elif not s or not t:
            skipped.add("empty", f"{src_name if not s else tgt_name}:{i}")
        elif max_chars is not None and max(len(s), len(t)) > max_chars:
            name = src_name if len(s) > max_chars else tgt_name
            skipped.add(f"longer than {max_chars} chars", f"{name}:{i}")
        else:
            corpus.src.append(s)
            corpus.tgt.append(t)
            corpus.origins.append(f"{src_name}:{i}")
    if not corpus.src and skipped.count("empty") == len(src_raw):
        raise UserError(f"{src_path if not any(s.strip() for s in src_raw) else tgt_path} is empty: "
                        "it holds no text to train on (or only whitespace)")
    if log and skipped:
        logger.warning("%s: %s", prefix, skipped.summary())
    return corpus


def _pair_paths(prefix: str | os.PathLike, src_lang: str, tgt_lang: str) -> tuple[Path, Path]:
    """PREFIX -> (PREFIX.src, PREFIX.tgt); also accepts 'x.en' for prefix 'x' and looks under
    $FROMSCRATCH_DATA when the prefix does not exist as given."""
    prefix = str(prefix)
    for lang in (src_lang, tgt_lang):
        if prefix.endswith("." + lang):
            prefix = prefix[: -len(lang) - 1]
    candidates = [Path(prefix)]
    if os.environ.get(ENV_DATA) and not Path(prefix).is_absolute():
        candidates.append(Path(os.environ[ENV_DATA]) / prefix)
    for base in candidates:
        src, tgt = Path(f"{base}.{src_lang}"), Path(f"{base}.{tgt_lang}")
        if src.exists() or tgt.exists():
            for p in (src, tgt):
                if not p.exists():
                    raise UserError(f"no such file: {p} (a corpus prefix needs both {src.name} and {tgt.name})")
            return src, tgt
    where = " or ".join(str(Path(f"{c}.{src_lang}")) for c in candidates)
    hint = "" if os.environ.get(ENV_DATA) else f" (relative prefixes are also looked up under ${ENV_DATA})"
    raise UserError(f"corpus {prefix!r} not found: no file {where}{hint}")


# ---------------------------------------------------------------------------------------------
# The Hugging Face hub


def corpus_from_hf(dataset, src_lang: str = SRC_LANG, tgt_lang: str = TGT_LANG, name: str = "hub",
                   max_chars: int | None = DEFAULT_MAX_CHARS, log: bool = True) -> ParallelCorpus:
    """Convert a `datasets.Dataset` with OPUS-100's schema {"translation": {"en": .., "id": ..}}.

    The same cleaning as `read_parallel` applies; origins are "NAME:ROW" (1-based rows).
    """
    if "translation" not in getattr(dataset, "column_names", []):
        raise UserError(f"{name}: expected a 'translation' column, found {getattr(dataset, 'column_names', None)}")
    corpus = ParallelCorpus([], [], [])
    for i, row in enumerate(dataset["translation"], start=1):
        s, t = (row.get(src_lang) or "").strip(), (row.get(tgt_lang) or "").strip()
        where = f"{name}:{i}"
        if not s or not t:
            corpus.skipped.add("empty", where)
        elif max_chars is not None and max(len(s), len(t)) > max_chars:
            corpus.skipped.add(f"longer than {max_chars} chars", where)
        else:
            corpus.src.append(s)
            corpus.tgt.append(t)
            corpus.origins.append(where)
    if log and corpus.skipped:
        logger.warning("%s: %s", name, corpus.skipped.summary())
    return corpus


def load_opus100(split: str, config: str = "en-id", **kwargs) -> ParallelCorpus:
    """OPUS-100 (Zhang et al. 2020) from the hub: `Helsinki-NLP/opus-100`, `config` e.g. "en-id"."""
    try:
        import datasets
    except ImportError:
        raise UserError("loading from the Hugging Face hub needs `datasets`: pip install fromscratch[hub]") from None
    if split not in ("train", "validation", "test"):
        raise UserError(f"OPUS-100 has splits train, validation and test, not {split!r}")
    src_lang, tgt_lang = config.split("-")
    try:
        ds = datasets.load_dataset("Helsinki-NLP/opus-100", config, split=split)
    except Exception as e:  # network, unknown config: the user can fix either
        raise UserError(f"could not load Helsinki-NLP/opus-100 {config} {split}: {e}") from None
    return corpus_from_hf(ds, src_lang, tgt_lang, name=f"opus100-{config}-{split}", **kwargs)


def load_demo_split(split: str) -> ParallelCorpus:
    """The shipped everyday-sentences corpus (`fromscratch.demo_corpus`): split "train", "test"
    (every TEST_EVERY-th pair, held out) or "all"."""
    if split not in ("train", "test", "all"):
        raise UserError(f"the demo corpus has splits train, test and all, not {split!r}")
    corpus = read_parallel(demo_corpus.DATA_DIR / demo_corpus.NAME, max_chars=None)
    if split == "all":
        return corpus
    return corpus.select(i for i in range(len(corpus)) if demo_corpus.is_test(i) == (split == "test"))


def load_corpora(specs: Sequence[str], max_chars: int | None = DEFAULT_MAX_CHARS, log: bool = True) -> ParallelCorpus:
    """Read and concatenate corpora named as in the module docstring (prefixes, demo:, opus100:)."""
    if not specs:
        raise UserError("no corpus given")
    parts = []
    for spec in specs:
        spec = str(spec)
        if spec.startswith("demo:"):
            parts.append(load_demo_split(spec.split(":", 1)[1]))
        elif spec.startswith("opus100:"):
            parts.append(load_opus100(spec.split(":", 1)[1], max_chars=max_chars, log=log))
        else:
            parts.append(read_parallel(spec, max_chars=max_chars, log=log))
    corpus = ParallelCorpus.concat(parts)
    if not len(corpus):
        raise UserError(f"no usable sentence pairs in {', '.join(map(str, specs))}")
    return corpus


# ---------------------------------------------------------------------------------------------
# Tokens and batches


def filter_long_pairs(
    src_ids: list[list[int]], tgt_ids: list[list[int]], origins: list[str], max_tokens: int, log: bool = True
) -> tuple[list[int], SkipReport]:
    """Indices of the pairs whose both sides have at most `max_tokens` tokens, and a report of
    the others (so that no batch ever holds a sequence longer than the model's max_seq_len)."""
    keep, report = [], SkipReport()
    for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        if len(s) <= max_tokens and len(t) <= max_tokens:
            keep.append(i)
        else:
            report.add(f"longer than {max_tokens} tokens", origins[i])
    if log and report:
        logger.warning("%s", report.summary())
    return keep, report


def token_batches(
    src_lengths: Sequence[int], tgt_lengths: Sequence[int], batch_tokens: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """Group pair indices into batches of similar length holding at most `batch_tokens` padded
    tokens on each side (§5.1), in an order that is a pure function of (seed, epoch).

    Pairs are shuffled, stably sorted by (source length, target length) so that equal lengths
    land in a different order every epoch, cut greedily into batches, and the batches shuffled.
    A pair longer than the budget on its own gets a batch of its own.
    """
    src_lengths, tgt_lengths = np.asarray(src_lengths), np.asarray(tgt_lengths)
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(src_lengths))
    order = perm[np.lexsort((tgt_lengths[perm], src_lengths[perm]))]
    batches, start, max_src, max_tgt = [], 0, 0, 0
    for pos, i in enumerate(order):
        s, t = max(max_src, src_lengths[i]), max(max_tgt, tgt_lengths[i])
        n = pos - start + 1
        if n > 1 and n * max(s, t) > batch_tokens:
            batches.append(order[start:pos])
            start, s, t = pos, src_lengths[i], tgt_lengths[i]
        max_src, max_tgt = s, t
    if start < len(order):
        batches.append(order[start:])
    return [batches[j] for j in rng.permutation(len(batches))]


class TokenBatchSchedule:
    """Step -> batch of pair indices, epoch after epoch: step s is a pure function of (seed, s).

    Epoch plans are built on demand and cached, so a resumed run at step 10,000 computes the same
    batches as a run that went there without stopping.
    """

    def __init__(self, src_lengths: Sequence[int], tgt_lengths: Sequence[int], batch_tokens: int, seed: int):
        if len(src_lengths) == 0:
            raise UserError("cannot batch an empty corpus")
        self.src_lengths, self.tgt_lengths = list(src_lengths), list(tgt_lengths)
        self.batch_tokens, self.seed = batch_tokens, seed
        self._epochs: list[list[np.ndarray]] = []
        self._starts: list[int] = []  # first step of each epoch

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        while len(self._epochs) <= epoch:
            e = len(self._epochs)
            self._starts.append(self._starts[-1] + len(self._epochs[-1]) if e else 0)
            self._epochs.append(token_batches(self.src_lengths, self.tgt_lengths, self.batch_tokens, self.seed, e))
        return self._epochs[epoch]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, index within that epoch) of a 0-based step."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch = 0
        while True:
            batches = self.epoch_batches(epoch)
            if step < self._starts[epoch] + len(batches):
                return epoch, step - self._starts[epoch]
            epoch += 1

    def __call__(self, step: int) -> np.ndarray:
        epoch, index = self.locate(step)
        return self._epochs[epoch][index]


def collate(
    src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]], pad_id: int, bos_id: int, eos_id: int
) -> dict[str, torch.Tensor]:
    """Pad a batch of token-id pairs into the three tensors teacher forcing needs.

    src     = x₁ … xₙ </s>           (B, S)
    tgt_in  = <s> y₁ … yₘ            (B, T)  the decoder's input, shifted right (§3.1)
    tgt_out = y₁ … yₘ </s>           (B, T)  what it must predict at each position
    All right-padded with pad_id.
    """
    b = len(src_ids)
    s_len = max(len(s) for s in src_ids) + 1
    t_len = max(len(t) for t in tgt_ids) + 1
    src = torch.full((b, s_len), pad_id, dtype=torch.long)
    tgt_in = torch.full((b, t_len), pad_id, dtype=torch.long)
    tgt_out = torch.full((b, t_len), pad_id, dtype=torch.long)
    for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        src[i, : len(s) + 1] = torch.tensor([*s, eos_id])
        tgt_in[i, : len(t) + 1] = torch.tensor([bos_id, *t])
        tgt_out[i, : len(t) + 1] = torch.tensor([*t, eos_id])
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}


def collate_source(src_ids: Sequence[Sequence[int]], pad_id: int, eos_id: int) -> torch.Tensor:
    """Source side only, as in `collate` (x₁ … xₙ </s>, right-padded): (B, S)."""
    s_len = max(len(s) for s in src_ids) + 1
    src = torch.full((len(src_ids), s_len), pad_id, dtype=torch.long)
    for i, s in enumerate(src_ids):
        src[i, : len(s) + 1] = torch.tensor([*s, eos_id])
    return src
