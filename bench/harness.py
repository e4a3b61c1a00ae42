"""What the benchmarks share: how they time their contenders (called in turn, round after round,
so that a neighbour that slows the machine for a while slows each of them alike; then each one's
median and best call), and how they write their results."""

import json
import statistics
import time
from pathlib import Path


def interleaved(contenders: dict, rounds: int, warmup: int = 0) -> dict[str, list[float]]:
    """Seconds of every timed call of each contender (name → function): `warmup` untimed calls
    of each first, then `rounds` rounds in which each is called once, in order."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def alternate(contenders: dict, rounds: int, warmup: int = 1) -> dict:
    """Median and best seconds a call of each contender, over `rounds` interleaved rounds."""
    return {name: {"median": statistics.median(t), "best": min(t)}
            for name, t in interleaved(contenders, rounds, warmup).items()}


def rates(work: float, times: list[float]) -> dict:
    """`work` (tokens, images) a second at the best and at the median of `times`."""
    return {"best": round(work / min(times), 1), "median": round(work / statistics.median(times), 1)}


def speedup(ours: dict, theirs: dict) -> dict:
    """The ratios of two `rates`, at the best and at the median."""
    return {"speedup_best": round(ours["best"] / theirs["best"], 2),
            "speedup_median": round(ours["median"] / theirs["median"], 2)}


def write_results(results: dict, path: Path | str, echo: bool = False) -> None:
    """Write `results` as indented JSON to `path` (its folder made if missing); `echo`: print it too."""
    text = json.dumps(results, indent=2, ensure_ascii=False)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n")
    if echo:
        print(text)
