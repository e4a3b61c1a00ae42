"""Does the translation data path scale to OPUS-100's real en-id training split (1M pairs)?

    python bench/translate_data_scale.py [--pairs 1000000] [--out bench/results/translate_data_scale.json]

Writes a corpus of that many pairs (drawn from the shared en-id pairs, a third of them two pairs
joined, so that lengths vary like real data), then times each stage `translate train` runs before
its first step — reading and cleaning, training the joint BPE, tokenizing, planning an epoch of
token-bucket batches — and records the process's peak resident memory after each (VmHWM), beside
the sizes of the text and of the token ids it holds. Run it alone: times on a shared CPU mean little.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

from fromscratch.transformer.data import TokenBatchSchedule, TokenizedPairs, load_corpora
from fromscratch.transformer.tokenizer import BPETokenizer

DATA = Path(os.environ.get("FROMSCRATCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "en-id"


def peak_rss_mib() -> float:
    """The high-water mark of this process's resident memory (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_corpus(prefix: Path, n_pairs: int, seed: int = 0) -> None:
    source = load_corpora(sorted(str(p.with_suffix("")) for p in DATA.glob("*.en") if p.stem != "opus100-dev"),
                          log=False)
    rng = random.Random(seed)
    with open(f"{prefix}.en", "w", encoding="utf-8") as en, open(f"{prefix}.id", "w", encoding="utf-8") as id_:
        for _ in range(n_pairs):
            i = rng.randrange(len(source))
            s, t = source.src[i], source.tgt[i]
            if rng.random() < 1 / 3:
                j = rng.randrange(len(source))
                s, t = f"{s} {source.src[j]}", f"{t} {source.tgt[j]}"
            en.write(s + "\n")
            id_.write(t + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--batch-tokens", type=int, default=1500)  # the CPU recipe's
    parser.add_argument("--out", default="bench/results/translate_data_scale.json")
    parser.add_argument("--write-corpus", metavar="PREFIX", help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args(argv)
    if args.write_corpus:
        return write_corpus(Path(args.write_corpus), args.pairs)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "generated"
        # Written by a child process, so that this one's memory peak is the pipeline's alone.
        subprocess.run([sys.executable, __file__, "--pairs", str(args.pairs), "--write-corpus", str(prefix)], check=True)
        file_mib = sum(os.path.getsize(f"{prefix}.{lang}") for lang in ("en", "id")) / 2**20
        stages, baseline = {}, peak_rss_mib()

        def stage(name, work):
            started = time.perf_counter()
            result = work()
            stages[name] = {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mib": round(peak_rss_mib(), 1)}
            print(name, stages[name], flush=True)
            return result

        corpus = stage("read_and_clean", lambda: load_corpora([str(prefix)], log=False))
        tokenizer = stage("train_bpe", lambda: BPETokenizer.train(chain(corpus.src, corpus.tgt), args.vocab_size))
        pairs = stage("tokenize", lambda: TokenizedPairs.encode(corpus, tokenizer))
        del corpus
        schedule = TokenBatchSchedule(pairs.src_lengths + 1, pairs.tgt_lengths + 1, args.batch_tokens, seed=0)
        batches = stage("plan_epoch_batches", lambda: schedule.epoch_batches(0))
    ids_mib = sum(a.nbytes for a in (pairs.src, pairs.src_offsets, pairs.tgt, pairs.tgt_offsets)) / 2**20
    record = {
        "pairs": args.pairs, "kept_pairs": len(pairs), "corpus_files_mib": round(file_mib, 1),
        "token_ids_mib": round(ids_mib, 1), "target_tokens": int(pairs.tgt_lengths.sum()),
        "batches_per_epoch": len(batches), "peak_rss_mib_before": round(baseline, 1), "stages": stages,
        "cpu_count": os.cpu_count(), "load_average_at_end": list(os.getloadavg()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
