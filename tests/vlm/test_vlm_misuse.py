"""Misuse of `fromscratch vlm` and its data files gets one line (exit status 2) that names the
problem, the file and the entry, before the long work where it can be known then; and a text too
long for the model is left out of training with a warning, not silently.

One tiny run (two steps on a folder of six images) serves every command; the data are written
per test in tmp_path.
"""

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from fromscratch.cli import main
from fromscratch.errors import UserError
from fromscratch.vlm import sources
from fromscratch.vlm.config import VLMConfig
from fromscratch.vlm.data import load_coco_captions_json, load_vqa_rad_file
from fromscratch.vlm.tokenizer import WordTokenizer
from fromscratch.vlm.training import VLMTask

TINY = ["--preset", "tiny", "--device", "cpu", "--batch-size", 2, "--max-steps", 2, "--eval-every", 2,
        "--save-every", 2]
LONG_QUESTION = "is " + "the " * 60 + "image bright?"  # 63 words: more than the tiny model's 48 positions


def cli(*argv) -> tuple[int, str, str]:
    """`fromscratch ARGV` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(result, *expected: str, stdout: str | None = "") -> None:
    """Status 2 and one line naming `expected`; and, unless stdout is None, that much printed (by
    default nothing: the mistake was found before any work)."""
    code, printed, err = result
    assert code == 2 and stdout in (None, printed), err
    assert err.startswith("fromscratch: error:") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err


def write_vqa(folder: Path, n_images: int = 6, name: str = "trainset.json", changes: dict | None = None) -> Path:
    """A VQA-RAD-style folder: black and white images, two questions on each; `changes` maps an
    entry's index to the fields it gets instead."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for k in range(n_images):
        Image.new("L", (12, 10), 255 * (k % 2)).save(folder / "images" / f"img{k}.png")
        for question in ("is the image bright?", "is this image white?"):
            entries.append({"qid": len(entries), "image_name": f"img{k}.png", "question": question,
                            "answer": "yes" if k % 2 else "no", "answer_type": "CLOSED", "question_type": "COLOR"})
    for i, fields in (changes or {}).items():
        entries[i].update(fields)
    (folder / name).write_text(json.dumps(entries))
    return folder / name


def write_coco(folder: Path, images: list, annotations: list) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for image in images:
        Image.new("RGB", (8, 8)).save(folder / "images" / image["file_name"])
    path = folder / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vlm")
    write_vqa(root / "data")
    code, _, err = cli("vlm", "train", "--data", root / "data", "--out", root / "run", *TINY)
    assert code == 0, err
    return root / "run"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "photo.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    return path


# --- outputs are checked before the work ---------------------------------------------------------


def test_eval_output_is_checked_before_evaluating_and_its_folder_made(run, tmp_path):
    assert_one_line_error(cli("vlm", "eval", "--checkpoint", run, "--data", run.parent / "data",
                              "--output", tmp_path), "--output", "is a directory")
    output = tmp_path / "new" / "metrics.json"
    code, _, err = cli("vlm", "eval", "--checkpoint", run, "--data", run.parent / "data", "--output", output)
    assert code == 0, err
    assert "accuracy" in json.loads(output.read_text())["vqa"]


@pytest.mark.parametrize("path, expected", [("am.txt", "give a .png path"), ("amx", "give a .png path"),
                                            ("folder.png", "is a directory")])
def test_caption_attention_map_must_be_a_png_file(run, image, tmp_path, path, expected):
    (tmp_path / "folder.png").mkdir()
    assert_one_line_error(cli("vlm", "caption", "--checkpoint", run, image, "--attention-map", tmp_path / path),
                          "--attention-map", expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png"]


# --- images ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("verb, extra", [("caption", []), ("ask", ["is it bright?"])])
def test_a_decompression_bomb_or_a_directory_is_not_an_image(run, image, verb, extra, monkeypatch):
    assert_one_line_error(cli("vlm", verb, "--checkpoint", run, image.parent, *extra), "a directory, not an image")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 40×30 = 1,200 pixels > twice that: a "bomb"
    assert_one_line_error(cli("vlm", verb, "--checkpoint", run, image, *extra), str(image), "image too large")


# --- data files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({3: {"question": "  \n "}}, r"trainset\.json entry 3 \(qid 3\): empty question"),
    ({5: {"answer": " "}}, r"trainset\.json entry 5 \(qid 5\): empty answer"),
])
def test_empty_vqa_fields_name_the_entry(tmp_path, changes, message):
    with pytest.raises(UserError, match=message):
        load_vqa_rad_file(write_vqa(tmp_path, 3, changes=changes), size=8)


