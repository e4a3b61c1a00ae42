"""English→Indonesian recipe ablations: train variants of the CPU recipe for the same budget on
every shared en-id file except `opus100-dev`, score each on `opus100-dev`, write one JSON line each.

    python bench/translate_ablations.py --budget-minutes 15 --out runs/ablations [--only NAME ...]
    python bench/translate_ablations.py --budget-steps 400 ...   (equal tokens: steps of the baseline's
                                                                   batch size, scaled for other sizes)

Each variant is the baseline (`BASELINE`) with a few settings changed; its run directory holds
the usual logs (metrics.csv, eval.csv, run.json) and `result.json`: the settings, steps, target
tokens, wall time, tokens/s, and greedy BLEU / chrF on the 2,000 dev pairs of the run's best
checkpoint (by validation loss, the package-wide rule). Run it alone on the machine when the budget
is wall-clock: a shared CPU makes minutes worth less.
"""

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

from fromscratch.transformer import evaluate_bleu, load_translator, train
from fromscratch.transformer.data import load_corpora

DATA = Path(os.environ.get("FROMSCRATCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "en-id"

# The committed 60-minute run of the seed (bench/translate_enid_60min.sh before this recipe).
# Every setting the recipe (training.RECIPES["cpu"]) has is written out, so that a later recipe
# does not change what these rows ran.
BASELINE = dict(preset="small", vocab_size=8000, batch_tokens=3000, lr=0.3, warmup_steps=400, dropout=0.1,
                norm_first=False, cooldown=0.0)

# Each change on top of the one before it, as the README's ablation table reads.
PRENORM = dict(norm_first=True, lr=1.0)
SMALL_BATCH = dict(PRENORM, batch_tokens=1500)
BFLOAT16 = dict(SMALL_BATCH, dtype="bfloat16")  # CPU autocast: AMX/AVX-512 bf16 products
# Each on top of the recipe (SMALL_BATCH), one change at a time.
NO_DROPOUT = dict(SMALL_BATCH, dropout=0.0)
VOCAB_4000 = dict(SMALL_BATCH, vocab_size=4000)  # Sennrich & Zhang 2019: fewer merges for less data
# Then on top of dropout 0: over-sample the conversational corpora (OPUS-100 dev is mostly film
# subtitles; --repeat), and let the rate fall to ~0 over the last fifth of the time (--cooldown).
REPEAT = dict(NO_DROPOUT, repeats={"tatoeba": 4, "iwslt17": 2})
COOLDOWN = dict(REPEAT, cooldown=0.2)
VARIANTS = {
    "baseline": {},
    "prenorm-lr1": PRENORM,
    "prenorm-lr1-batch1500": SMALL_BATCH,
    "prenorm-lr1-batch1500-bf16": BFLOAT16,
    "prenorm-lr1-batch1500-dropout0": NO_DROPOUT,
    "prenorm-lr1-batch1500-vocab4000": VOCAB_4000,
    "dropout0-repeat-tatoeba4-ted2": REPEAT,
    "dropout0-repeat-cooldown0.2": COOLDOWN,
}
AVERAGE = 3  # checkpoints averaged at the end (§6.1), scored beside the best one


def train_prefixes() -> list[str]:
    return sorted(str(p.with_suffix("")) for p in DATA.glob("*.en") if p.stem != "opus100-dev")


def run_variant(name: str, settings: dict, out: Path, minutes: float | None, steps: int | None) -> dict:
    run_dir = out / name
    engine = dict(max_steps=1_000_000, eval_every=300, save_every=150, keep_last=AVERAGE, bleu_samples=0, seed=0,
                  device="cpu")
    if minutes:
        engine["max_minutes"] = minutes
    if steps:  # as many target tokens as `steps` steps of the baseline's batches
        engine["max_steps"] = round(steps * BASELINE["batch_tokens"] / settings["batch_tokens"])
        engine["eval_every"] = engine["save_every"] = max(engine["max_steps"] // 4, 1)
    started = time.time()
    with contextlib.redirect_stderr(io.StringIO()):
        result = train(train_prefixes(), str(DATA / "opus100-dev"), str(run_dir), **settings, **engine)
    seconds = time.time() - started
    dev = load_corpora([str(DATA / "opus100-dev")], max_chars=None)
    model, tokenizer = load_translator(run_dir)
    scores = evaluate_bleu(model, tokenizer, dev.src, dev.tgt, beam_size=1)
    averaged = evaluate_bleu(*load_translator(run_dir, average=AVERAGE), dev.src, dev.tgt, beam_size=1)
    record = {
        "variant": name, "settings": settings, "steps": result["step"], "target_tokens": result["train"]["tokens"],
        "train_seconds": round(seconds, 1), "final_train_loss": result["train"]["loss"],
        "best": result["best"], "dev_greedy_bleu": round(scores["bleu"], 2), "dev_greedy_chrf": round(scores["chrf"], 2),
        f"dev_greedy_bleu_average{AVERAGE}": round(averaged["bleu"], 2),
        f"dev_greedy_chrf_average{AVERAGE}": round(averaged["chrf"], 2),
        "load_average_at_end": list(os.getloadavg()),
    }
    (run_dir / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/ablations")
    parser.add_argument("--budget-minutes", type=float, default=None)
    parser.add_argument("--budget-steps", type=int, default=None, help="a step budget instead (equal tokens)")
    parser.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    args = parser.parse_args(argv)
    if not args.budget_minutes and not args.budget_steps:
        parser.error("give --budget-minutes or --budget-steps")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only or VARIANTS:
        settings = {**BASELINE, **VARIANTS[name]}
        settings = {k: v for k, v in settings.items() if v is not None}
        record = run_variant(name, settings, out, args.budget_minutes, args.budget_steps)
        print(json.dumps(record), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    sys.exit(main())
