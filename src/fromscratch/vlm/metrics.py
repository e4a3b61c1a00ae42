"""The VLM's metrics: answer accuracy (VQA), caption BLEU-4 and CIDEr-D (COCO), retrieval recall@k.

Answer accuracy: the VQA metric for datasets with ten human answers, exact match otherwise.

VQA accuracy (Antol et al. 2015; Goyal et al. 2017, as computed by the official `vqaEval.py`):
an answer is right in proportion to how many humans gave it,

    Acc(ans) = mean over the 10 subsets of 9 human answers of  min(#humans in the subset who said ans / 3, 1),

so an answer three annotators gave scores 1 and one a single annotator gave scores 0.3. Answers
are compared after the official normalisation (`normalize_vqa_answer`): lower case, punctuation
stripped, number words to digits ("two" -> "2"), articles dropped. Departures from `vqaEval.py`:
its table of ~170 contractions ("dont" -> "don't") is not applied, and the normalisation is
applied to every question (the official script skips it when all ten human answers agree, so
there "2." or "the dog" would not match "2" or "dog").

Captions are scored as the COCO caption evaluation (`pycocoevalcap`) scores them, re-implemented
here line for line (its BLEU and CIDEr scorers are pure Python; the package itself is a 100 MB
download with Java jars for its tokenizer, METEOR and SPICE):

- BLEU-4 (Papineni et al. 2002) at the corpus level: clipped n-gram precisions p₁…p₄ summed
  over all captions, BLEU-4 = BP · (p₁p₂p₃p₄)^¼, with the brevity penalty on the summed lengths
  and, for each caption, the reference length closest to it (`option="closest"`); counts get
  pycocoevalcap's tiny smoothing constants (1e-15 above, 1e-9 below);
- CIDEr-D (Vedantam et al. 2015), with pycocoevalcap's `CiderScorer` (n = 4, σ = 6): each
  caption's n-grams weighted by TF-IDF, the IDF taken over the reference sets of the evaluated
  images; per n, the cosine between candidate and reference vectors with the candidate's weights
  clipped at the reference's, times a Gaussian length penalty exp(−Δ²/2σ²); averaged over n
  and references, times 10. (As in pycocoevalcap, Δ is measured in bigrams.)

Departure: PTBTokenizer (Stanford CoreNLP, Java) is replaced by `caption_words`: lower case,
words of letters and digits (inner hyphens and apostrophes kept), punctuation dropped, which
is what PTBTokenizer followed by pycocoevalcap's punctuation filter gives on plain captions.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
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
    if isinstance(human_answers, str):  # its letters would be taken for ten humans' answers
        raise TypeError("vqa_accuracy takes a list of human answers, not one string: pass [answer]")
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


# ---------------------------------------------------------------------------------------------
# Captions

_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def caption_words(text: str) -> list[str]:
    """'A red circle, above the 7.' → ['a', 'red', 'circle', 'above', 'the', '7']."""
    return _WORD.findall(text.lower())


def _ngrams(words: Sequence[str], n: int = 4) -> Counter:
    """Counts of every k-gram of `words`, k = 1..n (pycocoevalcap's `precook`)."""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def check_references(references: Sequence[Sequence[str]]) -> None:
    """Each image's references are a list of captions: a bare string would be read as one caption
    per letter; and every image needs at least one."""
    if not references:
        raise ValueError("no captions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise TypeError(f"references[{i}] is one string; each image's references are a list: pass [caption]")
        if not refs:
            raise ValueError(f"references[{i}] is empty: each image needs at least one reference caption")


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1 … BLEU-n of hypotheses[i] against references[i] (several each), as
    pycocoevalcap's `Bleu(4)` computes it (module docstring). Returns [BLEU-1, …, BLEU-n] in [0, 1]."""
    check_references(references)
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    test_length = ref_length = 0
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        words = caption_words(hypothesis)
        ref_words = [caption_words(r) for r in refs]
        max_counts: Counter = Counter()
        for r in ref_words:
            max_counts |= _ngrams(r, n)  # | keeps the larger count of each n-gram
        for ngram, count in _ngrams(words, n).items():
            correct[len(ngram) - 1] += min(count, max_counts[ngram])
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        test_length += len(words)
        ref_length += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]  # the closest
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1 / (k + 1)))
    ratio = (test_length + tiny) / (ref_length + small)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [s * brevity for s in scores]


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D of hypotheses[i] against references[i], as pycocoevalcap's `Cider` computes it
    (module docstring): (the mean over images, each image's score)."""
    check_references(references)
    hyps = [_ngrams(caption_words(h), n) for h in hypotheses]
    refs = [[_ngrams(caption_words(r), n) for r in rs] for rs in references]
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference sets")
    document_frequency: Counter = Counter()
    for image_refs in refs:
        document_frequency.update({g for r in image_refs for g in r})
    log_n_images = math.log(len(refs))

    def tf_idf(counts: Counter):
        """Per n-gram order: {ngram: tf · idf}, the vector's norm; and the length (in bigrams)."""
        vectors, norms = [dict() for _ in range(n)], [0.0] * n
        for ngram, tf in counts.items():
            k = len(ngram) - 1
            vectors[k][ngram] = tf * (log_n_images - math.log(max(1.0, document_frequency[ngram])))
            norms[k] += vectors[k][ngram] ** 2
        return vectors, [math.sqrt(x) for x in norms], sum(tf for g, tf in counts.items() if len(g) == 2)

    scores = []
    for hyp, image_refs in zip(hyps, refs):
        vec, norm, length = tf_idf(hyp)
        total = [0.0] * n
        for ref in image_refs:
            vec_ref, norm_ref, length_ref = tf_idf(ref)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * sigma**2))
            for k in range(n):
                value = sum(min(w, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and norm_ref[k] != 0:
                    value /= norm[k] * norm_ref[k]
                total[k] += value * penalty
        scores.append(10.0 * sum(total) / n / len(image_refs))
    return sum(scores) / len(scores), scores


# ---------------------------------------------------------------------------------------------
# Retrieval


def recall_at_k(similarity, text_image, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image↔text retrieval recall, the COCO protocol (Karpathy & Fei-Fei 2015).

    similarity (N_images, N_texts); text_image[j]: the image text j describes (an image may have
    several). image→text R@k: share of images with one of their texts among the k most similar
    texts; text→image R@k: share of texts whose image is among the k most similar images.
    Returns {"image_to_text_R@1": ..., "text_to_image_R@1": ..., ...} in [0, 1]."""
    import torch

    similarity = torch.as_tensor(similarity, dtype=torch.float32).cpu()  # from any device
    text_image = torch.as_tensor(text_image, dtype=torch.long)
    n_images, n_texts = similarity.shape
    # rank of the best matching text of each image, and of each text's image
    own = text_image[None, :] == torch.arange(n_images)[:, None]  # (N_images, N_texts)
    best_own = similarity.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)
    image_rank = (similarity > best_own).sum(dim=1)  # texts ranked above the best own one
    text_rank = (similarity > similarity[text_image, torch.arange(n_texts)][None, :]).sum(dim=0)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float((image_rank < k).float().mean())
        out[f"text_to_image_R@{k}"] = float((text_rank < k).float().mean())
    return out
