"""The VLM README's results table: train on each dataset, evaluate on its test split, record the
times. Run alone on a quiet machine (each training takes many minutes; see the README):

    python bench/vlm_results.py                         # every experiment
    python bench/vlm_results.py easy-vqa scenes         # some of them
    python bench/vlm_results.py --quick --results /tmp/q  # a smoke run: tiny models, a few steps
    python bench/vlm_results.py --device cuda           # the same commands on a GPU (bench/gpu_run.sh)
    VQA_RAD_TEST=path/to/testset.json python bench/vlm_results.py vqa-rad   # VQA-RAD's held-out test file

Each experiment is exactly the commands the README shows (`fromscratch vlm train` then
`fromscratch vlm eval`), run as subprocesses with 2 threads. For experiment NAME everything lands
in bench/results/vlm_NAME/: run/ (the training run), train.log, eval.txt (what eval printed),
eval.json (every metric), result.json (the commands, wall and CPU seconds of training and
evaluation, the load average, the headline numbers).

    easy-vqa         easy-VQA, test split (accuracy by question type, shuffled images)
    scenes           our scenes: captions (CIDEr, seen / unseen combinations), VQA, retrieval,
                     zero-shot digits
    vqa-rad          VQA-RAD: the test file in $VQA_RAD_TEST if set, else the val part of trainset.json
    vqa-rad-blind    the question-only baseline of VQA-RAD (every image black)
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
EXPERIMENTS = {
    "easy-vqa": (["--data", "easy-vqa"], ["--data", "easy-vqa"]),
    "scenes": (["--data", "scenes"], ["--data", "scenes"]),
    "vqa-rad": (["--data", "vqa-rad"], ["--data", "vqa-rad"]),
    "vqa-rad-blind": (["--data", "vqa-rad", "--blind"], ["--data", "vqa-rad"]),
}
QUICK = {  # a smoke run: the same pipeline, a tiny model, a few steps
    "train": ["--preset", "tiny", "--max-steps", "4", "--eval-every", "2", "--save-every", "4", "--batch-size", "4"],
    "scenes": ["--scenes", "40"],
    "eval": ["--limit", "20"],
}


def run(command: list[str], log: Path, env: dict) -> dict:
    """Run `command`, its output (stdout and stderr) into `log`; its wall and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        sys.exit(f"{' '.join(command)} failed (exit {code}); see {log}")
    return {"command": command, "wall_seconds": time.perf_counter() - started,
            "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def experiment(name: str, quick: bool, env: dict, results: Path = RESULTS, device: str = "cpu") -> dict:
    train_flags, eval_flags = EXPERIMENTS[name]
    out = results / f"vlm_{name}"
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    fromscratch = [sys.executable, "-m", "fromscratch", "vlm"]
    train = [*fromscratch, "train", *train_flags, "--out", str(run_dir), "--device", device]
    evaluate = [*fromscratch, "eval", "--checkpoint", str(run_dir), *eval_flags, "--output", str(out / "eval.json"),
                "--device", device]
    if quick:
        train += QUICK["train"] + (QUICK["scenes"] if name == "scenes" else [])
        evaluate += QUICK["eval"]
    if name.startswith("vqa-rad") and os.environ.get("VQA_RAD_TEST"):
        evaluate += ["--test", os.environ["VQA_RAD_TEST"]]
    if (run_dir / "checkpoints.json").exists():
        train.append("--resume")  # a run cut short: continue it (a finished one returns at once)
    load = os.getloadavg()[0]
    record = {"experiment": name, "device": device, "load_average_before": load,
              "train": run(train, out / "train.log", env)}
    record["eval"] = run(evaluate, out / "eval.txt", env)
    record["load_average_after"] = os.getloadavg()[0]
    record["last_line"] = (out / "eval.txt").read_text().strip().splitlines()[-1]
    metrics = json.loads((out / "eval.json").read_text())
    if "vqa" in metrics:
        record["accuracy"] = metrics["vqa"]["accuracy"]
        record["shuffled_accuracy"] = metrics["vqa"].get("shuffled_accuracy")
    if "captions" in metrics:
        record["cider"], record["bleu4"] = metrics["captions"]["cider"], metrics["captions"]["bleu4"]
    (out / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{name}: {record['last_line']} (training {record['train']['wall_seconds'] / 60:.1f} min wall, "
          f"{record['train']['cpu_seconds'] / 60:.1f} min CPU); {out}", flush=True)
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="*", metavar="NAME",
                        help=f"some of {', '.join(EXPERIMENTS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps: a smoke run")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where vlm_NAME/ go (default: bench/results)")
    parser.add_argument("--device", default="cpu", help="cpu (the README's times) or cuda (bench/gpu_run.sh)")
    args = parser.parse_args()
    unknown = sorted(set(args.experiments) - set(EXPERIMENTS))
    if unknown:
        parser.error(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1"}
    env.setdefault("FROMSCRATCH_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    for name in args.experiments or list(EXPERIMENTS):
        experiment(name, args.quick, env, args.results, args.device)


if __name__ == "__main__":
    main()
