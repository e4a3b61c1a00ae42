"""Misuse of the Python API gets an error that names the problem, before an embedding lookup or a
tensor shape fails with a message that names neither, and never a silently wrong result."""

import math

import pytest
import torch

from fromscratch.engine import TrainConfig
from fromscratch.errors import UserError
from fromscratch.llama import Llama, LlamaConfig
from fromscratch.transformer import Transformer, TransformerConfig
from fromscratch.vlm.metrics import bleu, cider_d, vqa_accuracy


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return Transformer(TransformerConfig.from_preset("tiny", vocab_size=50, dropout=0.0)).eval()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, max_seq_len=32)).eval()


@pytest.mark.parametrize("src, expected", [
    (torch.tensor([[3, 50, 2]]), "src_ids holds ids from 2 to 50, outside the model's vocabulary of 50"),
    (torch.tensor([[3, -1, 2]]), "outside the model's vocabulary"),
    (torch.tensor([[3.0, 4.0, 2.0]]), "src_ids must hold integer token ids, got torch.float32"),
    (torch.tensor([3, 4, 2]), "src_ids must be (batch, time), got shape (3,)"),
    (torch.zeros(0, 4, dtype=torch.long), "give at least one source of at least one token"),
])
def test_transformer_generate_names_bad_source_ids(transformer, src, expected):
    with pytest.raises((UserError, TypeError), match=expected.replace("(", r"\(").replace(")", r"\)")):
        transformer.generate(src)


def test_generate_names_bad_counts(transformer, llama):
    src = torch.tensor([[3, 4, 2]])
    with pytest.raises(UserError, match="max_new_tokens must be a whole number ≥ 0, got -3"):
        transformer.generate(src, max_new_tokens=-3)
    with pytest.raises(TypeError, match="beam_size must be a whole number, got 2.0"):
        transformer.generate(src, beam_size=2.0)
    with pytest.raises(UserError, match="max_new_tokens must be a whole number ≥ 0, got 2.5"):
        llama.generate([[1, 2]], 2.5)
    with pytest.raises(UserError, match="input_ids holds ids from 1 to 99"):
        llama.generate([[1, 99]], 2)
    with pytest.raises(TypeError, match="prompts must be token ids"):
        llama.generate(["hello"], 2)
    with pytest.raises(UserError, match="length penalty α must be a finite number, got nan"):
        llama.generate([[1, 2]], 3, beam_size=2, length_penalty=math.nan)


def test_translate_takes_a_list_of_strings():
    from fromscratch.transformer import translate

    class Stand:  # translate refuses before it looks at the model or the tokenizer
        config = TransformerConfig.from_preset("tiny", vocab_size=50)

    with pytest.raises(TypeError, match="a list of sentences, not one string"):
        translate(Stand(), None, "I will read a book.")
    with pytest.raises(TypeError, match="line 2 is int, not a string"):
        translate(Stand(), None, ["a", 123])
    with pytest.raises(ValueError, match="1 line numbers for 3 lines"):
        translate(Stand(), None, ["a", "b", "c"], line_numbers=[1])


@pytest.mark.parametrize("settings, expected", [
    (dict(max_steps=2.5), "max_steps must be a whole number, got 2.5"),
    (dict(max_steps="10"), "max_steps must be a whole number, got '10'"),
    (dict(seed=1.5), "seed must be a whole number"),
    (dict(resume="false"), "resume must be True or False, got 'false'"),
    (dict(betas=(0.9, 0.95, 0.99)), "betas must be two numbers"),
    (dict(lr=1e-3, min_lr=5.0), "--min-lr 5.0 is above --lr 0.001"),
])
def test_train_config_refuses_values_of_the_wrong_type(settings, expected):
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**settings)


def test_marian_save_refuses_a_norm_eps_its_config_cannot_hold(tmp_path):
    model = Transformer(TransformerConfig.from_preset("tiny", vocab_size=50, norm_first=False, norm_eps=0.5))
    with pytest.raises(UserError, match="norm_eps=0.5: MarianMTModel's LayerNorms take 1e-05"):
        model.save_pretrained(tmp_path / "marian")
    assert not (tmp_path / "marian").exists()


def test_llama_dtype_and_tokenizer_inputs_are_checked(tmp_path, shared_data):
    from fromscratch.llama import Tokenizer

    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        Llama.from_pretrained(tmp_path, dtype="bfloat16")
    tokenizer = Tokenizer(shared_data / "tokenizers" / "llama2-tokenizer.model")
    with pytest.raises(TypeError, match="encode takes one string, got list"):
        tokenizer.encode(["a", "b"])


def test_caption_metrics_refuse_a_bare_string_where_a_list_belongs():
    with pytest.raises(TypeError, match="not one string"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(TypeError, match=r"references\[0\] is one string"):
        bleu(["a red circle"], ["a red circle"])
    with pytest.raises(ValueError, match="no captions to score"):
        cider_d([], [])
    assert vqa_accuracy("yes", ["yes"] * 10) == pytest.approx(1.0)  # ten humans, as VQAv2 has


def test_decoding_ids_outside_the_tokenizer_and_exporting_to_a_directory_are_refused(tmp_path, llama):
    from fromscratch.llama import export_llama2c
    from fromscratch.transformer import BPETokenizer

    tokenizer = BPETokenizer.train(["a small text to learn from"] * 10, vocab_size=300)
    with pytest.raises(ValueError, match=r"ids \[99999\] are outside the tokenizer's"):
        tokenizer.decode([5, 99999])
    with pytest.raises(UserError, match="is a directory; give a file path"):
        export_llama2c(llama, tmp_path)
    with pytest.raises(TypeError, match="export_llama2c takes a model"):
        export_llama2c(str(tmp_path), tmp_path / "model.bin")
