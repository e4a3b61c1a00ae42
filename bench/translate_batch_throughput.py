"""Training throughput of the CPU recipe at several batch sizes, on real batches.

    python bench/translate_batch_throughput.py [--sizes 1000 1500 2000 3000] [--rounds 8] [--steps 20]

Builds the recipe's task once per `--batch-tokens` size (`translate_short_attention.recipe_tasks`)
and trains each with AdamW, the gradient clipped as the engine does; round after round, `--steps`
steps of each size in turn (the order flips each round, each round on new batches). Reports
target tokens per second, seconds per step and target tokens per step for each size. Tokens per
second is what an hour of `translate train` turns into training; what each token buys at a size
is for `translate_equal_tokens.py` to say. Run it alone on the machine.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fromscratch.devices import describe_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from translate_short_attention import recipe_tasks, trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 1500, 2000, 3000])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="steps of one size per turn")
    parser.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    runs = {}
    for size, task in zip(args.sizes, recipe_tasks(args.sizes)):
        model = task.model.train()
        step = trainer(model)

        def run(first: int, task=task, model=model, step=step) -> int:
            return sum(int(step(lambda s=s: task.loss(model, task.global_batch(s))))
                       for s in range(first, first + args.steps))
        run(1)  # warm-up: allocator, oneDNN's first loss shapes
        runs[size] = run
    seconds, tokens = dict.fromkeys(args.sizes, 0.0), dict.fromkeys(args.sizes, 0)
    for r in range(args.rounds):
        for size in args.sizes if r % 2 == 0 else args.sizes[::-1]:
            start = time.perf_counter()
            tokens[size] += runs[size](1 + args.steps * (r + 1))
            seconds[size] += time.perf_counter() - start
    steps = args.rounds * args.steps
    sizes = {size: {"target_tokens_per_second": tokens[size] / seconds[size],
                    "seconds_per_step": seconds[size] / steps, "target_tokens_per_step": tokens[size] / steps}
             for size in args.sizes}
    results = {"hardware": describe_device("cpu"), "torch": torch.__version__, "rounds": args.rounds,
               "steps_per_turn": args.steps, "sizes": sizes}
    for size, r in results["sizes"].items():
        print(f"--batch-tokens {size}: {r['target_tokens_per_second']:,.0f} target tokens/s, "
              f"{r['seconds_per_step']:.3f} s a step, {r['target_tokens_per_step']:,.0f} target tokens a step")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
