"""Answer accuracy: the VQA metric for datasets with ten human answers, exact match otherwise.

VQA accuracy (Antol et al. 2015; Goyal et al. 2017, as computed by the official `vqaEval.py`):
an answer is right in proportion to how many humans gave it,

    Acc(ans) = mean over the 10 subsets of 9 human answers of  min(#humans in the subset who said ans / 3, 1),

so an answer three annotators gave scores 1 and one a single annotator gave scores 0.3. Answers
are compared after the official normalisation (`normalize_vqa_answer`): lower case, punctuation
stripped, number words to digits ("two" -> "2"), articles dropped. Departures from `vqaEval.py`:
its table of ~170 contractions ("dont" -> "don't") is not applied, and the normalisation is
applied to every question (the official script skips it when all ten human answers agree, so
there "2." or "the dog" would not match "2" or "dog").
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

from fromscratch.vlm.data import VQAExample, normalize_answer

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")  # what vqaEval.py's periodStrip does in practice


def normalize_vqa_answer(answer: str) -> str:
    """'Two dogs.' -> '2 dogs'; 'the red one!' -> 'red 1'; '1,000' -> '1000' (vqaEval.py's rules)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    for mark in PUNCTUATION:
        # a mark touching a space, or any mark in a text with a thousands comma, is deleted;
        # one inside a word ("black/white") becomes a space
        if f"{mark} " in text or f" {mark}" in text or _COMMA_BETWEEN_DIGITS.search(text):
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text)
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(w for w in words if w not in ARTICLES)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The VQA accuracy of one predicted answer against the human answers (VQAv2 has ten):
    min(#matching humans / 3, 1), averaged over the leave-one-human-out subsets."""
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    predicted = normalize_vqa_answer(prediction)
    humans = [normalize_vqa_answer(a) for a in human_answers]
    if len(humans) == 1:
        return float(predicted == humans[0])
    scores = []
    for left_out in range(len(humans)):
        matches = sum(h == predicted for j, h in enumerate(humans) if j != left_out)
        scores.append(min(matches / 3, 1.0))
    return sum(scores) / len(scores)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the answers agree up to case and spacing ('Right  lung' == 'right lung'), else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def answer_score(example: VQAExample, prediction: str) -> float:
    """VQA accuracy when the example has several human answers, exact match with its answer otherwise."""
    if len(example.answers) > 1:
        return vqa_accuracy(prediction, example.answers)
    return exact_match(prediction, example.answer)


def accuracy_report(examples: Sequence[VQAExample], predictions: Sequence[str],
                    by: Sequence[str] = ("question_type", "answer_type")) -> dict:
    """Mean `answer_score` overall and per value of each field in `by`:

        {"accuracy": 0.71, "n": 451,
         "by_answer_type": {"closed": {"accuracy": 0.79, "n": 272}, "open": {...}}, ...}

    `by=("unseen",)` on the scenes' test split gives accuracy on seen vs unseen combinations.
    """
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    scores = [answer_score(e, p) for e, p in zip(examples, predictions)]
    report: dict = {"accuracy": sum(scores) / len(scores) if scores else 0.0, "n": len(scores)}
    for field in by:
        groups: dict[str, list[float]] = defaultdict(list)
        for example, score in zip(examples, scores):
            groups[str(getattr(example, field))].append(score)
        report[f"by_{field}"] = {value: {"accuracy": sum(s) / len(s), "n": len(s)}
                                 for value, s in sorted(groups.items())}
    return report
