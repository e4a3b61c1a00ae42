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
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

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


class Origins(Sequence[str]):
    """Where each pair came from, "tatoeba.en:17": a file (or dataset) name and a 1-based line,
    kept as two compact integer arrays and a list of names, not a string per pair (a million
    pairs would otherwise hold a million strings)."""

    def __init__(self, items: Iterable[str] = ()):
        self.names: list[str] = []
        self._name_index: dict[str, int] = {}
        self._names, self._lines = array("H"), array("I")  # name index, line of each pair
        for item in items:
            name, _, line = item.rpartition(":")
            self.append(name, int(line))

    def append(self, name: str, line: int) -> None:
        if name not in self._name_index:
            self._name_index[name] = len(self.names)
            self.names.append(name)
        self._names.append(self._name_index[name])
        self._lines.append(line)

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return f"{self.names[self._names[i]]}:{self._lines[i]}"

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def extend(self, other: "Origins") -> None:
        for i in range(len(other)):
            self.append(other.names[other._names[i]], other._lines[i])

    def name_of_each(self) -> np.ndarray:
        """For each pair, the index in `names` of the file it came from."""
        return np.frombuffer(self._names, dtype=np.uint16) if len(self) else np.zeros(0, np.uint16)

    def line_of_each(self) -> np.ndarray:
        """For each pair, its 1-based line in the file it came from."""
        return np.frombuffer(self._lines, dtype=np.uint32) if len(self) else np.zeros(0, np.uint32)

    def select(self, indices: Sequence[int]) -> "Origins":
        out = Origins()
        for i in indices:
            out.append(self.names[self._names[i]], self._lines[i])
        return out


@dataclass
class ParallelCorpus:
    """Aligned sentence pairs. `origins[i]` says where pair i came from ("tatoeba.en:17")."""

    src: list[str]
    tgt: list[str]
    origins: Origins = field(default_factory=Origins)
    skipped: SkipReport = field(default_factory=SkipReport)

    def __post_init__(self) -> None:
        if not isinstance(self.origins, Origins):
            self.origins = Origins(self.origins)
        assert len(self.src) == len(self.tgt) == len(self.origins)

    def __len__(self) -> int:
        return len(self.src)

    def add(self, src: str, tgt: str, name: str, line: int) -> None:
        self.src.append(src)
        self.tgt.append(tgt)
        self.origins.append(name, line)

    def select(self, indices: Iterable[int]) -> "ParallelCorpus":
        indices = list(indices)
        return ParallelCorpus([self.src[i] for i in indices], [self.tgt[i] for i in indices],
                              self.origins.select(indices), self.skipped)

    @staticmethod
    def concat(corpora: Sequence["ParallelCorpus"]) -> "ParallelCorpus":
        if len(corpora) == 1:
            return corpora[0]
        out = ParallelCorpus([], [])
        for c in corpora:
            out.src += c.src
            out.tgt += c.tgt
            out.origins.extend(c.origins)
            out.skipped.extend(c.skipped)
        return out