@pytest.mark.parametrize("images, annotations, message", [
    ([{"id": 1, "file_name": "a.png"}], [], r"captions\.json: no captions"),
    ([{"id": 1, "file_name": "a.png"}], [{"image_id": 1, "caption": " "}], r"annotations\[0\]: empty caption"),
    ([{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}], [{"image_id": 1, "caption": "x"}],
     r"images\[1\]: id 1 is already the id of a\.png"),
])
def test_bad_coco_files_name_the_entry(tmp_path, images, annotations, message):
    with pytest.raises(UserError, match=message):
        load_coco_captions_json(write_coco(tmp_path, images, annotations), tmp_path / "images", size=8)


def test_eval_on_an_empty_test_file_names_it(run, tmp_path):
    empty = tmp_path / "testset.json"
    empty.write_text("[]")
    assert_one_line_error(cli("vlm", "eval", "--checkpoint", run, "--data", run.parent / "data", "--test", empty),
                          f"{empty}: no questions")
    captions = write_coco(tmp_path / "coco", [{"id": 1, "file_name": "a.png"}], [])
    assert_one_line_error(cli("vlm", "eval", "--checkpoint", run, "--data", captions.parent, "--test", captions),
                          f"{captions}: no captions")


def test_eval_names_a_question_too_long_for_the_model(run, tmp_path):
    test_file = write_vqa(tmp_path, 2, "testset.json", {1: {"question": LONG_QUESTION}})
    assert_one_line_error(cli("vlm", "eval", "--checkpoint", run, "--data", run.parent / "data", "--test", test_file),
                          "testset.json[1]: the question is 64 tokens long", "48 text positions",
                          stdout="vqa-rad-testset: 2 images, 4 questions, 0 captions\n")  # no answers yet


# --- training --------------------------------------------------------------------------------------


def test_texts_too_long_for_the_model_are_left_out_with_a_warning(tmp_path, caplog):
    write_vqa(tmp_path / "data", 10, changes={2 * k: {"question": LONG_QUESTION} for k in range(10)})
    train, val = (sources.load_part(str(tmp_path / "data"), part, 32, 3) for part in ("train", "val"))
    assert (train.name, val.name) == ("data-train", "data-val")  # the folder's name, not "vqa-rad"
    tokenizer = WordTokenizer.train([t for e in train.questions for t in (e.question, e.answer)])
    config = VLMConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)
    with caplog.at_level(logging.WARNING, logger="fromscratch.vlm.training"):
        task = VLMTask(config, tokenizer, train, val, 2, 2, 0, {"max_answer_tokens": 2})
    assert caplog.messages == [f"data-{part}: {n} of {2 * n} questions and 0 of 0 captions are longer than the "
                               "model's 48 text positions: left out" for part, n in (("train", 9), ("val", 1))]
    assert sum(len(questions) for _, questions in task.train_texts) == 9 and len(task.val_questions) == 1


def test_training_data_without_texts_in_the_training_part(tmp_path):
    write_vqa(tmp_path / "one", 1)  # its one image is the validation part
    assert_one_line_error(cli("vlm", "train", "--data", tmp_path / "one", "--out", tmp_path / "run", *TINY),
                          "one-train: no captions or questions at all in the training part (0 images")
    assert_one_line_error(cli("vlm", "train", "--data", "scenes", "--scenes", 0, "--out", tmp_path / "run"),
                          "--scenes must be at least 10, got 0")
    assert not (tmp_path / "run").exists()
