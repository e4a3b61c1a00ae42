"""Scenes: MNIST reading, determinism, held-out combinations and digits, non-overlap, and answers
checked against the rendered pixels by an independent reading of each question."""

import gzip
import re
import time

import numpy as np
import pytest
import torch

from fromscratch.errors import UserError
from fromscratch.vlm.scenes import (
    COLOURS,
    DEFAULT_HELD_OUT,
    DIGIT,
    KINDS,
    MNIST_IMAGES,
    MNIST_LABELS,
    NUMBER_WORDS,
    POSITIONS,
    QUESTION_TYPES,
    SceneConfig,
    answer_vocabulary,
    generate_scenes,
    load_mnist,
    mnist_pools,
    zero_shot_digits,
)


@pytest.fixture(scope="module")
def mnist(shared_data):
    return load_mnist(shared_data / "images")


@pytest.fixture(scope="module")
def train(mnist):
    return generate_scenes(mnist, 1500, "train", seed=0)


@pytest.fixture(scope="module")
def test_split(mnist):
    return generate_scenes(mnist, 1500, "test", seed=0)


# --- MNIST -----------------------------------------------------------------------------------


def test_mnist_test_split_is_read_whole(mnist):
    assert mnist.images.shape == (10000, 28, 28) and mnist.images.dtype == np.uint8
    assert mnist.labels[:5].tolist() == [7, 2, 1, 0, 4]  # MNIST's first test digits
    assert np.bincount(mnist.labels).tolist()[:3] == [980, 1135, 1032]


def write_idx(folder, images: bytes, labels: bytes):
    folder.mkdir(exist_ok=True)
    (folder / MNIST_IMAGES).write_bytes(gzip.compress(images))
    (folder / MNIST_LABELS).write_bytes(gzip.compress(labels))


IMAGES_HEADER = bytes([0, 0, 8, 3]) + np.array([2, 28, 28], ">u4").tobytes()
LABELS_HEADER = bytes([0, 0, 8, 1]) + np.array([2], ">u4").tobytes()


@pytest.mark.parametrize("images, labels, message", [
    (IMAGES_HEADER + bytes(2 * 784), LABELS_HEADER + bytes([3, 4]), None),
    (bytes([0, 0, 8, 1]) + bytes(10), LABELS_HEADER + bytes(2), f"{MNIST_IMAGES}: not an IDX file of 3-d"),
    (IMAGES_HEADER + bytes(700), LABELS_HEADER + bytes(2), f"{MNIST_IMAGES}: header says"),
    (IMAGES_HEADER + bytes(2 * 784), LABELS_HEADER[:-4] + np.array([3], ">u4").tobytes() + bytes(3), "2 images"),
    (IMAGES_HEADER + bytes(2 * 784), LABELS_HEADER + bytes([3, 12]), f"{MNIST_LABELS}: labels should be 0..9"),
])
def test_mnist_bad_files_name_the_file(tmp_path, images, labels, message):
    write_idx(tmp_path / "mnist", images, labels)
    if message is None:
        assert load_mnist(tmp_path / "mnist").labels.tolist() == [3, 4]
    else:
        with pytest.raises(UserError, match=re.escape(message)):
            load_mnist(tmp_path / "mnist")


def test_mnist_missing_or_not_gzip(tmp_path):
    (tmp_path / MNIST_IMAGES).write_bytes(b"plain bytes")
    with pytest.raises(UserError, match=f"{MNIST_IMAGES}: not a readable gzip file"):
        load_mnist(tmp_path)
    (tmp_path / MNIST_IMAGES).unlink()
    with pytest.raises(UserError, match=f"{MNIST_IMAGES}: no such file"):
        load_mnist(tmp_path)


# --- determinism and held-out properties ------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_scenes(mnist, train):
    again = generate_scenes(mnist, 1500, "train", seed=0)
    assert torch.equal(again.images, train.images)
    assert again.vqa.examples == train.vqa.examples and again.captions.examples == train.captions.examples
    other = generate_scenes(mnist, 50, "train", seed=1)
    assert not torch.equal(other.images, train.images[:50])
    assert not torch.equal(generate_scenes(mnist, 50, "test", seed=0).images, train.images[:50])


def test_train_never_shows_a_held_out_pair_but_shows_every_colour_and_kind(train):
    pairs = {(o.colour, o.kind) for objects in train.objects for o in objects}
    assert not pairs & set(DEFAULT_HELD_OUT)
    assert {c for c, _ in pairs} == set(COLOURS) and {k for _, k in pairs} == set(KINDS)
    assert not any(e.unseen for e in train.vqa.examples)


