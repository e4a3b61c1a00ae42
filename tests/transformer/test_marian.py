"""Hugging Face Marian (OPUS-MT) checkpoints run by our Transformer, checked against transformers.

The hub is unreachable here, so the checkpoints are made here in its formats: randomly
initialised `MarianMTModel`s saved with `save_pretrained` (and, for the pickled
`pytorch_model.bin` that transformers 5 no longer writes, in transformers 4's layout, every tied
name and the positions table included), plus one MarianMTModel trained for a few seconds on a
toy task — a random Marian repeats one token up to the length limit, while this one ends its
translations at lengths of their own, so beam search has real decisions to make. The tokenizer
test trains two small SentencePiece models on real Tatoeba sentences, as OPUS-MT's are.
"""

import copy
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import sentencepiece
import torch
import transformers  # test-only dependency: the reference implementation
from helpers import repeats_an_ngram
from safetensors.torch import load_file, save_file

from fromscratch.cli import main
from fromscratch.errors import UserError
from fromscratch.transformer import Transformer, TransformerConfig, translate
from fromscratch.transformer.marian import MarianTokenizer
from fromscratch.transformer.translation import load_translator

EOS, UNK, PAD, VOCAB = 0, 1, 99, 100  # OPUS-MT's layout: </s> 0, <unk> 1, <pad> last


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread; more only contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- models -----------------------------------------------------------------------------------


def marian_config(**overrides) -> transformers.MarianConfig:
    fields = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                  activation_function="swish", scale_embedding=True, pad_token_id=PAD, eos_token_id=EOS,
                  decoder_start_token_id=PAD, forced_eos_token_id=None, dropout=0.0)
    return transformers.MarianConfig(**{**fields, **overrides})


