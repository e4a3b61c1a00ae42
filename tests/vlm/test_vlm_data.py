"""VLM data: easy-VQA and VQA-RAD on the real data, COCO / VQAv2 schemas on local files, bad files,
image decoding and caching, and the VQA accuracy metric."""

import json
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from fromscratch.errors import UserError
from fromscratch.vlm import data
from fromscratch.vlm.data import (
    VQAExample,
    captions_from_hf,
    easy_vqa_question_type,
    image_to_array,
    load_coco_captions_json,
    load_easy_vqa,
    load_hub_dataset,
    load_hub_vqa,
    load_images,
    load_vqa_rad,
    load_vqa_rad_file,
    split_by_image,
    vqa_from_hf,
)
from fromscratch.vlm.metrics import accuracy_report, exact_match, normalize_vqa_answer, vqa_accuracy

# --- easy-VQA --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def easy_vqa_splits():
    return {split: load_easy_vqa(split) for split in ("train", "test")}


@pytest.mark.parametrize("split, n_images, n_questions", [("train", 4000, 38575), ("test", 1000, 9673)])
def test_easy_vqa_has_the_published_sizes(easy_vqa_splits, split, n_images, n_questions):
    dataset = easy_vqa_splits[split]
    assert dataset.images.shape == (n_images, 3, 64, 64) and dataset.images.dtype == torch.uint8
    assert len(dataset) == n_questions
    assert len(dataset.answer_vocabulary()) == 13
    image, example = dataset[5]
    assert torch.equal(image, dataset.images[example.image])


def test_easy_vqa_question_types_agree_with_the_answers(easy_vqa_splits):
    colours = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
    answers_of = {"colour": colours, "shape": {"circle", "rectangle", "triangle"}, "yes/no": {"yes", "no"}}
    for dataset in easy_vqa_splits.values():
        for example in dataset.examples:
            assert example.answer in answers_of[example.question_type], example
        assert set(dataset.counts()) == {"colour", "shape", "yes/no"}
    assert easy_vqa_question_type("What is the color of the shape?") == "colour"
    assert easy_vqa_question_type("what is the blue shape?") == "shape"
    assert easy_vqa_question_type("does the image not contain a circle?") == "yes/no"


def test_easy_vqa_grayscale_and_bad_split():
    assert load_easy_vqa("test", size=32, channels=1).images.shape == (1000, 1, 32, 32)
    with pytest.raises(UserError, match="train and test"):
        load_easy_vqa("validation")


def test_easy_vqa_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "easy_vqa", None)
    with pytest.raises(UserError, match="pip install easy-vqa"):
        load_easy_vqa()


# --- VQA-RAD ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vqa_rad_dir(shared_data):
    return shared_data / "vqa-rad"


def test_vqa_rad_splits_by_image_deterministically(vqa_rad_dir):
    train = load_vqa_rad(vqa_rad_dir, "train", size=32)
    val = load_vqa_rad(vqa_rad_dir, "val", size=32)
    assert len(train) + len(val) == 3064
    assert not set(train.image_names) & set(val.image_names)
    assert len(train.image_names) + len(val.image_names) == 314
    assert len(val.image_names) == round(0.1 * 314)
    assert train.images.shape == (len(train.image_names), 3, 32, 32)
    assert load_vqa_rad(vqa_rad_dir, "val", size=32).examples == val.examples
    assert set(load_vqa_rad(vqa_rad_dir, "val", seed=1, size=32).image_names) != set(val.image_names)


def test_vqa_rad_answers_and_types_are_normalised(vqa_rad_dir):
    dataset = load_vqa_rad_file(vqa_rad_dir / "trainset.json", size=16, channels=1)
    assert len(dataset) == 3064 and dataset.images.shape == (314, 1, 16, 16)
    assert set(dataset.counts("answer_type")) == {"closed", "open"}  # two entries say "CLOSED "
    assert all(e.answer == e.answer.strip().lower() for e in dataset.examples)
    first = dataset.examples[0]
    assert (first.question, first.answer, first.question_type) == ("Are regions of the brain infarcted?", "yes", "PRES")
    assert dataset.image_names[first.image] == "synpic54610.jpg"
    assert "4" in dataset.answer_vocabulary()  # the integer answers become text


def test_vqa_rad_test_file_of_the_same_format(vqa_rad_dir, tmp_path):
    entries = json.loads((vqa_rad_dir / "trainset.json").read_text())[:5]
    test_file = tmp_path / "testset.json"
    test_file.write_text(json.dumps(entries))
    dataset = load_vqa_rad_file(test_file, vqa_rad_dir / "images", size=24)
    assert [e.question for e in dataset.examples] == [e["question"] for e in entries]
    assert dataset.examples[2].source == "testset.json[2]"


