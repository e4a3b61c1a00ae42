"""MoE checkpoints: Hugging Face Mixtral directories written by transformers itself (single and
sharded, per-expert and fused expert layouts) load with Mixtral's logits; `save_pretrained`
writes what `MixtralForCausalLM` loads, and reads back bitwise; runs and hub names follow the
package's rules; malformed files are refused naming the file and the tensor."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from mixtral_reference import PARITY_CONFIGS, hf_and_ours, hf_mixtral_config, randomize_
from safetensors.torch import load_file, save_file

from fromscratch.checkpoints import resolve
from fromscratch.engine.checkpoint import save_model_weights, write_json
from fromscratch.errors import UserError
from fromscratch.llama import Llama
from fromscratch.moe import MoEConfig, MoELlama
from fromscratch.moe.checkpoints import expected_shapes, read_checkpoint

TOKENS = torch.tensor([[1, 5, 9, 33, 2, 60, 17, 8, 8, 40, 250, 3], [3, 3, 0, 63, 12, 7, 7, 1, 50, 21, 299, 4]])
CONFIG = PARITY_CONFIGS["top2-gqa"]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(TOKENS)
    return (out.logits if hasattr(out, "logits") else out).float()


def assert_same_weights(a: MoELlama, b: MoELlama) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.fixture
def hf_dir(tmp_path) -> tuple[Path, transformers.MixtralForCausalLM, MoELlama]:
    """A random Mixtral saved by transformers (its per-expert layout), and ours with its weights."""
    hf, ours = hf_and_ours(CONFIG)
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", hf, ours


# --- reading Hugging Face Mixtral directories -----------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True])
def test_a_mixtral_saved_by_transformers_loads_with_its_logits(tmp_path, sharded):
    hf, ours = hf_and_ours(CONFIG)
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if sharded else "10GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    keys = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) if sharded \
        else set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys  # the hub's per-expert layout
    loaded = MoELlama.from_pretrained(tmp_path)
    assert_same_weights(loaded, ours)
    assert loaded.config.n_experts == 4 and loaded.config.top_k == 2 and loaded.config.aux_loss_convention == "hf"
    diff = (logits(loaded) - logits(hf)).abs().max().item()
    assert diff <= 1e-4, diff


def test_the_fused_layout_of_transformers_5_loads_the_same(tmp_path, hf_dir):
    path, hf, ours = hf_dir
    fused = {key: tensor.contiguous() for key, tensor in hf.state_dict().items()}  # gate_up_proj, down_proj
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "config.json").write_text((path / "config.json").read_text())
    save_file(fused, tmp_path / "fused" / "model.safetensors", metadata={"format": "pt"})
    assert_same_weights(MoELlama.from_pretrained(tmp_path / "fused"), ours)


def test_bfloat16_weights_load_as_float32_or_as_asked(tmp_path):
    hf, _ = hf_and_ours(CONFIG)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    assert MoELlama.from_pretrained(tmp_path).layers[0].feed_forward.experts.w1.dtype == torch.float32
    half = MoELlama.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.layers[0].feed_forward.experts.w1.dtype == torch.bfloat16
    assert torch.equal(half.layers[0].feed_forward.experts.w1[1],
                       hf.model.layers[0].mlp.experts.gate_up_proj[1, :CONFIG.expert_dim])


# --- writing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["top2-gqa", "top2-tied-mha", "top1"])
def test_save_pretrained_is_read_by_transformers_and_back_bitwise(tmp_path, name):
    _, ours = hf_and_ours(PARITY_CONFIGS[name], seed=3)
    ours.save_pretrained(tmp_path / "out")
    theirs = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "out").eval()
    diff = (logits(theirs) - logits(ours)).abs().max().item()
    assert diff <= 1e-4, diff
    back = MoELlama.from_pretrained(tmp_path / "out")
    assert_same_weights(back, ours)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    # our Switch-convention coefficient, as Hugging Face's (balanced = k) counts it
    assert config["router_aux_loss_coef"] == pytest.approx(ours.config.aux_loss_coef / ours.config.top_k)


@pytest.mark.parametrize("change, message", [
    (dict(balance="bias"), "balance='bias'"), (dict(capacity_factor=1.25), "capacity_factor=1.25"),
    (dict(n_shared_experts=1), "n_shared_experts=1"), (dict(moe_every=2, n_layers=2), "moe_every=2"),
    (dict(router_scoring="sigmoid"), "router_scoring='sigmoid'"), (dict(norm_topk=False), "norm_topk=False"),
])
def test_routing_mixtral_cannot_compute_is_refused_on_save(tmp_path, change, message):
    model = MoELlama(MoEConfig.from_preset("tiny", **change))
    with pytest.raises(UserError, match=f"routes with {message}.*a Mixtral checkpoint cannot hold it"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_shapes_a_checkpoint_must_have_are_the_models_own():
    for config in (CONFIG, MoEConfig.from_preset("tiny", n_layers=4, moe_every=2, n_shared_experts=2, balance="bias")):
        state = MoELlama(config).state_dict()
        assert {name: tuple(t.shape) for name, t in state.items()} == expected_shapes(config)


# --- runs and hub names ---------------------------------------------------------------------------


def write_run_checkpoint(run: Path, step: int, model: MoELlama, latest: bool = True, best: bool = False) -> Path:
    step_dir = run / "checkpoints" / f"step-{step:08d}"
    step_dir.mkdir(parents=True)
    save_model_weights(model.state_dict(), step_dir / "model.safetensors")
    index = json.loads((run / "checkpoints.json").read_text()) if (run / "checkpoints.json").exists() else {}
    index.update({"latest": step_dir.name} if latest else {}, **({"best": step_dir.name} if best else {}))
    write_json(run / "checkpoints.json", index)
    return step_dir


def test_a_run_stands_for_its_best_checkpoint_else_its_latest_and_is_not_a_llama(tmp_path):
    config = MoEConfig.from_preset("tiny", balance="bias", n_shared_experts=1)
    first, second = (randomize_(MoELlama(config)) for _ in range(2))
    with torch.no_grad():
        first.layers[1].feed_forward.router.expert_bias.normal_()
    run = tmp_path / "run"
    run.mkdir()
    write_json(run / "model_config.json", config.to_dict())
    write_json(run / "run.json", {"model": "moe", "command": ["fromscratch", "moe", "train"]})
    step1 = write_run_checkpoint(run, 1, first)
    assert_same_weights(MoELlama.from_pretrained(run), first)  # only the latest
    write_run_checkpoint(run, 2, second)
    assert_same_weights(MoELlama.from_pretrained(run), second)
    index = json.loads((run / "checkpoints.json").read_text())
    write_json(run / "checkpoints.json", {**index, "best": step1.name})
    assert_same_weights(MoELlama.from_pretrained(run), first)  # the best, by validation
    assert_same_weights(MoELlama.from_pretrained(step1 / "model.safetensors"), first)
    # Built on the meta device, a loaded model still counts its load to go on training.
    loaded = MoELlama.from_pretrained(run).train()
    loaded(torch.randint(0, config.vocab_size, (2, 8)))
    assert loaded.layers[1].feed_forward.observed_load.sum() == 2 * 8 * config.top_k
    with pytest.raises(UserError, match="holds a moe run .*not a llama one"):
        Llama.from_pretrained(run)


def test_a_hub_name_is_fetched_and_read_as_a_directory(monkeypatch, hf_dir):
    path, _, ours = hf_dir
    asked = []

    def hub_download(repo_id, allow_patterns=None):
        asked.append((repo_id, allow_patterns))
        return path

    monkeypatch.setattr(resolve, "hub_download", hub_download)
    assert_same_weights(MoELlama.from_pretrained("mistralai/Mixtral-8x7B-v0.1"), ours)
    assert asked[0][0] == "mistralai/Mixtral-8x7B-v0.1" and "*.safetensors" in asked[0][1]


# --- refusals -------------------------------------------------------------------------------------


def rewrite(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_a_missing_expert_names_the_directory_and_the_tensor(hf_dir):
    path, _, _ = hf_dir
    rewrite(path, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(UserError, match=rf"{path}: missing tensor 'model.layers.1.block_sparse_moe.experts.2.w3.weight'"
                                        r" \(expected shape \(96, 64\) from .*config.json\)"):
        MoELlama.from_pretrained(path)


def test_an_expert_of_the_wrong_shape_names_the_file_the_tensor_and_both_shapes(hf_dir):
    path, _, _ = hf_dir
    rewrite(path, lambda t: t.update({"model.layers.0.block_sparse_moe.experts.1.w2.weight": torch.zeros(64, 95)}))
    with pytest.raises(UserError, match=r"model.safetensors: tensor 'model.layers.0.block_sparse_moe.experts.1.w2.weight':"
                                        r" shape \(64, 95\) disagrees with .*config.json, which implies \(64, 96\)"):
        MoELlama.from_pretrained(path)


def test_an_expert_beyond_the_config_is_unexpected(hf_dir):
    path, _, _ = hf_dir
    rewrite(path, lambda t: t.update({"model.layers.0.block_sparse_moe.experts.4.w1.weight": torch.zeros(96, 64)}))
    with pytest.raises(UserError, match=r"'model.layers.0.block_sparse_moe.experts.4.w1.weight': unexpected tensor"
                                        r" for a model of 4 experts"):
        MoELlama.from_pretrained(path)


def test_a_router_of_the_wrong_shape_or_an_unknown_tensor_is_refused(hf_dir):
    path, _, _ = hf_dir
    rewrite(path, lambda t: t.update({"model.layers.2.block_sparse_moe.gate.weight": torch.zeros(5, 64)}))
    with pytest.raises(UserError, match=r"'model.layers.2.block_sparse_moe.gate.weight': shape \(5, 64\) disagrees"):
        MoELlama.from_pretrained(path)
    rewrite(path, lambda t: t.update({"model.layers.2.block_sparse_moe.gate.weight": torch.zeros(4, 64),
                                      "model.layers.0.block_sparse_moe.gate.bias": torch.zeros(4)}))
    with pytest.raises(UserError, match=r"'model.layers.0.block_sparse_moe.gate.bias': unexpected tensor"):
        MoELlama.from_pretrained(path)
    rewrite(path, lambda t: (t.pop("model.layers.0.block_sparse_moe.gate.bias"),
                             t.pop("model.layers.2.block_sparse_moe.gate.weight")))
    with pytest.raises(UserError, match=r"missing tensor 'model.layers.2.block_sparse_moe.gate.weight' \(expected shape \(4, 64\)"):
        MoELlama.from_pretrained(path)


def test_a_fused_tensor_of_the_wrong_shape_names_the_file(tmp_path, hf_dir):
    path, hf, _ = hf_dir
    fused = {key: tensor.contiguous() for key, tensor in hf.state_dict().items()}
    fused["model.layers.1.mlp.experts.gate_up_proj"] = torch.zeros(4, 190, 64)
    save_file(fused, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model.safetensors: tensor 'model.layers.1.mlp.experts.gate_up_proj': "
                                        r"shape \(4, 190, 64\) disagrees .* implies \(4, 192, 64\)"):
        MoELlama.from_pretrained(path)


def test_config_files_that_are_not_mixtrals_or_not_ours_to_compute_are_refused(hf_dir, tmp_path):
    path, _, _ = hf_dir
    config = json.loads((path / "config.json").read_text())

    def refused(change: dict, message: str) -> None:
        (path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=message):
            MoELlama.from_pretrained(path)

    refused({"model_type": "llama"}, "model_type is 'llama'; this loader reads 'mixtral'")
    refused({"sliding_window": 16}, "sliding_window 16 is shorter than max_position_embeddings 256")
    refused({"num_experts_per_tok": 5}, r"config.json: top_k \(5\) must be between 1 and n_experts \(4\)")
    refused({"num_local_experts": "4"}, r"config.json: num_local_experts must be int")
    refused({"hidden_act": "gelu"}, "hidden_act 'gelu'")
    with pytest.raises(UserError, match="model_type is 'mixtral'; this loader reads 'llama'"):
        (path / "config.json").write_text(json.dumps(config))
        Llama.from_pretrained(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a Mixtral checkpoint .* nor a `fromscratch moe train` run"):
        read_checkpoint(tmp_path / "empty")
    with pytest.raises(UserError, match="no such file or directory"):
        read_checkpoint(tmp_path / "nope")


def test_a_corrupt_weights_file_is_named(hf_dir):
    path, _, _ = hf_dir
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.safetensors: not a readable safetensors file"):
        MoELlama.from_pretrained(path)


def test_integer_tensors_are_refused(hf_dir):
    path, _, _ = hf_dir
    rewrite(path, lambda t: t.update({"model.layers.0.block_sparse_moe.experts.0.w1.weight":
                                      torch.zeros(96, 64, dtype=torch.int32)}))
    with pytest.raises(UserError, match=r"experts.0.w1.weight.*(int32|not floating)"):
        MoELlama.from_pretrained(path)


def test_hf_config_for_the_reference_is_what_save_pretrained_writes():
    """The test's own Mixtral config (mixtral_reference.py) and the one we write describe the same model."""
    from fromscratch.moe.checkpoints import mixtral_config

    ours = transformers.MixtralConfig(**mixtral_config(CONFIG))
    theirs = hf_mixtral_config(CONFIG)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "rope_parameters"):
        assert getattr(ours, key) == getattr(theirs, key), key
