"""Two `translate train` runs compared at equal target tokens, not at equal steps.

    python bench/translate_equal_tokens.py REFERENCE_RUN RUN

For runs whose batches differ in size (`--batch-tokens`), a step is not the same amount of
training: each evaluation of RUN (eval.csv) is set beside REFERENCE_RUN's validation NLL at the
same number of target tokens seen (metrics.csv), read off REFERENCE_RUN's evaluations by linear
interpolation in log(tokens) between the two around it (its curve is convex: interpolating in
tokens would put it too high). Prints one line per evaluation of RUN: step, tokens, both NLLs and
RUN's minus REFERENCE_RUN's (negative: RUN is ahead).
"""

import math
import sys
from pathlib import Path

from fromscratch.engine.metrics import read_csv


def evaluations(run: Path) -> list[tuple[float, float, int]]:
    """(target tokens seen, validation NLL, step) at each evaluation of `run`."""
    tokens = {int(row["step"]): row["tokens"] for row in read_csv(run / "metrics.csv")}
    return [(tokens[int(row["step"])], row["val_nll"], int(row["step"]))
            for row in read_csv(run / "eval.csv") if int(row["step"]) in tokens]


def nll_at(points: list[tuple[float, float, int]], tokens: float) -> float | None:
    for (t0, v0, _), (t1, v1, _) in zip(points, points[1:]):
        if t0 <= tokens <= t1:
            share = (math.log(tokens) - math.log(t0)) / (math.log(t1) - math.log(t0))
            return v0 + (v1 - v0) * share
    return None  # outside the reference's evaluations


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    reference, run = Path(sys.argv[1]), Path(sys.argv[2])
    points = evaluations(reference)
    print(f"run: {run}\nreference: {reference}")
    print(f"{'step':>6} {'tokens':>8} {'run':>8} {'reference':>10} {'difference':>10}")
    for tokens, nll, step in evaluations(run):
        ref = nll_at(points, tokens)
        ref_text, diff_text = ("–", "–") if ref is None else (f"{ref:.3f}", f"{nll - ref:+.3f}")
        print(f"{step:>6} {tokens / 1e6:>7.2f}M {nll:>8.3f} {ref_text:>10} {diff_text:>10}")


if __name__ == "__main__":
    main()
