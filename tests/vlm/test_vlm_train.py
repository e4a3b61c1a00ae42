"""`fromscratch vlm train | eval | caption | ask` end to end, through the command line, on real data.

A tiny VLM trains on generated scenes (MNIST digits) and must learn; one trains on easy-VQA and
must answer far better than by always saying the most common answer; a run killed with SIGKILL
and resumed must end bit for bit where an uninterrupted run ends; bad arguments and missing or
broken images fail at once with one line.
"""

import contextlib
import csv
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import kill_resume_and_compare_logs
from PIL import Image

from fromscratch.cli import main
from fromscratch.vlm import VLM
from fromscratch.vlm import sources
from fromscratch.vlm.evaluation import derangement

TINY = ["--preset", "tiny", "--device", "cpu", "--warmup-steps", "10", "--lr", "3e-3"]


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse: --help, or a malformed command line
            code = e.code
    return code, out.getvalue(), err.getvalue()


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(autouse=True)
def data_folder(shared_data, monkeypatch):
    monkeypatch.setenv("FROMSCRATCH_DATA", str(shared_data))
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def scenes_run(shared_data, tmp_path_factory):
    """`vlm train --data scenes` for 80 steps of 16 scenes: (run dir, stdout)."""
    import os

    os.environ["FROMSCRATCH_DATA"] = str(shared_data)
    run_dir = tmp_path_factory.mktemp("runs") / "scenes"
    code, out, err = cli("vlm", "train", "--data", "scenes", "--scenes", 400, "--out", run_dir, *TINY,
                         "--batch-size", 16, "--max-steps", 80, "--eval-every", 40, "--save-every", 40)
    assert code == 0, err
    return run_dir, out


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory, shared_data):
    """Three test scenes as PNG files, and the scenes themselves."""
    import os

    os.environ["FROMSCRATCH_DATA"] = str(shared_data)
    folder = tmp_path_factory.mktemp("images")
    split = sources.load_part("scenes", "test", 32, 3, scenes={**sources.SCENE_DEFAULTS, "n_test": 3})
    paths = []
    for k in range(3):
        paths.append(folder / f"scene{k}.png")
        Image.fromarray(split.images[k].permute(1, 2, 0).numpy()).save(paths[-1])
    return paths, split


# --- training learns and leaves a complete run ---------------------------------------------------


