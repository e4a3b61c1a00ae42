"""Every checkpoint format `Llama.from_pretrained` reads, written here in that exact format.

Hugging Face directories are written by transformers itself (or, for the pickled
pytorch_model*.bin that transformers 5 no longer writes, in the layout transformers 4 used);
Meta's are split the way its model parallelism split them; llama2.c files are written byte by
byte after karpathy's export.py as well as by our exporter. Parity is checked on logits against
transformers' LlamaForCausalLM; round trips are checked bitwise.
"""

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers  # test-only dependency: the reference implementation

from fromscratch.engine.checkpoint import save_model_weights, write_json
from fromscratch.errors import UserError
from fromscratch.llama import checkpoints
from fromscratch.llama.checkpoints import (
    build_model,
    convert,
    export_llama2c,
    find_tokenizer,
    hf_to_meta_permute,
    meta_to_hf_permute,
    read_checkpoint,
    save_pretrained,
)
from fromscratch.llama.config import LlamaConfig
from fromscratch.llama.model import Llama, apply_rope, precompute_rope_rotations

load_pretrained = Llama.from_pretrained

VOCAB, TOKENS = 64, torch.tensor([[1, 5, 9, 33, 2, 60, 17, 8, 8, 40], [3, 3, 0, 63, 12, 7, 7, 1, 50, 21]])
VARIANTS = {"mha-untied": dict(n_kv_heads=None, tie=False), "gqa-tied": dict(n_kv_heads=2, tie=True),
            "mha-tied": dict(n_kv_heads=None, tie=True), "gqa-untied": dict(n_kv_heads=2, tie=False)}


# --- fixtures: tiny random models -------------------------------------------------------------


def tiny_config(n_kv_heads=None, tie=False, **overrides) -> LlamaConfig:
    fields = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                  ffn_hidden_dim=48, max_seq_len=64, tie_embeddings=tie)
    return LlamaConfig(**{**fields, **overrides})


# Meta's params.json has no hidden size: it follows from dim, multiple_of and ffn_dim_multiplier.
META_FFN = dict(ffn_hidden_dim=None, multiple_of=16)


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Weights far from any initialisation, norms included, so a swapped tensor shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.25)
    return model.eval()


def random_llama(**kw) -> Llama:
    return randomize_(Llama(tiny_config(**kw)))


def random_hf(n_kv_heads=None, tie=False, rope_theta=10000.0):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads or 4, rms_norm_eps=1e-5, rope_theta=rope_theta,
        max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return randomize_(transformers.LlamaForCausalLM(config))


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


def our_logits(model: Llama) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def assert_same_weights(a: Llama, b: Llama) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert a.config.hidden_dim == b.config.hidden_dim and a.config.kv_heads == b.config.kv_heads
    assert a.config.tie_embeddings == b.config.tie_embeddings


def assert_matches_hf(ours: Llama, hf) -> None:
    diff = (our_logits(ours) - hf_logits(hf)).abs().max().item()
    assert diff <= 1e-4, diff


# --- the RoPE permutation ---------------------------------------------------------------------


@pytest.mark.parametrize("n_heads", [1, 4])
def test_permutations_are_inverses(n_heads):
    w = torch.randn(n_heads * 8, 24)
    assert torch.equal(hf_to_meta_permute(meta_to_hf_permute(w, n_heads), n_heads), w)
    assert torch.equal(meta_to_hf_permute(hf_to_meta_permute(w, n_heads), n_heads), w)
    assert not torch.equal(meta_to_hf_permute(w, n_heads), w)


