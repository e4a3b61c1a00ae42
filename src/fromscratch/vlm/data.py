"""Images with questions or captions: easy-VQA, VQA-RAD, COCO-style captions and VQAv2.

Every loader returns the same two shapes of data, so a model and its evaluation never care where
the data came from:

    VQADataset       images uint8 (N_images, C, H, W), decoded once, and a list of `VQAExample`
                     (question, answer, question type, ...) that point at rows of that tensor
    CaptionDataset   the same images tensor and a list of `CaptionExample` (several captions each)

Images are square: a non-square image is padded with black to a square (nothing is cropped or
stretched), then resized to `size` pixels. `channels` is 3 (RGB; a grayscale image is copied into
all three) or 1 (grayscale), chosen by the caller, so one image encoder can read every dataset.
Decoding hundreds of large JPEGs takes a while, so path-based loaders take a `cache_dir`: the
decoded tensor is saved there as .npy, keyed by the files' names, sizes and modification times,
and read back on the next call.

The data:

    easy-VQA   (Zhou 2020; PyPI `easy-vqa`): 64×64 images of one coloured shape, 4,000 train /
               1,000 test images, 38,575 / 9,673 questions, 13 answers. `load_easy_vqa`.
    VQA-RAD    (Lau et al. 2018): 315 radiology images and 3,064 clinicians' questions in
               trainset.json. Its official test split is held out, so `load_vqa_rad` splits
               trainset.json into train and val *by image*; `load_vqa_rad_file` reads any file of
               the same format (the held-out test file). Folder: `root` or $FROMSCRATCH_DATA/vqa-rad.
    COCO       a captions_*.json annotation file and its image folder (`load_coco_captions_json`),
               or a Karpathy-split dataset from the hub (`captions_from_hf`, `load_hub_captions`).
    VQAv2      (Goyal et al. 2017) from the hub, `HuggingFaceM4/VQAv2` (`vqa_from_hf`,
               `load_hub_vqa`); its ten human answers per question feed `metrics.vqa_accuracy`.

Every mistake in a file (malformed JSON, no entries, a missing or empty field, a field of the
wrong type, a repeated image id, a missing, unreadable or huge image) is a `UserError` naming the
file and the entry.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fromscratch.errors import UserError
from fromscratch.transformer.data import ENV_DATA

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Records and datasets


@dataclass(frozen=True)
class VQAExample:
    """One question about one image."""

    image: int  # row of the dataset's images tensor
    question: str
    answer: str  # normalised (lower case, single spaces); VQAv2: the most common human answer
    question_type: str
    answer_type: str | None = None  # "yes/no", "number", "other" (VQAv2, easy-VQA, scenes); "closed", "open" (VQA-RAD)
    answers: tuple[str, ...] = ()  # every human answer (VQAv2 has ten) for the soft VQA accuracy; () when there is one
    unseen: bool = False  # scenes' test split: the question is about an attribute combination held out of training
    source: str = ""  # where it came from, e.g. "trainset.json[17]"


@dataclass(frozen=True)
class CaptionExample:
    """One image and the captions that describe it."""

    image: int  # row of the dataset's images tensor
    captions: tuple[str, ...]
    source: str = ""


@dataclass
class VQADataset:
    """Questions about images; `dataset[i]` is (image uint8 (C, H, W), example i)."""

    images: torch.Tensor  # uint8 (N_images, C, H, W)
    image_names: list[str]  # image_names[k] names images[k] (a file name or an id)
    examples: list[VQAExample]
    name: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, VQAExample]:
        example = self.examples[i]
        return self.images[example.image], example

    def answer_vocabulary(self) -> list[str]:
        """Every distinct answer, sorted: the classes of a classifier head."""
        return sorted({e.answer for e in self.examples})

    def counts(self, field: str = "question_type") -> dict[str, int]:
        """How many examples have each value of `field`, most common first."""
        return dict(Counter(str(getattr(e, field)) for e in self.examples).most_common())

    def summary(self) -> str:
        """One line: 'NAME: 38575 questions on 4000 images, 13 answers; yes/no 28407, shape 5002, ...'."""
        types = ", ".join(f"{t} {n}" for t, n in self.counts().items())
        return (f"{self.name}: {len(self.examples)} questions on {len(self.images)} images, "
                f"{len(self.answer_vocabulary())} answers; {types}")


@dataclass
class CaptionDataset:
    """Captioned images; `dataset[i]` is (image uint8 (C, H, W), example i)."""

    images: torch.Tensor  # uint8 (N_images, C, H, W)
    image_names: list[str]
    examples: list[CaptionExample]
    name: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, CaptionExample]:
        example = self.examples[i]
        return self.images[example.image], example

    def summary(self) -> str:
        n_captions = sum(len(e.captions) for e in self.examples)
        return f"{self.name}: {len(self.examples)} images, {n_captions} captions"


def normalize_answer(answer: Any) -> str:
    """'  Right  Upper lobe ' -> 'right upper lobe'; numbers (VQA-RAD has a few) -> their text."""
    return " ".join(str(answer).lower().split())


# ---------------------------------------------------------------------------------------------
# Images


def dataset_folder(root: str | os.PathLike | None, name: str) -> Path:
    """The folder of dataset `name`: `root` when given, else $FROMSCRATCH_DATA/`name`."""
    if root is None:
        if not os.environ.get(ENV_DATA):
            raise UserError(f"{name}: give its folder, or set ${ENV_DATA} to the folder holding {name}/")
        root = Path(os.environ[ENV_DATA]) / name
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder ({name})")
    return root


def _check_image_format(size: int, channels: int) -> None:
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), not {channels}")
    if size < 1:
        raise UserError(f"image size must be positive, not {size}")


def image_to_array(image: Image.Image, size: int, channels: int = 3) -> np.ndarray:
    """uint8 (channels, size, size): `image` padded with black to a square, then resized."""
    mode = "L" if channels == 1 else "RGB"
    image = image.convert(mode)
    width, height = image.size
    if width != height:
        side = max(width, height)
        square = Image.new(mode, (side, side))
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        image = square
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _decode(file: Path | io.BytesIO, size: int, channels: int, where: str) -> np.ndarray:
    """uint8 (channels, size, size) from an image file; `where` names it in errors."""
    try:
        with Image.open(file) as image:
            if image.format == "JPEG":  # decode at a reduced scale, still at least `size` px
                image.draft("L" if channels == 1 else "RGB", (size, size))
            return image_to_array(image, size, channels)
    except FileNotFoundError:
        raise UserError(f"{where}: image not found") from None
    except Image.DecompressionBombError as e:  # PIL refuses to decode it: a decompression bomb, or a huge scan
        raise UserError(f"{where}: image too large to decode ({e})") from None
    except (UnidentifiedImageError, OSError) as e:  # not an image, or truncated
        raise UserError(f"{where}: not a readable image ({e})") from None


def _fingerprint(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def load_images(paths: Sequence[str | os.PathLike], size: int, channels: int = 3,
                cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """uint8 (len(paths), channels, size, size): the images decoded as `image_to_array` does.

    With `cache_dir`, the tensor is also saved there (images-SIZEpx-Cch-FINGERPRINT.npy) and read
    back instead of decoding when the same files are asked for again.
    """
    _check_image_format(size, channels)
    paths = [Path(p) for p in paths]
    for path in paths:
        if path.is_dir():
            raise UserError(f"{path}: a directory, not an image")
        if not path.is_file():
            raise UserError(f"{path}: image not found")
    shape = (len(paths), channels, size, size)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"images-{size}px-{channels}ch-{_fingerprint(paths)}.npy"
        if cache_file.is_file():
            try:
                cached = np.load(cache_file)
                if cached.shape == shape and cached.dtype == np.uint8:
                    return torch.from_numpy(cached)
                logger.warning("%s: image cache of the wrong shape %s; decoding again", cache_file, cached.shape)
            except (OSError, ValueError) as e:
                logger.warning("%s: unreadable image cache (%s); decoding again", cache_file, e)
    array = np.zeros(shape, dtype=np.uint8)
    for i, path in enumerate(paths):
        array[i] = _decode(path, size, channels, str(path))
    if cache_file is not None:
        partial = cache_file.with_suffix(".partial.npy")
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            np.save(partial, array)
            partial.replace(cache_file)  # atomic: a reader never sees half a cache
        except OSError as e:
            raise UserError(f"{cache_file}: cannot write the image cache ({e.strerror or e})") from None
    return torch.from_numpy(array)


def _hf_image_to_array(value: Any, size: int, channels: int, where: str) -> np.ndarray:
    """A `datasets` image cell (a PIL image, or {"bytes", "path"} when not decoded) -> (C, size, size)."""
    if isinstance(value, Image.Image):
        return image_to_array(value, size, channels)
    if isinstance(value, dict) and value.get("bytes"):
        return _decode(io.BytesIO(value["bytes"]), size, channels, where)
    if isinstance(value, dict) and value.get("path"):
        return _decode(Path(value["path"]), size, channels, f"{where}: {value['path']}")
    raise UserError(f"{where}: expected an image, found {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# JSON files


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def _field(entry: dict, key: str, types: type | tuple[type, ...], where: str) -> Any:
    """entry[key], checked to be one of `types`; a UserError naming `where` otherwise."""
    if key not in entry:
        raise UserError(f"{where}: missing field {key!r}")
    value = entry[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise UserError(f"{where}: field {key!r} should be {names}, not {type(value).__name__} ({value!r:.40})")
    return value


# ---------------------------------------------------------------------------------------------
# easy-VQA


def easy_vqa_question_type(question: str) -> str:
    """'colour' ("what color is the shape?"), 'shape' ("what is the blue shape?") or 'yes/no'
    ("is there a red shape?", "does the image contain a circle?"): easy-VQA's 24 templates."""
    question = question.lower()
    if question.startswith(("what color", "what is the color")):
        return "colour"
    if question.startswith("what"):
        return "shape"
    return "yes/no"


