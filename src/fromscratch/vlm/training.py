"""Training the VLM on the shared engine: the task, `train` (what `fromscratch vlm train` runs),
loading a trained run, and the demo.

A step's batch is a set of images, each with `texts_per_image` texts about it: a caption (when
the data has captions; the positive pair of the contrastive loss) and questions with their
answers. The image is encoded once for all its texts (the decoder's rows point at it through
`image_index`), which makes the step's cost mostly the text decoder's rather than the ViT's.
The batch is a pure function of (seed, step): images in a seeded order, one permutation per
epoch, and the texts of each image drawn by a generator seeded with (seed, step).

    images      uint8 (B, C, H, W)
    tokens      (B, K, T)   <s> caption             or  <s> question <sep> answer
    targets     (B, K, T)   caption </s>                (pad …) answer </s>: what is predicted
    is_caption  (B, K)      True for the caption row of each image

The run directory holds, besides what the engine writes, tokenizer.json (the word vocabulary
of the training text) and task.json (the data, the settings of the batches, the decoding
lengths), which `VLM.from_pretrained` and `fromscratch vlm eval` read.

Optimiser: AdamW, β = (0.9, 0.999) and weight decay 0.01 on matrices, a cosine schedule after
a short warm-up, gradients clipped at 1.0; after every step the temperature is clamped as
open_clip does (`clip.clamp_logit_scale`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fromscratch.checkpoints.runs import read_run
from fromscratch.checkpoints.safe import read_json_object
from fromscratch.engine import TrainConfig, Trainer, check_run_state, make_train_config
from fromscratch.engine.checkpoint import read_index, write_json
from fromscratch.errors import UserError
from fromscratch.vlm import sources
from fromscratch.vlm.clip import clamp_logit_scale
from fromscratch.vlm.config import VLMConfig
from fromscratch.vlm.decoding import answer_ids
from fromscratch.vlm.fast import accelerate
from fromscratch.vlm.metrics import exact_match
from fromscratch.vlm.model import VLM, coca_loss, pad_rows
from fromscratch.vlm.tokenizer import TOKENIZER_FILE, WordTokenizer

logger = logging.getLogger(__name__)

MODEL_NAME = "vlm"
TASK_FILE = "task.json"
DEFAULTS = TrainConfig(max_steps=4000, batch_size=64, lr=1e-3, min_lr=1e-5, warmup_steps=200, schedule="cosine",
                       betas=(0.9, 0.999), weight_decay=0.01, clip_grad=1.0, eval_every=500, save_every=500)
# Per dataset: the model preset, texts per image, and the engine settings that differ from DEFAULTS.
DATA_DEFAULTS = {
    "easy-vqa": dict(preset="small", texts_per_image=4, batch_size=64, max_steps=4000),
    "scenes": dict(preset="small", texts_per_image=4, batch_size=64, max_steps=6000),
    "vqa-rad": dict(preset="rad", texts_per_image=8, batch_size=16, max_steps=2000, lr=5e-4),
    "vqa-folder": dict(preset="rad", texts_per_image=8, batch_size=16, max_steps=2000, lr=5e-4),
    "caption-folder": dict(preset="small", texts_per_image=1, batch_size=64, max_steps=5000),
}
# Validation questions answered (greedy) at each evaluation: every one of easy-VQA's (3,796), the
# scenes' (2,573) and VQA-RAD's held-out part. With 500, accuracy moved in steps of 0.2 points and
# the earliest of tied checkpoints was kept (bench/results/vlm_easy-vqa_eval500: 99.29% on test).
EVAL_QUESTIONS = 4000
EVAL_IMAGES_PER_CHUNK = 64


def sequence(config, prompt: list[int], text: list[int]) -> tuple[list[int], list[int]]:
    """The decoder's input and targets for `text` after `prompt` (the prompt's own tokens are not
    predicted): <s> prompt text </s> → input <s> prompt text, targets (pad …) text </s>."""
    full = [config.bos_id, *prompt, *text, config.eos_id]
    targets = full[1:]
    return full[:-1], [config.pad_id] * len(prompt) + targets[len(prompt):]


class VLMTask:
    """Everything VLM-specific the engine needs (the interface is in engine/trainer.py)."""

    model_name = MODEL_NAME

    def __init__(self, model_config: VLMConfig, tokenizer: WordTokenizer, train: sources.Split,
                 val: sources.Split, batch_images: int, texts_per_image: int, seed: int, settings: dict):
        if model_config.vocab_size != tokenizer.vocab_size:
            raise UserError(f"model vocab_size {model_config.vocab_size} ≠ tokenizer's {tokenizer.vocab_size}")
        if not (train.captions or train.questions):  # e.g. a folder whose one image is the validation part
            raise UserError(f"{train.name}: no captions or questions at all in the training part "
                            f"({len(train.images)} images; the validation part has {len(val.images)})")
        self.model_config, self.tokenizer, self.settings = model_config, tokenizer, settings
        self.seed, self.batch_images, self.texts_per_image = seed, batch_images, texts_per_image
        self.blind = bool(settings.get("blind"))
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone
            torch.manual_seed(seed)
            self.model = accelerate(VLM(model_config, tokenizer))  # the fast paths: same maths (fast.py)
        self.train, self.val = train, val
        self.train_texts, _ = self._texts(train)
        self.val_texts, self.val_questions = self._texts(val)
        if not any(caps or qas for caps, qas in self.train_texts):
            raise UserError(f"{train.name}: no caption or question fits the model's "
                            f"{model_config.max_text_len} positions")
        self.best_metric, self.best_mode = ("val_accuracy", "max") if self.val_questions else ("val_loss", "min")

    def _texts(self, split: sources.Split) -> tuple[list[tuple[list, list]], list]:
        """Per image: (its captions, its questions), each as (input, targets) token lists; and the
        questions kept. Texts longer than the model's positions are left out, with a warning."""
        c, tok = self.model_config, self.tokenizer
        texts: list[tuple[list, list]] = [([], []) for _ in range(len(split.images))]
        n_captions = 0
        for example in split.captions:
            for caption in tok.encode_batch(list(example.captions)):
                n_captions += 1
                text = sequence(c, [], caption)
                if len(text[0]) <= c.max_text_len:
                    texts[example.image][0].append(text)
        questions = tok.encode_batch([e.question for e in split.questions])
        answers = tok.encode_batch([e.answer for e in split.questions])
        kept = []
        for example, q, a in zip(split.questions, questions, answers):
            text = sequence(c, [*q, c.sep_id], a)
            if len(text[0]) <= c.max_text_len:
                texts[example.image][1].append(text)
                kept.append(example)
        long_captions = n_captions - sum(len(caps) for caps, _ in texts)
        if long_captions or len(kept) < len(questions):
            logger.warning("%s: %d of %d questions and %d of %d captions are longer than the model's %d text "
                           "positions: left out", split.name, len(questions) - len(kept), len(questions),
                           long_captions, n_captions, c.max_text_len)
        return texts, kept

    # --- batches -----------------------------------------------------------------------------

    @lru_cache(maxsize=2)
    def _order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train.images), generator=generator)

    def _collate(self, images: torch.Tensor, rows: list[list[tuple[list[int], list[int], bool]]]) -> dict:
        """images (B, C, H, W) and, per image, its text rows → the batch tensors (module docstring)."""
        c, k = self.model_config, max(len(r) for r in rows)
        flat = [r[j] if j < len(r) else ([c.pad_id], [c.pad_id], False) for r in rows for j in range(k)]
        tokens = pad_rows([f[0] for f in flat], c.pad_id)
        targets = pad_rows([f[1] for f in flat], c.pad_id)
        return {
            "images": torch.zeros_like(images) if self.blind else images,
            "tokens": tokens.view(len(rows), k, -1),
            "targets": targets.view(len(rows), k, -1),
            "is_caption": torch.tensor([f[2] for f in flat]).view(len(rows), k),
        }

    def global_batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of (1-based) step `step`, a pure function of (seed, step)."""
        n, start = len(self.train.images), (step - 1) * self.batch_images
        picked = [int(self._order((start + j) // n)[(start + j) % n]) for j in range(self.batch_images)]
        rng = np.random.default_rng([self.seed, step])
        rows = []
        for image in picked:
            captions, questions = self.train_texts[image]
            row = []
            if captions:
                ids, targets = captions[int(rng.integers(len(captions)))]
                row.append((ids, targets, True))
            n_questions = min(self.texts_per_image - len(row), len(questions))
            for q in rng.choice(len(questions), size=n_questions, replace=False) if n_questions else []:
                row.append((*questions[int(q)], False))
            rows.append(row)
        return self._collate(self.train.images[picked], rows)

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        total, n_tokens, _ = self._loss(model, batch)
        return total, n_tokens

    def _loss(self, model, batch):
        b, k, t = batch["tokens"].shape
        image_index = torch.arange(b, device=batch["tokens"].device).repeat_interleave(k)
        out = model(self.model.pixels(batch["images"]), batch["tokens"].view(b * k, t), image_index)
        return coca_loss(self.model_config, out, batch["targets"].view(b * k, t), image_index,
                         batch["is_caption"].view(b * k))

    def after_step(self, model, dist) -> None:
        clamp_logit_scale(model.logit_scale)

    # --- validation --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model, step: int) -> dict[str, float]:
        """val_loss (λ_cap·val_caption_nll + λ_con·val_contrastive) over every validation text,
        images in chunks of 64 (each chunk's captions the contrastive negatives), and
        val_accuracy: exact-match accuracy of greedy answers to the first EVAL_QUESTIONS validation questions.
        Uses no random numbers."""
        c = self.model_config
        device = next(model.parameters()).device
        nll = tokens = 0.0
        contrastive = []
        for first in range(0, len(self.val.images), EVAL_IMAGES_PER_CHUNK):
            chunk = range(first, min(first + EVAL_IMAGES_PER_CHUNK, len(self.val.images)))
            rows = [[(*t, True) for t in self.val_texts[i][0][:1]] + [(*t, False) for t in self.val_texts[i][1]]
                    for i in chunk]
            if not any(rows):
                continue
            batch = {k: v.to(device) for k, v in self._collate(self.val.images[list(chunk)], rows).items()}
            _, n, parts = self._loss(model, batch)
            nll, tokens = nll + parts["caption_nll"] * n, tokens + n
            if "contrastive" in parts:
                contrastive.append(parts["contrastive"])
        metrics = {"val_caption_nll": nll / max(tokens, 1)}
        metrics["val_loss"] = c.caption_loss_weight * metrics["val_caption_nll"]
        if contrastive:
            metrics["val_contrastive"] = sum(contrastive) / len(contrastive)
            metrics["val_loss"] += c.contrastive_loss_weight * metrics["val_contrastive"]
        if self.val_questions:
            questions = self.val_questions[:EVAL_QUESTIONS]
            predictions = answer_questions(model, self.tokenizer, self.val.images, questions,
                                           self.settings["max_answer_tokens"], blind=self.blind)
            right = sum(exact_match(p, q.answer) for p, q in zip(predictions, questions))
            metrics["val_accuracy"] = right / len(questions)
        return metrics

    def save_artifacts(self, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        self.tokenizer.save(run_dir / TOKENIZER_FILE)
        if not (run_dir / TASK_FILE).exists() or not read_index(run_dir).get("latest"):
            write_json(run_dir / TASK_FILE, self.settings)


def answer_questions(model, tokenizer, images: torch.Tensor, questions, max_new_tokens: int, batch_size: int = 256,
                     blind: bool = False, image_of=None, beam_size: int = 1) -> list[str]:
    """Greedy (or beam) answers to VQAExamples `questions` about rows of `images` (uint8),
    `batch_size` questions at a time. image_of(example) picks the image row (default: example.image).
    A question that leaves no room for an answer in the model's positions is a UserError naming
    it, before any is answered."""
    image_of = image_of or (lambda e: e.image)
    question_ids = tokenizer.encode_batch([e.question for e in questions])
    limit = model.config.max_text_len
    for i, (example, ids) in enumerate(zip(questions, question_ids)):
        if len(ids) + 2 >= limit:  # <s> question <sep>, then at least one answer token
            raise UserError(f"{example.source or f'question {i}'}: the question is {len(ids)} tokens long; the "
                            f"model's {limit} text positions leave room for an answer after at most {limit - 3}")
    answers = []
    for start in range(0, len(questions), batch_size):
        part = questions[start:start + batch_size]
        batch = images[[image_of(e) for e in part]]
        pixels = model.pixels(torch.zeros_like(batch) if blind else batch)
        ids = answer_ids(model, pixels, question_ids[start:start + batch_size], max_new_tokens, beam_size)
        answers += tokenizer.decode_batch(ids)
    return answers


# ---------------------------------------------------------------------------------------------
# Training from Python (what `fromscratch vlm train` calls)


def _check_same_task(run_dir: Path, settings: dict) -> None:
    path = run_dir / TASK_FILE
    if not path.exists():
        return
    recorded = read_json_object(path)
    problems = [f"{k} {recorded[k]!r} (asked now: {settings[k]!r})" for k in settings
                if k in recorded and recorded[k] != settings[k]]
    if problems:
        raise UserError(f"--resume: the run in {run_dir} was started with " + "; ".join(problems)
                        + f". Repeat the original flags (recorded in {path}) or use a new --out")


def train(data: str, out: str | os.PathLike, *, preset: str | None = None, texts_per_image: int | None = None,
          scenes: int | None = None, blind: bool = False, command: list[str] | None = None, **engine) -> dict:
    """Train a VLM on `data` (easy-vqa, vqa-rad, scenes, or a folder: `sources.py`) into the run
    directory `out`. preset: the model size (default: the dataset's, DATA_DEFAULTS);
    texts_per_image: texts per image in a batch; scenes: how many training scenes to generate;
    blind: the question-only baseline (every image black, in training and evaluation);
    engine: the shared engine's options (max_steps, batch_size = images per step, lr, resume, …).
    Returns the engine's result: {"step", "train", "eval", "best", "run_dir"}."""
    # 1. Every argument is checked before anything is loaded or written.
    what = sources.kind(data)
    defaults = dict(DATA_DEFAULTS[what])
    data_preset, data_texts = defaults.pop("preset"), defaults.pop("texts_per_image")
    preset = preset or data_preset
    texts_per_image = data_texts if texts_per_image is None else texts_per_image
    base = TrainConfig(**{**DEFAULTS.to_dict(), **defaults})
    config = make_train_config(base, out, **engine)
    config.check_before_work()
    VLMConfig.from_preset(preset)  # an unknown preset fails here
    if texts_per_image < 1:
        raise UserError(f"--texts-per-image must be at least 1, got {texts_per_image}")
    if scenes is not None and what != "scenes":
        raise UserError("--scenes N (at least 10) is for --data scenes")
    if scenes is not None and scenes < 10:
        raise UserError(f"--scenes must be at least 10, got {scenes}")
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun (the engine checks again)
    if config.batch_size % (processes * config.grad_accum):
        raise UserError(f"--batch-size {config.batch_size} is not divisible by processes × --grad-accum = "
                        f"{processes} × {config.grad_accum}; the global batch must split evenly")
    run_dir = Path(config.out_dir)
    check_run_state(run_dir, config.resume, MODEL_NAME)  # before any data is read
    scene_settings = sources.scene_settings(scenes) if what == "scenes" else None
    settings = {"data": sources.canonical(data), "preset": preset, "texts_per_image": texts_per_image,
                "blind": blind, "scenes": scene_settings}
    if config.resume:
        _check_same_task(run_dir, settings)

    # 2. Data, tokenizer (the run's own on --resume), model.
    shape = VLMConfig.from_preset(preset)
    load = dict(image_size=shape.image_size, channels=shape.n_channels, scenes=scene_settings)
    train_split, val_split = sources.load_part(data, "train", **load), sources.load_part(data, "val", **load)
    if config.resume and (run_dir / TOKENIZER_FILE).is_file():
        tokenizer = WordTokenizer.load(run_dir)
    else:
        tokenizer = WordTokenizer.train(
            [c for e in train_split.captions for c in e.captions]
            + [t for e in train_split.questions for t in (e.question, e.answer)])
    answers = tokenizer.encode_batch([e.answer for e in train_split.questions]) or [[]]
    settings["max_answer_tokens"] = max(len(a) for a in answers) + 1
    captions = tokenizer.encode_batch([c for e in train_split.captions for c in e.captions]) or [[]]
    settings["max_caption_tokens"] = max(len(c) for c in captions) + 1
    model_config = VLMConfig.from_preset(preset, vocab_size=tokenizer.vocab_size)
    task = VLMTask(model_config, tokenizer, train_split, val_split, config.batch_size, texts_per_image,
                   config.seed, settings)
    trainer = Trainer(task, config, command)
    print(f"{train_split.summary()}; {val_split.summary()}; vocabulary {tokenizer.vocab_size} words; "
          f"model {preset}, {sum(p.numel() for p in task.model.parameters()):,} parameters", file=sys.stderr)
    return trainer.fit()


# ---------------------------------------------------------------------------------------------
# Loading a trained run


def load_vlm(cls, path, device: str = "cpu"):
    """The VLM of a run (best checkpoint, else latest) or of a checkpoint in one, with the run's
    tokenizer and its task settings (`model.settings`)."""
    from fromscratch.vlm.huggingface import build_checked

    state, config_dict, step_dir, run_dir = read_run(path, MODEL_NAME)
    config = VLMConfig.from_dict(config_dict, source=str(step_dir))
    model = build_checked(cls, config, state, str(step_dir), device)
    model.tokenizer = WordTokenizer.load(run_dir)
    model.settings = read_json_object(run_dir / TASK_FILE) if (run_dir / TASK_FILE).is_file() else {}
    return model


# ---------------------------------------------------------------------------------------------
# The demo


def train_demo(out: str | os.PathLike, data: str = "scenes", max_steps: int = 600, quiet: bool = False) -> dict:
    """A small VLM (the `demo` preset, 48×48 px) trained for about two minutes of CPU time on
    3,000 generated scenes (which need MNIST: $FROMSCRATCH_DATA/images), or on easy-VQA, then
    scored on 300 test images and asked about (and, on the scenes, captioning) one of them.
    Returns {"accuracy", "by_type", "question", "answer", "true_answer", "caption" and
    "reference" (None without captions), "steps", "seconds", "run_dir"}."""
    from fromscratch.vlm.metrics import accuracy_report

    started = time.perf_counter()
    out = Path(out)
    options = dict(preset="demo", max_steps=max_steps, batch_size=32, lr=2e-3, warmup_steps=50, eval_every=max_steps,
                   save_every=max_steps, command=["fromscratch", "demo"])
    if data == "scenes":
        options["scenes"] = 3000
    if quiet:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            result = train(data, out, **options)
    else:
        result = train(data, out, **options)
    model = VLM.from_pretrained(out)
    test = sources.load_part(data, "test", model.config.image_size, model.config.n_channels,
                             scenes={**sources.scene_settings(3000), "n_test": 300}).first(300)
    predictions = answer_questions(model, model.tokenizer, test.images, test.questions,
                                   model.settings["max_answer_tokens"])
    report = accuracy_report(test.questions, predictions, by=("question_type",))
    example = test.questions[0]
    caption = reference = None
    if test.captions:
        caption = model.caption(test.images[[example.image]], 1, model.settings["max_caption_tokens"])[0]
        reference = next(e.captions[0] for e in test.captions if e.image == example.image)
    return {
        "accuracy": report["accuracy"], "by_type": report["by_question_type"], "question": example.question,
        "answer": predictions[0], "true_answer": example.answer, "caption": caption, "reference": reference,
        "steps": result["step"], "seconds": time.perf_counter() - started, "run_dir": str(out),
    }