def test_permuted_weights_under_rotate_half_equal_adjacent_pair_rope():
    """Meta's RoPE on x·wqᵀ equals transformers' rotate_half RoPE on x·meta_to_hf(wq)ᵀ, up to the
    same reordering of features: the permutation is exactly the change of RoPE layout."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n_heads, head_dim, t = 4, 8, 7
    x, wq = torch.randn(1, t, 32), torch.randn(n_heads * head_dim, 32)
    meta = apply_rope((x @ wq.T).view(1, t, n_heads, head_dim), precompute_rope_rotations(head_dim, t))

    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(t).float(), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos()[None], torch.cat([angles, angles], -1).sin()[None]
    q_hf = (x @ meta_to_hf_permute(wq, n_heads).T).view(1, t, n_heads, head_dim).transpose(1, 2)
    hf, _ = apply_rotary_pos_emb(q_hf, q_hf, cos, sin)  # (1, n_heads, t, head_dim)

    meta_as_hf = meta_to_hf_permute(meta.reshape(t, -1).T, n_heads).T.reshape(t, n_heads, head_dim)
    torch.testing.assert_close(hf[0].transpose(0, 1), meta_as_hf, rtol=1e-5, atol=1e-5)


# --- Hugging Face directories -----------------------------------------------------------------


@pytest.mark.parametrize("variant", ["mha-untied", "gqa-tied"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_hf_safetensors_loads_with_equal_logits(tmp_path, variant, sharded):
    hf = random_hf(**VARIANTS[variant], rope_theta=500000.0)
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    ours = load_pretrained(tmp_path)
    assert ours.config.rope_theta == 500000.0 and ours.config.tie_embeddings == VARIANTS[variant]["tie"]
    assert_matches_hf(ours, hf)


@pytest.mark.parametrize("variant", ["mha-untied", "gqa-tied"])
def test_loading_keeps_one_copy_of_the_weights(tmp_path, variant):
    """The model is built on the meta device and takes the checkpoint's tensors as its parameters:
    no random initialisation, no second copy (what makes a 7B checkpoint fit in memory once)."""
    hf = random_hf(**VARIANTS[variant])
    hf.save_pretrained(tmp_path)
    ckpt = read_checkpoint(tmp_path)
    model = build_model(Llama, ckpt)
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and p.data_ptr() == ckpt.state_dict[name].data_ptr(), name
    if VARIANTS[variant]["tie"]:
        assert model.output.weight is model.tok_embeddings.weight
        assert model.num_parameters() == sum(t.numel() for k, t in ckpt.state_dict.items() if k != "output.weight")
    assert model.rope_rotations.device.type == "cpu"
    assert_matches_hf(model, hf)


def write_pytorch_bin(hf, directory: Path, n_shards: int) -> None:
    """pytorch_model.bin, or pytorch_model-0000i-of-0000n.bin + index, as transformers 4 wrote them
    (including the rotary inv_freq buffers that versions before 4.31 saved)."""
    directory.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(directory)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    if n_shards == 1:
        torch.save(sd, directory / "pytorch_model.bin")
        return
    names, weight_map = list(sd), {}
    for i in range(n_shards):
        file = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: sd[k] for k in names[i::n_shards]}
        torch.save(part, directory / file)
        weight_map.update({k: file for k in part})
    index = {"metadata": {"total_size": sum(v.numel() * 4 for v in sd.values())}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("n_shards", [1, 3])
def test_hf_pytorch_bin_loads_with_equal_logits(tmp_path, n_shards):
    hf = random_hf(n_kv_heads=2)
    write_pytorch_bin(hf, tmp_path, n_shards)
    assert_matches_hf(load_pretrained(tmp_path), hf)


def test_hf_bf16_weights_load_as_float32_or_as_asked(tmp_path):
    hf = random_hf(n_kv_heads=2).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.tok_embeddings.weight.dtype == torch.float32
    assert torch.equal(ours.tok_embeddings.weight, hf.model.embed_tokens.weight.float())
    # A float32 reference from the same bf16 file (casting `hf` back would keep a bf16 RoPE table).
    assert_matches_hf(ours, transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32))
    half = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.layers[0].attention.wq.weight.dtype == torch.bfloat16
    assert torch.equal(half.tok_embeddings.weight, hf.model.embed_tokens.weight)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_pretrained_is_read_by_transformers_and_back_bitwise(tmp_path, variant):
    model = random_llama(**VARIANTS[variant])
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert_matches_hf(model, transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf"))
    back = Llama.from_pretrained(tmp_path / "hf")
    assert_same_weights(model, back)
    assert torch.equal(our_logits(model), our_logits(back))


def test_save_pretrained_carries_the_tokenizer(tmp_path, shared_data):
    spm = shared_data / "tokenizers" / "llama2-tokenizer.model"
    with pytest.raises(UserError, match="has 32000 tokens but the model 64: they do not belong together"):
        save_pretrained(random_llama(), tmp_path / "hf", tokenizer_path=spm)  # would fail only when generating
    assert not (tmp_path / "hf").exists()
    save_pretrained(random_llama(vocab_size=32000), tmp_path / "hf", tokenizer_path=spm)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == spm.read_bytes()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, None)
    assert find_tokenizer(tmp_path / "hf") == tmp_path / "hf" / "tokenizer.model"


def test_save_pretrained_replaces_a_model_dir_but_keeps_other_files(tmp_path):
    out = tmp_path / "hf"
    random_llama().save_pretrained(out)
    (out / "README.md").write_text("notes")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    second = random_llama(n_kv_heads=2)
    second.save_pretrained(out)
    assert (out / "README.md").read_text() == "notes"
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert_same_weights(second, load_pretrained(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporaries left


def test_save_pretrained_crash_leaves_no_directory(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.huggingface, "save_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(random_llama(), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_save_pretrained_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="refusing"):
        save_pretrained(random_llama(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "precious"


# --- Meta directories -------------------------------------------------------------------------


def write_meta(model: Llama, directory: Path, n_shards: int, vocab_parallel: bool = False) -> None:
    """params.json + consolidated.NN.pth, each shard holding what one model-parallel rank held:
    ColumnParallelLinear weights split on dim 0, RowParallelLinear on dim 1, norms replicated,
    the ParallelEmbedding on dim 1 (Llama 1/2) or the VocabParallelEmbedding on dim 0 (Llama 3)."""
    c = model.config
    directory.mkdir(parents=True)
    params = {"dim": c.d_model, "n_layers": c.n_layers, "n_heads": c.n_heads, "multiple_of": c.multiple_of,
              "norm_eps": c.norm_eps, "vocab_size": -1, "rope_theta": c.rope_theta}
    if c.n_kv_heads is not None:
        params["n_kv_heads"] = c.n_kv_heads
    if c.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = c.ffn_dim_multiplier
    (directory / "params.json").write_text(json.dumps(params))
    shards = [{} for _ in range(n_shards)]
    for name, w in model.state_dict().items():
        if name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")):
            parts = w.chunk(n_shards, dim=0)
        elif name.endswith(("wo.weight", "w2.weight")):
            parts = w.chunk(n_shards, dim=1)
        elif name == "tok_embeddings.weight":
            parts = w.chunk(n_shards, dim=0 if vocab_parallel else 1)
        else:
            parts = [w] * n_shards
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for i, shard in enumerate(shards):
        shard["rope.freqs"] = torch.ones(c.head_dim // 2)  # Llama 1 saved this; it is ignored
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_merges_model_parallel_shards(tmp_path, n_shards):
    model = random_llama(n_kv_heads=2, ffn_dim_multiplier=1.3, **META_FFN)
    write_meta(model, tmp_path / "llama-2-tiny", n_shards)
    loaded = load_pretrained(tmp_path / "llama-2-tiny")
    assert loaded.config.vocab_size == VOCAB  # from the embedding: params.json says -1
    assert loaded.config.hidden_dim == model.config.hidden_dim == 112  # ⌈1.3·⌊8·32/3⌋ / 16⌉·16
    assert_same_weights(model, loaded)


def test_meta_llama3_vocab_parallel_embedding(tmp_path):
    model = random_llama(n_kv_heads=2, rope_theta=500000.0, **META_FFN)
    write_meta(model, tmp_path / "llama-3-tiny", 2, vocab_parallel=True)
    assert_same_weights(model, load_pretrained(tmp_path / "llama-3-tiny" / "consolidated.00.pth"))


def test_meta_converts_to_hf_with_equal_logits_and_its_tokenizer(tmp_path, shared_data):
    """Meta layout → our convert → transformers: proves the Meta reader and the permutation together."""
    model = random_llama(n_kv_heads=2, vocab_size=32000, **META_FFN)  # the tokenizer's size
    write_meta(model, tmp_path / "download" / "llama-2-tiny", 2)
    spm = tmp_path / "download" / "tokenizer.model"  # Meta's downloads keep it one level up
    spm.write_bytes((shared_data / "tokenizers" / "llama2-tokenizer.model").read_bytes())
    assert find_tokenizer(tmp_path / "download" / "llama-2-tiny") == spm
    convert(tmp_path / "download" / "llama-2-tiny", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == spm.read_bytes()
    assert_matches_hf(model, transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf"))


# --- llama2.c .bin files ----------------------------------------------------------------------


def write_llama2c_by_hand(model: Llama, path: Path, version: int) -> None:
    """A llama2.c file written the way karpathy's export.py writes it (legacy_export for v0,
    version1_export for v1), independently of `export_llama2c`."""
    c, sd = model.config, {k: v.detach().numpy() for k, v in model.state_dict().items()}
    shared = c.tie_embeddings
    L = range(c.n_layers)
    with open(path, "wb") as f:
        if version == 0:
            vocab = c.vocab_size if shared else -c.vocab_size
            f.write(struct.pack("iiiiiii", c.d_model, c.hidden_dim, c.n_layers, c.n_heads, c.kv_heads, vocab,
                                c.max_seq_len))
            order = ["tok_embeddings.weight"]
            for part in ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                         "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]:
                order += [f"layers.{i}.{part}.weight" for i in L]
            order.append("norm.weight")
            for name in order:
                sd[name].astype(np.float32).tofile(f)
            # llama2.c model.py's precompute_freqs_cis, in float32 as it computes it
            hd = c.head_dim
            freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
            angles = torch.outer(torch.arange(c.max_seq_len), freqs).float()
            torch.cos(angles).numpy().tofile(f)
            torch.sin(angles).numpy().tofile(f)
        else:
            f.write(struct.pack("I", 0x616B3432))
            f.write(struct.pack("i", 1))
            f.write(struct.pack("iiiiiii", c.d_model, c.hidden_dim, c.n_layers, c.n_heads, c.kv_heads,
                                c.vocab_size, c.max_seq_len))
            f.write(struct.pack("B", int(shared)))
            f.write(b"\0" * (256 - f.tell()))
            order = [f"layers.{i}.attention_norm.weight" for i in L]
            order += [f"layers.{i}.ffn_norm.weight" for i in L]
            order += ["norm.weight", "tok_embeddings.weight"]
            for part in ["attention.wq", "attention.wk", "attention.wv", "attention.wo",
                         "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]:
                order += [f"layers.{i}.{part}.weight" for i in L]
            for name in order:
                sd[name].astype(np.float32).tofile(f)
        if not shared:
            sd["output.weight"].astype(np.float32).tofile(f)


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("variant", ["mha-untied", "gqa-tied", "gqa-untied"])
def test_llama2c_reads_export_py_files_and_our_exporter_writes_the_same_bytes(tmp_path, version, variant):
    model = random_llama(**VARIANTS[variant])
    by_hand, ours = tmp_path / "by_hand.bin", tmp_path / "ours.bin"
    write_llama2c_by_hand(model, by_hand, version)
    loaded = load_pretrained(by_hand)
    assert_same_weights(model, loaded)
    assert torch.equal(our_logits(model), our_logits(loaded))
    export_llama2c(model, ours, version=version)
    assert ours.read_bytes() == by_hand.read_bytes()


def test_llama2c_version2_int8_round_trip(tmp_path):
    """Q8_0: each group of 32 weights is stored as int8 q with one float32 scale max|w|/127."""
    model = random_llama(n_kv_heads=2)
    export_llama2c(model, tmp_path / "q80.bin", version=2, group_size=64)  # backs off to 32 = d_model
    loaded = load_pretrained(tmp_path / "q80.bin")
    for name, w in model.state_dict().items():
        got = loaded.state_dict()[name]
        if w.ndim == 1:
            assert torch.equal(got, w), name  # norms stay float32
            continue
        groups = w.reshape(-1, 32)
        scale = groups.abs().amax(1, keepdim=True) / 127.0
        assert torch.equal(got.reshape(-1, 32), torch.round(groups / scale) * scale), name
    assert (our_logits(model) - our_logits(loaded)).abs().max() < 0.2


def test_llama2c_export_refuses_what_run_c_cannot_compute(tmp_path):
    with pytest.raises(UserError, match="rope_theta"):
        export_llama2c(random_llama(rope_theta=500000.0), tmp_path / "x.bin")


def test_llama2c_training_checkpoint(tmp_path):
    """train.py's ckpt.pt: model_args + a (torch.compile-prefixed) state dict + optimizer state."""
    model = random_llama(n_kv_heads=2, tie=True)
    args = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": VOCAB, "hidden_dim": 48,
            "multiple_of": 32, "max_seq_len": 64, "dropout": 0.0}
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": state, "model_args": args, "optimizer": {"state": {}, "param_groups": []},
                "iter_num": 100, "best_val_loss": torch.tensor(1.5), "config": {"batch_size": 8}},
               tmp_path / "ckpt.pt")
    assert_same_weights(model, load_pretrained(tmp_path / "ckpt.pt"))