def test_vqa_rad_folder_from_the_environment(vqa_rad_dir, monkeypatch):
    monkeypatch.setenv("FROMSCRATCH_DATA", str(vqa_rad_dir.parent))
    assert len(load_vqa_rad(split="val", size=8)) > 0
    monkeypatch.delenv("FROMSCRATCH_DATA")
    with pytest.raises(UserError, match="FROMSCRATCH_DATA"):
        load_vqa_rad()


def test_vqa_rad_bad_arguments(vqa_rad_dir, tmp_path):
    with pytest.raises(UserError, match="not 'test'"):
        load_vqa_rad(vqa_rad_dir, "test")
    with pytest.raises(UserError, match="val_fraction"):
        load_vqa_rad(vqa_rad_dir, val_fraction=1.5)
    with pytest.raises(UserError, match="no such folder"):
        load_vqa_rad(tmp_path / "nowhere")
    with pytest.raises(UserError, match="channels must be 1"):
        load_vqa_rad(vqa_rad_dir, "val", channels=2)


GOOD_ENTRY = {"qid": 7, "image_name": "x.png", "image_organ": "HEAD", "question": "Is this an MRI?",
              "answer": "Yes", "answer_type": "CLOSED", "question_type": "MODALITY", "phrase_type": "freeform"}


@pytest.mark.parametrize("content, message", [
    ("[{\"qid\": 1,", r"testset\.json: not valid JSON \(line 1"),
    (json.dumps({"qid": 1}), "expected a JSON list"),
    (json.dumps([GOOD_ENTRY, "oops"]), r"testset\.json entry 1: expected an object"),
    (json.dumps([{k: v for k, v in GOOD_ENTRY.items() if k != "answer"}]),
     r"entry 0 \(qid 7\): missing field 'answer'"),
    (json.dumps([{**GOOD_ENTRY, "question": 3}]), "field 'question' should be str, not int"),
    (json.dumps([{**GOOD_ENTRY, "image_name": "missing.png"}]), r"images/missing\.png not found"),
    (json.dumps([{**GOOD_ENTRY, "image_name": "broken.png"}]), r"broken\.png: not a readable image"),
])
def test_vqa_rad_bad_files_name_the_file_and_entry(tmp_path, content, message):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (10, 10)).save(tmp_path / "images" / "x.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "testset.json").write_text(content)
    with pytest.raises(UserError, match=message):
        load_vqa_rad_file(tmp_path / "testset.json", size=8)


def test_vqa_rad_missing_file_and_image_folder(tmp_path):
    with pytest.raises(UserError, match="no such image folder"):
        load_vqa_rad_file(tmp_path / "testset.json")
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match=r"testset\.json: no such file"):
        load_vqa_rad_file(tmp_path / "testset.json")


def test_split_by_image_keeps_an_image_on_its_side_when_others_are_added():
    names = [f"img{i}.jpg" for i in range(100)]
    val = split_by_image(names, 0.2, seed=3)
    assert len(val) == 20
    grown = split_by_image(names + [f"new{i}.jpg" for i in range(100)], 0.2, seed=3)
    assert len(val - grown) < 10  # most keep their side; the count of val images grows to 40


# --- images ----------------------------------------------------------------------------------


def test_image_to_array_pads_to_a_square_and_sets_the_channels():
    tall = Image.new("L", (10, 20), color=255)  # 10 wide, 20 high
    array = image_to_array(tall, 20, channels=3)
    assert array.shape == (3, 20, 20) and array.dtype == np.uint8
    assert (array[:, :, :5] == 0).all() and (array[:, :, 5:15] == 255).all()  # black bars left and right
    assert (array[0] == array[1]).all() and (array[1] == array[2]).all()  # grayscale copied to RGB
    assert image_to_array(Image.new("RGB", (64, 48), (200, 0, 0)), 32, channels=1).shape == (1, 32, 32)