def test_scenes_training_learns_and_leaves_a_complete_run(scenes_run):
    run_dir, out = scenes_run
    for name in ("checkpoints.json", "metrics.csv", "eval.csv", "run.json", "model_config.json", "tokenizer.json",
                 "task.json"):
        assert (run_dir / name).is_file(), name
    steps, evals = read_csv(run_dir / "metrics.csv"), read_csv(run_dir / "eval.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 81)) and [int(r["step"]) for r in evals] == [40, 80]
    model = VLM.from_pretrained(run_dir)
    vocab = model.config.vocab_size
    # untrained, the decoder predicts about uniformly: log(vocab) nats per token
    assert float(evals[-1]["val_caption_nll"]) < 0.5 * math.log(vocab), evals
    assert float(evals[-1]["val_contrastive"]) < float(evals[0]["val_contrastive"]) < math.log(64)
    task = json.loads((run_dir / "task.json").read_text())
    assert task["data"] == "scenes" and task["scenes"]["n_train"] == 400 and task["max_answer_tokens"] >= 2
    assert json.loads(out.strip().splitlines()[-1])["step"] == 80
    assert model.tokenizer.vocab_size == vocab and model.settings == task


def test_eval_prints_every_metric_and_ends_with_cider(scenes_run, tmp_path):
    run_dir, _ = scenes_run
    code, out, err = cli("vlm", "eval", "--checkpoint", run_dir, "--data", "scenes", "--output", tmp_path / "m.json",
                         "--limit", 300)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("scenes-test: 300 images")
    text = "\n".join(lines)
    for expected in ("accuracy by question type: colour", "accuracy by combination unseen in training",
                     "accuracy with the images shuffled among the questions", "captions: BLEU-4",
                     "image_to_text_R@1", "zero-shot digits by text prompts alone"):
        assert expected in text, expected
    report = json.loads((tmp_path / "m.json").read_text())
    assert lines[-1] == f"CIDEr {100 * report['captions']['cider']:.2f}"
    assert set(report["vqa"]["by_question_type"]) == {"colour", "shape", "count", "position", "relation", "digit"}
    # after 80 tiny steps the model already answers the count questions far above chance (1 in 5)
    assert report["vqa"]["by_question_type"]["count"]["accuracy"] > 0.3


def test_caption_and_ask_image_files(scenes_run, scene_files, tmp_path):
    run_dir, _ = scenes_run
    paths, split = scene_files
    model = VLM.from_pretrained(run_dir)
    code, out, err = cli("vlm", "caption", "--checkpoint", run_dir, *paths, "--attention-map", tmp_path / "att.png")
    assert code == 0, err
    expected = model.caption(split.images, 1, model.settings["max_caption_tokens"])
    assert out.splitlines() == [f"{p}\t{c}" for p, c in zip(paths, expected)]
    assert (tmp_path / "att.png").stat().st_size > 1000
    code, out, err = cli("vlm", "caption", "--checkpoint", run_dir, paths[0], "--beam", 3)
    assert code == 0, err
    assert out.strip() == model.caption(split.images[:1], 3, model.settings["max_caption_tokens"])[0]
    question = "how many objects are there?"
    code, out, err = cli("vlm", "ask", "--checkpoint", run_dir, paths[1], question)
    assert code == 0, err
    assert out.strip() == model.answer(split.images[1:2], [question], model.settings["max_answer_tokens"])[0]


@pytest.mark.parametrize("verb", ["caption", "ask"])
def test_missing_or_broken_images_fail_in_one_line(scenes_run, tmp_path, verb):
    run_dir, _ = scenes_run
    (tmp_path / "broken.png").write_bytes(b"not a png")
    extra = ["what color is it?"] if verb == "ask" else []
    for image, message in ((tmp_path / "missing.png", "missing.png: image not found"),
                           (tmp_path / "broken.png", "broken.png: not a readable image")):
        code, out, err = cli("vlm", verb, "--checkpoint", run_dir, image, *extra)
        assert code == 2 and out == ""
        assert err.startswith("fromscratch: error:") and err.count("\n") == 1 and message in err, err


# --- easy-VQA: real data, and the question-only baseline -------------------------------------------


@pytest.mark.slow  # ~40 s on two cores: easy-VQA's 40k questions, 100 steps
def test_easy_vqa_learns_and_looks_at_the_image(tmp_path):
    code, _, err = cli("vlm", "train", "--out", tmp_path / "easy", "--data", "easy-vqa", *TINY, "--batch-size", 32,
                       "--max-steps", 100, "--eval-every", 100, "--save-every", 100)
    assert code == 0, err
    code, out, err = cli("vlm", "eval", "--checkpoint", tmp_path / "easy", "--data", "easy-vqa", "--limit", 200,
                         "--output", tmp_path / "easy.json")
    assert code == 0, err
    report = json.loads((tmp_path / "easy.json").read_text())["vqa"]
    assert out.strip().splitlines()[-1] == f"accuracy {100 * report['accuracy']:.2f}"
    # the most common answer of each question type scores about 0.43 (yes/no: 74% of the questions, half right)
    assert report["accuracy"] > 0.6, report
    assert report["shuffled_accuracy"] < report["accuracy"] - 0.05  # it looks at the image


# --- a VQA-RAD-format folder and --test FILE --------------------------------------------------------


def write_vqa_folder(folder: Path, n_images: int = 12, name: str = "trainset.json") -> Path:
    """Images that are black or white, and questions whose answer is their brightness."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for k in range(n_images):
        colour = 255 * (k % 2)
        Image.new("L", (40, 30), colour).save(folder / "images" / f"img{k}.jpg")
        for q in ("is the image bright?", "is this image white?"):
            entries.append({"qid": len(entries), "image_name": f"img{k}.jpg", "image_organ": "CHEST", "question": q,
                            "answer": "Yes" if colour else "No", "answer_type": "CLOSED", "question_type": "COLOR",
                            "phrase_type": "freeform"})
    (folder / name).write_text(json.dumps(entries))
    return folder / name


def test_a_vqa_rad_format_folder_trains_and_evaluates_on_a_test_file(tmp_path):
    write_vqa_folder(tmp_path / "data", 40)
    test_file = write_vqa_folder(tmp_path / "held-out", 6, "testset.json")
    common = ["--data", tmp_path / "data", *TINY, "--max-steps", 30, "--batch-size", 8, "--eval-every", 30,
              "--save-every", 30]
    evaluate = ["vlm", "eval", "--data", tmp_path / "data", "--test", test_file]
    code, _, err = cli("vlm", "train", "--out", tmp_path / "run", *common)
    assert code == 0, err
    code, out, err = cli(*evaluate, "--checkpoint", tmp_path / "run")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("vqa-rad-testset: 6 images, 12 questions")
    assert "accuracy by answer type: closed" in out and lines[-1].startswith("accuracy ")
    assert float(lines[-1].split()[1]) == 100.0  # brightness is easy to read off the image
    # with the images deranged, a question is answered right when its new image is as bright as its own
    shuffle = derangement(6)
    same = float(np.mean(shuffle % 2 == np.arange(6) % 2))
    assert f"shuffled among the questions {100 * same:.2f} " in out and same < 1

    # the question-only baseline sees black images only, in training and in evaluation
    code, _, err = cli("vlm", "train", "--out", tmp_path / "blind", "--blind", *common)
    assert code == 0, err
    model = VLM.from_pretrained(tmp_path / "blind")
    assert model.settings["blind"] is True
    code, out, err = cli(*evaluate, "--checkpoint", tmp_path / "blind")
    assert code == 0, err
    assert "question-only model" in out and "the image's share: 0.00 points" in out
    assert float(out.strip().splitlines()[-1].split()[1]) == 50.0  # the same answer for bright and dark


def test_blind_batches_hold_black_images_only(tmp_path):
    from fromscratch.vlm.config import VLMConfig
    from fromscratch.vlm.tokenizer import WordTokenizer
    from fromscratch.vlm.training import VLMTask

    write_vqa_folder(tmp_path / "data", 8)
    split = sources.load_part(str(tmp_path / "data"), "train", 32, 3)
    tokenizer = WordTokenizer.train([t for e in split.questions for t in (e.question, e.answer)])
    config = VLMConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)
    for blind in (False, True):
        task = VLMTask(config, tokenizer, split, split, 4, 2, 0, {"blind": blind, "max_answer_tokens": 2})
        batch = task.global_batch(1)
        assert batch["images"].shape == (4, 3, 32, 32) and bool(batch["images"].any()) is not blind
        assert torch.equal(batch["tokens"], task.global_batch(1)["tokens"])  # a pure function of the step


# --- kill -9 at a random step, then --resume: bit for bit the uninterrupted run ----------------------


@pytest.mark.slow  # ~25 s: three processes start, two side by side
def test_kill_9_then_resume_is_bit_identical_to_an_uninterrupted_run(shared_data, tmp_path, monkeypatch):
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    def command(out: Path, *extra) -> list[str]:
        return [sys.executable, "-m", "fromscratch", "vlm", "train", "--data", "scenes", "--scenes", 200,
                "--out", str(out), *map(str, TINY), "--batch-size", "8", "--max-steps", "60", "--save-every", "10",
                "--eval-every", "30", "--seed", "5", *extra]

    kill_resume_and_compare_logs(lambda out, *extra: [str(a) for a in command(out, *extra)], straight, killed,
                                 max_steps=60, steps=(11, 55))
    a, b = VLM.from_pretrained(straight).state_dict(), VLM.from_pretrained(killed).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


# --- bad arguments fail at once, with status 2 and one line, having done nothing ---------------------


@pytest.mark.parametrize("flags, expected", [
    (["--data", "coco"], "--data coco: no such folder, nor one of easy-vqa, vqa-rad, scenes"),
    (["--data", "easy-vqa", "--scenes", "100"], "--scenes N (at least 10) is for --data scenes"),
    (["--data", "scenes", "--resume"], "holds no checkpoint to resume from"),
    (["--data", "scenes", "--batch-size", "6", "--grad-accum", "4"], "not divisible"),
    (["--data", "scenes", "--texts-per-image", "0"], "--texts-per-image must be at least 1"),
], ids=["unknown-data", "scenes-flag", "resume-nothing", "batch-split", "texts-per-image"])
def test_bad_train_arguments_fail_before_any_work(tmp_path, flags, expected):
    out = tmp_path / "new-run"
    code, stdout, stderr = cli("vlm", "train", "--out", out, "--max-steps", 5, *flags)
    assert code == 2 and stdout == ""
    assert stderr.startswith("fromscratch: error:") and stderr.count("\n") == 1 and expected in stderr, stderr
    assert not out.exists()


def test_bad_resume_and_eval_arguments_leave_the_run_untouched(scenes_run, tmp_path):
    run_dir, _ = scenes_run
    before = {str(p): p.stat().st_mtime_ns for p in sorted(run_dir.rglob("*"))}
    for argv, expected in [
        (["vlm", "train", "--data", "scenes", "--out", run_dir, "--max-steps", 90], "already holds a run"),
        (["vlm", "train", "--data", "scenes", "--scenes", 500, "--out", run_dir, *TINY, "--batch-size", 16,
          "--max-steps", 90, "--resume"], "'n_train': 400"),
        (["vlm", "eval", "--checkpoint", run_dir, "--data", "easy-vqa", "--test", "x.json"], "--test is for VQA-RAD"),
        (["vlm", "caption", "--checkpoint", run_dir, "x.png", "--beam", 0], "--beam must be at least 1"),
        (["vlm", "eval", "--checkpoint", tmp_path / "nothing", "--data", "scenes"], "no such file or directory"),
    ]:
        code, stdout, stderr = cli(*argv)
        assert code == 2 and stdout == "", stderr
        assert stderr.count("\n") == 1 and expected in stderr, stderr
    assert {str(p): p.stat().st_mtime_ns for p in sorted(run_dir.rglob("*"))} == before


def test_help_lists_the_flags():
    code, out, _ = cli("vlm", "train", "--help")
    assert code == 0
    for flag in ("--data", "--out", "--preset", "--max-steps", "--seed", "--resume", "--blind", "--texts-per-image"):
        assert flag in out, flag
    for verb in ("eval", "caption", "ask"):
        assert cli("vlm", verb, "--help")[0] == 0