def _open_lines(path: Path) -> Iterator[bytes]:
    """The raw lines of a file, one at a time (streamed, never the whole file in memory), split
    on b"\n" only.

    Splitting bytes rather than `str.splitlines()` matters: the latter also breaks on U+2028,
    U+0085 and form feeds, which do occur inside sentences and would silently misalign the pair.
    """
    try:
        with open(path, "rb") as f:
            yield from f
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


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
    """Read the line-aligned pair PREFIX.{src_lang} / PREFIX.{tgt_lang}, line by line.

    Raises UserError when a file is missing, holds no text, or the two files have different line
    counts. Pairs with an empty side, a side longer than `max_chars` characters, or a line that
    is not valid UTF-8 are dropped and recorded in `corpus.skipped` (and logged when `log`).
    """
    src_path, tgt_path = _pair_paths(prefix, src_lang, tgt_lang)
    corpus = ParallelCorpus([], [])
    skipped = corpus.skipped
    src_name, tgt_name = src_path.name, tgt_path.name
    n_src = n_tgt = 0
    text_in = {src_name: False, tgt_name: False}
    for s_raw, t_raw in zip_longest(_open_lines(src_path), _open_lines(tgt_path)):
        n_src, n_tgt = n_src + (s_raw is not None), n_tgt + (t_raw is not None)
        if s_raw is None or t_raw is None:
            continue  # one file is longer: counted, reported below
        s, t = _decode(s_raw), _decode(t_raw)
        text_in[src_name] |= bool(s)
        text_in[tgt_name] |= bool(t)
        i = n_src
        if s is None or t is None:
            skipped.add("undecodable", f"{src_name if s is None else tgt_name}:{i}")
        elif not s or not t:
            skipped.add("empty", f"{src_name if not s else tgt_name}:{i}")
        elif max_chars is not None and max(len(s), len(t)) > max_chars:
            name = src_name if len(s) > max_chars else tgt_name
            skipped.add(f"longer than {max_chars} chars", f"{name}:{i}")
        else:
            corpus.add(s, t, src_name, i)
    if n_src != n_tgt:
        raise UserError(
            f"{src_path} has {n_src} lines but {tgt_path} has {n_tgt}; a parallel corpus must be line-aligned"
        )
    for path, name in ((src_path, src_name), (tgt_path, tgt_name)):
        if not text_in[name] and not corpus.src:
            raise UserError(f"{path} is empty: it holds no sentences (or only whitespace)")
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
    corpus = ParallelCorpus([], [])
    rows = (row for batch in dataset.iter(batch_size=10_000) for row in batch["translation"])  # streamed
    for i, row in enumerate(rows, start=1):
        s, t = (row.get(src_lang) or "").strip(), (row.get(tgt_lang) or "").strip()
        if not s or not t:
            corpus.skipped.add("empty", f"{name}:{i}")
        elif max_chars is not None and max(len(s), len(t)) > max_chars:
            corpus.skipped.add(f"longer than {max_chars} chars", f"{name}:{i}")
        else:
            corpus.add(s, t, name, i)
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


def parse_repeats(specs: Iterable[str]) -> dict[str, int]:
    """["tatoeba=4", "iwslt17=2"] -> {"tatoeba": 4, "iwslt17": 2} (`--repeat NAME=N`)."""
    repeats = {}
    for spec in specs:
        name, sep, count = str(spec).partition("=")
        if not sep or not name or not count.strip().isdigit() or int(count) < 1:
            raise UserError(f"--repeat {spec!r}: expected NAME=N, a corpus file name's start and a whole number ≥ 1")
        repeats[name] = int(count)
    return repeats


def _file_matches(origins: Origins, names: Sequence[str], flag: str) -> list[str | None]:
    """For each file of `origins.names`, the longest of `names` its file name starts with (None:
    none of them). A NAME that matches no file is an error naming `flag`."""
    files = [Path(name).name for name in origins.names]
    matches = [[name for name in names if file.startswith(name)] for file in files]
    unmatched = [name for name in names if not any(name in found for found in matches)]
    if unmatched:
        raise UserError(f"{flag} {', '.join(unmatched)}: no training corpus file name starts with that "
                        f"(files: {', '.join(sorted(files))})")
    return [max(found, key=len) if found else None for found in matches]


def repeat_counts(origins: Origins, repeats: dict[str, int]) -> np.ndarray:
    """How many times each pair enters an epoch: `repeats[NAME]` for a pair read from a file whose
    name starts with NAME (the longest such NAME), once for the others. Over-sampling a corpus
    this way repeats its indices in the batch plan, never its text or tokens."""
    per_file = [repeats[name] if name else 1 for name in _file_matches(origins, list(repeats), "--repeat")]
    return np.array(per_file or [1], dtype=np.int64)[origins.name_of_each()]


def tagged_pairs(origins: Origins, tag: str) -> np.ndarray:
    """Whether each pair was read from a file whose name starts with `tag` (`--tag NAME`: those
    sources get the tag token)."""
    per_file = [name is not None for name in _file_matches(origins, [tag], "--tag")]
    return np.array(per_file or [False], dtype=bool)[origins.name_of_each()]


