"""Caption metrics on examples computed by hand (BLEU-4 and CIDEr-D as pycocoevalcap computes
them), retrieval recall@k on a similarity matrix whose ranks are known, the derangement."""

import math

import numpy as np
import pytest
import torch

from fromscratch.vlm.evaluation import derangement
from fromscratch.vlm.metrics import bleu, caption_words, cider_d, recall_at_k


def test_caption_words_drop_punctuation_and_case():
    assert caption_words("There are two objects: a Red circle, and an x-ray.") == [
        "there", "are", "two", "objects", "a", "red", "circle", "and", "an", "x-ray"]


def test_bleu_by_hand():
    # precisions 4/5, 3/4, 2/3, 1/2 and equal lengths: BLEU-4 = (4/5 · 3/4 · 2/3 · 1/2)^(1/4) = 0.2^(1/4)
    scores = bleu(["a b c d e"], [["a b c d f"]])
    assert scores[0] == pytest.approx(0.8) and scores[3] == pytest.approx(0.2 ** 0.25)
    # every n-gram right but too short: the brevity penalty exp(1 − 6/4)
    assert bleu(["a b c d"], [["a b c d e f"]])[3] == pytest.approx(math.exp(-0.5))
    # the closest reference length (3, not 6) sets the penalty: 4 words against 3 is not short
    assert bleu(["a b c d"], [["a b c", "a b c d e f"]])[0] == pytest.approx(1.0)
    # clipping: "the the the" matches "the" only as often as a reference has it
    assert bleu(["the the the"], [["the cat"]])[0] == pytest.approx(1 / 3)
    # corpus level: counts are summed before dividing
    assert bleu(["a b", "c d"], [["a b"], ["c e"]])[0] == pytest.approx(3 / 4)


def test_cider_d_by_hand():
    """Two images; references 'a b' and 'a c'. IDF = log 2 − log df: 'a' is in both (idf 0), the
    rest in one (idf log 2). A caption equal to its reference scores 10 · mean(1, 1, 0, 0) = 5
    (it has no 3- and 4-grams). 'a b b' against 'a b': unigram cosine min(2,1)·1/(2·1) = 1/2,
    bigram {ab, bb} against {ab}: 1/√2, length penalty exp(−1²/(2·6²))."""
    mean, scores = cider_d(["a b", "a c"], [["a b"], ["a c"]])
    assert scores == pytest.approx([5.0, 5.0]) and mean == pytest.approx(5.0)
    _, scores = cider_d(["a b b", "a c"], [["a b"], ["a c"]])
    assert scores[0] == pytest.approx(10 * (0.5 + 2 ** -0.5) / 4 * math.exp(-1 / 72))
    assert scores[1] == pytest.approx(5.0)
    # a caption of the other image's words scores 0; several references are averaged
    assert cider_d(["a b", "a c"], [["a c"], ["a b"]])[1] == pytest.approx([0.0, 0.0])
    _, scores = cider_d(["a b", "a c"], [["a b", "a c"], ["a c"]])
    assert scores[0] == pytest.approx(5.0 / 2)


def test_recall_at_k():
    # 3 images, 4 texts: texts 0, 1 describe image 0; text 2 image 1; text 3 image 2
    similarity = torch.tensor([[0.1, 0.9, 0.5, 0.0],   # image 0: its text 1 ranks first
                               [0.8, 0.2, 0.55, 0.1],  # image 1: its text 2 ranks second
                               [0.9, 0.7, 0.6, 0.2]])  # image 2: its text 3 ranks last
    recall = recall_at_k(similarity, [0, 0, 1, 2], ks=(1, 2))
    assert recall["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert recall["image_to_text_R@2"] == pytest.approx(2 / 3)
    # text 0: its image ranks last; text 1: first; text 2: second (0.6 > 0.55 > 0.5); text 3: first
    assert recall["text_to_image_R@1"] == pytest.approx(2 / 4)
    assert recall["text_to_image_R@2"] == pytest.approx(3 / 4)


def test_derangement_moves_every_image_and_is_seeded():
    for n in (2, 3, 50):
        permutation = derangement(n)
        assert sorted(permutation.tolist()) == list(range(n))
        assert (permutation != np.arange(n)).all()
    assert derangement(50).tolist() == derangement(50).tolist()
