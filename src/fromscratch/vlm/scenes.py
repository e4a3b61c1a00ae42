"""Scenes of our own: seeded images of coloured shapes and handwritten digits, with captions and
questions whose answers are known exactly.

A scene is a square image (64×64 by default) cut into a 3×3 grid. It holds 1–4 objects, each in
its own cell (so objects never overlap), at a random offset inside the cell. An object is a shape
(circle, square, triangle, diamond) or a real MNIST digit, in one of six colours, small or large.
No two objects of a scene share both colour and kind, so "the red circle" or "the blue digit"
always names one object.

Each scene comes with four captions ("a small red circle and a large blue 7", "there are two
objects: ...", "... in the top left ...", "a red circle to the left of a blue 7") and one
question of each type that applies: colour, shape, count, position, relation (yes/no, with two
or more objects) and digit (when a digit is drawn). Answers come from `answer_vocabulary()`.

Generalisation is measured two ways:
- held-out combinations: some (colour, kind) pairs (`SceneConfig.held_out`, e.g. green
  triangle) are never drawn in the train split; the test split draws every pair, and each test
  question is flagged `unseen` when it is about an object with a held-out pair;
- zero-shot digits: the 10,000 MNIST test digits are split once (by `SceneConfig.mnist_seed`) into
  train-scene, test-scene and zero-shot pools; no scene ever draws a zero-shot digit, and
  `zero_shot_digits` renders them for digit classification through text prompts alone.

Everything is a pure function of the seed (NumPy's PCG64 generator), and 10,000 scenes take
1–2 seconds.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fromscratch.errors import UserError
from fromscratch.vlm.data import CaptionDataset, CaptionExample, VQADataset, VQAExample, dataset_folder

COLOURS = {  # name -> RGB on a black background
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "diamond")
DIGIT = "digit"
KINDS = SHAPES + (DIGIT,)
SIZES = {"small": 0.6, "large": 0.9}  # side of the object / side of a grid cell
POSITIONS = ("top left", "top middle", "top right", "middle left", "center", "middle right",
             "bottom left", "bottom middle", "bottom right")  # the 3×3 cells, row-major
RELATIONS = ("to the left of", "to the right of", "above", "below")
SPLITS = ("train", "test")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# every colour and every kind stays in training with other partners
DEFAULT_HELD_OUT = (("green", "triangle"), ("red", "square"), ("blue", "circle"), ("purple", "diamond"),
                    ("yellow", DIGIT))
MNIST_IMAGES = "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = "t10k-labels-idx1-ubyte.gz"


@dataclass(frozen=True)
class SceneConfig:
    """What scenes look like and which combinations and digits are held out."""

    image_size: int = 64
    max_objects: int = 4  # at least 1, at most the 9 grid cells
    held_out: tuple[tuple[str, str], ...] = DEFAULT_HELD_OUT  # (colour, kind) pairs drawn only in the test split
    zero_shot_digits: int = 1000  # MNIST digits set aside for zero-shot classification, never in a scene
    test_scene_digits: int = 1000  # MNIST digits drawn only in test scenes; the rest are drawn in training
    mnist_seed: int = 0  # fixes which digit goes to which pool, whatever seed the scenes use

    def __post_init__(self):
        if self.image_size < 24:
            raise UserError(f"scene image_size must be at least 24 px, not {self.image_size}")
        if not 1 <= self.max_objects <= len(POSITIONS):
            raise UserError(f"scene max_objects must be between 1 and {len(POSITIONS)}, not {self.max_objects}")
        for colour, kind in self.held_out:
            if colour not in COLOURS or kind not in KINDS:
                raise UserError(f"held-out pair ({colour}, {kind}): colours are {', '.join(COLOURS)}; "
                                f"kinds are {', '.join(KINDS)}")


# ---------------------------------------------------------------------------------------------
# MNIST


@dataclass(frozen=True)
class MnistDigits:
    """MNIST digits in memory."""

    images: np.ndarray  # uint8 (N, 28, 28), white digits on black
    labels: np.ndarray  # int64 (N,), 0..9


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (LeCun's MNIST format), gzip-compressed -> uint8 array."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, EOFError) as e:  # not gzip, or truncated
        raise UserError(f"{path}: not a readable gzip file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != expected_ndim:
        raise UserError(f"{path}: not an IDX file of {expected_ndim}-d unsigned bytes (header {data[:4].hex()})")
    header_end = 4 + 4 * expected_ndim
    shape = tuple(int(d) for d in np.frombuffer(data[4:header_end], dtype=">u4"))
    if len(data) - header_end != int(np.prod(shape)):
        raise UserError(f"{path}: header says {shape} = {int(np.prod(shape))} bytes, "
                        f"file holds {len(data) - header_end}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_end).reshape(shape)


def load_mnist(folder: str | os.PathLike | None = None) -> MnistDigits:
    """The 10,000 MNIST test digits from `folder` (default $FROMSCRATCH_DATA/images), which holds
    t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz."""
    folder = dataset_folder(folder, "images")
    images = _read_idx(folder / MNIST_IMAGES, 3)
    labels = _read_idx(folder / MNIST_LABELS, 1).astype(np.int64)
    if len(images) != len(labels):
        raise UserError(f"{folder}: {len(images)} images in {MNIST_IMAGES} but {len(labels)} labels in {MNIST_LABELS}")
    if labels.max(initial=0) > 9:
        raise UserError(f"{folder / MNIST_LABELS}: labels should be 0..9, found {labels.max()}")
    return MnistDigits(images, labels)


def mnist_pools(n_digits: int, config: SceneConfig = SceneConfig()) -> dict[str, np.ndarray]:
    """Disjoint index arrays into the MNIST digits: "zero_shot", "test" (test scenes) and "train"
    (train scenes), a seeded permutation cut in three."""
    if config.zero_shot_digits + config.test_scene_digits >= n_digits:
        raise UserError(f"{n_digits} MNIST digits cannot give {config.zero_shot_digits} zero-shot and "
                        f"{config.test_scene_digits} test-scene digits and leave some for training")
    order = np.random.default_rng(config.mnist_seed).permutation(n_digits)
    first, second = config.zero_shot_digits, config.zero_shot_digits + config.test_scene_digits
    return {"zero_shot": np.sort(order[:first]), "test": np.sort(order[first:second]), "train": np.sort(order[second:])}


# ---------------------------------------------------------------------------------------------
# Objects and drawing


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: what it is, where it is, and (for a digit) which MNIST image it shows."""

    kind: str  # a shape from SHAPES, or "digit"
    colour: str
    size: str  # "small" or "large"
    cell: int  # 0..8, row-major in the 3×3 grid: 0 is top left
    box: tuple[int, int, int, int]  # (top, left, bottom, right) in pixels, bottom and right exclusive
    digit: int | None = None  # the label of a drawn digit
    mnist_index: int | None = None  # which of the 10,000 MNIST test digits was drawn

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def name(self) -> str:
        """What questions call it: 'red circle', 'blue digit' (unique within its scene)."""
        return f"{self.colour} {self.kind}"

    def description(self, with_size: bool) -> str:
        """What captions call it: 'a large red circle', 'a blue 7'."""
        what = str(self.digit) if self.kind == DIGIT else self.kind
        return f"a {self.size + ' ' if with_size else ''}{self.colour} {what}"