def closest_corpus(train: ParallelCorpus, valid: ParallelCorpus, weight: float = 0.5) -> tuple[str, dict[str, float]]:
    """The training file whose target side is most like the validation targets (`--tag auto`):
    the lowest cross-entropy, in nats per word, of the validation targets' lower-cased words under
    each file's unigram model interpolated with the whole training set's (Jelinek–Mercer, `weight`
    on the file's; the background add-one smoothed). Selecting data by a language model's
    cross-entropy on in-domain text is Moore & Lewis's (2010) method, here per file. Returns the
    file's name without its language suffix, and every file's cross-entropy by that name."""
    names = [Path(name).stem for name in train.origins.names]
    counts = {name: Counter() for name in names}  # files of one name (in two folders) count as one
    for text, which in zip(train.tgt, train.origins.name_of_each()):
        counts[names[which]].update(text.lower().split())
    background = sum(counts.values(), Counter())
    valid_words = Counter(word for text in valid.tgt for word in text.lower().split())
    if not valid_words:
        raise UserError("--tag auto: the validation targets have no words to compare the training files with")
    vocabulary = len(background.keys() | valid_words.keys())
    total = sum(background.values())
    words = list(valid_words)
    frequency = np.array([valid_words[w] for w in words], dtype=np.float64)
    p_background = (np.array([background[w] for w in words], dtype=np.float64) + 1) / (total + vocabulary)
    entropy = {}
    for name, count in counts.items():
        n = max(sum(count.values()), 1)
        p = weight * np.array([count[w] for w in words], dtype=np.float64) / n + (1 - weight) * p_background
        entropy[name] = float(-(frequency * np.log(p)).sum() / frequency.sum())
    return min(entropy, key=entropy.get), entropy


# ---------------------------------------------------------------------------------------------
# Tokens and batches


class TokenizedPairs:
    """The token ids of many sentence pairs, each side one flat integer array plus offsets: pair
    i's source is `src[src_offsets[i]:src_offsets[i + 1]]`. Two bytes a token (four for
    vocabularies over 65,536), where lists of Python ints would take over thirty."""

    def __init__(self, src: np.ndarray, src_offsets: np.ndarray, tgt: np.ndarray, tgt_offsets: np.ndarray):
        self.src, self.src_offsets, self.tgt, self.tgt_offsets = src, src_offsets, tgt, tgt_offsets

    @classmethod
    def encode(cls, corpus: ParallelCorpus, tokenizer, chunk_pairs: int = 4096,
               tagged: np.ndarray | bool = False) -> "TokenizedPairs":
        """Tokenize `corpus` a chunk of pairs at a time (only one chunk's Python lists exist at once).
        The sources of the `tagged` pairs (a mask, or True: all) start with the tokenizer's
        `source_prefix`, its source tag."""
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
        prefix = list(getattr(tokenizer, "source_prefix", ()))
        tagged = np.broadcast_to(np.asarray(tagged, dtype=bool), (len(corpus),)) if prefix else None
        sides = []
        for side, texts in enumerate((corpus.src, corpus.tgt)):
            chunks, lengths = [], []
            for start in range(0, len(texts), chunk_pairs):
                ids = tokenizer.encode_batch(texts[start:start + chunk_pairs])
                if side == 0 and tagged is not None:
                    ids = [prefix + row if tag else row for row, tag in zip(ids, tagged[start:start + chunk_pairs])]
                lengths.append(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)))
                chunks.append(np.fromiter((t for row in ids for t in row), dtype=dtype))
            flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype)
            offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths) if lengths else [])]).astype(np.int64)
            sides += [flat, offsets]
        return cls(*sides)

    def __len__(self) -> int:
        return len(self.src_offsets) - 1

    @property
    def src_lengths(self) -> np.ndarray:
        return np.diff(self.src_offsets)

    @property
    def tgt_lengths(self) -> np.ndarray:
        return np.diff(self.tgt_offsets)

    def source(self, i: int) -> np.ndarray:
        return self.src[self.src_offsets[i]:self.src_offsets[i + 1]]

    def target(self, i: int) -> np.ndarray:
        return self.tgt[self.tgt_offsets[i]:self.tgt_offsets[i + 1]]

    def select(self, indices: Sequence[int]) -> "TokenizedPairs":
        """The pairs `indices`, in that order, as new compact arrays."""
        sides = []
        for flat, offsets in ((self.src, self.src_offsets), (self.tgt, self.tgt_offsets)):
            starts, ends = offsets[:-1][indices], offsets[1:][indices]
            pieces = [flat[a:b] for a, b in zip(starts, ends)]
            sides += [np.concatenate(pieces) if pieces else flat[:0],
                      np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)]
        return TokenizedPairs(*sides)