def test_image_cache_is_written_once_and_read_back(tmp_path, monkeypatch):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (30, 30), (i * 50, 0, 0)).save(paths[-1])
    first = load_images(paths, 16, 3, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1

    def no_decoding(*args):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(data, "_decode", no_decoding)
    assert torch.equal(load_images(paths, 16, 3, cache_dir=tmp_path / "cache"), first)
    with pytest.raises(AssertionError, match="decoded although cached"):  # another size: another cache
        load_images(paths, 8, 3, cache_dir=tmp_path / "cache")


def test_a_broken_cache_is_rebuilt_and_an_unwritable_one_named(tmp_path, caplog):
    Image.new("RGB", (30, 30), (1, 2, 3)).save(tmp_path / "a.png")
    first = load_images([tmp_path / "a.png"], 8, 3, cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").glob("*.npy")
    cache_file.write_bytes(b"junk")
    assert torch.equal(load_images([tmp_path / "a.png"], 8, 3, cache_dir=tmp_path / "cache"), first)
    assert "unreadable image cache" in caplog.text
    (tmp_path / "not-a-folder").write_text("")
    with pytest.raises(UserError, match="cannot write the image cache"):
        load_images([tmp_path / "a.png"], 8, 3, cache_dir=tmp_path / "not-a-folder")


def test_vqa_rad_cache_gives_the_same_images(vqa_rad_dir, tmp_path):
    decoded = load_vqa_rad(vqa_rad_dir, "val", size=24, cache_dir=tmp_path)
    cached = load_vqa_rad(vqa_rad_dir, "val", size=24, cache_dir=tmp_path)
    assert torch.equal(decoded.images, cached.images)


# --- COCO captions ---------------------------------------------------------------------------


def write_coco(tmp_path, annotations=None, images=None):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    for name, colour in [("a.png", (255, 0, 0)), ("b.png", (0, 255, 0)), ("c.png", (0, 0, 255))]:
        Image.new("RGB", (40, 30), colour).save(tmp_path / "imgs" / name)
    images = images if images is not None else [{"id": 5, "file_name": "a.png"}, {"id": 9, "file_name": "b.png"},
                                                {"id": 2, "file_name": "c.png"}]
    annotations = annotations if annotations is not None else [
        {"image_id": 9, "id": 1, "caption": "A green  square."},
        {"image_id": 5, "id": 2, "caption": "A red box"},
        {"image_id": 9, "id": 3, "caption": "green everywhere"},
    ]
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_coco_captions_json_groups_captions_by_image(tmp_path):
    dataset = load_coco_captions_json(write_coco(tmp_path), tmp_path / "imgs", size=16)
    assert dataset.image_names == ["a.png", "b.png"]  # c.png has no caption
    assert [e.captions for e in dataset.examples] == [("A red box",), ("A green square.", "green everywhere")]
    image, example = dataset[1]
    assert image.shape == (3, 16, 16) and image[1, 8, 8] == 255 and image[0, 8, 8] == 0
    assert (image[:, 0, :] == 0).all()  # 40×30 padded to a square: black band at the top
    assert len(load_coco_captions_json(write_coco(tmp_path), tmp_path / "imgs", size=16, limit=1)) == 1


@pytest.mark.parametrize("annotations, images, message", [
    ([{"image_id": 77, "caption": "x"}], None, r"annotations\[0\]: image_id 77 is not in 'images'"),
    ([{"image_id": 5, "caption": ["x"]}], None, r"annotations\[0\]: field 'caption' should be str, not list"),
    ([{"caption": "x"}], None, r"annotations\[0\]: missing field 'image_id'"),
    ([], [{"id": 1}], r"images\[0\]: missing field 'file_name'"),
    ([{"image_id": 1, "caption": "x"}], [{"id": 1, "file_name": "gone.png"}], r"gone\.png not found"),
])
def test_coco_captions_json_bad_entries_name_the_file(tmp_path, annotations, images, message):
    path = write_coco(tmp_path, annotations, images)
    with pytest.raises(UserError, match=message) as error:
        load_coco_captions_json(path, tmp_path / "imgs")
    assert str(path) in str(error.value)


def test_coco_captions_json_not_an_object(tmp_path):
    (tmp_path / "c.json").write_text("[]")
    with pytest.raises(UserError, match=r"c\.json: expected a JSON object"):
        load_coco_captions_json(tmp_path / "c.json", tmp_path)


# --- the hub schemas, on local datasets -------------------------------------------------------


def pil(colour, size=(20, 20)):
    return Image.new("RGB", size, colour)


def test_captions_from_hf_reads_the_karpathy_schemas(tmp_path):
    with_pixels = datasets.Dataset.from_dict({
        "image": [pil((255, 0, 0)), pil((0, 0, 255))],
        "sentences": [["a red picture", "all red"], ["blue"]],
    })
    dataset = captions_from_hf(with_pixels, size=8)
    assert dataset.images.shape == (2, 3, 8, 8) and dataset.images[1, 2, 4, 4] == 255
    assert [e.captions for e in dataset.examples] == [("a red picture", "all red"), ("blue",)]

    structs = datasets.Dataset.from_dict({  # bitmind/MS-COCO: sentences as {tokens, raw, ...}
        "image": [pil((0, 255, 0))],
        "sentences": [[{"raw": "a green one", "tokens": ["a", "green", "one"]}]],
    })
    assert captions_from_hf(structs, size=8).examples[0].captions == ("a green one",)

    (tmp_path / "val2014").mkdir()
    pil((9, 9, 9)).save(tmp_path / "val2014" / "COCO_1.jpg")
    files_only = datasets.Dataset.from_dict({  # yerevann/coco-karpathy carries no pixels
        "filepath": ["val2014"], "filename": ["COCO_1.jpg"], "sentences": [["grey"]], "cocoid": [1],
    })
    dataset = captions_from_hf(files_only, images_dir=tmp_path, size=8)
    assert dataset.image_names == ["COCO_1.jpg"] and dataset.examples[0].captions == ("grey",)


def test_captions_from_hf_bad_schemas():
    no_captions = datasets.Dataset.from_dict({"image": [pil((0, 0, 0))], "text": ["x"]})
    with pytest.raises(UserError, match="no caption column"):
        captions_from_hf(no_captions, name="mine")
    no_image = datasets.Dataset.from_dict({"filename": ["a.jpg"], "sentences": [["x"]]})
    with pytest.raises(UserError, match="give images_dir"):
        captions_from_hf(no_image)
    empty = datasets.Dataset.from_dict({"image": [pil((0, 0, 0))], "sentences": [[]]})
    with pytest.raises(UserError, match="mine row 0: no captions"):
        captions_from_hf(empty, name="mine")


def vqav2_rows():
    ten = ["2"] * 4 + ["two"] * 2 + ["3"] * 3 + ["many"]
    return datasets.Dataset.from_dict({
        "question_type": ["how many", "what color", "is the"],
        "multiple_choice_answer": ["2", "red", "yes"],
        "answers": [[{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(ten)],
                    [{"answer": "red", "answer_confidence": "yes", "answer_id": 1}] * 10,
                    [{"answer": "yes", "answer_confidence": "yes", "answer_id": 1}] * 10],
        "image_id": [42, 42, 7],
        "answer_type": ["number", "other", "yes/no"],
        "question_id": [420, 421, 70],
        "question": ["How many cats?", "What color is the car?", "Is the sky blue?"],
        "image": [pil((255, 0, 0)), pil((255, 0, 0)), pil((0, 0, 255))],
    })


def test_vqa_from_hf_reads_vqav2_and_shares_images():
    dataset = vqa_from_hf(vqav2_rows(), size=8, name="vqav2")
    assert dataset.images.shape == (2, 3, 8, 8)  # image 42 twice, image 7 once
    assert [e.image for e in dataset.examples] == [0, 0, 1] and dataset.image_names == ["42", "7"]
    assert dataset.images[0, :, 4, 4].tolist() == [255, 0, 0] and dataset.images[1, :, 4, 4].tolist() == [0, 0, 255]
    first = dataset.examples[0]
    assert (first.answer, first.question_type, first.answer_type) == ("2", "how many", "number")
    assert first.source == "vqav2:420"
    assert len(first.answers) == 10
    assert vqa_accuracy("two", first.answers) == 1.0  # "two" normalises to "2": six humans agree


def test_vqa_from_hf_bad_schema():
    with pytest.raises(UserError, match="expected VQAv2's columns"):
        vqa_from_hf(datasets.Dataset.from_dict({"question": ["q"], "answers": [["a"]]}))


def test_hub_loaders_give_a_user_error_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceM4/VQAv2' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"could not load HuggingFaceM4/VQAv2 .*Couldn't reach") as error:
        load_hub_vqa()
    assert "\n" not in str(error.value)


def test_hub_loader_converts_what_the_hub_returns(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: vqav2_rows())
    assert len(load_hub_vqa(split="validation[:3]", size=8)) == 3


def test_hub_loader_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match="pip install"):
        load_hub_dataset("yerevann/coco-karpathy", "test")


# --- metrics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, normalised", [
    ("Two dogs.", "2 dogs"), ("the red one!", "red 1"), ("1,000", "1000"), ("3.5", "3.5"),
    ("black/white", "black white"), ("  Yes\n", "yes"), ("an apple", "apple"),
])
def test_vqa_answer_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


@pytest.mark.parametrize("n_agree, accuracy", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0)])
def test_vqa_accuracy_matches_the_official_values(n_agree, accuracy):
    humans = ["cat"] * n_agree + [f"other{i}" for i in range(10 - n_agree)]
    assert vqa_accuracy("Cat", humans) == pytest.approx(accuracy)


def test_accuracy_report_by_type():
    examples = [VQAExample(0, "q", "yes", "PRES", "closed"), VQAExample(0, "q", "right lung", "POS", "open"),
                VQAExample(0, "q", "no", "PRES", "closed", unseen=True)]
    report = accuracy_report(examples, ["Yes", "left lung", "no"], by=("answer_type", "unseen"))
    assert report["accuracy"] == pytest.approx(2 / 3) and report["n"] == 3
    assert report["by_answer_type"] == {"closed": {"accuracy": 1.0, "n": 2}, "open": {"accuracy": 0.0, "n": 1}}
    assert report["by_unseen"]["True"] == {"accuracy": 1.0, "n": 1}
    assert exact_match("Right  Lung", "right lung") == 1.0
    assert set(report) == {"accuracy", "n", "by_answer_type", "by_unseen"}