def random_marian(seed: int, **overrides) -> transformers.MarianMTModel:
    """Weights far from any initialisation (norms and the logits bias included), so that a
    swapped or mis-mapped tensor shows in the logits. The positions table is left as computed."""
    torch.manual_seed(seed)
    model = transformers.MarianMTModel(marian_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name:
                continue
            if name.endswith("layer_norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.normal_(0.0, 0.05)
            else:
                p.normal_(0.0, 0.3 if "shared" not in name else 1.0)
        model.final_logits_bias.normal_(0.0, 0.5)
    return model.eval()


def toy_batch(generator: torch.Generator, n: int, mapping: torch.Tensor):
    """Sources of 1–10 tokens (EOS appended, right-padded) and their targets: each token mapped."""
    lengths = torch.randint(1, 11, (n,), generator=generator)
    src, labels = torch.full((n, 11), PAD), torch.full((n, 11), -100)
    for i, length in enumerate(lengths.tolist()):
        tokens = torch.randint(2, PAD, (length,), generator=generator)
        src[i, :length], src[i, length] = tokens, EOS
        labels[i, :length], labels[i, length] = mapping[tokens], EOS
    return src, labels


@pytest.fixture(scope="module")
def trained():
    """A MarianMTModel trained for 100 steps to map each source token through a fixed table."""
    torch.manual_seed(0)
    model = transformers.MarianMTModel(marian_config())  # transformers' own initialisation
    generator = torch.Generator().manual_seed(0)
    mapping = torch.randint(2, PAD, (VOCAB,), generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(100):
        src, labels = toy_batch(generator, 32, mapping)
        loss = model(input_ids=src, attention_mask=src != PAD, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def sources(seed: int = 0, n: int = 8) -> torch.Tensor:
    """A padded batch of sources of different lengths, as our batcher makes them."""
    return toy_batch(torch.Generator().manual_seed(1000 + seed), n, torch.arange(VOCAB))[0]


def hf_logits(hf, src) -> torch.Tensor:
    tgt = torch.cat([torch.full((src.size(0), 1), PAD), src[:, :-1].clamp(max=PAD - 1)], dim=1)
    with torch.no_grad():
        return hf(input_ids=src, attention_mask=src != PAD, decoder_input_ids=tgt).logits, tgt


def assert_logits_match(ours: Transformer, hf) -> None:
    src = sources()
    expected, tgt = hf_logits(hf, src)
    with torch.no_grad():
        got = ours(src, tgt)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, diff


def hf_generate(hf, src, **options) -> torch.Tensor:
    """MarianMTModel.generate under the settings the README states; without its start column."""
    out = hf.generate(input_ids=src, attention_mask=src != PAD, bad_words_ids=[[PAD]], forced_eos_token_id=None,
                      do_sample=False, **options)
    return out[:, 1:]


def save(hf, directory: Path, layout: str = "safetensors") -> Path:
    if layout == "pytorch_model.bin":  # transformers 4's layout: every tied name, the positions table
        hf.config.save_pretrained(directory)
        torch.save(hf.state_dict(), directory / "pytorch_model.bin")
    else:
        hf.save_pretrained(directory, max_shard_size="20KB" if layout == "sharded" else "1GB")
    return directory


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    return save(random_marian(1), tmp_path_factory.mktemp("marian"))


# --- loading: logits and translations ----------------------------------------------------------


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "pytorch_model.bin"])
def test_logits_equal_transformers(tmp_path, layout):
    hf = random_marian(2)
    files = {p.name for p in save(hf, tmp_path, layout).iterdir()}
    assert ("model.safetensors.index.json" in files) == (layout == "sharded")
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.config.positions == "halves" and ours.config.activation == "swish" and ours.config.start_id == PAD
    assert_logits_match(ours, hf)


VARIANTS = {"relu": dict(activation_function="relu", scale_embedding=False),
            "gelu": dict(activation_function="gelu", scale_embedding=False),
            "untied": dict(share_encoder_decoder_embeddings=False, tie_word_embeddings=False)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers_in_other_variants(tmp_path, variant):
    hf = random_marian(3, **VARIANTS[variant])
    ours = Transformer.from_pretrained(save(hf, tmp_path))
    assert ours.config.scale_embeddings == (variant == "untied")
    assert ours.config.share_embeddings == (variant != "untied")
    assert_logits_match(ours, hf)


def test_greedy_translations_equal_generate(tmp_path, trained):
    for name, hf in {"trained": trained, "random": random_marian(4)}.items():
        ours = Transformer.from_pretrained(save(hf, tmp_path / name))
        src = sources(seed=1)
        for max_new_tokens in (5, 14):
            expected = hf_generate(hf, src, num_beams=1, max_new_tokens=max_new_tokens)
            assert torch.equal(ours.generate(src, max_new_tokens=max_new_tokens), expected), name
        # Our default length limit: the longest source + 50, at most max_position_embeddings.
        limit = min(int((src != PAD).sum(dim=1).max()) + 50, 64)
        assert torch.equal(ours.generate(src), hf_generate(hf, src, num_beams=1, max_new_tokens=limit)), name


def test_beam_translations_equal_generate_with_the_hf_style(tmp_path, trained):
    """num_beams=4 under transformers' ranking, stopping rule and bad-word masking, several
    penalties, limits that are and are not reached, sources of different lengths in one batch."""
    cases = [("trained", trained, alpha, limit) for alpha in (1.0, 0.5, 2.0) for limit in (12, 5)]
    cases += [("random", random_marian(seed), 1.0, 8) for seed in (5, 6)]
    likes_pad = copy.deepcopy(trained)  # the banned token is likely: banning it must not renormalise
    with torch.no_grad():
        likes_pad.final_logits_bias[0, PAD] += 12.0  # P(pad) ≈ 0.97 before the ban
    cases += [("likes pad", likes_pad, 1.0, 12)] * 4
    gnmt_differs, lengths = 0, set()
    for i, (name, hf, alpha, limit) in enumerate(cases):
        ours = Transformer.from_pretrained(save(hf, tmp_path / str(i)))
        src = sources(seed=i)
        expected = hf_generate(hf, src, num_beams=4, length_penalty=alpha, max_new_tokens=limit)
        got = ours.generate(src, max_new_tokens=limit, beam_size=4, length_penalty=alpha, length_penalty_style="hf")
        assert got.shape == expected.shape and torch.equal(got, expected), (name, alpha, limit, got, expected)
        gnmt = ours.generate(src, max_new_tokens=limit, beam_size=4, length_penalty=alpha)
        gnmt_differs += gnmt.shape != expected.shape or not torch.equal(gnmt, expected)
        lengths |= {row.index(EOS) + 1 if EOS in row else limit for row in expected.tolist()}
    assert gnmt_differs >= 2  # the style is what makes them equal: GNMT's search ranks otherwise
    assert len(lengths) >= 5  # translations of many lengths, finished and cut at the limit


def test_translate_with_the_hf_style_equals_generate(tmp_path, trained):
    """translate() sorts by length, batches and decodes; with the hf style its beams are generate's."""
    ours = Transformer.from_pretrained(save(trained, tmp_path))
    tokenizer = IdTokenizer()
    src = sources(seed=3)
    texts = [" ".join(map(str, row[row != PAD][:-1].tolist())) for row in src]
    got = translate(ours, tokenizer, texts, beam_size=4, length_penalty=1.0, length_penalty_style="hf")
    limit = min(int((src != PAD).sum(dim=1).max()) + 50, 64)  # one batch: its longest source + 50
    expected = hf_generate(trained, src, num_beams=4, max_new_tokens=limit)
    assert got == [tokenizer.decode(row) for row in expected.tolist()]


class IdTokenizer:
    """Token ids written as numbers: the smallest tokenizer `translate` accepts."""

    pad_id, eos_id = PAD, EOS

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        ids = list(ids)
        return " ".join(str(i) for i in ids[: ids.index(EOS) if EOS in ids else len(ids)] if i != PAD)


# --- saving ---------------------------------------------------------------------------------


def test_save_pretrained_is_loaded_by_transformers_with_equal_logits(tmp_path, random_dir):
    ours = Transformer.from_pretrained(random_dir)
    ours.save_pretrained(tmp_path / "out")
    hf = transformers.MarianMTModel.from_pretrained(tmp_path / "out").eval()
    assert_logits_match(ours, hf)
    back = Transformer.from_pretrained(tmp_path / "out")
    assert back.config == ours.config
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize("share_embeddings", [True, False])
def test_our_paper_model_is_written_as_an_equal_marian(tmp_path, share_embeddings):
    """The paper's model as `translate train` makes it (interleaved positions, ReLU, no logits
    bias, BOS as start token, pad 0), written in Marian's layout: transformers computes the same
    logits, and its default generate (our generation_config.json) our greedy translations."""
    torch.manual_seed(7)
    config = TransformerConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2,
                               d_ff=64, max_seq_len=64, pad_id=0, bos_id=1, eos_id=2, dropout=0.0,
                               share_embeddings=share_embeddings)
    ours = Transformer(config).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norms" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0.0, 0.1)
    ours.save_pretrained(tmp_path)
    hf = transformers.MarianMTModel.from_pretrained(tmp_path).eval()
    src = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, 0, 0]])
    tgt = torch.tensor([[1, 3, 4, 5], [1, 6, 7, 8]])
    with torch.no_grad():
        expected = hf(input_ids=src, attention_mask=src != 0, decoder_input_ids=tgt).logits
        assert (ours(src, tgt) - expected).abs().max().item() <= 1e-4
    generated = hf.generate(input_ids=src, attention_mask=src != 0, max_new_tokens=10)[:, 1:]
    assert torch.equal(ours.generate(src, max_new_tokens=10), generated)
    assert Transformer.from_pretrained(tmp_path).config.positions == "halves"