def test_llama2c_converts_to_hf_with_equal_logits(tmp_path, shared_data):
    model = random_llama(tie=True, vocab_size=32000)  # the tokenizer's size
    export_llama2c(model, tmp_path / "model.bin", version=0)
    spm = (shared_data / "tokenizers" / "llama2-tokenizer.model").read_bytes()
    (tmp_path / "tokenizer.model").write_bytes(spm)
    convert(tmp_path / "model.bin", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == spm
    assert_matches_hf(model, transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf"))


@pytest.mark.parametrize("version", [0, 1])
def test_llama2c_truncated_or_overlong_file(tmp_path, version):
    path = tmp_path / "model.bin"
    export_llama2c(random_llama(), path, version=version)
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    message = rf"model\.bin: truncated.*implies {len(data)} bytes, the file has {len(data) - 4}"
    with pytest.raises(UserError, match=message):
        load_pretrained(path)
    path.write_bytes(data + b"\0" * 8)
    with pytest.raises(UserError, match="8 bytes longer"):
        load_pretrained(path)


def test_llama2c_bad_headers(tmp_path):
    path = tmp_path / "model.bin"
    export_llama2c(random_llama(), path, version=1)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<i", 7)
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="version 7"):
        load_pretrained(path)
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(UserError, match="truncated"):
        load_pretrained(path)
    path.write_bytes(b"GGUF" + b"\x03\0\0\0" * 20)  # neither magic nor a sane v0 header
    with pytest.raises(UserError, match="not a recognised checkpoint"):
        load_pretrained(path)
    path.write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match="too short"):
        load_pretrained(path)


