"""What `fromscratch.fast.attention.short_attention` buys a training step, on real batches.

    python bench/translate_short_attention.py [--rounds 10] [--out bench/results/translate_short_attention.json]

Builds the CPU recipe's task as `translate train` does (every shared en-id file but opus100-dev,
the joint BPE of 4,000, `slim`, pre-norm, pairs of at most 48 tokens, batches of 1,500 tokens) and
trains it with AdamW, the gradient clipped as the engine does; round after round, 30 steps with
PyTorch's attention kernel then 30 with `short_attention` (the order flips each round), each
round on new batches. Then the same on `bench_transformer.py`'s fixed `base` batch (16 sentences
of 16–32 source and 32 target tokens), 3 steps a turn. Reports each round's ratio (the kernel's
time over `short_attention`'s) and the ratio of the totals, with the CPU's model and vector flags:
run it alone on the machine.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import fromscratch.fast.attention as fast_attention
from fromscratch.devices import describe_device
from fromscratch.transformer import Transformer, TransformerConfig
from fromscratch.transformer.data import load_corpora
from fromscratch.transformer.fast import accelerate
from fromscratch.transformer.tokenizer import BPETokenizer
from fromscratch.transformer.training import LABEL_SMOOTHING, TranslationTask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transformer import batch  # noqa: E402

DATA = Path(os.environ.get("FROMSCRATCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "en-id"
RESULTS = Path(__file__).resolve().parent / "results" / "translate_short_attention.json"
KERNEL, SHORT = 0, fast_attention.MAX_KEYS  # MAX_KEYS 0: no attention is short, every one takes the kernel


def trainer(model: torch.nn.Module):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.98), eps=1e-9, fused=True)

    def step(loss_and_tokens):
        loss, tokens = loss_and_tokens()
        (loss / tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens
    return step


def alternate(run, rounds: int) -> dict:
    """run(round, steps) timed with the kernel and with short_attention, in flipping order."""
    seconds = {KERNEL: [], SHORT: []}
    for r in range(rounds):
        for max_keys in (KERNEL, SHORT) if r % 2 == 0 else (SHORT, KERNEL):
            fast_attention.MAX_KEYS = max_keys
            start = time.perf_counter()
            run(r)
            seconds[max_keys].append(time.perf_counter() - start)
    fast_attention.MAX_KEYS = SHORT
    ratios = [k / s for k, s in zip(seconds[KERNEL], seconds[SHORT])]
    return {"seconds_kernel": seconds[KERNEL], "seconds_short": seconds[SHORT], "ratio_per_round": ratios,
            "ratio_median": statistics.median(ratios), "ratio_of_totals": sum(seconds[KERNEL]) / sum(seconds[SHORT])}


def recipe_tasks(batch_tokens: list[int]) -> list[TranslationTask]:
    """The CPU recipe's task as `translate train` builds it, once for each batch size (the same
    corpus, tokenizer and seed-0 initial weights)."""
    train = load_corpora(sorted(str(p.with_suffix("")) for p in DATA.glob("*.en") if p.stem != "opus100-dev"),
                         log=False)
    valid = load_corpora([str(DATA / "opus100-dev")], log=False)
    tokenizer = BPETokenizer.train(train.src + train.tgt, vocab_size=4000)
    config = TransformerConfig.from_preset("slim", vocab_size=tokenizer.vocab_size, norm_first=True)
    tasks = []
    for size in batch_tokens:
        torch.manual_seed(0)
        tasks.append(TranslationTask(train, valid, tokenizer, config, batch_tokens=size, max_tokens=48, bleu_samples=1))
    return tasks


def recipe_steps(rounds: int, steps: int) -> dict:
    task, = recipe_tasks([1500])
    model = task.model.train()
    step = trainer(model)
    for s in range(1, 21):  # warm-up: allocator, oneDNN's first loss shapes
        step(lambda: task.loss(model, task.global_batch(s)))
    # Both contenders of a round take the same batches (steps 21 + steps·round onwards).
    result = alternate(lambda r: [step(lambda: task.loss(model, task.global_batch(s)))
                                  for s in range(21 + steps * r, 21 + steps * (r + 1))], rounds)
    return {"model": "slim", "batch_tokens": 1500, "max_tokens": 48, "steps_per_turn": steps, **result}


def bench_shape_steps(rounds: int) -> dict:
    config = TransformerConfig.from_preset("base", vocab_size=8000)
    torch.manual_seed(0)
    model = accelerate(Transformer(config)).train()
    step = trainer(model)
    src, tgt_in, target = batch(config, 16, 32, 32, torch.Generator().manual_seed(0))

    def loss():
        return model(src, tgt_in, targets=target, label_smoothing=LABEL_SMOOTHING), (target != config.pad_id).sum()
    for _ in range(2):
        step(loss)
    return {"model": "base", "batch_size": 16, "src_len": 32, "tgt_len": 32, "steps_per_turn": 3,
            **alternate(lambda r: [step(loss) for _ in range(3)], rounds)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30, help="recipe steps per turn")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    load = os.getloadavg()[0]
    results = {"cpu": describe_device("cpu"), "load_average_start": load,
               "recipe": recipe_steps(args.rounds, args.steps), "bench_base": bench_shape_steps(args.rounds),
               "load_average_end": os.getloadavg()[0], "torch": torch.__version__}
    for name in ("recipe", "bench_base"):
        r = results[name]
        print(f"{name}: kernel / short_attention {r['ratio_of_totals']:.3f} (median round {r['ratio_median']:.3f}, "
              f"{min(r['ratio_per_round']):.3f}–{max(r['ratio_per_round']):.3f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