def test_save_pretrained_refuses_a_pre_norm_model(tmp_path):
    model = Transformer(TransformerConfig.from_preset("tiny", vocab_size=VOCAB, norm_first=True))
    with pytest.raises(UserError, match="pre-norm .* no Marian equivalent"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- malformed directories ------------------------------------------------------------------


def edit_weights(directory: Path, edit) -> None:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            del config[key]
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


FC2 = "model.decoder.layers.1.fc2.weight"
WEIGHT_EDITS = {
    "missing": (lambda t: t.pop(FC2),
                rf"model.safetensors: missing tensor '{re.escape(FC2)}' \(expected shape \(32, 64\)\)"),
    "shape": (lambda t: t.update({FC2: torch.zeros(32, 63)}),
              rf"model.safetensors: tensor '{re.escape(FC2)}' has shape \(32, 63\) but config.json implies \(32, 64\)"),
    "int": (lambda t: t.update({FC2: torch.zeros(32, 64, dtype=torch.int64)}),
            rf"'{re.escape(FC2)}' is int64, not floating point"),
    "unexpected": (lambda t: t.update({"model.encoder.layers.0.adapter.weight": torch.zeros(3)}),
                   "'model.encoder.layers.0.adapter.weight' is not a tensor of the MarianMTModel"),
    "learned positions": (lambda t: t.update({"model.decoder.embed_positions.weight": torch.randn(64, 32)}),
                          "'model.decoder.embed_positions.weight' is not Marian's sinusoid table"),
    "untied": (lambda t: t.update({"lm_head.weight": torch.randn(VOCAB, 32)}),
               r"'(lm_head|model\.shared)\.weight' differs from .*, but config.json ties them"),
    "no embeddings": (lambda t: t.pop("model.shared.weight"), "has no token embeddings"),
}
CONFIG_EDITS = {
    "wrong type": (dict(d_model="32"), r"config.json: d_model must be int, got '32'"),
    "missing key": (dict(decoder_layers=...), r"config.json: has no 'decoder_layers'"),
    "pre-norm": (dict(normalize_before=True), "config.json: normalize_before=True asks for pre-norm layers"),
    "learned positions": (dict(static_position_embeddings=False), "static_position_embeddings=False asks for learned"),
    "decoder vocab": (dict(decoder_vocab_size=50, share_encoder_decoder_embeddings=False),
                      "decoder_vocab_size=50 differs from vocab_size=100"),
    "half tied": (dict(tie_word_embeddings=False),
                  "share_encoder_decoder_embeddings=True with tie_word_embeddings=False"),
    "activation": (dict(activation_function="gelu_new"), "activation_function 'gelu_new' is not one"),
    "heads": (dict(decoder_attention_heads=2), "encoder_attention_heads=4 but decoder_attention_heads=2"),
    "eos list": (dict(eos_token_id=[0, 1]), r"eos_token_id must be int, got \[0, 1\]"),
    "id range": (dict(decoder_start_token_id=100),
                 "decoder_start_token_id=100 is not a token of its 100-token vocabulary"),
    "other model": (dict(model_type="llama"), "model_type 'llama' is not a Marian model"),
}


@pytest.mark.parametrize("case", list(WEIGHT_EDITS) + [f"config: {c}" for c in CONFIG_EDITS])
def test_malformed_directories_are_refused_naming_file_and_key(tmp_path, random_dir, case):
    directory = Path(shutil.copytree(random_dir, tmp_path / "m"))
    if case.startswith("config: "):
        changes, message = CONFIG_EDITS[case.removeprefix("config: ")]
        edit_config(directory, **changes)
    else:
        edit, message = WEIGHT_EDITS[case]
        edit_weights(directory, edit)
    with pytest.raises(UserError, match=message) as error:
        Transformer.from_pretrained(directory)
    assert str(directory) in str(error.value) and "\n" not in str(error.value)


def test_old_checkpoints_with_every_tied_name_and_the_positions_load(tmp_path):
    """transformers 4 stored the shared matrix under four names and both positions tables."""
    hf = random_marian(8)
    save(hf, tmp_path, "pytorch_model.bin")
    names = torch.load(tmp_path / "pytorch_model.bin", weights_only=True).keys()
    assert {"lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_positions.weight"} <= names
    assert_logits_match(Transformer.from_pretrained(tmp_path), hf)


# --- the tokenizer --------------------------------------------------------------------------


def write_marian_tokenizer(directory: Path, shared_data: Path) -> Path:
    """source.spm (English) and target.spm (Indonesian) unigram models trained on Tatoeba, and
    the joint vocab.json of OPUS-MT's layout: </s> 0, <unk> 1, the pieces of both, <pad> last."""
    directory.mkdir(parents=True, exist_ok=True)
    models = []
    for name, language in (("source", "en"), ("target", "id")):
        lines = (shared_data / "en-id" / f"tatoeba.{language}").read_text(encoding="utf-8").splitlines()[:400]
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=str(directory / name), vocab_size=200, model_type="unigram",
            character_coverage=1.0, unk_id=1, eos_id=0, bos_id=-1, pad_id=-1, minloglevel=2)
        (directory / f"{name}.model").rename(directory / f"{name}.spm")
        (directory / f"{name}.vocab").unlink()
        models.append(sentencepiece.SentencePieceProcessor(model_file=str(directory / f"{name}.spm")))
    pieces = sorted({m.id_to_piece(i) for m in models for i in range(m.get_piece_size())} - {"</s>", "<unk>"})
    vocab = {piece: i for i, piece in enumerate(["</s>", "<unk>", *pieces, "<pad>"])}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({"source_lang": "en", "target_lang": "id"}))
    return directory


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, shared_data):
    return write_marian_tokenizer(tmp_path_factory.mktemp("tokenizer"), shared_data)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    with warnings.catch_warnings():  # "Recommended: pip install sacremoses": ids do not depend on it
        warnings.simplefilter("ignore")
        return transformers.MarianTokenizer.from_pretrained(tokenizer_dir)


