"""Parallel corpora: reading real OPUS/Moses files, reporting bad lines, hub conversion, batching."""

import logging
import sys

import numpy as np
import pytest
import torch

from fromscratch.errors import UserError
from fromscratch.transformer.data import (
    ParallelCorpus,
    TokenBatchSchedule,
    collate,
    corpus_from_hf,
    filter_long_pairs,
    load_corpora,
    load_opus100,
    read_parallel,
    token_batches,
)


def write_pair(tmp_path, name, en: bytes, id_: bytes):
    (tmp_path / f"{name}.en").write_bytes(en)
    (tmp_path / f"{name}.id").write_bytes(id_)
    return tmp_path / name


# --- reading ---------------------------------------------------------------------------------


def test_reads_real_corpus_line_aligned(shared_data):
    corpus = read_parallel(shared_data / "en-id" / "tatoeba")
    assert len(corpus) == 7151 and not corpus.skipped
    assert (corpus.src[0], corpus.tgt[0]) == ("Run!", "Lari!")
    assert corpus.origins[16] == "tatoeba.en:17"


def test_real_corpus_with_an_empty_pair_reports_it(shared_data, caplog):
    with caplog.at_level(logging.WARNING):
        corpus = read_parallel(shared_data / "en-id" / "guntara2020-religious-test")
    assert len(corpus) == 4823
    assert corpus.skipped.reasons == {"empty": ["guntara2020-religious-test.en:4824"]}
    assert "skipped 1 pair: 1 empty (guntara2020-religious-test.en:4824)" in caplog.text


def test_several_prefixes_concatenate(shared_data):
    corpus = load_corpora([str(shared_data / "en-id" / "tatoeba"), str(shared_data / "en-id" / "opus100-dev")])
    assert len(corpus) == 7151 + 2000
    assert corpus.origins[-1] == "opus100-dev.en:2000"


def test_prefix_found_under_FROMSCRATCH_DATA_and_with_language_suffix(shared_data, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FROMSCRATCH_DATA", str(shared_data))
    assert len(read_parallel("en-id/opus100-dev")) == 2000
    assert len(read_parallel(shared_data / "en-id" / "opus100-dev.en")) == 2000


def test_line_count_mismatch_names_both_files_and_counts(tmp_path):
    prefix = write_pair(tmp_path, "bad", b"a\nb\nc\n", b"x\ny\n")
    with pytest.raises(UserError) as e:
        read_parallel(prefix)
    message = str(e.value)
    assert "bad.en has 3 lines" in message and "bad.id has 2" in message


def test_missing_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_parallel(tmp_path / "nothing")
    (tmp_path / "half.en").write_text("a\n")
    with pytest.raises(UserError, match=r"half\.id"):
        read_parallel(tmp_path / "half")


def test_bad_lines_are_skipped_counted_and_located(tmp_path, caplog):
    en = b"\n".join([
        b"Good morning.",          # 1 fine
        b"",                       # 2 empty source
        b"Thank you.",             # 3 target empty
        b"caf\xe9 au lait",        # 4 Latin-1 byte: undecodable
        b"Hello\r",                # 5 CRLF line ending: fine
        b"one\xe2\x80\xa8two",     # 6 U+2028 inside a line must not split it
        b"x" * 50,                 # 7 too long
        b"\xef\xbb\xbfBOM",        # 8 a BOM is dropped
    ]) + b"\n"
    id_ = b"\n".join([b"Selamat pagi.", b"Kosong", b"   ", b"kopi susu", b"Halo\r", b"satu dua",
                      b"y", b"BOM"]) + b"\n"
    prefix = write_pair(tmp_path, "mixed", en, id_)
    with caplog.at_level(logging.WARNING):
        corpus = read_parallel(prefix, max_chars=40)
    assert corpus.src == ["Good morning.", "Hello", "one\u2028two", "BOM"]
    assert corpus.tgt == ["Selamat pagi.", "Halo", "satu dua", "BOM"]
    assert corpus.origins == ["mixed.en:1", "mixed.en:5", "mixed.en:6", "mixed.en:8"]
    assert corpus.skipped.reasons == {
        "empty": ["mixed.en:2", "mixed.id:3"],
        "undecodable": ["mixed.en:4"],
        "longer than 40 chars": ["mixed.en:7"],
    }
    summary = ("skipped 4 pairs: 2 empty (mixed.en:2, mixed.id:3), 1 undecodable (mixed.en:4), "
               "1 longer than 40 chars (mixed.en:7)")
    assert corpus.skipped.summary() == summary
    assert summary in caplog.text


def test_summary_shortens_long_lists():
    corpus = ParallelCorpus([], [], [])
    for i in range(5):
        corpus.skipped.add("empty", f"a.en:{i}")
    assert corpus.skipped.summary() == "skipped 5 pairs: 5 empty (a.en:0, a.en:1, a.en:2, …)"


def test_file_without_trailing_newline_and_empty_files(tmp_path):
    assert read_parallel(write_pair(tmp_path, "a", b"one\ntwo", b"satu\ndua\n")).src == ["one", "two"]
    with pytest.raises(UserError, match=r"b\.en is empty"):
        load_corpora([str(write_pair(tmp_path, "b", b"", b""))])


# --- the hub ---------------------------------------------------------------------------------


def test_hub_schema_conversion_on_a_local_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"translation": [
        {"en": "Hello.", "id": "Halo."},
        {"en": "", "id": "Kosong."},
        {"en": " Thanks. ", "id": "Terima kasih."},
    ]})
    corpus = corpus_from_hf(ds, name="opus100-en-id-test")
    assert corpus.src == ["Hello.", "Thanks."] and corpus.tgt == ["Halo.", "Terima kasih."]
    assert corpus.origins == ["opus100-en-id-test:1", "opus100-en-id-test:3"]
    assert corpus.skipped.reasons == {"empty": ["opus100-en-id-test:2"]}