def load_easy_vqa(split: str = "train", size: int = 64, channels: int = 3,
                  cache_dir: str | os.PathLike | None = None) -> VQADataset:
    """easy-VQA's "train" (4,000 images, 38,575 questions) or "test" (1,000, 9,673) split, read
    from the `easy-vqa` package; images uint8 (N, channels, size, size), native size 64."""
    try:
        import easy_vqa
    except ImportError:
        raise UserError("easy-VQA needs its package: pip install easy-vqa") from None
    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        image_paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        texts, answers, image_ids = easy_vqa.get_test_questions()
        image_paths = easy_vqa.get_test_image_paths()
    else:
        raise UserError(f"easy-VQA has splits train and test, not {split!r}")
    ids = sorted(image_paths)
    row = {image_id: k for k, image_id in enumerate(ids)}
    examples = []
    for i, (question, answer, image_id) in enumerate(zip(texts, answers, image_ids)):
        if image_id not in row:
            raise UserError(f"easy-VQA {split} question {i}: image {image_id} is not in the package")
        question_type = easy_vqa_question_type(question)
        examples.append(VQAExample(
            image=row[image_id], question=question, answer=normalize_answer(answer), question_type=question_type,
            answer_type="yes/no" if question_type == "yes/no" else "other", source=f"easy-vqa-{split}[{i}]",
        ))
    images = load_images([image_paths[i] for i in ids], size, channels, cache_dir)
    dataset = VQADataset(images, [str(i) for i in ids], examples, name=f"easy-vqa-{split}")
    logger.info(dataset.summary())
    return dataset