def lines(shared_data, language, start, stop):
    return (shared_data / "en-id" / f"tatoeba.{language}").read_text(encoding="utf-8").splitlines()[start:stop]


ODD_TEXTS = ["", "   ", "  spaces   inside  ", "Ωmega ƒ 漢字 ok 🙂", "tab\there", "a </s> b <unk>c<pad>  x",
             ">>ind<< Where is the station?", ">>xx no end", "Line with ÿ and é, ñ.", "123 4567 89"]


def test_tokenizer_ids_equal_transformers(tokenizer_dir, hf_tokenizer, shared_data):
    ours = MarianTokenizer.from_directory(tokenizer_dir)
    assert (ours.eos_id, ours.unk_id, ours.pad_id, ours.vocab_size) == (0, 1, hf_tokenizer.pad_token_id,
                                                                       hf_tokenizer.vocab_size)
    texts = lines(shared_data, "en", 400, 900) + ODD_TEXTS
    unknown = 0
    for text in texts:
        ids = ours.encode(text)
        assert ids + [ours.eos_id] == hf_tokenizer(text)["input_ids"], text
        unknown += ours.unk_id in ids
    assert unknown >= 3  # characters the models never saw became <unk>, as in transformers


def test_tokenizer_decodes_as_transformers(tokenizer_dir, hf_tokenizer, shared_data):
    """Target-language ids (Indonesian through target.spm), with <unk>, padding and EOS in them."""
    ours = MarianTokenizer.from_directory(tokenizer_dir)
    generator = torch.Generator().manual_seed(0)
    for text in lines(shared_data, "id", 400, 700) + [t for t in ODD_TEXTS if "</s>" not in t]:  # we stop at EOS
        ids = hf_tokenizer(text_target=text)["input_ids"][:-1]  # without its EOS
        cut = int(torch.randint(0, len(ids) + 1, (1,), generator=generator))
        ids = ids[:cut] + [ours.unk_id] + ids[cut:]
        expected = hf_tokenizer.decode(ids, skip_special_tokens=True, use_source_tokenizer=False)
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == expected  # transformers 5's default
        assert ours.decode(ids + [EOS, ours.pad_id, ours.pad_id]) == expected, text
        assert ours.decode([ours.pad_id, *ids, EOS, *ids]) == expected  # the start token, then up to EOS


