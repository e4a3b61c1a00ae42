"""The MoE Llama: parity with Hugging Face `MixtralForCausalLM` (logits, loss, aux_loss), equality
with the dense Llama for one expert, the config, the block layout, the router statistics, the
scaling of the router's losses under the engine's summed loss, and the initialisation."""

import math

import pytest
import torch
import torch.nn.functional as F
from mixtral_reference import PARITY_CONFIGS, hf_and_ours

from fromscratch.engine import split_batch
from fromscratch.errors import UserError
from fromscratch.llama import FeedForward, Llama, LlamaConfig
from fromscratch.moe import MoEConfig, MoEFeedForward, MoELlama
from fromscratch.moe.checkpoints import expected_shapes

transformers = pytest.importorskip("transformers")


def ragged_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """The next token of each position, -100 (ignored) for the last: what Hugging Face's loss
    predicts when given labels = input_ids (it shifts them itself)."""
    return torch.cat([input_ids[:, 1:], torch.full((input_ids.size(0), 1), -100)], dim=1)


# --- parity with Hugging Face ---------------------------------------------------------------------


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_logits_match_mixtral(name):
    config = PARITY_CONFIGS[name]
    hf, ours = hf_and_ours(config)
    input_ids = torch.randint(0, config.vocab_size, (3, 29))
    with torch.no_grad():
        expected, got = hf(input_ids).logits, ours(input_ids)
    assert got.shape == (3, 29, config.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_training_loss_and_hf_convention_aux_loss_equal_mixtrals(name):
    """With Hugging Face's convention (pooled over layers) and no z-loss, our training loss is
    Mixtral's cross-entropy + router_aux_loss_coef·aux_loss, term for term, gradients included."""
    config = MoEConfig.from_dict({**PARITY_CONFIGS[name].to_dict(), "aux_loss_convention": "hf",
                                  "z_loss_coef": 0.0, "aux_loss_coef": 0.05})
    hf, ours = hf_and_ours(config)
    hf.train(), ours.train()  # no dropout and no jitter: training mode only adds the aux term
    input_ids = torch.randint(0, config.vocab_size, (2, 21))
    out = hf(input_ids, labels=input_ids, output_router_logits=True)
    loss = ours(input_ids, targets=ragged_targets(input_ids))
    torch.testing.assert_close(ours.load_balancing_loss(), out.aux_loss)
    torch.testing.assert_close(loss, out.loss)
    assert out.aux_loss > config.top_k  # an unbalanced random router: above its balanced value k
    (hf_grad,) = torch.autograd.grad(out.loss, hf.model.layers[0].mlp.gate.weight)
    (our_grad,) = torch.autograd.grad(loss, ours.layers[0].feed_forward.router.weight)
    torch.testing.assert_close(our_grad, hf_grad, atol=1e-6, rtol=1e-4)


def test_switch_convention_is_the_mean_of_the_layers_losses_and_hf_pools_them():
    config = PARITY_CONFIGS["top2-gqa"]
    _, ours = hf_and_ours(config)
    ours(torch.randint(0, config.vocab_size, (2, 16)))
    layers = ours.moe_layers()
    switch = ours.load_balancing_loss()
    torch.testing.assert_close(switch, torch.stack([layer.load_balancing_loss for layer in layers]).mean())
    ours.config.aux_loss_convention = "hf"
    pooled = ours.load_balancing_loss()
    # For one layer the conventions differ by exactly k; pooled over layers only about so.
    assert abs(pooled / (config.top_k * switch) - 1) < 0.1 and not torch.isclose(pooled, config.top_k * switch)


# --- one expert is the dense Llama ----------------------------------------------------------------


def test_one_expert_top1_equals_the_dense_llama_with_the_same_weights():
    fields = dict(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=80, max_seq_len=64)
    dense = Llama(LlamaConfig(**fields))
    moe = MoELlama(MoEConfig(**fields, n_experts=1, top_k=1, aux_loss_coef=0.0, z_loss_coef=0.0))
    state = dense.state_dict()
    for i in range(2):
        p = f"layers.{i}.feed_forward."
        for w in ("w1", "w2", "w3"):
            state[f"{p}experts.{w}"] = state.pop(f"{p}{w}.weight")[None]  # (1, out, in)
        state[p + "router.weight"] = moe.state_dict()[p + "router.weight"]
    moe.load_state_dict(state, strict=True)
    input_ids = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        assert torch.equal(moe.eval()(input_ids), dense.eval()(input_ids))  # gate 1.0, the same products
    dense.train(), moe.train()
    dense_loss, moe_loss = dense(input_ids[:, :-1], targets=input_ids[:, 1:]), moe(input_ids[:, :-1], targets=input_ids[:, 1:])
    assert torch.equal(moe_loss, dense_loss)
    dense_loss.backward(), moe_loss.backward()
    torch.testing.assert_close(moe.layers[1].feed_forward.experts.w2.grad[0], dense.layers[1].feed_forward.w2.weight.grad,
                               rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(moe.tok_embeddings.weight.grad, dense.tok_embeddings.weight.grad, rtol=1e-6, atol=1e-8)


# --- config and layout ----------------------------------------------------------------------------


def test_presets_have_their_shapes():
    with torch.device("meta"):
        mixtral = MoELlama(MoEConfig.from_preset("mixtral-8x7b"))
    # Jiang et al. 2024, §2: 47B parameters ("46.7B" on the model card), 13B active per token.
    assert round(mixtral.num_parameters() / 1e9, 1) == 46.7
    assert round(mixtral.num_active_parameters() / 1e9, 1) == 12.9
    tiny = MoEConfig.from_preset("mixtral-tiny")
    stories = LlamaConfig.from_preset("stories15m")
    assert (tiny.d_model, tiny.n_layers, tiny.n_heads, tiny.expert_dim) == (stories.d_model, stories.n_layers,
                                                                             stories.n_heads, stories.hidden_dim)
    assert (tiny.n_experts, tiny.top_k, tiny.kv_heads) == (8, 2, 2)
    for name in MoEConfig.PRESETS:
        config = MoEConfig.from_preset(name)
        assert MoEConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("bad, message", [
    (dict(top_k=5), r"top_k \(5\) must be between 1 and n_experts \(4\)"),
    (dict(top_k=0), "top_k"),
    (dict(n_experts=0), "n_experts must be at least 1"),
    (dict(moe_every=3), r"moe_every \(3\) must be between 1 and n_layers \(2\)"),
    (dict(n_shared_experts=-1), "n_shared_experts"),
    (dict(expert_hidden_dim=0), "expert_hidden_dim"),
    (dict(router_scoring="tanh"), "router_scoring must be one of softmax, sigmoid"),
    (dict(balance="loss"), "balance must be one of aux, bias, none"),
    (dict(aux_loss_convention="gshard"), "aux_loss_convention"),
    (dict(aux_loss_convention="hf", router_scoring="sigmoid"), "defined for softmax routing"),
    (dict(capacity_factor=0.0), "capacity_factor must be positive"),
    (dict(aux_loss_coef=-1.0), "aux_loss_coef must be ≥ 0"),
    (dict(z_loss_coef=-1.0), "z_loss_coef"),
    (dict(bias_update_rate=-1.0), "bias_update_rate"),
    (dict(router_jitter=1.0), "router_jitter must be in"),
    (dict(n_experts="8"), "n_experts must be int"),
    (dict(d_model=66), "divisible by n_heads"),  # Llama's own rules still hold
])
def test_bad_configs_are_refused(bad, message):
    with pytest.raises(UserError, match=message):
        MoEConfig.from_preset("tiny", **bad)


def test_moe_every_two_makes_every_second_block_sparse_and_the_state_dict_is_as_expected():
    config = MoEConfig.from_preset("tiny", n_layers=4, moe_every=2, n_shared_experts=1, balance="bias")
    model = MoELlama(config)
    assert config.sparse_layers == model.sparse_layers == [1, 3]
    assert [type(block.feed_forward) for block in model.layers] == [FeedForward, MoEFeedForward] * 2
    assert model.layers[0].feed_forward.w1.weight.shape == (config.hidden_dim, config.d_model)
    assert model.layers[1].feed_forward.experts.w1.shape == (4, config.expert_dim, config.d_model)
    state = model.state_dict()
    assert {name: tuple(t.shape) for name, t in state.items() if name != "output.weight" or not config.tie_embeddings} \
        == expected_shapes(config)
    model(torch.randint(0, config.vocab_size, (2, 8)))
    assert list(model.router_stats) == [1, 3]


def test_initialisation_scales_the_experts_down_projections_as_llamas():
    torch.manual_seed(0)
    config = MoEConfig.from_preset("tiny", n_layers=8, n_experts=8, n_shared_experts=2, expert_hidden_dim=256)
    model = MoELlama(config)
    layer = model.layers[3].feed_forward
    residual_std = 0.02 / math.sqrt(2 * config.n_layers)
    assert layer.experts.w2.std().item() == pytest.approx(residual_std, rel=0.02)
    assert layer.shared_experts.w2.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert layer.experts.w1.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.layers[3].attention.wo.weight.std().item() == pytest.approx(residual_std, rel=0.05)


# --- statistics and losses ------------------------------------------------------------------------


def test_router_stats_describe_the_last_forward():
    config = MoEConfig.from_preset("tiny", n_layers=3, capacity_factor=0.5)
    model = MoELlama(config).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.weight.normal_(0.0, 1.0)
    model(torch.randint(0, config.vocab_size, (2, 16)))
    assert list(model.router_stats) == [0, 1, 2]
    for i, stats in model.router_stats.items():
        assert set(stats) == {"load_balancing_loss", "z_loss", "tokens_per_expert", "dropped_tokens",
                              "dropped_fraction", "router_entropy"}
        assert stats["tokens_per_expert"].shape == (4,) and stats["tokens_per_expert"].sum() == 2 * 32
        assert stats["dropped_fraction"] == stats["dropped_tokens"] / 64 and stats["dropped_tokens"] > 0
        assert 0 < stats["router_entropy"] < math.log(4)
        assert not any(value.requires_grad for value in stats.values())


def test_the_router_term_depends_on_the_balance_method_and_eval_loss_is_cross_entropy():
    input_ids = torch.randint(0, 512, (2, 17))
    inputs, targets = input_ids[:, :-1], input_ids[:, 1:]
    for balance in ("aux", "bias", "none"):
        torch.manual_seed(0)
        model = MoELlama(MoEConfig.from_preset("tiny", balance=balance, aux_loss_coef=0.1, z_loss_coef=0.01)).train()
        loss = model(inputs, targets=targets)
        cross_entropy = F.cross_entropy(model.output(model.hidden_states(inputs)).flatten(0, 1), targets.flatten())
        expected = 0.01 * model.z_loss() + (0.1 * model.load_balancing_loss() if balance == "aux" else 0)
        torch.testing.assert_close(model.router_loss(), expected)
        torch.testing.assert_close(loss, cross_entropy + expected)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(inputs, targets=targets), cross_entropy)


def micro_batch_gradients(model: MoELlama, batch: dict, n_micro: int) -> dict[str, torch.Tensor]:
    """What the engine computes: each micro-batch's summed loss back-propagated, the sum divided
    by the token count of the whole batch."""
    model.zero_grad()
    for micro in split_batch(batch, n_micro):
        model(micro["inputs"], targets=micro["targets"], reduction="sum").backward()
    n_tokens = batch["targets"].numel()
    return {name: p.grad / n_tokens for name, p in model.named_parameters()}


@pytest.mark.parametrize("balance", ["bias", "none"])
def test_split_batches_give_one_batchs_gradients_without_the_aux_loss(balance):
    """The cross-entropy and the z-loss (a mean over tokens, scaled by the micro-batch's token
    count) add up exactly over micro-batches: two halves give the gradients of the whole batch,
    which are those of its mean loss."""
    torch.manual_seed(0)
    model = MoELlama(MoEConfig.from_preset("tiny", balance=balance, z_loss_coef=0.5)).train()
    rows = torch.randint(0, 512, (4, 13))
    batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:]}
    whole, halves = micro_batch_gradients(model, batch, 1), micro_batch_gradients(model, batch, 2)
    model.zero_grad()
    model(batch["inputs"], targets=batch["targets"]).backward()  # reduction "mean"
    for name, p in model.named_parameters():
        torch.testing.assert_close(halves[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(p.grad, whole[name], rtol=1e-4, atol=1e-6, msg=name)
    router = "layers.0.feed_forward.router.weight"
    assert whole[router].abs().sum() > 0


def test_split_batches_weigh_each_micro_batchs_aux_loss_by_its_tokens():
    """With balance "aux", a split batch's loss is the cross-entropy and z-loss of the whole batch
    plus aux_loss_coef × the token-weighted mean of each micro-batch's load-balancing loss: the
    coefficient keeps its meaning whatever the split (the loss of each micro-batch is its own)."""
    torch.manual_seed(0)
    model = MoELlama(MoEConfig.from_preset("tiny", aux_loss_coef=0.5, z_loss_coef=0.0)).train()
    rows = torch.randint(0, 512, (4, 13))
    batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:]}
    halves = micro_batch_gradients(model, batch, 2)
    model.zero_grad()
    cross_entropy = model(batch["inputs"], targets=batch["targets"]) - model.router_loss()
    lb_losses = []
    for micro in split_batch(batch, 2):
        model(micro["inputs"])
        lb_losses.append(model.load_balancing_loss())
    (cross_entropy + 0.5 * torch.stack(lb_losses).mean()).backward()  # equal halves: equal weights
    for name, p in model.named_parameters():
        torch.testing.assert_close(halves[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_update_bias_moves_every_layers_bias_from_the_load_of_training_forwards():
    model = MoELlama(MoEConfig.from_preset("tiny", n_layers=3, balance="bias", bias_update_rate=0.1)).train()
    with torch.no_grad():
        model(torch.randint(0, 512, (2, 16)))
    loads = [layer.observed_load.clone() for layer in model.moe_layers()]
    model.update_bias()
    for layer, load in zip(model.moe_layers(), loads):
        expected = 0.1 * torch.sign(load.float().mean() - load.float())
        assert torch.equal(layer.router.expert_bias, expected) and expected.abs().sum() > 0
        assert layer.observed_load.sum() == 0


# --- the README's figures -------------------------------------------------------------------------


def test_the_load_balancing_figures_claims_hold():
    """What figures.py draws and the README states: f² has no gradient anywhere (f is a count);
    f·P and P² are 1 at balance; once the near-identical tokens have all gone to one expert, P²
    stays near its minimum while f·P does not, and f·P's gradient pushes back harder."""
    from fromscratch.moe.figures import candidate_losses

    shift = torch.tensor([0.0, 0.3, 1.0])
    losses = candidate_losses(shift)
    assert torch.all(losses["∂(f²)"] == 0)
    torch.testing.assert_close(losses["f·P"][0], torch.tensor(1.0), atol=0.02, rtol=0)
    collapsed = 1  # shift 0.3: f = (1, 0)
    assert losses["f²"][collapsed] == 2.0
    assert losses["P²"][collapsed] < 1.05 < losses["f·P"][collapsed]
    assert losses["∂(f·P)"][collapsed] > 2 * losses["∂(P²)"][collapsed] > 0


def test_figures_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from fromscratch.moe.figures import dropped_fraction, plot_dispatch_combine

    assert plot_dispatch_combine(tmp_path / "d.png").stat().st_size > 10_000
    drops = [dropped_fraction(c, skew=1.0, n_tokens=512) for c in (0.5, 1.0, 2.0, 4.0)]
    assert drops == sorted(drops, reverse=True) and drops[0] > 0.4 and drops[-1] == 0