def _relation_holds(a: SceneObject, relation: str, b: SceneObject) -> bool:
    """Whether 'a RELATION b' is true, by grid cells: 'to the left of' means a column further left."""
    return {"to the left of": a.col < b.col, "to the right of": a.col > b.col,
            "above": a.row < b.row, "below": a.row > b.row}[relation]


def _grid(image_size: int) -> tuple[int, int]:
    """(cell side, margin) in pixels: three cells side by side, centred in the image."""
    cell = image_size // 3
    return cell, (image_size - 3 * cell) // 2


@lru_cache(maxsize=None)
def _shape_alpha(kind: str, side: int) -> np.ndarray:
    """float32 (side, side) coverage, 1 inside the shape and 0 outside."""
    y, x = (np.mgrid[0:side, 0:side] + 0.5) / side - 0.5  # pixel centres in [-0.5, 0.5)
    if kind == "circle":
        inside = x ** 2 + y ** 2 <= 0.25
    elif kind == "square":
        inside = np.ones((side, side), dtype=bool)
    elif kind == "triangle":  # apex at the top centre, base along the bottom
        inside = np.abs(x) <= (y + 0.5) / 2
    elif kind == "diamond":
        inside = np.abs(x) + np.abs(y) <= 0.5
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return inside.astype(np.float32)


