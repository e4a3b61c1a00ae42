"""Tokenizer: Meta's Llama 2 SentencePiece model gives the known ids, a tokenizer.json of the same
vocabulary agrees with it, a freshly trained tokenizer round-trips, bad files are user errors."""

import pytest

from fromscratch.errors import UserError
from fromscratch.llama.tokenizer import Tokenizer, train_tokenizer

SENTENCES = [
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the park with her 3 friends.\nThe end.",
    "Émigré cafés serve crème brûlée; 🦙 llamas do not.",
]


@pytest.fixture(scope="module")
def llama2_tokenizer_path(shared_data):
    return shared_data / "tokenizers" / "llama2-tokenizer.model"


def test_llama2_tokenizer_gives_the_known_ids(llama2_tokenizer_path):
    tok = Tokenizer(llama2_tokenizer_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, None)
    # The ids every Llama 2 tutorial shows for these, e.g. HF's LlamaTokenizer("Hello world").
    assert tok.encode("Hello world") == [1, 15043, 3186]
    assert tok.encode("The quick brown fox jumps over the lazy dog.", bos=True, eos=True) == [
        1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889, 2]
    # Digits are split, unknown characters fall back to bytes (Llama 2 §2.2).
    assert tok.encode("1234", bos=False) == [29871, 29896, 29906, 29941, 29946]
    assert tok.encode("🦙", bos=False) == [29871, 243, 162, 169, 156]
    for text in SENTENCES + ["  two leading spaces and  a double one"]:
        assert tok.decode(tok.encode(text, eos=True)) == text


def _huggingface_tokenizer_json(model_path, out_path):
    """Build a tokenizer.json from the same SentencePiece model with transformers' own
    LlamaTokenizer: the merges are the vocabulary's pairs in score order (as transformers'
    SentencePieceExtractor derives them; that needs protobuf, which we don't install)."""
    import sentencepiece
    from transformers import LlamaTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    merges = sorted(
        (vocab[piece], vocab[piece[:i]], vocab[piece[i:]], piece[:i], piece[i:])
        for piece in vocab for i in range(1, len(piece))
        if piece[:i] in vocab and piece[i:] in vocab
    )
    hf = LlamaTokenizer(vocab=vocab, merges=[(left, right) for *_, left, right in merges])
    hf.backend_tokenizer.save(str(out_path))
    return hf


def test_tokenizer_json_agrees_with_sentencepiece(llama2_tokenizer_path, tmp_path):
    pytest.importorskip("transformers")
    hf = _huggingface_tokenizer_json(llama2_tokenizer_path, tmp_path / "tokenizer.json")
    sp_tok, json_tok = Tokenizer(llama2_tokenizer_path), Tokenizer(tmp_path)  # a folder works too
    assert (json_tok.vocab_size, json_tok.bos_id, json_tok.eos_id, json_tok.pad_id) == (32000, 1, 2, None)
    # Single-spaced text: HF's BPE merges runs of spaces differently from SentencePiece.
    for text in SENTENCES:
        ids = sp_tok.encode(text)
        assert json_tok.encode(text) == ids
        assert hf.encode(text, add_special_tokens=False) == ids[1:]
        assert json_tok.decode(ids) == text


def test_trained_tokenizer_round_trips(shared_data, tmp_path):
    text = (shared_data / "text" / "tinyshakespeare.txt").read_text()
    sample = tmp_path / "sample.txt"
    sample.write_text(text[:200_000])
    path = train_tokenizer([sample], vocab_size=1000, out_prefix=tmp_path / "tok" / "shakespeare")
    tok = Tokenizer(path)
    assert path.name == "shakespeare.model" and tok.vocab_size == 1000
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    held_out = text[-3000:]
    ids = tok.encode(held_out)
    assert tok.decode(ids) == held_out
    assert len(ids) < 0.6 * len(held_out)  # it learned merges: fewer tokens than characters
    odd = "  Émigré 1234 — 🦙\n\tend  "  # unseen characters go to bytes, spaces survive
    assert tok.decode(tok.encode(odd)) == odd


def test_stream_decoder_rebuilds_the_text(llama2_tokenizer_path):
    tok = Tokenizer(llama2_tokenizer_path)
    text = "Hello world, said the 🦙 to the café."
    push = tok.stream_decoder()
    pieces = [push(i) for i in tok.encode(text)]
    assert "".join(pieces) == text
    assert pieces[2] == " world"  # a piece keeps its leading space


def test_bad_tokenizer_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "garbage.model").write_bytes(b"\x00not a model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        Tokenizer(tmp_path / "garbage.model")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json"):
        Tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer(tmp_path / "empty")
    with pytest.raises(UserError, match="not found"):
        train_tokenizer([tmp_path / "missing.txt"], 300, tmp_path / "x")