# --- our own training runs --------------------------------------------------------------------


def write_run_checkpoint(run: Path, step: int, model: Llama, latest: bool = True) -> Path:
    """One checkpoint of a fromscratch training run, in the engine's layout."""
    step_dir = run / "checkpoints" / f"step-{step:08d}"
    step_dir.mkdir(parents=True)
    save_model_weights(model.state_dict(), step_dir / "model.safetensors")  # tied weights stored once
    index = json.loads((run / "checkpoints.json").read_text()) if (run / "checkpoints.json").exists() else {}
    if latest:
        index["latest"] = step_dir.name
    write_json(run / "checkpoints.json", index)
    return step_dir


def test_training_run_loads_its_best_checkpoint_else_its_latest_or_a_chosen_one(tmp_path):
    run = tmp_path / "run"
    first, second, third = random_llama(tie=True), random_llama(tie=True), random_llama(tie=True)
    run.mkdir()
    write_json(run / "model_config.json", first.config.to_dict())
    (run / "tokenizer.json").write_text("{}")
    step100 = write_run_checkpoint(run, 100, first)
    step200 = write_run_checkpoint(run, 200, second)
    write_run_checkpoint(run, 300, third, latest=False)  # e.g. a save the index never recorded
    assert_same_weights(second, load_pretrained(run))  # no best recorded: the index's latest
    write_json(run / "checkpoints.json", {"latest": step200.name, "best": step100.name})
    assert_same_weights(first, load_pretrained(run))  # the best, by validation
    assert_same_weights(first, load_pretrained(step100))  # a step directory: config from its run
    assert_same_weights(second, load_pretrained(step200 / "model.safetensors"))
    assert find_tokenizer(step100) == run / "tokenizer.json"
    assert find_tokenizer(run) == run / "tokenizer.json"
    (run / "checkpoints.json").unlink()
    assert_same_weights(third, load_pretrained(run))  # no index: the highest step