def _digit_alpha(digit_image: np.ndarray, side: int) -> np.ndarray:
    """float32 (side, side) coverage in [0, 1]: an MNIST digit (uint8 (28, 28)) cropped to the
    square around its strokes (so it fills its box as a shape does), resized, and scaled to peak
    at 1 (a small digit's thin strokes would otherwise come out dim, their colour hard to tell)."""
    rows, cols = np.flatnonzero(digit_image.any(axis=1)), np.flatnonzero(digit_image.any(axis=0))
    if len(rows):
        height, width = rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]
        square = np.zeros((max(height, width),) * 2, dtype=np.uint8)
        top, left = (len(square) - height) // 2, (len(square) - width) // 2
        square[top:top + height, left:left + width] = digit_image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        digit_image = square
    resized = Image.fromarray(digit_image).resize((side, side), Image.Resampling.BILINEAR)
    alpha = np.asarray(resized, dtype=np.float32)
    return alpha / max(alpha.max(), 1.0)


def _draw(canvas: np.ndarray, obj: SceneObject, mnist: MnistDigits) -> None:
    """Paint `obj` into `canvas`, uint8 (H, W, 3), inside its box (which nothing else touches)."""
    top, left, bottom, right = obj.box
    side = bottom - top
    alpha = _digit_alpha(mnist.images[obj.mnist_index], side) if obj.kind == DIGIT else _shape_alpha(obj.kind, side)
    canvas[top:bottom, left:right] = np.rint(alpha[..., None] * np.array(COLOURS[obj.colour], np.float32))