# ---------------------------------------------------------------------------------------------
# VQA-RAD

VQA_RAD_SPLITS = ("train", "val")


def _read_vqa_rad_entries(json_path: Path, images_dir: Path) -> list[dict]:
    """The entries of a VQA-RAD file, checked and normalised: image_name, question, answer,
    answer_type ("closed"/"open"), question_type ("PRES", "POS", ...) and source."""
    data = _read_json(json_path)
    if not isinstance(data, list):
        raise UserError(f"{json_path}: expected a JSON list of questions, found {type(data).__name__}")
    if not data:
        raise UserError(f"{json_path}: no questions")
    entries = []
    for i, entry in enumerate(data):
        where = f"{json_path} entry {i}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected an object, found {type(entry).__name__}")
        if "qid" in entry:
            where += f" (qid {entry['qid']})"
        image_name = _field(entry, "image_name", str, where)
        if not (images_dir / image_name).is_file():
            raise UserError(f"{where}: image {images_dir / image_name} not found")
        question = " ".join(_field(entry, "question", str, where).split())
        answer = normalize_answer(_field(entry, "answer", (str, int, float), where))
        for key, value in (("question", question), ("answer", answer)):
            if not value:
                raise UserError(f"{where}: empty {key}")
        entries.append({
            "image_name": image_name, "question": question, "answer": answer,
            "answer_type": _field(entry, "answer_type", str, where).strip().lower(),  # two say "CLOSED "
            "question_type": _field(entry, "question_type", str, where).strip().upper(),
            "source": f"{json_path.name}[{i}]",
        })
    return entries


