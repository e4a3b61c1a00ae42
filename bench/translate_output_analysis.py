"""What the English→Indonesian outputs say, beside the opus100-dev references: the numbers the
Transformer README quotes about the register and the TED annotations, from committed files.

    python bench/translate_output_analysis.py OUTPUT.id [OUTPUT.id ...] > bench/results/translate_output_analysis.log

1. Register: how often the familiar *aku*, *kau*, *kamu* and the polite *saya*, *Anda* appear
   as whole words (lower-case or capitalised) in the references and in each output file.
2. Target-only annotations: the TED talks' Indonesian side carries stage notes such as
   "(Tepuk tangan)" ("(Applause)") that their English side lacks, so a model learns to write
   them. Counted in the training files and in each output; then each output is scored with
   sacreBLEU / chrF as written and with those notes removed: an upper bound on what cleaning
   them out of the training data could gain.
3. `--tag auto`: every training file's cross-entropy (nats per word) on the dev targets,
   `data.closest_corpus`, lowest first.
4. How long the dev sentences are, in words: the median and the 90th percentile of each side.

Counts and scores only: nothing is trained, and the load of the machine changes nothing.
"""

import argparse
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import sacrebleu

from fromscratch.transformer.data import closest_corpus, load_corpora

DATA = Path(os.environ.get("FROMSCRATCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "en-id"
FAMILIAR, POLITE = ("aku", "kau", "kamu"), ("saya", "anda")
STAGE_NOTE = re.compile(r"\s*\((Tepuk tangan|Tawa penonton|Orang tertawa|Tertawa)\)\s*")


def register(lines: list[str]) -> tuple[int, int]:
    """(familiar, polite) whole-word counts, each word lower-case or capitalised."""
    words = Counter(word for line in lines for word in re.findall(r"\w+", line))
    count = lambda forms: sum(words[w] + words[w.capitalize()] for w in forms)  # noqa: E731
    return count(FAMILIAR), count(POLITE)


def without_notes(line: str) -> str:
    return STAGE_NOTE.sub(" ", line).strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", nargs="+", help="translations of opus100-dev.en, one a line")
    args = parser.parse_args()
    valid = load_corpora([str(DATA / "opus100-dev")], max_chars=None, log=False)
    references = list(valid.tgt)
    train_prefixes = sorted(str(p.with_suffix("")) for p in DATA.glob("*.en") if p.stem != "opus100-dev")
    train = load_corpora(train_prefixes, log=False)  # read once: parts 2 and 3

    print("1. register: familiar (aku, kau, kamu) / polite (saya, Anda), whole words")
    print(f"   references: {register(references)[0]} / {register(references)[1]}")
    outputs = {path: Path(path).read_text(encoding="utf-8").splitlines() for path in args.outputs}
    for path, lines in outputs.items():
        if len(lines) != len(references):
            raise SystemExit(f"{path}: {len(lines)} lines, but opus100-dev has {len(references)}")
        familiar, polite = register(lines)
        print(f"   {path}: {familiar} / {polite}")

    print("2. stage notes on the Indonesian side only (e.g. '(Tepuk tangan)')")
    file_names = [Path(name).stem for name in train.origins.names]
    only_target = Counter(file_names[which] for s, t, which in zip(train.src, train.tgt, train.origins.name_of_each())
                          if STAGE_NOTE.search(t) and "(" not in s)
    for name, count in sorted(only_target.items()):
        print(f"   {name}: {count} pairs")
    print(f"   references: {sum(1 for line in references if STAGE_NOTE.search(line))} lines")
    for path, lines in outputs.items():
        cleaned = [without_notes(line) for line in lines]
        before = sacrebleu.corpus_bleu(lines, [references]).score, sacrebleu.corpus_chrf(lines, [references]).score
        after = sacrebleu.corpus_bleu(cleaned, [references]).score, sacrebleu.corpus_chrf(cleaned, [references]).score
        print(f"   {path}: {sum(1 for line in lines if STAGE_NOTE.search(line))} lines with a note; "
              f"BLEU / chrF {before[0]:.2f} / {before[1]:.2f} as written, {after[0]:.2f} / {after[1]:.2f} without")

    print("3. --tag auto: cross-entropy of the dev targets' words under each training file (nats/word)")
    chosen, entropy = closest_corpus(train, valid)
    for name, value in sorted(entropy.items(), key=lambda kv: kv[1]):
        print(f"   {name}: {value:.2f}")
    print(f"   chosen: {chosen}")

    print("4. opus100-dev sentence lengths in words: median / 90th percentile")
    for side, lines in (("English", valid.src), ("Indonesian", valid.tgt)):
        words = np.array([len(line.split()) for line in lines])
        print(f"   {side}: {np.median(words):.0f} / {np.percentile(words, 90):.0f}")


if __name__ == "__main__":
    main()
