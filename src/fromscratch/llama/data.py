"""Text for language-model training: read, tokenized once, memory-mapped.

Text files are split into paragraphs at blank lines; each paragraph is encoded with a BOS token
in front (as llama2.c does with each TinyStories story), and the ids are concatenated into one
stream. The stream is written once to a flat binary file (uint16 when the vocabulary allows,
else uint32) and memory-mapped, so training reads random windows without holding the corpus in
memory and a resumed run reads the very same tokens. The last `val_fraction` of each source's
tokens is held out for validation.

A hub dataset is named `hf:NAME[:SPLIT[:FIELD]]` (e.g. `hf:roneneldan/TinyStories:train:text`)
and read through `datasets` when it is installed and the hub is reachable.
"""

import codecs
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from fromscratch.errors import UserError


def is_hub(source: str) -> bool:
    return source.startswith("hf:")


def check_sources(sources: list[str]) -> None:
    """Fail before any work on a data path that does not exist, a file that is not UTF-8 text or
    holds nothing but whitespace, or a malformed hub name."""
    for source in sources:
        if is_hub(source):
            if not source[3:].split(":")[0]:
                raise UserError(f"--data {source}: give a dataset name, hf:NAME[:SPLIT[:FIELD]]")
        elif not Path(source).is_file():
            raise UserError(f"--data {source}: " + ("a directory; give a text file" if Path(source).is_dir()
                                                    else "no such file"))
        else:
            check_utf8(Path(source))


def check_utf8(path: Path, chunk_size: int = 1 << 24) -> None:
    """Read `path` through a UTF-8 decoder, chunk by chunk; fail naming the file and the byte,
    or when it holds no text at all (empty, or whitespace only)."""
    decoder, offset, has_text = codecs.getincrementaldecoder("utf-8")(), 0, False
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            pending = len(decoder.getstate()[0])  # bytes of a character split by the last chunk
            try:
                has_text = bool(decoder.decode(chunk).strip()) or has_text
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not UTF-8 text (byte {offset - pending + e.start}: {e.reason})") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (it ends inside a character: {e.reason})") from None
    if not has_text:
        raise UserError(f"{path} is empty: it holds no text" + (" (only whitespace)" if offset else ""))


def paragraphs_from_file(path: Path) -> Iterator[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    for paragraph in text.replace("\r\n", "\n").split("\n\n"):
        if paragraph.strip():
            yield paragraph.strip("\n")


def texts_from_dataset(dataset, field: str = "text") -> Iterator[str]:
    """The text column of a `datasets.Dataset` (what the hub loader returns)."""
    if field not in dataset.column_names:
        raise UserError(f"dataset has no column {field!r} (columns: {', '.join(dataset.column_names)})")
    for row in dataset:
        if row[field] and row[field].strip():
            yield row[field].strip()


def paragraphs_from_hub(spec: str) -> Iterator[str]:
    parts = spec[3:].split(":")
    name, split, field = parts[0], (parts[1:2] or ["train"])[0], (parts[2:3] or ["text"])[0]
    try:
        import datasets
    except ImportError:
        raise UserError(f"--data {spec} needs the `datasets` package: pip install 'fromscratch[hub]'") from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, unknown name, ...: say which and why
        raise UserError(f"could not load hub dataset {name} (split {split}): {e}") from None
    return texts_from_dataset(dataset, field)


def read_source(source: str) -> Iterator[str]:
    return paragraphs_from_hub(source) if is_hub(source) else paragraphs_from_file(Path(source))


def text_files_for_tokenizer(sources: list[str], work_dir: Path, max_chars: int = 200_000_000) -> list[Path]:
    """Local text files to train a tokenizer on: the local sources as they are, and the text of
    hub sources written out (up to `max_chars`) to `work_dir/tokenizer-text.txt`."""
    files = [Path(s) for s in sources if not is_hub(s)]
    hub = [s for s in sources if is_hub(s)]
    if hub:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        path, written = Path(work_dir) / "tokenizer-text.txt", 0
        with open(path, "w", encoding="utf-8") as f:
            for source in hub:
                for paragraph in read_source(source):
                    if written >= max_chars:
                        break
                    f.write(paragraph + "\n\n")
                    written += len(paragraph) + 2
        files.append(path)
    return files


def encode_stream(paragraphs: Iterable[str], tokenizer, dtype=np.int64) -> np.ndarray:
    """One stream of ids: BOS + paragraph, BOS + paragraph, ... (kept in chunks while it grows)."""
    chunks, ids = [], []
    for paragraph in paragraphs:
        ids.extend(tokenizer.encode(paragraph, bos=True, eos=False))
        if len(ids) >= 1 << 20:
            chunks.append(np.asarray(ids, dtype=dtype))
            ids = []
    chunks.append(np.asarray(ids, dtype=dtype))
    return np.concatenate(chunks)


def _fingerprint(sources: list[str], tokenizer_path: Path, val_fraction: float) -> str:
    h = hashlib.sha256()
    for source in sources:
        h.update(source.encode())
        if not is_hub(source):
            stat = Path(source).stat()
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    h.update(Path(tokenizer_path).read_bytes())
    h.update(str(val_fraction).encode())
    return h.hexdigest()


def prepare_token_files(
    sources: list[str], tokenizer, tokenizer_path: Path, cache_dir: Path, val_fraction: float = 0.05
) -> tuple[np.memmap, np.memmap]:
    """Tokenize `sources` into `cache_dir/{train,val}.bin` (once) and memory-map them.

    `cache_dir/meta.json` records a fingerprint of the sources (name, size, modification time),
    the tokenizer file and `val_fraction`; while it matches, the files are reused as they are.
    meta.json is written last, so a run killed while tokenizing tokenizes again next time.
    """
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / "meta.json"
    fingerprint = _fingerprint(sources, tokenizer_path, val_fraction)
    if not (meta_path.exists() and json.loads(meta_path.read_text()).get("fingerprint") == fingerprint):
        cache_dir.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)  # the .bin files are about to change
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
        train_parts, val_parts = [], []
        for source in sources:
            ids = encode_stream(read_source(source), tokenizer, dtype)
            if len(ids) < 2:
                raise UserError(f"--data {source}: holds no text to train on")
            n_val = max(int(len(ids) * val_fraction), 1)
            train_parts.append(ids[:-n_val])
            val_parts.append(ids[-n_val:])
        meta = {"fingerprint": fingerprint, "dtype": np.dtype(dtype).name, "sources": sources}
        for name, parts in (("train", train_parts), ("val", val_parts)):
            ids = np.concatenate(parts)
            tmp = cache_dir / f".{name}.bin.tmp"
            ids.tofile(tmp)
            os.replace(tmp, cache_dir / f"{name}.bin")
            meta[f"{name}_tokens"] = int(len(ids))
        meta_path.write_text(json.dumps(meta, indent=2))
    meta = json.loads(meta_path.read_text())
    return tuple(np.memmap(cache_dir / f"{name}.bin", dtype=meta["dtype"], mode="r") for name in ("train", "val"))
