"""What `--data NAME_OR_PATH` means: the train, validation and test parts of each dataset.

    easy-vqa      the `easy-vqa` package: train = its train split less 10% of its images, which
                  are the validation part; test = its test split
    vqa-rad       $FROMSCRATCH_DATA/vqa-rad (trainset.json + images/): train and val split
                  trainset.json by image (`data.load_vqa_rad`); test = the file given with --test
                  (the official held-out test file), else the val part
    scenes        our generated scenes (`scenes.py`): train = `n_train` scenes of the train split,
                  val = `n_val` more from another seed (a tenth of n_train, between 50 and 500),
                  test = `n_test` scenes of the test split (held-out combinations flagged);
                  MNIST from $FROMSCRATCH_DATA/images
    DIR           a folder in VQA-RAD's layout (trainset.json, images/), or in COCO's caption
                  layout (captions.json in COCO's format, images/): train and val split by image;
                  test = --test FILE in the same format

Every part is a `Split`: one uint8 images tensor, and the questions and captions about its rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fromscratch.errors import UserError
from fromscratch.vlm.data import (
    CaptionExample,
    VQAExample,
    dataset_folder,
    load_coco_captions_json,
    load_easy_vqa,
    load_vqa_rad,
    load_vqa_rad_file,
    split_by_image,
)

NAMES = ("easy-vqa", "vqa-rad", "scenes")
PARTS = ("train", "val", "test")
VAL_FRACTION = 0.1  # of the images, for easy-VQA and folders
COCO_FILE = "captions.json"
SCENE_DEFAULTS = {"n_train": 10_000, "n_val": 500, "n_test": 2_000, "seed": 0}


def scene_settings(n_train: int | None = None) -> dict:
    """The scenes' part sizes and seed, for `n_train` training scenes (default 10,000)."""
    n_train = n_train or SCENE_DEFAULTS["n_train"]
    return {**SCENE_DEFAULTS, "n_train": n_train, "n_val": max(50, min(500, n_train // 10))}


@dataclass
class Split:
    """One part of a dataset: images and what is said and asked about them."""

    name: str
    images: torch.Tensor  # uint8 (N, C, H, W)
    questions: list[VQAExample] = field(default_factory=list)  # .image: a row of `images`
    captions: list[CaptionExample] = field(default_factory=list)
    unseen_images: set[int] = field(default_factory=set)  # scenes: images with a held-out combination

    def first(self, n: int) -> "Split":
        """The first n images and what is said and asked about them."""
        return Split(self.name, self.images[:n], [e for e in self.questions if e.image < n],
                     [e for e in self.captions if e.image < n], {k for k in self.unseen_images if k < n})

    def summary(self) -> str:
        n_captions = sum(len(e.captions) for e in self.captions)
        return f"{self.name}: {len(self.images)} images, {len(self.questions)} questions, {n_captions} captions"


def kind(spec: str) -> str:
    """'easy-vqa', 'vqa-rad', 'scenes', 'vqa-folder' or 'caption-folder'; a UserError for anything else."""
    if spec in NAMES:
        return spec
    path = Path(spec)
    if path.is_dir() and (path / "trainset.json").is_file():
        return "vqa-folder"
    if path.is_dir() and (path / COCO_FILE).is_file():
        return "caption-folder"
    if path.exists():
        raise UserError(f"--data {spec}: neither a folder with trainset.json (VQA-RAD's layout) nor one with "
                        f"{COCO_FILE} (COCO captions)")
    raise UserError(f"--data {spec}: no such folder, nor one of {', '.join(NAMES)}")


def canonical(spec: str) -> str:
    """The name recorded in a run: a dataset name as it is, a folder by its absolute path."""
    return spec if spec in NAMES else str(Path(spec).resolve())


def _subset(images: torch.Tensor, questions: list[VQAExample], keep: list[int], name: str) -> Split:
    """The images `keep` (rows of `images`) and the questions about them, renumbered."""
    row = {old: new for new, old in enumerate(keep)}
    kept = [VQAExample(**{**e.__dict__, "image": row[e.image]}) for e in questions if e.image in row]
    return Split(name, images[keep], questions=kept)


def _split_by_image(images, names, questions, part, name, seed=0) -> Split:
    val = split_by_image(names, VAL_FRACTION, seed)
    keep = [k for k, n in enumerate(names) if (n in val) == (part == "val")]
    return _subset(images, questions, keep, f"{name}-{part}")


def _captions_split(dataset, part: str, name: str) -> Split:
    val = split_by_image(dataset.image_names, VAL_FRACTION)
    keep = [k for k, n in enumerate(dataset.image_names) if (n in val) == (part == "val")]
    row = {old: new for new, old in enumerate(keep)}
    captions = [CaptionExample(row[e.image], e.captions, e.source) for e in dataset.examples if e.image in row]
    return Split(f"{name}-{part}", dataset.images[keep], captions=captions)


def load_part(spec: str, part: str, image_size: int, channels: int, test_file: str | None = None,
              scenes: dict | None = None, cache_dir: str | os.PathLike | None = None) -> Split:
    """Part `part` (train, val or test) of the data `spec` names (module docstring), its images
    uint8 (N, channels, image_size, image_size)."""
    if part not in PARTS:
        raise ValueError(part)
    what = kind(spec)
    if test_file is not None and (part != "test" or what in ("easy-vqa", "scenes")):
        raise UserError(f"--test is for VQA-RAD and data folders; {spec} has its own test split")
    if what == "easy-vqa":
        if part == "test":
            d = load_easy_vqa("test", image_size, channels, cache_dir)
            return Split(d.name, d.images, questions=d.examples)
        d = load_easy_vqa("train", image_size, channels, cache_dir)
        return _split_by_image(d.images, d.image_names, d.examples, part, "easy-vqa")
    if what == "scenes":
        return _scenes_part(part, image_size, {**SCENE_DEFAULTS, **(scenes or {})})
    if what == "caption-folder":
        folder = Path(spec)
        if part == "test" and test_file is None:
            raise UserError(f"{spec}: give the test captions with --test FILE (COCO's format)")
        if test_file is not None:
            images_dir = Path(test_file).parent / "images"
            d = load_coco_captions_json(test_file, images_dir if images_dir.is_dir() else folder / "images",
                                        image_size, channels, cache_dir=cache_dir)
            return Split(d.name, d.images, captions=d.examples)
        d = load_coco_captions_json(folder / COCO_FILE, folder / "images", image_size, channels, cache_dir=cache_dir)
        return _captions_split(d, part, folder.name)
    root = lambda: dataset_folder(None if what == "vqa-rad" else spec, "vqa-rad")  # noqa: E731
    if test_file is not None:
        images_dir = Path(test_file).parent / "images"
        d = load_vqa_rad_file(test_file, images_dir if images_dir.is_dir() else root() / "images", image_size,
                              channels, cache_dir)
    else:  # no test file: the validation part stands in for it
        d = load_vqa_rad(root(), "train" if part == "train" else "val", size=image_size, channels=channels,
                         cache_dir=cache_dir)
    return Split(d.name, d.images, questions=d.examples)


def _scenes_part(part: str, image_size: int, settings: dict) -> Split:
    from fromscratch.vlm.scenes import SceneConfig, generate_scenes, load_mnist

    mnist = load_mnist()
    config = SceneConfig(image_size=image_size)
    seed = settings["seed"]
    if part == "train":
        scenes = generate_scenes(mnist, settings["n_train"], "train", seed, config)
    elif part == "val":
        scenes = generate_scenes(mnist, settings["n_val"], "train", seed + 1, config)
    else:
        scenes = generate_scenes(mnist, settings["n_test"], "test", seed, config)
    held_out = set(config.held_out)
    unseen = {k for k, objects in enumerate(scenes.objects) if any((o.colour, o.kind) in held_out for o in objects)}
    return Split(f"scenes-{part}", scenes.images, questions=scenes.vqa.examples, captions=scenes.captions.examples,
                 unseen_images=unseen)