def _vqa_rad_dataset(entries: list[dict], images_dir: Path, name: str, size: int, channels: int,
                     cache_dir: str | os.PathLike | None) -> VQADataset:
    image_names = sorted({e["image_name"] for e in entries})
    row = {image_name: k for k, image_name in enumerate(image_names)}
    examples = [
        VQAExample(image=row[e["image_name"]], question=e["question"], answer=e["answer"],
                   question_type=e["question_type"], answer_type=e["answer_type"], source=e["source"])
        for e in entries
    ]
    images = load_images([images_dir / n for n in image_names], size, channels, cache_dir)
    dataset = VQADataset(images, image_names, examples, name=name)
    logger.info(dataset.summary())
    return dataset


def split_by_image(image_names: Sequence[str], val_fraction: float, seed: int = 0) -> set[str]:
    """The images of the validation part: round(val_fraction × #images) of them (at least one).

    Each image is ranked by a hash of (seed, name), so the split is the same on every machine and
    Python/NumPy version, and an image keeps its side when others are added to the file.
    """
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    names = sorted(set(image_names))
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
    return set(ranked[: max(1, round(val_fraction * len(names)))])


def load_vqa_rad(root: str | os.PathLike | None = None, split: str = "train", val_fraction: float = 0.1,
                 seed: int = 0, size: int = 128, channels: int = 3,
                 cache_dir: str | os.PathLike | None = None) -> VQADataset:
    """VQA-RAD's trainset.json split by image into "train" and "val" (no image in both, so val
    accuracy is not inflated by questions on images seen in training).

    `root` holds trainset.json and images/ (default $FROMSCRATCH_DATA/vqa-rad); the parts are
    named after it ("vqa-rad-train", "mydata-val"). Images uint8 (N, channels, size, size);
    `val_fraction` is a fraction of the images, not of the questions.
    """
    if split not in VQA_RAD_SPLITS:
        raise UserError(f"VQA-RAD splits of trainset.json are {' and '.join(VQA_RAD_SPLITS)}, not {split!r} "
                        "(read a test file with load_vqa_rad_file)")
    root = dataset_folder(root, "vqa-rad")
    images_dir = root / "images"
    entries = _read_vqa_rad_entries(root / "trainset.json", images_dir)
    val_images = split_by_image([e["image_name"] for e in entries], val_fraction, seed)
    entries = [e for e in entries if (e["image_name"] in val_images) == (split == "val")]
    name = Path(os.path.abspath(root)).name  # abspath, not resolve: "." gets its folder's name, a link keeps its own
    return _vqa_rad_dataset(entries, images_dir, f"{name}-{split}", size, channels, cache_dir)


def load_vqa_rad_file(json_path: str | os.PathLike, images_dir: str | os.PathLike | None = None,
                      size: int = 128, channels: int = 3,
                      cache_dir: str | os.PathLike | None = None) -> VQADataset:
    """Every question of a file in VQA-RAD's format (the held-out official test file, or
    trainset.json whole). `images_dir` defaults to images/ beside the file."""
    json_path = Path(json_path)
    images_dir = Path(images_dir) if images_dir is not None else json_path.parent / "images"
    if not images_dir.is_dir():
        raise UserError(f"{images_dir}: no such image folder (for {json_path})")
    entries = _read_vqa_rad_entries(json_path, images_dir)
    return _vqa_rad_dataset(entries, images_dir, f"vqa-rad-{json_path.stem}", size, channels, cache_dir)


# ---------------------------------------------------------------------------------------------
# COCO captions