def test_hub_wrong_schema_is_a_user_error():
    datasets = pytest.importorskip("datasets")
    with pytest.raises(UserError, match="translation"):
        corpus_from_hf(datasets.Dataset.from_dict({"text": ["a"]}))


def test_missing_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(UserError, match=r"pip install fromscratch\[hub\]"):
        load_opus100("train")


def test_data_module_does_not_import_datasets():
    import subprocess

    code = "import sys, fromscratch.transformer.data; assert 'datasets' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- batching --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_lengths(shared_data):
    corpus = read_parallel(shared_data / "en-id" / "opus100-dev", log=False)
    return [len(s.split()) + 1 for s in corpus.src], [len(t.split()) + 1 for t in corpus.tgt]


def test_token_batches_cover_every_pair_once_within_budget(real_lengths):
    src, tgt = map(np.array, real_lengths)
    budget = 600
    batches = token_batches(src, tgt, budget, seed=1, epoch=0)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(src)))
    for b in batches:
        padded = len(b) * max(src[b].max(), tgt[b].max())
        assert padded <= budget or len(b) == 1
    # Similar lengths: far less padding than random batches of the same sizes would need.
    def padding(bs):
        return sum(len(b) * src[b].max() - src[b].sum() for b in bs)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(src))
    sizes = np.cumsum([len(b) for b in batches])[:-1]
    assert padding(batches) < 0.2 * padding(np.split(perm, sizes))


def test_token_batches_are_a_pure_function_of_seed_and_epoch(real_lengths):
    a = token_batches(*real_lengths, 600, seed=1, epoch=3)
    b = token_batches(*real_lengths, 600, seed=1, epoch=3)
    c = token_batches(*real_lengths, 600, seed=1, epoch=4)
    d = token_batches(*real_lengths, 600, seed=2, epoch=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert [x.tolist() for x in a] != [x.tolist() for x in c]
    assert [x.tolist() for x in a] != [x.tolist() for x in d]


def test_schedule_step_lookup_is_independent_of_history(real_lengths):
    sequential = TokenBatchSchedule(*real_lengths, 600, seed=5)
    seen = [sequential(s) for s in range(400)]  # several epochs
    fresh = TokenBatchSchedule(*real_lengths, 600, seed=5)
    assert np.array_equal(fresh(321), seen[321])
    n0 = len(sequential.epoch_batches(0))
    assert sorted(np.concatenate(seen[:n0]).tolist()) == list(range(len(real_lengths[0])))
    assert sorted(np.concatenate(seen[n0 : n0 + len(sequential.epoch_batches(1))]).tolist()) == list(
        range(len(real_lengths[0])))


def test_oversized_pair_gets_its_own_batch():
    batches = token_batches([3, 50, 3, 3], [3, 2, 3, 3], 10, seed=0, epoch=0)
    assert sorted(len(b) for b in batches) == [1, 3]


def test_collate_shifts_the_target_and_pads():
    batch = collate([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], pad_id=0, bos_id=1, eos_id=2)
    assert batch["src"].tolist() == [[5, 6, 7, 2], [8, 2, 0, 0]]
    assert batch["tgt_in"].tolist() == [[1, 9, 10, 0], [1, 11, 12, 13]]
    assert batch["tgt_out"].tolist() == [[9, 10, 2, 0], [11, 12, 13, 2]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_filter_long_pairs_reports_where():
    keep, report = filter_long_pairs([3, 9], [2, 2], ["a.en:1", "a.en:2"], 5, log=False)
    assert keep == [0]
    assert report.reasons == {"longer than 5 tokens": ["a.en:2"]}


def test_tokenized_pairs_hold_the_ids_compactly_and_select_exactly(shared_data):
    from fromscratch.transformer.data import TokenizedPairs
    from fromscratch.transformer.tokenizer import BPETokenizer

    corpus = read_parallel(shared_data / "en-id" / "tatoeba", log=False).select(range(300))
    tokenizer = BPETokenizer.train(corpus.src + corpus.tgt, vocab_size=400)
    pairs = TokenizedPairs.encode(corpus, tokenizer, chunk_pairs=64)  # several chunks
    assert len(pairs) == 300 and pairs.src.dtype == "uint16"
    for i in (0, 63, 64, 299):
        assert pairs.source(i).tolist() == tokenizer.encode(corpus.src[i])
        assert pairs.target(i).tolist() == tokenizer.encode(corpus.tgt[i])
    picked = pairs.select([299, 5, 5])
    assert [picked.target(j).tolist() for j in range(3)] == [pairs.target(i).tolist() for i in (299, 5, 5)]
    assert picked.src_lengths.tolist() == [len(pairs.source(i)) for i in (299, 5, 5)]


def test_origins_are_compact_and_read_like_strings():
    from fromscratch.transformer.data import Origins

    origins = Origins(["a.en:1", "b.en:7"])
    origins.append("a.en", 9)
    assert list(origins) == ["a.en:1", "b.en:7", "a.en:9"] and origins[-1] == "a.en:9"
    assert origins.select([2, 0]) == ["a.en:9", "a.en:1"] and origins.names == ["a.en", "b.en"]
