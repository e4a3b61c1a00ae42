"""Hub names wherever a checkpoint path goes, for every model (`fromscratch.checkpoints.resolve`).

The hub is unreachable here, so `resolve.hub_download` — the one function that touches the
network — is replaced by a fake that serves a local directory in the hub's layout (a tiny
transformers model saved with save_pretrained), or raises what huggingface_hub raises when
offline, for a gated repository and for a missing one.
"""

import json
import shutil
import sys
from pathlib import Path

import httpx2  # huggingface_hub 2's HTTP library: its errors carry one of its responses
import pytest
import torch
import transformers  # test-only dependency: the reference models
from huggingface_hub import errors

from fromscratch.checkpoints import resolve
from fromscratch.cli import main
from fromscratch.errors import UserError
from fromscratch.llama import Llama
from fromscratch.transformer import Transformer

sys.path.insert(0, str(Path(__file__).parent / "transformer"))
from test_marian import one_thread, random_marian, save, write_marian_tokenizer  # noqa: E402,F401 (one_thread: autouse)

OPUS_MT, LLAMA_2 = "Helsinki-NLP/opus-mt-en-id", "meta-llama/Llama-2-7b-hf"


@pytest.fixture(scope="module")
def opus_mt(tmp_path_factory, shared_data):
    """A tiny Marian with its two SentencePiece models, as the hub's opus-mt-en-id directory is laid out."""
    directory = tmp_path_factory.mktemp("opus-mt")
    write_marian_tokenizer(directory, shared_data)
    vocab_size = len(json.loads((directory / "vocab.json").read_text(encoding="utf-8")))
    pad = vocab_size - 1  # </s> 0, <unk> 1, ..., <pad> last
    save(random_marian(0, vocab_size=vocab_size, pad_token_id=pad, decoder_start_token_id=pad), directory)
    return directory


@pytest.fixture(scope="module")
def llama_2(tmp_path_factory, shared_data):
    """A tiny random LlamaForCausalLM with Llama 2's tokenizer, as the hub's directory is laid out."""
    directory = tmp_path_factory.mktemp("llama-2")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    shutil.copy(shared_data / "tokenizers" / "llama2-tokenizer.model", directory / "tokenizer.model")
    return directory


@pytest.fixture
def hub(monkeypatch):
    """The fake hub: `hub.repos[repo_id]` is a directory to serve or an exception to raise;
    `hub.calls` records (repo_id, allow_patterns)."""

    class FakeHub:
        repos: dict = {}
        calls: list = []

        def download(self, repo_id, allow_patterns=None):
            self.calls.append((repo_id, allow_patterns))
            found = self.repos[repo_id]
            if isinstance(found, Exception):
                raise found
            return Path(found)

    fake = FakeHub()
    fake.repos, fake.calls = {}, []
    monkeypatch.setattr(resolve, "hub_download", fake.download)
    return fake


def test_a_marian_hub_name_loads_like_its_directory(hub, opus_mt):
    hub.repos[OPUS_MT] = opus_mt
    model = Transformer.from_pretrained(OPUS_MT)
    local = Transformer.from_pretrained(opus_mt)
    (repo_id, patterns), = hub.calls
    assert repo_id == OPUS_MT and {"config.json", "*.spm", "vocab.json"} <= set(patterns)
    src, tgt = torch.tensor([[5, 6, 7, 0]]), torch.tensor([[local.config.start_id, 8, 9]])
    with torch.no_grad():
        assert torch.equal(model(src, tgt), local(src, tgt))


def test_translate_run_with_a_hub_name(hub, opus_mt, capsys):
    hub.repos[OPUS_MT] = opus_mt
    argv = ["--beam", "2", "--device", "cpu", "Where is the station?", "I like tea."]
    assert main(["translate", "run", "--checkpoint", str(opus_mt), *argv]) == 0
    local = capsys.readouterr().out
    assert main(["translate", "run", "--checkpoint", OPUS_MT, *argv]) == 0
    assert capsys.readouterr().out == local and len(local.splitlines()) == 2


def test_a_llama_hub_name_loads_like_its_directory(hub, llama_2, capsys):
    hub.repos[LLAMA_2] = llama_2
    model = Llama.from_pretrained(LLAMA_2)
    (repo_id, patterns), = hub.calls
    assert repo_id == LLAMA_2 and "tokenizer.model" in patterns
    tokens = torch.tensor([[1, 450, 4996, 17354]])
    reference = transformers.LlamaForCausalLM.from_pretrained(llama_2).eval()
    with torch.no_grad():
        assert (model(tokens) - reference(tokens).logits).abs().max().item() <= 1e-4
    argv = ["--prompt", "Once upon a time", "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu"]
    assert main(["llama", "generate", "--checkpoint", str(llama_2), *argv]) == 0
    local = capsys.readouterr().out
    assert main(["llama", "generate", "--checkpoint", LLAMA_2, *argv]) == 0
    assert capsys.readouterr().out == local and local.startswith("Once upon a time")


def _response(status: int, repo_id: str) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))


FAILURES = {
    "offline": (lambda repo: errors.LocalEntryNotFoundError(
        "An error happened while trying to locate the files on the Hub and we cannot find the appropriate "
        "snapshot folder for the specified revision on the local disk.\nPlease check your internet connection."),
        "the Hugging Face hub could not be reached to fetch it"),
    "gated": (lambda repo: errors.GatedRepoError(
        f"401 Client Error.\nCannot access gated repo for url https://huggingface.co/{repo}.",
        response=_response(401, repo)), "is a gated model on the Hugging Face hub: accept its licence"),
    "missing": (lambda repo: errors.RepositoryNotFoundError(
        f"404 Client Error.\nRepository Not Found for url: https://huggingface.co/api/models/{repo}.",
        response=_response(404, repo)), "no such local path, and no such model on the Hugging Face hub"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("repo_id, load", [(OPUS_MT, Transformer.from_pretrained), (LLAMA_2, Llama.from_pretrained)])
def test_hub_failures_are_one_line_errors(hub, failure, repo_id, load):
    make, message = FAILURES[failure]
    hub.repos[repo_id] = make(repo_id)
    with pytest.raises(UserError, match=message) as error:
        load(repo_id)
    assert str(error.value).startswith(repo_id) and "\n" not in str(error.value)


def test_hub_failures_through_the_cli(hub, capsys):
    hub.repos[LLAMA_2] = FAILURES["gated"][0](LLAMA_2)
    assert main(["llama", "generate", "--checkpoint", LLAMA_2, "--prompt", "Hi"]) == 2
    error = capsys.readouterr().err
    assert "gated model" in error and error.count("\n") == 1
    hub.repos[OPUS_MT] = FAILURES["offline"][0](OPUS_MT)
    assert main(["translate", "run", "--checkpoint", OPUS_MT, "Hi"]) == 2
    error = capsys.readouterr().err
    assert "could not be reached" in error and error.count("\n") == 1


@pytest.mark.parametrize("spec", ["./no/such/dir", "no-such-dir", "a/b/c"])
def test_a_path_that_is_not_there_and_not_a_hub_name_is_never_fetched(hub, spec):
    with pytest.raises(UserError, match="no such file or directory"):
        Transformer.from_pretrained(spec)
    assert hub.calls == []
