"""Scoring a trained VLM: what `fromscratch vlm eval` prints.

    VQA        accuracy overall, by question type and by answer type (and, on the scenes, on
               seen and unseen attribute combinations); beside it the accuracy with the images
               shuffled among the questions ("does the model look?": the gap is the share of
               the answers that comes from the image)
    captions   BLEU-4 and CIDEr-D (metrics.py) of greedy or beam captions against every
               reference; on the scenes also on the images with and without an unseen combination
    retrieval  image→text and text→image recall@1/5/10 in the joint space
    zero-shot  digit classification by text prompts alone, on MNIST digits no scene ever used

Shuffling: the images are permuted by a seeded derangement (no question keeps its image), the
same for every model, so two models' shuffled accuracies are comparable.
"""

from __future__ import annotations

import numpy as np
import torch

from fromscratch.vlm.metrics import accuracy_report, bleu, cider_d, recall_at_k
from fromscratch.vlm.sources import Split
from fromscratch.vlm.training import answer_questions

SHUFFLE_SEED = 0


def derangement(n: int, seed: int = SHUFFLE_SEED) -> np.ndarray:
    """A seeded permutation of range(n) without fixed points (n ≥ 2): a random cycle through all."""
    order = np.random.default_rng(seed).permutation(n)
    permutation = np.empty(n, dtype=np.int64)
    permutation[order] = np.roll(order, -1)  # order[k] → order[k + 1]
    return permutation


@torch.no_grad()
def evaluate_vqa(model, split: Split, blind: bool = False, beam_size: int = 1) -> dict:
    """accuracy_report of the model's answers (by question and answer type; by seen/unseen when
    the split flags held-out combinations), and "shuffled_accuracy" with the images deranged."""
    max_tokens = model.settings.get("max_answer_tokens", 8)
    by = ("question_type", "answer_type") + (("unseen",) if any(e.unseen for e in split.questions) else ())
    predictions = answer_questions(model, model.tokenizer, split.images, split.questions, max_tokens,
                                   blind=blind, beam_size=beam_size)
    report = accuracy_report(split.questions, predictions, by=by)
    if len(split.images) > 1:
        shuffle = derangement(len(split.images))
        shuffled = answer_questions(model, model.tokenizer, split.images, split.questions, max_tokens, blind=blind,
                                    image_of=lambda e: int(shuffle[e.image]), beam_size=beam_size)
        report["shuffled_accuracy"] = accuracy_report(split.questions, shuffled, by=())["accuracy"]
    report["predictions"] = predictions
    return report


@torch.no_grad()
def caption_images(model, images: torch.Tensor, beam_size: int = 1, batch_size: int = 128) -> list[str]:
    max_tokens = model.settings.get("max_caption_tokens", 32)
    captions = []
    for start in range(0, len(images), batch_size):
        captions += model.caption(images[start:start + batch_size], beam_size, max_tokens)
    return captions


def evaluate_captions(model, split: Split, beam_size: int = 1) -> dict:
    """BLEU-4 (in [0, 1]) and CIDEr-D (in [0, 10]), pycocoevalcap's scales, of the captions of the
    split's captioned images; on the scenes also CIDEr-D of the images with and without an unseen
    combination."""
    examples = split.captions
    hypotheses = caption_images(model, split.images[[e.image for e in examples]], beam_size)
    references = [list(e.captions) for e in examples]
    report = {"bleu4": bleu(hypotheses, references)[3], "cider": cider_d(hypotheses, references)[0],
              "n": len(examples), "hypotheses": hypotheses}
    if split.unseen_images:
        for name, unseen in (("seen", False), ("unseen", True)):
            rows = [i for i, e in enumerate(examples) if (e.image in split.unseen_images) == unseen]
            if rows:
                # CIDEr's IDF over the group's references, as if the group were the test set
                report[f"cider_{name}"] = cider_d([hypotheses[i] for i in rows], [references[i] for i in rows])[0]
                report[f"n_{name}"] = len(rows)
    return report


@torch.no_grad()
def evaluate_retrieval(model, split: Split, batch_size: int = 256) -> dict:
    """recall_at_k over the split's captioned images and all their captions."""
    examples = split.captions
    images = split.images[[e.image for e in examples]]
    image_embeds = torch.cat([model.embed_images(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    texts = [c for e in examples for c in e.captions]
    text_image = [k for k, e in enumerate(examples) for _ in e.captions]
    text_embeds = torch.cat([model.embed_texts(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
    return recall_at_k(image_embeds @ text_embeds.t(), text_image)


@torch.no_grad()
def evaluate_zero_shot_digits(model, digits, batch_size: int = 200) -> dict:
    """Accuracy of digit classification through text prompts alone (`ZeroShotDigits.prompts`)."""
    predictions = []
    for start in range(0, len(digits), batch_size):
        rows = range(start, min(start + batch_size, len(digits)))
        predictions.append(model.zero_shot(digits.images[list(rows)], [digits.prompts(i) for i in rows]))
    predicted = torch.cat(predictions).cpu()
    return {"accuracy": float((predicted == digits.labels).float().mean()), "n": len(digits)}