def test_training_run_without_config_is_an_error(tmp_path):
    step = write_run_checkpoint(tmp_path, 1, random_llama())
    with pytest.raises(UserError, match="model_config.json"):
        load_pretrained(step)


# --- errors -----------------------------------------------------------------------------------


def test_missing_tensor_names_the_file_and_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    random_hf().save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"%s.*missing tensor 'model.layers.1.mlp.up_proj.weight'.*\(48, 32\)"
                       % str(tmp_path)):
        load_pretrained(tmp_path)


def test_wrong_shape_names_both_shapes(tmp_path):
    from safetensors.torch import load_file, save_file

    random_hf().save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 32)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    message = (r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight': "
               r"shape \(16, 32\) disagrees with .*config.json, which implies \(32, 32\)")
    with pytest.raises(UserError, match=message):
        load_pretrained(tmp_path)


def test_unexpected_tensor_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    random_hf().save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"'model.layers.0.self_attn.q_proj.bias': unexpected tensor"):
        load_pretrained(tmp_path)


def test_meta_shard_with_wrong_shape(tmp_path):
    write_meta(random_llama(**META_FFN), tmp_path / "m", 2)
    shard = torch.load(tmp_path / "m" / "consolidated.01.pth", weights_only=True)
    shard["layers.1.feed_forward.w2.weight"] = torch.zeros(16, 48)
    torch.save(shard, tmp_path / "m" / "consolidated.01.pth")
    with pytest.raises(UserError, match=r"layers.1.feed_forward.w2.weight.*\(32, 48\), \(16, 48\)"):
        load_pretrained(tmp_path / "m")


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["hf", "meta", "bare"])
def test_a_pickle_that_runs_code_is_refused_and_never_run(tmp_path, where):
    marker = tmp_path / "pwned"
    payload = {"model.embed_tokens.weight": torch.zeros(2), "x": _RunsCode(marker)}
    if where == "hf":
        random_hf().config.save_pretrained(tmp_path / "d")
        path = tmp_path / "d" / "pytorch_model.bin"
    elif where == "meta":
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 2, "n_heads": 4}))
        path = tmp_path / "d" / "consolidated.00.pth"
    else:
        (tmp_path / "d").mkdir()
        path = tmp_path / "d" / "ckpt.pt"
    torch.save(payload, path)
    assert not marker.exists()
    with pytest.raises(UserError, match=r"refused to load.*posix.system"):
        load_pretrained(path.parent if where != "bare" else path)
    assert not marker.exists()


