"""Decoding options on one trained run, all 2,000 opus100-dev pairs: beam size, the length
penalty α and `no_repeat_ngram_size`, each scored with sacreBLEU and chrF (and BLEU's brevity
penalty and length ratio). The weights do not change between rows, so the scores are exact
comparisons of the decoding alone; the load of the machine changes only the seconds.

    python bench/translate_decoding_sweep.py RUN [--average N] [--without-tag] [BEAM:ALPHA:N ...]

--without-tag translates a `translate train --tag` run's weights without its source tag (the
tokenizer's prefix emptied), to measure what the tag does on the same weights.

Default settings: greedy with and without the ban of repeated trigrams, beam 4 with α 0.6, 1.0,
1.4 and 1.5 with and without it. Prints one line a setting (the Transformer README quotes them).
"""

import argparse
import os
import time
from pathlib import Path

import sacrebleu

from fromscratch.transformer.data import load_corpora
from fromscratch.transformer.translation import load_translator, translate

DATA = Path(os.environ.get("FROMSCRATCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DEFAULT = ["1:0.6:0", "1:0.6:3", "4:0.6:0", "4:0.6:3", "4:1.0:0", "4:1.0:3", "4:1.4:0", "4:1.4:3", "4:1.5:0", "4:1.5:3"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a translate train run directory")
    parser.add_argument("--average", type=int, default=None, help="the mean of its last N checkpoints")
    parser.add_argument("--without-tag", action="store_true", help="translate without the run's source tag")
    parser.add_argument("settings", nargs="*", default=DEFAULT, metavar="BEAM:ALPHA:N",
                        help="beam size, length penalty α, no_repeat_ngram_size (0: off)")
    args = parser.parse_intermixed_args()
    test = load_corpora([str(DATA / "en-id" / "opus100-dev")], max_chars=None, log=False)
    model, tokenizer = load_translator(args.run, "cpu", args.average)
    if args.without_tag:
        tokenizer.source_prefix = []
    print(f"{args.run} (average {args.average}, source prefix {tokenizer.source_prefix}): {len(test)} pairs", flush=True)
    for setting in args.settings:
        beam, alpha, n = setting.split(":")
        start = time.perf_counter()
        hypotheses = translate(model, tokenizer, list(test.src), int(beam), 64, float(alpha),
                               no_repeat_ngram_size=int(n))
        bleu = sacrebleu.corpus_bleu(hypotheses, [list(test.tgt)])
        chrf = sacrebleu.corpus_chrf(hypotheses, [list(test.tgt)])
        print(f"beam {beam} alpha {alpha} no_repeat_ngram {n}: BLEU {bleu.score:.2f} chrF {chrf.score:.2f} "
              f"BP {bleu.bp:.3f} length ratio {bleu.sys_len / bleu.ref_len:.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