def filter_long_pairs(
    src_lengths: Sequence[int], tgt_lengths: Sequence[int], origins: Sequence[str], max_tokens: int, log: bool = True
) -> tuple[list[int], SkipReport]:
    """Indices of the pairs whose both sides have at most `max_tokens` tokens, and a report of
    the others (so that no batch ever holds a sequence longer than the model's max_seq_len)."""
    src_lengths, tgt_lengths = np.asarray(src_lengths), np.asarray(tgt_lengths)
    fits = (src_lengths <= max_tokens) & (tgt_lengths <= max_tokens)
    report = SkipReport()
    for i in np.flatnonzero(~fits):
        report.add(f"longer than {max_tokens} tokens", origins[int(i)])
    if log and report:
        logger.warning("%s", report.summary())
    return np.flatnonzero(fits).tolist(), report


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
    # The greedy cut is sequential; plain Python ints make the loop ~10× faster than numpy scalars.
    sorted_src, sorted_tgt = src_lengths[order].tolist(), tgt_lengths[order].tolist()
    cuts, start, max_src, max_tgt = [], 0, 0, 0
    for pos, (s, t) in enumerate(zip(sorted_src, sorted_tgt)):
        s, t = max(max_src, s), max(max_tgt, t)
        if pos > start and (pos - start + 1) * max(s, t) > batch_tokens:
            cuts.append(pos)
            start, s, t = pos, sorted_src[pos], sorted_tgt[pos]
        max_src, max_tgt = s, t
    batches = np.split(order, cuts) if len(order) else []
    return [batches[j] for j in rng.permutation(len(batches))]


class TokenBatchSchedule:
    """Step -> batch of pair indices, epoch after epoch: step s is a pure function of (seed, s).

    Epoch plans are made on demand; the plan of the current epoch is kept, and of earlier epochs
    only how many batches they had (to find where each epoch starts), so a resumed run at step
    10,000 computes the same batches as a run that went there without stopping, and memory does
    not grow with the number of epochs.
    """

    def __init__(self, src_lengths: Sequence[int], tgt_lengths: Sequence[int], batch_tokens: int, seed: int):
        if len(src_lengths) == 0:
            raise UserError("cannot batch an empty corpus")
        self.src_lengths, self.tgt_lengths = np.asarray(src_lengths), np.asarray(tgt_lengths)
        self.batch_tokens, self.seed = batch_tokens, seed
        self._counts: list[int] = []  # batches in each epoch planned so far
        self._plan: tuple[int, list[np.ndarray]] | None = None  # (epoch, its batches)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, token_batches(self.src_lengths, self.tgt_lengths, self.batch_tokens, self.seed, epoch))
        return self._plan[1]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, index within that epoch) of a 0-based step."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, start = 0, 0
        while True:
            if epoch == len(self._counts):
                self._counts.append(len(self.epoch_batches(epoch)))
            if step < start + self._counts[epoch]:
                return epoch, step - start
            start += self._counts[epoch]
            epoch += 1

    def __call__(self, step: int) -> np.ndarray:
        epoch, index = self.locate(step)
        return self.epoch_batches(epoch)[index]


def collate(
    src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]], pad_id: int, bos_id: int, eos_id: int
) -> dict[str, torch.Tensor]:
    """Pad a batch of token-id pairs into the three tensors teacher forcing needs.

    src     = x₁ … xₙ </s>           (B, S)
    tgt_in  = <s> y₁ … yₘ            (B, T)  the decoder's input, shifted right (§3.1)
    tgt_out = y₁ … yₘ </s>           (B, T)  what it must predict at each position
    All right-padded with pad_id. (bos_id is the decoder's start token.)
    """
    t_len = max(len(t) for t in tgt_ids) + 1
    tgt_in = np.full((len(tgt_ids), t_len), pad_id, dtype=np.int64)
    tgt_out = np.full((len(tgt_ids), t_len), pad_id, dtype=np.int64)
    for i, t in enumerate(tgt_ids):
        tgt_in[i, 0], tgt_in[i, 1:len(t) + 1] = bos_id, t
        tgt_out[i, :len(t)], tgt_out[i, len(t)] = t, eos_id
    return {"src": collate_source(src_ids, pad_id, eos_id), "tgt_in": torch.from_numpy(tgt_in),
            "tgt_out": torch.from_numpy(tgt_out)}


def collate_source(src_ids: Sequence[Sequence[int]], pad_id: int, eos_id: int) -> torch.Tensor:
    """Source side only, as in `collate` (x₁ … xₙ </s>, right-padded): (B, S)."""
    src = np.full((len(src_ids), max(len(s) for s in src_ids) + 1), pad_id, dtype=np.int64)
    for i, s in enumerate(src_ids):
        src[i, :len(s)], src[i, len(s)] = s, eos_id
    return torch.from_numpy(src)