def test_unknown_or_missing_paths(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a recognised checkpoint directory"):
        load_pretrained(tmp_path / "empty")
    random_hf().config.save_pretrained(tmp_path / "no-weights")
    with pytest.raises(UserError, match="no weights"):
        load_pretrained(tmp_path / "no-weights")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}garbage")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="has no 'hidden_size'"):
        load_pretrained(tmp_path / "bad.safetensors")


def test_unsupported_hf_variants_are_refused(tmp_path):
    hf = random_hf()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="RoPE scaling 'llama3'"):
        load_pretrained(tmp_path)
    config.update(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="RoPE scaling 'linear'"):
        load_pretrained(tmp_path)
    # A default rope_parameters (what transformers 5 writes) must not hide a rope_scaling beside it.
    config.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="rope_scaling asks for RoPE scaling 'linear'"):
        load_pretrained(tmp_path)
    config.update(rope_parameters=None, rope_scaling=None, model_type="mistral")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="model_type is 'mistral'"):
        load_pretrained(tmp_path)


def test_corrupt_or_contradictory_files(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = random_hf(tie=True)
    hf.save_pretrained(tmp_path)
    good = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="model.safetensors: not a readable safetensors file"):
        load_pretrained(tmp_path)

    (tmp_path / "model.safetensors").write_bytes(good)
    sd = load_file(tmp_path / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 1
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="'lm_head.weight': the config .* ties the output layer"):
        load_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_size"] = 30  # not a multiple of the 4 heads
    del config["head_dim"]  # (transformers 4 wrote none)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config.json: .*divisible"):
        load_pretrained(tmp_path)


