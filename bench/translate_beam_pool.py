"""What beam search's full batch (`pool`) buys `translate eval`, in one process.

    python bench/translate_beam_pool.py --checkpoint RUN [--rounds 4] [--style hf|gnmt] [--out FILE]

Translates the 2,000 opus100-dev sentences with beam 4, batches of 64 sorted by length, three
ways, round after round (the order flips each round):
- `plain_batches`: the model as `Transformer.from_pretrained` gives it, one batch of 64 after
  another: what `translate eval` ran before it took the fast paths;
- `accelerated_batches`: after `fast.accelerate` (the packed decoding step), batch after batch:
  what `bench_transformer.py` timed before the pool;
- `accelerated_pool`: what `translate eval` runs now: 64 sentences at a time in one batch, each
  that is done giving its rows to the next.
Reports each one's seconds, the ratios of the medians, and how many translations agree (the
pool gives each sentence its own limit of length + 50, a batch its longest's). `--style hf`
(default) decodes as `MarianMTModel.generate` with α 1.0, as the bench does; `gnmt` with the
α the run records, as `translate eval` does. Run it alone on the machine.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from fromscratch.devices import describe_device
from fromscratch.transformer import Transformer, translation
from fromscratch.transformer.data import load_corpora
from fromscratch.transformer.translation import load_translator, run_length_penalty, translate

DATA = Path(os.environ.get("FROMSCRATCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "en-id"
RESULTS = Path(__file__).resolve().parent / "results" / "translate_beam_pool.json"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a translate train run (or a Marian directory)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--style", choices=["hf", "gnmt"], default="hf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    accelerated, tokenizer = load_translator(args.checkpoint)
    plain = Transformer.from_pretrained(args.checkpoint)
    lines = load_corpora([str(DATA / "opus100-dev")], max_chars=None).src
    alpha = 1.0 if args.style == "hf" else run_length_penalty(args.checkpoint)
    contenders = {"plain_batches": (plain, 1), "accelerated_batches": (accelerated, 1),
                  "accelerated_pool": (accelerated, translation.POOLED_BATCHES)}

    def run(model, groups):  # groups of `groups` batches: 1 is batch after batch
        translation.POOLED_BATCHES = groups
        return translate(model, tokenizer, lines, beam_size=4, batch_size=64, length_penalty=alpha,
                         length_penalty_style=args.style)

    seconds, outputs, load = {name: [] for name in contenders}, {}, list(os.getloadavg())
    with torch.no_grad():
        for round_ in range(args.rounds):
            for name in contenders if round_ % 2 == 0 else reversed(contenders):
                start = time.perf_counter()
                outputs[name] = run(*contenders[name])
                seconds[name].append(time.perf_counter() - start)
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {s[-1]:.2f} s" for n, s in seconds.items()), flush=True)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    result = {
        "checkpoint": str(args.checkpoint), "hardware": describe_device("cpu"), "threads": torch.get_num_threads(),
        "sentences": len(lines), "beam": 4, "batch_size": 64, "style": args.style, "length_penalty": alpha,
        "load_average_at_start": load, "load_average_at_end": list(os.getloadavg()),
        "seconds": seconds, "median_seconds": median,
        "pool_over_accelerated_batches": median["accelerated_batches"] / median["accelerated_pool"],
        "pool_over_plain_batches": median["plain_batches"] / median["accelerated_pool"],
        "identical": {
            "pool_and_accelerated_batches": sum(a == b for a, b in zip(outputs["accelerated_pool"],
                                                                       outputs["accelerated_batches"])),
            "plain_and_accelerated_batches": sum(a == b for a, b in zip(outputs["plain_batches"],
                                                                        outputs["accelerated_batches"])),
        },
    }
    print(json.dumps({k: result[k] for k in ("median_seconds", "pool_over_accelerated_batches",
                                             "pool_over_plain_batches", "identical")}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
