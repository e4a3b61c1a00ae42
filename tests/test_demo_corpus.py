"""The shipped everyday-sentences corpus: reproducible, clean splits, and grammar invariants."""

import re

import pytest

from fromscratch import demo_corpus
from fromscratch.transformer.data import load_corpora


@pytest.fixture(scope="module")
def pairs():
    return demo_corpus.generate()


def test_shipped_files_equal_the_generator_output(pairs):
    """`python -m fromscratch.transformer.demo_corpus` reproduces the shipped files byte for byte."""
    d = demo_corpus.DATA_DIR
    assert (d / "everyday.en").read_text(encoding="utf-8") == "".join(en + "\n" for en, _ in pairs)
    assert (d / "everyday.id").read_text(encoding="utf-8") == "".join(id_ + "\n" for _, id_ in pairs)
    assert (d / "LICENSE").read_text(encoding="utf-8") == demo_corpus.LICENSE_TEXT
    assert "CC0" in demo_corpus.LICENSE_TEXT


def test_write_regenerates_identical_files(tmp_path, pairs):
    demo_corpus.write(tmp_path)
    for name in ("everyday.en", "everyday.id", "LICENSE"):
        assert (tmp_path / name).read_bytes() == (demo_corpus.DATA_DIR / name).read_bytes()
    assert demo_corpus.generate(seed=1) != pairs


def test_size_and_uniqueness(pairs):
    assert 4000 <= len(pairs) <= 6000
    en, id_ = zip(*pairs)
    assert len(set(en)) == len(en) and len(set(id_)) == len(id_)  # one translation per sentence
    assert all(s and s == s.strip() and "  " not in s for s in en + id_)


def test_splits_are_disjoint_and_every_20th_is_held_out(pairs):
    train, test = load_corpora(["demo:train"]), load_corpora(["demo:test"])
    assert len(train) + len(test) == len(pairs)
    assert len(test) == len(pairs) // demo_corpus.TEST_EVERY
    assert (test.src[0], test.tgt[0]) == pairs[demo_corpus.TEST_EVERY - 1]
    assert test.origins[0] == f"everyday.en:{demo_corpus.TEST_EVERY}"
    assert not set(train.src) & set(test.src)
    assert not set(train.tgt) & set(test.tgt)


def test_sentence_shape(pairs):
    for en, id_ in pairs:
        assert en[0].isupper() and id_[0].isupper(), (en, id_)
        assert en[-1] == id_[-1] and en[-1] in ".?!", (en, id_)


def words(s):
    return re.findall(r"[\w'-]+", s.lower())


def test_indonesian_grammar_invariants(pairs):
    """The rules the module docstring promises, checked on every pair."""
    for en, id_ in pairs:
        e, i = words(en), words(id_)
        # Yes/no questions: English auxiliary first ↔ "Apakah" first.
        if i[0] == "apakah":
            assert en.endswith("?") and e[0] in {"do", "does", "did", "is", "are", "am", "was", "were",
                                                 "will", "have", "has", "can"}, en
        # Future ↔ akan; progressive ↔ sedang; perfect ↔ sudah / belum ... yet.
        if "will" in e:
            assert "akan" in i, (en, id_)
        if "sedang" in i:
            assert any(w.endswith("ing") for w in e), (en, id_)
        if "belum" in i:
            assert e[-1] == "yet", (en, id_)
        if "sudah" in i:
            assert {"have", "has"} & set(e), (en, id_)
        # Time words carry tense.
        for en_word, id_word in [("yesterday", "kemarin"), ("tomorrow", "besok")]:
            if en_word in e:
                assert id_word in i, (en, id_)
        # No English function words leak into the Indonesian side.
        assert not {"the", "is", "are", "will", "not", "a", "an", "does", "did"} & set(i), id_


def test_negation_tidak_before_verbs_and_adjectives_bukan_before_nouns(pairs):
    nouns = {p[2].split()[0] for p in demo_corpus.PROFESSIONS} | {n.id for n in demo_corpus.OWNABLE}
    adjectives = {a[1] for n in demo_corpus.NOUNS for a in n.adjectives} | {a[1] for a in demo_corpus.PERSON_STATES}
    bukan = [(en, id_) for en, id_ in pairs if " bukan " in id_]
    tidak = [(en, id_) for en, id_ in pairs if re.search(r"\btidak (\w+)", id_)]
    assert len(bukan) > 50 and len(tidak) > 500
    for en, id_ in bukan:  # "He is not a doctor." → "Dia bukan dokter."
        assert re.search(r"\b(is|are|am) not\b", en), en
        noun = id_.split(" bukan ")[1].split()[0].strip(".?").split("-")[0]
        assert noun in nouns or re.sub(r"(nya|mu)$", "", noun) in nouns, id_
    for en, id_ in tidak:  # never before a noun
        after = re.search(r"\btidak (\w+)", id_).group(1)
        assert after not in nouns or after in adjectives, id_


def test_examples_of_each_feature_are_present(pairs):
    """A few pairs a reader can check by eye, one per feature the corpus is meant to teach."""
    id_side = [id_ for _, id_ in pairs]
    text = "\n".join(id_side)
    for pattern in [
        r"\bsedang\b", r"\bakan\b", r"\bsudah\b", r"\bbelum\b", r"^Apakah ", r"\bbukan\b", r"^Jangan ",
        r"^Tolong ", r"^Ayo ", r"\w+nya\b", r"\w+mu\b", r"\bbuku-buku\b", r"\bdua ekor\b", r"\bseorang\b",
    ]:
        assert re.search(pattern, text, flags=re.M), pattern
    for en, id_ in [("Thank you.", "Terima kasih."), ("Good morning.", "Selamat pagi.")]:
        assert (en, id_) in pairs


def test_load_split_rejects_unknown_split():
    from fromscratch.errors import UserError

    with pytest.raises(UserError, match="train, test and all"):
        load_corpora(["demo:valid"])