def test_tokenizer_refuses_files_that_do_not_belong_to_the_model(tmp_path, tokenizer_dir):
    config = TransformerConfig(vocab_size=1000, d_model=32, n_heads=4, pad_id=999, eos_id=0, bos_id=999)
    with pytest.raises(UserError, match=r"'<pad>' \(pad_token\) is id \d+ but the model's is 999"):
        MarianTokenizer.from_directory(tokenizer_dir, config)
    small = TransformerConfig(vocab_size=100, d_model=32, n_heads=4, pad_id=99, eos_id=0, bos_id=99)
    with pytest.raises(UserError, match="beyond the model's 100 tokens"):
        MarianTokenizer.from_directory(tokenizer_dir, small)
    broken = Path(shutil.copytree(tokenizer_dir, tmp_path / "t"))
    (broken / "target.spm").unlink()
    with pytest.raises(UserError, match="no target.spm"):
        MarianTokenizer.from_directory(broken)
    (broken / "target.spm").write_bytes(b"not a model")
    with pytest.raises(UserError, match="target.spm is not a SentencePiece model"):
        MarianTokenizer.from_directory(broken)


# --- the command line -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def marian_with_tokenizer(tmp_path_factory, tokenizer_dir):
    """A random Marian over the tokenizer's vocabulary, saved with its tokenizer."""
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    hf = random_marian(9, vocab_size=len(vocab), pad_token_id=vocab["<pad>"], decoder_start_token_id=vocab["<pad>"])
    directory = save(hf, tmp_path_factory.mktemp("opus-mt-tiny"))
    for name in ("source.spm", "target.spm", "vocab.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def test_save_pretrained_carries_the_tokenizer(tmp_path, marian_with_tokenizer, random_dir):
    model = Transformer.from_pretrained(marian_with_tokenizer)
    model.save_pretrained(tmp_path / "out", tokenizer_dir=marian_with_tokenizer)
    for name in ("source.spm", "target.spm", "vocab.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (marian_with_tokenizer / name).read_bytes()
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    small = Transformer.from_pretrained(random_dir)  # 100 tokens: not this tokenizer's model
    with pytest.raises(UserError, match="beyond the model's 100 tokens"):
        small.save_pretrained(tmp_path / "x", tokenizer_dir=marian_with_tokenizer)
    assert not (tmp_path / "x").exists()


def test_translate_run_and_eval_accept_a_marian_directory(tmp_path, capsys, marian_with_tokenizer, shared_data):
    texts = lines(shared_data, "en", 900, 905)
    assert main(["translate", "run", "--checkpoint", str(marian_with_tokenizer), "--beam", "2", "--device", "cpu",
                 *texts]) == 0
    out = capsys.readouterr().out.splitlines()
    model, tokenizer = load_translator(marian_with_tokenizer)
    assert out == translate(model, tokenizer, texts, beam_size=2) and any(out)
    prefix = tmp_path / "test"
    prefix.with_suffix(".en").write_text("\n".join(texts) + "\n", encoding="utf-8")
    prefix.with_suffix(".id").write_text("\n".join(lines(shared_data, "id", 900, 905)) + "\n", encoding="utf-8")
    assert main(["translate", "eval", "--checkpoint", str(marian_with_tokenizer), "--test", str(prefix),
                 "--beam", "1", "--device", "cpu"]) == 0
    assert re.fullmatch(r"BLEU \d+\.\d\d chrF \d+\.\d\d", capsys.readouterr().out.splitlines()[-1])


def test_a_directory_of_another_model_is_refused(tmp_path, capsys):
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4))
    llama.save_pretrained(tmp_path)
    capsys.readouterr()  # transformers' progress bar
    assert main(["translate", "run", "--checkpoint", str(tmp_path), "hello"]) == 2
    error = capsys.readouterr().err
    assert "model_type 'llama' is not a Marian model" in error and error.count("\n") == 1


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_translations_equal_generate(tmp_path, trained, n):
    """no_repeat_ngram_size n: greedy and beam-4 (hf style) translations equal transformers'
    `generate(no_repeat_ngram_size=n)`; the option changes outputs that repeated an n-gram, and no
    output repeats one (the decoder's start token counts, as in transformers)."""
    changed = 0
    for name, hf in {"trained": trained, "random": random_marian(7)}.items():
        ours = Transformer.from_pretrained(save(hf, tmp_path / name))
        src = sources(seed=3)
        for beams in (1, 4):
            style = dict(length_penalty_style="hf") if beams > 1 else {}
            expected = hf_generate(hf, src, num_beams=beams, max_new_tokens=14, no_repeat_ngram_size=n)
            got = ours.generate(src, max_new_tokens=14, beam_size=beams, length_penalty=1.0,
                                no_repeat_ngram_size=n, **style)
            assert got.shape == expected.shape and torch.equal(got, expected), (name, beams)
            plain = ours.generate(src, max_new_tokens=14, beam_size=beams, length_penalty=1.0, **style)
            changed += plain.shape != got.shape or not torch.equal(plain, got)
            for row in got.tolist():
                start = [ours.config.start_id]
                assert not repeats_an_ngram(start + (row[: row.index(EOS) + 1] if EOS in row else row), n)
    assert changed >= 2
