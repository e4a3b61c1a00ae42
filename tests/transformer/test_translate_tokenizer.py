"""The joint English–Indonesian BPE: exact round trips on real text, special ids, save/load,
and BPE-dropout."""

import random

import numpy as np
import pytest

from fromscratch.errors import UserError
from fromscratch.transformer.data import read_parallel
from fromscratch.transformer.tokenizer import BPEDropout, BPETokenizer, bpe_segment


@pytest.fixture(scope="module")
def corpora(shared_data):
    train = read_parallel(shared_data / "en-id" / "tatoeba", log=False)
    held_out = read_parallel(shared_data / "en-id" / "opus100-dev", log=False)
    return train, held_out


@pytest.fixture(scope="module")
def tokenizer(corpora):
    train, _ = corpora
    return BPETokenizer.train(train.src + train.tgt, vocab_size=4000)


def test_special_token_ids(tokenizer):
    t = tokenizer.tokenizer
    assert [t.id_to_token(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 4000


def test_round_trip_on_unseen_real_sentences_of_both_languages(tokenizer, corpora):
    """decode(encode(s)) == s exactly, on held-out text (OPUS-100 dev) with its quotes, dashes,
    numbers and names, and never an <unk> or other special token in between."""
    _, held_out = corpora
    for lines in (held_out.src, held_out.tgt):
        ids = tokenizer.encode_batch(lines)
        assert [tokenizer.decode(row) for row in ids] == lines
        assert all(i >= 4 for row in ids for i in row)


def test_round_trip_of_unusual_text(tokenizer):
    for text in [" leading and  double  spaces ", "Ünïcode — “quotes” 日本語 😀", "tab\tinside", ""]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_vocabulary_is_joint(tokenizer):
    """Frequent words of each language are single tokens of the one vocabulary."""
    for word in ["the", "you", "saya", "tidak", "yang"]:
        assert len(tokenizer.encode(word)) == 1, word
    # A word is the same token at the start of a sentence as inside it (a space is prepended).
    assert tokenizer.encode("saya")[0] == tokenizer.encode("Dia dan saya")[-1]


def test_decode_stops_at_eos_and_drops_bos_and_pad(tokenizer):
    ids = tokenizer.encode("Saya makan nasi.")
    assert tokenizer.decode([1, *ids, 2, 0, 0]) == "Saya makan nasi."
    assert tokenizer.decode([*ids, 2, *tokenizer.encode(" garbage")]) == "Saya makan nasi."
    assert tokenizer.decode_batch([[1, *ids, 2], [2]]) == ["Saya makan nasi.", ""]


def test_save_and_load(tokenizer, tmp_path, corpora):
    path = tokenizer.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    for loaded in (BPETokenizer.load(tmp_path), BPETokenizer.load(path)):
        lines = corpora[1].tgt[:50]
        assert loaded.encode_batch(lines) == tokenizer.encode_batch(lines)
        assert loaded.decode(loaded.encode(lines[0])) == lines[0]


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer"):
        BPETokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read tokenizer"):
        BPETokenizer.load(tmp_path)


def test_too_small_vocabulary_is_refused():
    with pytest.raises(UserError, match="at least 260"):
        BPETokenizer.train(["a b c"], vocab_size=100)


def test_a_source_tag_is_one_special_token_that_saving_keeps(corpora, tmp_path):
    """--tag NAME: <NAME> is id 4, the source prefix; plain encoding is unchanged, the tag is
    never split by BPE, and a loaded tokenizer has the same prefix. Without a tag there is none."""
    train, held_out = corpora
    tagged = BPETokenizer.train(train.src[:2000] + train.tgt[:2000], vocab_size=1000, source_tag="tatoeba")
    plain = BPETokenizer.train(train.src[:2000] + train.tgt[:2000], vocab_size=1000)
    assert tagged.source_prefix == [4] and tagged.tokenizer.id_to_token(4) == "<tatoeba>"
    assert tagged.source_tag == "tatoeba" and tagged.vocab_size == plain.vocab_size == 1000
    assert plain.source_prefix == [] and plain.source_tag is None
    lines = held_out.src[:50]
    assert 4 not in {i for row in tagged.encode_batch(lines) for i in row}  # no BPE piece of text is the tag
    assert tagged.decode(tagged.encode(lines[0])) == lines[0]
    loaded = BPETokenizer.load(tagged.save(tmp_path))
    assert loaded.source_prefix == [4] and loaded.source_tag == "tatoeba"
    assert loaded.encode_batch(lines) == tagged.encode_batch(lines)
    for bad in ("", "two words", "<x>", "s", "/s", "pad"):
        with pytest.raises(UserError, match="--tag"):
            BPETokenizer.train(["a b c"], vocab_size=300, source_tag=bad)


def test_bpe_dropout_at_rate_zero_is_the_tokenizers_own_bpe(tokenizer, corpora):
    """Our merge loop over the tokenizer's merges and pre-tokenised words gives exactly the ids of
    `tokenizers`' BPE on 4,000 unseen real sentences, and every variant of a word is the same."""
    _, held_out = corpora
    texts = held_out.src + held_out.tgt
    plain = BPEDropout(tokenizer, texts, p=0.0, variants=2)
    assert plain.n_types > 5000
    expected = tokenizer.encode_batch(texts)
    for seed in (0, 1):  # whichever variant each word takes
        rows = plain.sample(range(len(texts)), np.random.default_rng(seed))
        assert [row.tolist() for row in rows] == expected


def test_bpe_dropout_splits_words_finer_at_its_rate_and_keeps_the_text(tokenizer, corpora):
    """With p = 0.1 the sentences decode to themselves exactly, most in more tokens than plain
    BPE and more overall; a sample is a function of the generator; and a merge that is the only
    candidate is skipped with probability p."""
    _, held_out = corpora
    texts = held_out.src[:500] + held_out.tgt[:500]
    dropout = BPEDropout(tokenizer, texts, p=0.1, seed=3)
    rows = dropout.sample(range(len(texts)), np.random.default_rng(0))
    assert [tokenizer.decode(row) for row in rows] == texts
    plain = tokenizer.encode_batch(texts)
    # A skipped merge can open a path to longer pieces, so a sentence may come out shorter; most get longer.
    assert sum(len(row) > len(ids) for row, ids in zip(rows, plain)) > 0.5 * len(texts)
    assert 1.05 < sum(map(len, rows)) / sum(map(len, plain)) < 1.6
    again = dropout.sample(range(len(texts)), np.random.default_rng(0))
    other = dropout.sample(range(len(texts)), np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(rows, again))
    assert sum(not np.array_equal(a, b) for a, b in zip(rows, other)) > 100
    subset = dropout.sample([7, 3], np.random.default_rng(5))  # any rows, in the order asked
    assert [tokenizer.decode(row) for row in subset] == [texts[7], texts[3]]

    draw = random.Random(0).random
    unmerged = sum(len(bpe_segment(["a", "b"], {("a", "b"): 0}, 0.1, draw)) == 2 for _ in range(20_000))
    assert abs(unmerged / 20_000 - 0.1) < 0.01  # 5 standard deviations: 0.0106
    for bad in (-0.1, 1.0):
        with pytest.raises(UserError, match="--bpe-dropout"):
            BPEDropout(tokenizer, texts[:3], p=bad)