def load_coco_captions_json(annotations_json: str | os.PathLike, images_dir: str | os.PathLike,
                            size: int = 64, channels: int = 3, limit: int | None = None,
                            cache_dir: str | os.PathLike | None = None) -> CaptionDataset:
    """Captioned images from a COCO annotation file (captions_train2017.json's format:
    {"images": [{id, file_name}], "annotations": [{image_id, caption}]}) and its image folder.

    Images come in the file's order; those without a caption are left out; `limit` keeps the
    first `limit` captioned images. Images uint8 (N, channels, size, size).
    """
    path, images_dir = Path(annotations_json), Path(images_dir)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object with 'images' and 'annotations', found {type(data).__name__}")
    images = _field(data, "images", list, str(path))
    annotations = _field(data, "annotations", list, str(path))
    file_names: dict[int, str] = {}
    for i, image in enumerate(images):
        where = f"{path} images[{i}]"
        if not isinstance(image, dict):
            raise UserError(f"{where}: expected an object, found {type(image).__name__}")
        image_id = _field(image, "id", int, where)
        if image_id in file_names:
            raise UserError(f"{where}: id {image_id} is already the id of {file_names[image_id]}")
        file_names[image_id] = _field(image, "file_name", str, where)
    if not annotations:
        raise UserError(f"{path}: no captions")
    captions: dict[int, list[str]] = {}
    for i, annotation in enumerate(annotations):
        where = f"{path} annotations[{i}]"
        if not isinstance(annotation, dict):
            raise UserError(f"{where}: expected an object, found {type(annotation).__name__}")
        image_id = _field(annotation, "image_id", int, where)
        if image_id not in file_names:
            raise UserError(f"{where}: image_id {image_id} is not in 'images'")
        caption = " ".join(_field(annotation, "caption", str, where).split())
        if not caption:
            raise UserError(f"{where}: empty caption")
        captions.setdefault(image_id, []).append(caption)
    captioned = [i for i in file_names if i in captions]
    if len(captioned) < len(file_names):
        logger.info("%s: %d images without a caption left out", path, len(file_names) - len(captioned))
    ids = captioned[:limit]
    for image_id in ids:
        if not (images_dir / file_names[image_id]).is_file():
            raise UserError(f"{path}: image {image_id}'s file {images_dir / file_names[image_id]} not found")
    examples = [CaptionExample(k, tuple(captions[i]), source=f"{path.name}:{i}") for k, i in enumerate(ids)]
    tensor = load_images([images_dir / file_names[i] for i in ids], size, channels, cache_dir)
    dataset = CaptionDataset(tensor, [file_names[i] for i in ids], examples, name=path.stem)
    logger.info(dataset.summary())
    return dataset


# ---------------------------------------------------------------------------------------------
# The Hugging Face hub

CAPTION_COLUMNS = ("sentences", "captions", "caption")  # Karpathy splits, most hub copies, one-caption sets


def load_hub_dataset(name: str, split: str, config: str | None = None):
    """`datasets.load_dataset(name, config, split=split)`; a UserError when `datasets` is missing
    or the hub cannot give the dataset (offline, unknown name or split)."""
    try:
        import datasets
    except ImportError:
        raise UserError("loading from the Hugging Face hub needs `datasets`: pip install fromscratch[hub]") from None
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown name, split or config: the user can fix each
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load {name} (split {split}) from the Hugging Face hub: {reason}") from None


def _captions_of(value: Any, where: str) -> tuple[str, ...]:
    """A caption cell: a string, a list of strings, or Karpathy's list of {"raw": ..., "tokens": ...}."""
    if isinstance(value, dict) and "raw" in value:  # a list of structs that `datasets` stored column-wise
        value = value["raw"]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise UserError(f"{where}: captions should be a string or a list, not {type(value).__name__}")
    captions = []
    for item in items:
        text = item.get("raw") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise UserError(f"{where}: a caption should be a string, not {type(text).__name__}")
        if text.strip():
            captions.append(" ".join(text.split()))
    if not captions:
        raise UserError(f"{where}: no captions")
    return tuple(captions)


def captions_from_hf(dataset, images_dir: str | os.PathLike | None = None, size: int = 64, channels: int = 3,
                     name: str = "hub") -> CaptionDataset:
    """A `datasets.Dataset` of captioned images -> CaptionDataset, images uint8 (N, channels, size, size).

    Captions come from the first of the columns "sentences", "captions", "caption"; the image from
    an "image" column, or else from the file `images_dir`/filepath/filename (the Karpathy split's
    schema, e.g. `yerevann/coco-karpathy`, which carries no pixels).
    """
    _check_image_format(size, channels)
    columns = list(getattr(dataset, "column_names", []))
    caption_column = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if caption_column is None:
        raise UserError(f"{name}: no caption column ({', '.join(CAPTION_COLUMNS)}); columns: {', '.join(columns)}")
    if "image" not in columns and ("filename" not in columns or images_dir is None):
        raise UserError(f"{name}: no 'image' column; give images_dir to read the files its 'filename' column names")
    arrays, image_names, examples = [], [], []
    for i, row in enumerate(dataset):
        where = f"{name} row {i}"
        if "image" in columns:
            arrays.append(_hf_image_to_array(row["image"], size, channels, where))
            image_names.append(str(row.get("filename") or row.get("image_id") or i))
        else:
            path = Path(images_dir) / (row.get("filepath") or "") / row["filename"]
            if not path.is_file():
                raise UserError(f"{where}: image {path} not found")
            arrays.append(_decode(path, size, channels, str(path)))
            image_names.append(row["filename"])
        examples.append(CaptionExample(i, _captions_of(row[caption_column], where), source=f"{name}:{i}"))
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, channels, size, size, dtype=torch.uint8)
    return CaptionDataset(images, image_names, examples, name=name)