def test_test_split_flags_questions_about_held_out_pairs(test_split):
    pairs = {(o.colour, o.kind) for objects in test_split.objects for o in objects}
    assert set(DEFAULT_HELD_OUT) <= pairs
    flags = test_split.vqa.counts("unseen")
    assert flags["True"] > 200 and flags["False"] > 2000
    named = re.compile(rf"the ({'|'.join(COLOURS)}) ({'|'.join(KINDS)})\b")
    for example in test_split.vqa.examples:
        if example.question_type in ("position", "relation"):  # these name their objects by (colour, kind)
            pairs_named = named.findall(example.question)
            assert pairs_named
            assert example.unseen == any(p in DEFAULT_HELD_OUT for p in pairs_named), example


def test_digits_come_from_their_split_pool_and_never_from_the_zero_shot_pool(mnist, train, test_split):
    pools = mnist_pools(len(mnist.labels))
    assert sum(len(p) for p in pools.values()) == 10000
    assert len(np.unique(np.concatenate(list(pools.values())))) == 10000
    for split, scenes in (("train", train), ("test", test_split)):
        used = {o.mnist_index for objects in scenes.objects for o in objects if o.kind == DIGIT}
        assert len(used) > 100
        assert used <= set(pools[split].tolist())
        assert not used & set(pools["zero_shot"].tolist())
        for objects in scenes.objects:
            for o in objects:
                if o.kind == DIGIT:
                    assert o.digit == mnist.labels[o.mnist_index]


def test_zero_shot_digits(mnist):
    zero_shot = zero_shot_digits(mnist)
    pools = mnist_pools(len(mnist.labels))
    assert zero_shot.images.shape == (1000, 3, 64, 64) and len(zero_shot) == 1000
    assert zero_shot.mnist_indices.tolist() == pools["zero_shot"].tolist()
    assert torch.equal(zero_shot.labels, torch.from_numpy(mnist.labels[pools["zero_shot"]]))
    assert set(zero_shot.labels.tolist()) == set(range(10))
    center = zero_shot.images[:, :, 21:42, 21:42]
    assert (zero_shot.images.sum(dim=(1, 2, 3)) == center.sum(dim=(1, 2, 3))).all()  # nothing outside the center
    assert (center.flatten(1).amax(1) > 100).all()
    prompts = zero_shot.prompts(3)
    assert len(prompts) == 10 and prompts[7] == f"a {zero_shot.colours[3]} 7 in the center"
    assert torch.equal(zero_shot_digits(mnist).images, zero_shot.images)


# --- what is drawn is what is said ------------------------------------------------------------


def test_objects_do_not_overlap_and_nothing_is_drawn_outside_them(train):
    for k, objects in enumerate(train.objects[:500]):
        image = train.images[k]
        drawn = torch.zeros(64, 64, dtype=torch.bool)
        assert 1 <= len(objects) <= 4 and len({o.cell for o in objects}) == len(objects)
        assert len({(o.colour, o.kind) for o in objects}) == len(objects)
        for o in objects:
            top, left, bottom, right = o.box
            assert 0 <= top < bottom <= 64 and 0 <= left < right <= 64
            assert not drawn[top:bottom, left:right].any()
            drawn[top:bottom, left:right] = True
        assert not image[:, ~drawn].any()


def pixel_colour(image: torch.Tensor, box) -> str:
    """The colour name whose RGB is nearest to the brightest pixel in `box` of image (3, H, W)."""
    top, left, bottom, right = box
    patch = image[:, top:bottom, left:right].flatten(1).float()  # (3, pixels)
    brightest = patch[:, patch.sum(0).argmax()]
    return min(COLOURS, key=lambda c: float(((brightest - torch.tensor(COLOURS[c])) ** 2).sum()))