def test_convert_keeps_the_stored_dtype(tmp_path):
    hf = random_hf(n_kv_heads=2).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "in")
    convert(tmp_path / "in", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    half = load_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert torch.equal(half.layers[1].attention.wk.weight, load_pretrained(tmp_path / "in", torch.bfloat16)
                       .layers[1].attention.wk.weight)


def test_pickles_that_are_not_weights(tmp_path):
    random_hf().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    bin_path = tmp_path / "hf" / "pytorch_model.bin"
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "step": 7}, bin_path)
    with pytest.raises(UserError, match=r"pytorch_model.bin: entry 'step' is a int, not a tensor"):
        load_pretrained(tmp_path / "hf" / "config.json")  # any file of a directory stands for it
    torch.save({"a": torch.zeros(3)}, bin_path, _use_new_zipfile_serialization=False)
    bin_path.write_bytes(bin_path.read_bytes()[:60])
    with pytest.raises(UserError, match="pytorch_model.bin: not a readable PyTorch file"):
        load_pretrained(tmp_path / "hf")


def test_a_llama2c_header_that_starts_like_a_pickle(tmp_path):
    """dim = 640 is b"\x80\x02\0\0", the opening of a protocol-2 pickle: still read as llama2.c."""
    model = randomize_(Llama(LlamaConfig(vocab_size=8, d_model=640, n_layers=1, n_heads=10, ffn_hidden_dim=16,
                                         max_seq_len=4, tie_embeddings=True)))
    export_llama2c(model, tmp_path / "m.bin", version=0)
    assert (tmp_path / "m.bin").read_bytes()[:2] == b"\x80\x02"
    assert_same_weights(model, load_pretrained(tmp_path / "m.bin"))
    (tmp_path / "m.bin").write_bytes((tmp_path / "m.bin").read_bytes()[:-1])
    with pytest.raises(UserError, match="truncated"):
        load_pretrained(tmp_path / "m.bin")


def test_a_single_weights_file_wins_over_a_stale_index_beside_it_as_in_transformers(tmp_path):
    """transformers' save_pretrained of one file over a sharded save leaves the old index behind
    (the shards go); it then loads the single file, and so do we. A weight_map naming anything
    but a file of the directory is refused."""
    random_hf().save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    second = random_hf(n_kv_heads=2)
    second.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists() and (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert torch.allclose(load_pretrained(tmp_path)(ids), second(ids).logits, atol=1e-5)
    (tmp_path / "model.safetensors").unlink()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="not the name of a file in the directory"):
        load_pretrained(tmp_path)