def _human_answers(value: Any, where: str) -> tuple[str, ...]:
    """VQAv2's answers cell: [{"answer": ..}, ..], or {"answer": [..]} when stored column-wise, or [str]."""
    if isinstance(value, dict) and "answer" in value:
        value = value["answer"]
    if not isinstance(value, list):
        raise UserError(f"{where}: 'answers' should be a list, not {type(value).__name__}")
    answers = [item.get("answer") if isinstance(item, dict) else item for item in value]
    if not all(isinstance(a, str) for a in answers):
        raise UserError(f"{where}: every answer in 'answers' should be a string")
    return tuple(" ".join(a.split()) for a in answers)


def vqa_from_hf(dataset, size: int = 64, channels: int = 3, name: str = "hub") -> VQADataset:
    """A `datasets.Dataset` with VQAv2's schema ({image, image_id, question, answers:
    [{answer, ..}], multiple_choice_answer, question_type, answer_type}) -> VQADataset.

    Rows that share an image_id share one row of the images tensor, uint8 (N, channels, size,
    size), decoded once. The answer is multiple_choice_answer, else the most common human answer,
    else an "answer" column; question_type and answer_type may be absent.
    """
    _check_image_format(size, channels)
    columns = list(getattr(dataset, "column_names", []))
    missing = [c for c in ("image", "question") if c not in columns]
    if missing or not {"answers", "multiple_choice_answer", "answer"} & set(columns):
        raise UserError(f"{name}: expected VQAv2's columns image, question and answers (or answer); "
                        f"found {', '.join(columns)}")
    text = dataset.remove_columns("image")  # read the text without decoding any image
    image_of: dict[Any, int] = {}  # image_id -> row of the images tensor
    first_rows: list[int] = []  # first_rows[k]: the dataset row whose image becomes images[k]
    examples = []
    for i, row in enumerate(text):
        where = f"{name} row {i}"
        if not isinstance(row["question"], str):
            raise UserError(f"{where}: field 'question' should be str, not {type(row['question']).__name__}")
        image_key = row.get("image_id", i)
        if image_key not in image_of:
            image_of[image_key] = len(first_rows)
            first_rows.append(i)
        answers = _human_answers(row["answers"], where) if "answers" in columns else ()
        if row.get("multiple_choice_answer") is not None:
            answer = row["multiple_choice_answer"]
        elif answers:
            answer = Counter(normalize_answer(a) for a in answers).most_common(1)[0][0]
        elif "answer" in columns:
            answer = row["answer"]
        else:
            raise UserError(f"{where}: no answer")
        examples.append(VQAExample(
            image=image_of[image_key], question=" ".join(row["question"].split()), answer=normalize_answer(answer),
            question_type=str(row.get("question_type") or "unknown"), answer_type=row.get("answer_type"),
            answers=answers, source=f"{name}:{row.get('question_id', i)}",
        ))
    arrays = [_hf_image_to_array(row["image"], size, channels, f"{name} row {r}")
              for r, row in zip(first_rows, dataset.select(first_rows).select_columns(["image"]))]
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, channels, size, size, dtype=torch.uint8)
    return VQADataset(images, [str(k) for k in image_of], examples, name=name)


def load_hub_captions(name: str = "yerevann/coco-karpathy", split: str = "validation",
                      images_dir: str | os.PathLike | None = None, size: int = 64, channels: int = 3) -> CaptionDataset:
    """A captions dataset from the hub (a slice such as split="test[:500]" keeps it small); see
    `captions_from_hf` for the schema and `images_dir`."""
    dataset = load_hub_dataset(name, split)
    return captions_from_hf(dataset, images_dir, size, channels, name=f"{name}:{split}")


def load_hub_vqa(name: str = "HuggingFaceM4/VQAv2", split: str = "validation[:2000]", size: int = 64,
                 channels: int = 3) -> VQADataset:
    """VQAv2 (or a dataset of its schema) from the hub. VQAv2's 83k training images at 64 px are
    ~1 GB held in memory, hence a slice by default."""
    dataset = load_hub_dataset(name, split)
    return vqa_from_hf(dataset, size, channels, name=f"{name}:{split}")