def _place(kind: str, colour: str, size: str, cell: int, image_size: int, rng: np.random.Generator | None,
           mnist: MnistDigits, mnist_index: int | None) -> SceneObject:
    """An object in `cell`, at a random offset inside it (centred when rng is None)."""
    cell_side, margin = _grid(image_size)
    side = int(SIZES[size] * cell_side)
    slack = cell_side - side
    dy, dx = (slack // 2, slack // 2) if rng is None else (int(v) for v in rng.integers(0, slack + 1, size=2))
    top, left = margin + (cell // 3) * cell_side + dy, margin + (cell % 3) * cell_side + dx
    digit = int(mnist.labels[mnist_index]) if kind == DIGIT else None
    return SceneObject(kind, colour, size, cell, (top, left, top + side, left + side), digit,
                       mnist_index if kind == DIGIT else None)


# ---------------------------------------------------------------------------------------------
# Captions and questions


def _pick(rng: np.random.Generator, options):
    """One of `options`, uniformly, by indexing (so a list of str gives a str, not a NumPy str_)."""
    return options[int(rng.integers(len(options)))]


def _join(phrases: list[str]) -> str:
    """['a', 'b', 'c'] -> 'a, b and c'."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions_for(objects: list[SceneObject], rng: np.random.Generator) -> tuple[str, ...]:
    """Four captions of one scene: a list with sizes, a count, positions, and a relation."""
    objs = [objects[i] for i in rng.permutation(len(objects))]
    n = len(objs)
    plain = [o.description(with_size=False) for o in objs]
    be, noun = ("is", "object") if n == 1 else ("are", "objects")
    if n == 1:
        relation = f"{plain[0]} on its own"
    else:
        a, b = objs[0], objs[1]
        relation = f"{plain[0]} {_pick(rng, [r for r in RELATIONS if _relation_holds(a, r, b)])} {plain[1]}"
    return (
        _join([o.description(with_size=True) for o in objs]),
        f"there {be} {NUMBER_WORDS[n]} {noun}: {_join(plain)}",
        _join([f"{d} in the {o.position}" for d, o in zip(plain, objs)]),
        relation,
    )


def _colour_question(objects, rng):
    obj = _pick(rng, objects)
    if sum(o.kind == obj.kind for o in objects) == 1:
        question = _pick(rng, ("what color is the {}?", "what is the color of the {}?")).format(obj.kind)
    else:
        question = f"what color is the {obj.kind} in the {obj.position}?"
    return question, obj.colour, [obj]


def _shape_question(objects, rng):
    shapes = [o for o in objects if o.kind != DIGIT]
    if not shapes:
        return None
    obj = _pick(rng, shapes)
    if sum(o.colour == obj.colour for o in objects) == 1:
        question = _pick(rng, ("what shape is the {} object?", "what is the {} shape?")).format(obj.colour)
    else:
        question = f"what shape is in the {obj.position}?"
    return question, obj.kind, [obj]


def _count_question(objects, rng):
    mode = _pick(rng, ("all", "colour", "kind"))
    if mode == "all":
        counted, question = objects, _pick(rng, ("how many objects are there?", "how many things are in the image?"))
    elif mode == "colour":
        colour = _pick(rng, list(COLOURS))
        counted, question = [o for o in objects if o.colour == colour], f"how many {colour} objects are there?"
    else:
        kind = _pick(rng, KINDS)
        counted, question = [o for o in objects if o.kind == kind], f"how many {kind}s are there?"
    return question, str(len(counted)), counted


def _position_question(objects, rng):
    obj = _pick(rng, objects)
    question = _pick(rng, ("where is the {}?", "in which part of the image is the {}?")).format(obj.name)
    return question, obj.position, [obj]


def _relation_question(objects, rng):
    if len(objects) < 2:
        return None
    i, j = (int(k) for k in rng.choice(len(objects), size=2, replace=False))
    a, b = objects[i], objects[j]
    true = [r for r in RELATIONS if _relation_holds(a, r, b)]
    false = [r for r in RELATIONS if r not in true]
    relation = _pick(rng, true if rng.random() < 0.5 else false)  # both are non-empty: a and b differ in cell
    return f"is the {a.name} {relation} the {b.name}?", "yes" if relation in true else "no", [a, b]


def _digit_question(objects, rng):
    digits = [o for o in objects if o.kind == DIGIT]
    if not digits:
        return None
    obj = _pick(rng, digits)
    if len(digits) == 1:
        question = _pick(rng, ("what digit is shown?", "which number is written in the image?"))
    else:
        question = _pick(rng, ("what digit is written in {}?", "which number is the {} digit?")).format(obj.colour)
    return question, str(obj.digit), [obj]


QUESTION_MAKERS = {"colour": _colour_question, "shape": _shape_question, "count": _count_question,
                   "position": _position_question, "relation": _relation_question, "digit": _digit_question}
QUESTION_TYPES = tuple(QUESTION_MAKERS)
ANSWER_TYPES = {"count": "number", "relation": "yes/no"}  # the others: "other"


def questions_for(objects: list[SceneObject], rng: np.random.Generator
                  ) -> list[tuple[str, str, str, list[SceneObject]]]:
    """(question type, question, answer, the objects it is about) for each type that applies."""
    questions = []
    for question_type, make in QUESTION_MAKERS.items():
        made = make(objects, rng)
        if made is not None:
            questions.append((question_type, *made))
    return questions


def answer_vocabulary(config: SceneConfig = SceneConfig()) -> list[str]:
    """Every answer a scene question can have, sorted: colours, shapes, positions, yes/no, counts, digits."""
    counts = [str(n) for n in range(config.max_objects + 1)]
    return sorted({*COLOURS, *SHAPES, *POSITIONS, "yes", "no", *counts, *(str(d) for d in range(10))})


# ---------------------------------------------------------------------------------------------
# Scenes


@dataclass
class SceneSplit:
    """Generated scenes: the same images tensor in a question and a caption dataset."""

    split: str
    objects: list[list[SceneObject]]  # objects[k]: what image k shows
    vqa: VQADataset
    captions: CaptionDataset
    config: SceneConfig

    @property
    def images(self) -> torch.Tensor:
        """uint8 (N, 3, image_size, image_size)."""
        return self.vqa.images


def _sample_objects(rng: np.random.Generator, pairs: list[tuple[str, str]], digit_pool: np.ndarray,
                    mnist: MnistDigits, config: SceneConfig) -> list[SceneObject]:
    n = int(rng.integers(1, config.max_objects + 1))
    cells = rng.choice(len(POSITIONS), size=n, replace=False)
    chosen = rng.choice(len(pairs), size=n, replace=False)  # distinct (colour, kind) within a scene
    objects = []
    for cell, pair in zip(cells, chosen):
        colour, kind = pairs[pair]
        size = _pick(rng, list(SIZES))
        mnist_index = int(_pick(rng, digit_pool)) if kind == DIGIT else None
        objects.append(_place(kind, colour, size, int(cell), config.image_size, rng, mnist, mnist_index))
    return objects


def generate_scenes(mnist: MnistDigits, n_scenes: int, split: str = "train", seed: int = 0,
                    config: SceneConfig = SceneConfig()) -> SceneSplit:
    """`n_scenes` scenes of `split`, a pure function of (seed, split, config): images uint8
    (n_scenes, 3, S, S), ~5 questions and 4 captions each.

    The train split never draws a held-out (colour, kind) pair; the test split draws every pair
    and flags its questions about held-out pairs `unseen`. Digits come from the split's own
    MNIST pool (`mnist_pools`), never from the zero-shot pool.
    """
    if split not in SPLITS:
        raise UserError(f"scene splits are {' and '.join(SPLITS)}, not {split!r}")
    if len(config.held_out) > len(COLOURS) * len(KINDS) - config.max_objects:
        raise UserError(f"{len(config.held_out)} held-out pairs leave too few for {config.max_objects}-object scenes")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    digit_pool = mnist_pools(len(mnist.labels), config)[split]
    held_out = set(config.held_out)
    pairs = [(c, k) for c in COLOURS for k in KINDS if split == "test" or (c, k) not in held_out]
    size = config.image_size
    canvas = np.zeros((n_scenes, size, size, 3), dtype=np.uint8)
    all_objects, examples, captions = [], [], []
    for k in range(n_scenes):
        objects = _sample_objects(rng, pairs, digit_pool, mnist, config)
        for obj in objects:
            _draw(canvas[k], obj, mnist)
        all_objects.append(objects)
        captions.append(CaptionExample(k, captions_for(objects, rng), source=f"scenes-{split}:{k}"))
        for question_type, question, answer, about in questions_for(objects, rng):
            examples.append(VQAExample(
                image=k, question=question, answer=answer, question_type=question_type,
                answer_type=ANSWER_TYPES.get(question_type, "other"),
                unseen=any((o.colour, o.kind) in held_out for o in about), source=f"scenes-{split}:{k}",
            ))
    images = torch.from_numpy(canvas).permute(0, 3, 1, 2).contiguous()
    names = [f"{split}-{k}" for k in range(n_scenes)]
    return SceneSplit(split, all_objects, VQADataset(images, names, examples, name=f"scenes-{split}"),
                      CaptionDataset(images, names, captions, name=f"scenes-{split}"), config)


# ---------------------------------------------------------------------------------------------
# Zero-shot digits


@dataclass
class ZeroShotDigits:
    """The zero-shot pool drawn as one-object scenes: a large digit in the center cell."""

    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # int64 (N,)
    colours: list[str]  # colours[i]: the colour digit i is drawn in
    mnist_indices: np.ndarray  # int64 (N,): which MNIST test digits these are

    def __len__(self) -> int:
        return len(self.labels)

    def prompts(self, i: int) -> list[str]:
        """The ten candidate captions for image i, prompts(i)[d] naming digit d, in the scenes'
        caption phrasing: 'a red 0 in the center', ..., 'a red 9 in the center'."""
        return [f"a {self.colours[i]} {d} in the center" for d in range(10)]


def zero_shot_digits(mnist: MnistDigits, seed: int = 0, config: SceneConfig = SceneConfig()) -> ZeroShotDigits:
    """The digits no scene ever draws (`mnist_pools(...)["zero_shot"]`), each rendered as a scene
    of one large digit in the center cell, in a seeded colour."""
    indices = mnist_pools(len(mnist.labels), config)["zero_shot"]
    rng = np.random.default_rng([seed, len(SPLITS)])  # a stream apart from both scene splits
    size = config.image_size
    canvas = np.zeros((len(indices), size, size, 3), dtype=np.uint8)
    colours = []
    for k, index in enumerate(indices):
        colour = _pick(rng, list(COLOURS))
        digit = _place(DIGIT, colour, "large", POSITIONS.index("center"), size, None, mnist, int(index))
        _draw(canvas[k], digit, mnist)
        colours.append(colour)
    images = torch.from_numpy(canvas).permute(0, 3, 1, 2).contiguous()
    return ZeroShotDigits(images, torch.from_numpy(mnist.labels[indices]), colours, indices.astype(np.int64))