def read_scene(image: torch.Tensor, objects) -> list[dict]:
    """The objects as the pixels show them: colour measured in the box, cell from the box centre."""
    seen = []
    for o in objects:
        top, left, bottom, right = o.box
        cell = 3 * ((top + bottom) // 2 // 21) + (left + right) // 2 // 21
        seen.append({"colour": pixel_colour(image, o.box), "kind": o.kind, "cell": cell, "digit": o.digit})
    return seen


def the_one(seen, **attributes):
    matches = [s for s in seen if all(s[k] == v for k, v in attributes.items())]
    assert len(matches) == 1, (attributes, seen)
    return matches[0]


def oracle(question: str, seen: list[dict]) -> str:
    """Answer a scene question from its words and the pixels alone, without the generator's code."""
    colours, kinds, positions = "|".join(COLOURS), "|".join(KINDS), "|".join(POSITIONS)
    if m := re.fullmatch(rf"what (?:color is|is the color of) the ({kinds})(?: in the ({positions}))?\?", question):
        where = {"cell": POSITIONS.index(m[2])} if m[2] else {}
        return the_one(seen, kind=m[1], **where)["colour"]
    if m := re.fullmatch(rf"what (?:shape is|is) the ({colours}) (?:object|shape)\?", question):
        return the_one(seen, colour=m[1])["kind"]
    if m := re.fullmatch(rf"what shape is in the ({positions})\?", question):
        return the_one(seen, cell=POSITIONS.index(m[1]))["kind"]
    if question in ("how many objects are there?", "how many things are in the image?"):
        return str(len(seen))
    if m := re.fullmatch(rf"how many ({colours}) objects are there\?", question):
        return str(sum(s["colour"] == m[1] for s in seen))
    if m := re.fullmatch(rf"how many ({kinds})s are there\?", question):
        return str(sum(s["kind"] == m[1] for s in seen))
    if m := re.fullmatch(rf"(?:where is|in which part of the image is) the ({colours}) ({kinds})\?", question):
        return POSITIONS[the_one(seen, colour=m[1], kind=m[2])["cell"]]
    if m := re.fullmatch(rf"is the ({colours}) ({kinds}) (to the left of|to the right of|above|below) "
                         rf"the ({colours}) ({kinds})\?", question):
        a, b = the_one(seen, colour=m[1], kind=m[2]), the_one(seen, colour=m[4], kind=m[5])
        (ra, ca), (rb, cb) = divmod(a["cell"], 3), divmod(b["cell"], 3)
        holds = {"to the left of": ca < cb, "to the right of": ca > cb, "above": ra < rb, "below": ra > rb}[m[3]]
        return "yes" if holds else "no"
    if question in ("what digit is shown?", "which number is written in the image?"):
        return str(the_one(seen, kind=DIGIT)["digit"])
    if m := re.fullmatch(rf"(?:what digit is written in|which number is the) ({colours})(?: digit)?\?", question):
        return str(the_one(seen, colour=m[1], kind=DIGIT)["digit"])
    raise AssertionError(f"the test cannot read {question!r}")


def test_every_answer_agrees_with_the_pixels(train, test_split):
    for scenes in (train, test_split):
        seen = [read_scene(scenes.images[k], objects) for k, objects in enumerate(scenes.objects)]
        for example in scenes.vqa.examples:
            assert oracle(example.question, seen[example.image]) == example.answer, example


def test_question_types_answers_and_captions(train):
    counts = train.vqa.counts()
    assert set(counts) == set(QUESTION_TYPES)
    assert counts["colour"] == counts["count"] == counts["position"] == 1500
    assert set(train.vqa.answer_vocabulary()) <= set(answer_vocabulary())
    relation_answers = [e.answer for e in train.vqa.examples if e.question_type == "relation"]
    assert 0.4 < relation_answers.count("yes") / len(relation_answers) < 0.6
    for example, objects in zip(train.captions.examples, train.objects):
        assert len(example.captions) == 4
        be = "is" if len(objects) == 1 else "are"
        assert example.captions[1].startswith(f"there {be} {NUMBER_WORDS[len(objects)]} ")
        for caption in example.captions[:3]:
            assert all(o.colour in caption for o in objects)


def test_generation_is_fast(mnist):
    start = time.perf_counter()
    generate_scenes(mnist, 3000, "train", seed=5)
    assert time.perf_counter() - start < 10  # about 0.5 s on one core


def test_bad_configs_and_splits(mnist):
    with pytest.raises(UserError, match="held-out pair"):
        SceneConfig(held_out=(("orange", "circle"),))
    with pytest.raises(UserError, match="max_objects"):
        SceneConfig(max_objects=10)
    with pytest.raises(UserError, match="not 'val'"):
        generate_scenes(mnist, 10, "val")
    with pytest.raises(UserError, match="cannot give"):
        mnist_pools(1500)


def test_a_larger_image_keeps_the_properties(mnist):
    scenes = generate_scenes(mnist, 20, "test", seed=2, config=SceneConfig(image_size=96, max_objects=6))
    assert scenes.images.shape == (20, 3, 96, 96)
    assert max(len(o) for o in scenes.objects) <= 6
