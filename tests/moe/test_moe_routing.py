"""The routed feed-forward layer: every dispatch path against a per-token reference, capacity,
equality with Llama's FeedForward for one expert, parity with Hugging Face Mixtral (block output
and `aux_loss`), the balancing losses and bias, float32 routing, sigmoid scoring, shared experts."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fromscratch.errors import UserError
from fromscratch.llama.model import FeedForward, LlamaConfig
from fromscratch.moe.routing import (
    MoEFeedForward,
    grouped_mm_supported,
    hf_load_balancing_loss,
    router_z_loss,
    switch_load_balancing_loss,
)

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402

D_MODEL, HIDDEN = 16, 24


def make_layer(n_experts=4, top_k=2, router_std=0.5, **kwargs) -> MoEFeedForward:
    """A small layer whose router weights are large enough for routing to depend on the token."""
    layer = MoEFeedForward(D_MODEL, n_experts, top_k, HIDDEN, **kwargs)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, router_std)
        for w in (layer.experts.w1, layer.experts.w2, layer.experts.w3):
            w.normal_(0.0, 0.2)
    return layer


def per_token_reference(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The layer's definition in Python loops over tokens: each token's chosen experts one at a
    time, with the capacity queue of GShard (all first choices, then all second choices, each in
    token order). Uses the layer's own router, so only dispatch and combination are checked."""
    x_flat = x.reshape(-1, x.size(-1))
    n_tokens, k = x_flat.size(0), layer.top_k
    _, _, chosen, gates = layer.router(x_flat)
    capacity = (math.inf if layer.capacity_factor is None
                else math.ceil(layer.capacity_factor * k * n_tokens / layer.n_experts))
    taken = [0] * layer.n_experts
    kept = {}
    for j in range(k):
        for n in range(n_tokens):
            e = int(chosen[n, j])
            kept[n, j] = taken[e] < capacity
            taken[e] += kept[n, j]
    w1, w2, w3 = layer.experts.w1, layer.experts.w2, layer.experts.w3
    rows = []
    for n in range(n_tokens):
        row = torch.zeros(x.size(-1))
        for j in range(k):
            if kept[n, j]:
                e = int(chosen[n, j])
                hidden = F.silu(F.linear(x_flat[n], w1[e])) * F.linear(x_flat[n], w3[e])
                row = row + gates[n, j] * F.linear(hidden, w2[e])
        rows.append(row)
    return torch.stack(rows).view(x.shape)


def outputs_and_grads(layer, x, fn):
    """fn(layer, x) and the gradients of a fixed random projection of it with respect to x,
    the router and the experts' weights."""
    x = x.clone().requires_grad_()
    out = fn(layer, x)
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    weights = [layer.router.weight, layer.experts.w1, layer.experts.w2, layer.experts.w3]
    return out, torch.autograd.grad(out, [x, *weights], projection)


# --- dispatch -------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k, capacity_factor, scoring", [
    (1, None, "softmax"), (2, None, "softmax"), (2, 1.0, "softmax"), (1, 1.0, "softmax"),
    (3, 0.75, "softmax"), (2, None, "sigmoid"),
])
def test_every_dispatch_path_matches_the_per_token_reference(top_k, capacity_factor, scoring):
    layer = make_layer(top_k=top_k, capacity_factor=capacity_factor, router_scoring=scoring)
    x = torch.randn(2, 12, D_MODEL)
    expected, expected_grads = outputs_and_grads(layer, x, per_token_reference)
    for method in ("grouped", "loop", "gather"):
        layer.dispatch = method
        out, grads = outputs_and_grads(layer, x, lambda m, t: m(t))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6, msg=method)
        for name, g, g_ref in zip(("x", "router", "w1", "w2", "w3"), grads, expected_grads):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6, msg=f"{method}: ∂{name}")
    if capacity_factor is not None:
        assert layer.stats["dropped_tokens"] > 0  # the case exercises dropping


def test_decoding_one_token_gathers_and_agrees_with_the_sorted_path():
    layer = make_layer(n_experts=8, top_k=2)
    token = torch.randn(1, 1, D_MODEL)  # (B, T) = (1, 1): 2 slots for 8 experts
    assert layer.dispatch_method(token.view(-1, D_MODEL), n_slots=2) == "gather"
    many = torch.randn(64, D_MODEL)
    assert layer.dispatch_method(many, n_slots=128) == ("grouped" if grouped_mm_supported(many) else "loop")
    out = layer(token)
    layer.dispatch = "loop"
    torch.testing.assert_close(out, layer(token), rtol=1e-5, atol=1e-6)


def test_repeated_forwards_are_bitwise_identical():
    layer = make_layer(top_k=2)
    x = torch.randn(4, 16, D_MODEL)
    assert torch.equal(layer(x), layer(x))


# --- capacity -------------------------------------------------------------------------------------


def test_capacity_drops_overflow_tokens_which_get_zero_output():
    layer = make_layer(n_experts=4, top_k=1, capacity_factor=1.0)
    direction = F.normalize(torch.randn(D_MODEL), dim=0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 5.0 * direction  # every token prefers expert 2
    x = torch.randn(1, 16, D_MODEL) * 0.1 + direction
    out = layer(x)[0]
    capacity = math.ceil(1.0 * 1 * 16 / 4)  # 4 of the 16 tokens fit
    assert layer.stats["tokens_per_expert"].tolist() == [0, 0, 16, 0]
    assert layer.stats["dropped_tokens"].item() == 12
    assert layer.stats["dropped_fraction"].item() == pytest.approx(0.75)
    assert torch.all(out[capacity:] == 0)  # they pass on the residual stream alone
    layer.capacity_factor = None
    torch.testing.assert_close(out[:capacity], layer(x)[0, :capacity])  # the first four, as dropless


def test_capacity_queues_all_first_choices_before_second_choices():
    """GShard's order: token 0's second choice (expert 0) queues after the first choices of
    tokens 1–3, so with room for 2 it is dropped although token 0 comes first."""
    layer = make_layer(n_experts=2, top_k=2, capacity_factor=0.5)  # capacity ⌈0.5·2·4/2⌉ = 2
    u = F.normalize(torch.randn(D_MODEL), dim=0)
    with torch.no_grad():
        layer.router.weight.copy_(torch.stack([u, -u]))
    x = torch.stack([-u, u, 1.1 * u, 1.2 * u])  # token 0 prefers expert 1; tokens 1–3 expert 0
    out = layer(x)
    _, _, chosen, gates = layer.router(x)

    def expert(e, n):
        w1, w2, w3 = layer.experts.w1[e], layer.experts.w2[e], layer.experts.w3[e]
        return F.linear(F.silu(F.linear(x[n], w1)) * F.linear(x[n], w3), w2)

    # expert 0 keeps tokens 1, 2 (first choices); expert 1 keeps token 0 (first), token 1 (second)
    expected = torch.stack([
        gates[0, 0] * expert(1, 0),
        gates[1, 0] * expert(0, 1) + gates[1, 1] * expert(1, 1),
        gates[2, 0] * expert(0, 2),
        torch.zeros(D_MODEL),
    ])
    assert chosen.tolist() == [[1, 0], [0, 1], [0, 1], [0, 1]]
    torch.testing.assert_close(out, expected)
    assert layer.stats["dropped_tokens"].item() == 4


# --- equality with Llama and Hugging Face ---------------------------------------------------------


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_one_expert_top1_equals_llama_feed_forward(scoring):
    config = LlamaConfig(d_model=32, n_heads=4, ffn_hidden_dim=48)
    dense = FeedForward(config)
    layer = MoEFeedForward(32, n_experts=1, top_k=1, expert_hidden_dim=48, router_scoring=scoring)
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(layer.experts, name)[0] = getattr(dense, name).weight
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        assert torch.equal(layer(x), dense(x))  # bitwise: gate 1.0, the same products
    x_dense, x_moe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_dense, out_moe = dense(x_dense), layer(x_moe)
    torch.testing.assert_close(out_moe, out_dense, rtol=1e-6, atol=1e-7)
    grad = torch.randn_like(out_dense)
    dense_grads = torch.autograd.grad(out_dense, [x_dense, dense.w1.weight, dense.w2.weight, dense.w3.weight], grad)
    moe_grads = torch.autograd.grad(out_moe, [x_moe, layer.experts.w1, layer.experts.w2, layer.experts.w3], grad)
    for g_moe, g_dense in zip(moe_grads, dense_grads):
        torch.testing.assert_close(g_moe.view(g_dense.shape), g_dense, rtol=1e-6, atol=1e-7)


def mixtral_config(**overrides):
    fields = dict(vocab_size=64, hidden_size=D_MODEL, intermediate_size=HIDDEN, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                  num_experts_per_tok=2, max_position_embeddings=64, router_jitter_noise=0.0,
                  output_router_logits=True)
    return transformers.MixtralConfig(**{**fields, **overrides})


def layer_from_mixtral_block(block: MixtralSparseMoeBlock) -> MoEFeedForward:
    """Our layer with an HF block's weights: gate_up_proj[e] = cat(w1[e], w3[e]), down_proj[e] = w2[e]."""
    n_experts, two_hidden, d_model = block.experts.gate_up_proj.shape
    layer = MoEFeedForward(d_model, n_experts, block.top_k, two_hidden // 2)
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        gate_proj, up_proj = block.experts.gate_up_proj.chunk(2, dim=1)
        layer.experts.w1.copy_(gate_proj)
        layer.experts.w3.copy_(up_proj)
        layer.experts.w2.copy_(block.experts.down_proj)
    return layer


def test_matches_hf_mixtral_sparse_moe_block():
    block = MixtralSparseMoeBlock(mixtral_config())
    with torch.no_grad():
        block.gate.weight.normal_(0.0, 0.5)
        block.experts.gate_up_proj.normal_(0.0, 0.2)
        block.experts.down_proj.normal_(0.0, 0.2)
    layer = layer_from_mixtral_block(block)
    x = torch.randn(3, 10, D_MODEL)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_hf, out_ours = block(x_hf), layer(x_ours)
    torch.testing.assert_close(out_ours, out_hf, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out_hf)
    (g_hf,) = torch.autograd.grad(out_hf, x_hf, grad)
    (g_ours,) = torch.autograd.grad(out_ours, x_ours, grad)
    torch.testing.assert_close(g_ours, g_hf, rtol=1e-5, atol=1e-5)


def test_hf_convention_equals_mixtral_aux_loss_and_switch_convention_is_it_over_k():
    torch.manual_seed(1)
    model = transformers.MixtralForCausalLM(mixtral_config(num_hidden_layers=3)).eval()
    mlp_inputs, mlp_outputs = [], []

    def record(module, args, output):
        mlp_inputs.append(args[0])
        mlp_outputs.append(output)

    for decoder_layer in model.model.layers:
        decoder_layer.mlp.register_forward_hook(record)
    input_ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        hf = model(input_ids, output_router_logits=True)
        ours = [layer_from_mixtral_block(decoder_layer.mlp).eval() for decoder_layer in model.model.layers]
        for layer, x, out_hf, logits_hf in zip(ours, mlp_inputs, mlp_outputs, hf.router_logits):
            torch.testing.assert_close(layer(x), out_hf, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.router_logits, logits_hf, rtol=1e-5, atol=1e-6)
    pooled = hf_load_balancing_loss([layer.router_logits for layer in ours], n_experts=4, top_k=2)
    torch.testing.assert_close(pooled, hf.aux_loss)
    # For one layer the two conventions differ exactly by the factor k (f counted over tokens).
    single = hf_load_balancing_loss([ours[0].router_logits], n_experts=4, top_k=2)
    torch.testing.assert_close(single, 2 * ours[0].load_balancing_loss)


# --- balancing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
def test_switch_loss_is_one_under_perfectly_balanced_routing(top_k):
    n_experts = 4
    layer = MoEFeedForward(n_experts, n_experts, top_k, 8)
    with torch.no_grad():
        layer.router.weight.copy_(3.0 * torch.eye(n_experts))  # logits = 3·x
    eye = torch.eye(n_experts)
    # Token i prefers expert i, then (for k = 2) expert i+1: each expert is chosen equally often,
    # and by the cyclic symmetry its mean probability is 1/E too.
    x = eye + 0.5 * eye.roll(1, dims=1) if top_k == 2 else eye
    layer(x)
    assert layer.stats["tokens_per_expert"].tolist() == [top_k] * n_experts
    torch.testing.assert_close(layer.load_balancing_loss, torch.tensor(1.0))
    torch.testing.assert_close(hf_load_balancing_loss([layer.router_logits], n_experts, top_k),
                               torch.tensor(float(top_k)))  # HF's balanced value is k
    layer(eye[[0, 0, 0, 0]])  # every token to expert 0
    assert layer.load_balancing_loss > 1.5


def test_switch_loss_formula_and_gradient():
    probs = torch.softmax(torch.randn(10, 4), dim=-1).requires_grad_()
    counts = torch.tensor([6, 4, 7, 3])  # 20 slots: k = 2 over 10 tokens
    loss = switch_load_balancing_loss(probs, counts, top_k=2)
    f, p = counts / 20, probs.mean(dim=0)
    torch.testing.assert_close(loss, 4 * (f * p).sum())
    (grad,) = torch.autograd.grad(loss, probs)
    torch.testing.assert_close(grad, (4 * f / 10).expand(10, 4))  # ∂/∂p_ti = N·fᵢ/T


def test_z_loss_is_mean_squared_logsumexp_and_trains_the_router():
    layer = make_layer()
    x = torch.randn(5, D_MODEL)
    layer(x)
    logits = x @ layer.router.weight.t()
    expected = torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in logits]).mean()
    torch.testing.assert_close(layer.z_loss, expected)
    torch.testing.assert_close(router_z_loss(layer.router_logits), expected)
    (grad,) = torch.autograd.grad(layer.z_loss, layer.router.weight)
    assert grad.abs().sum() > 0


def test_router_loss_weighs_the_losses_by_balance_method():
    x = torch.randn(8, D_MODEL)
    for balance in ("aux", "bias", "none"):
        layer = make_layer(balance=balance, aux_loss_coef=0.1, z_loss_coef=0.01)
        layer(x)
        expected = 0.01 * layer.z_loss + (0.1 * layer.load_balancing_loss if balance == "aux" else 0)
        torch.testing.assert_close(layer.router_loss, expected)


def skewed_bias_layer() -> MoEFeedForward:
    layer = make_layer(n_experts=8, top_k=2, balance="bias", router_std=0.3)
    with torch.no_grad():
        layer.router.weight[0] += 1.5 / D_MODEL  # logits +1.5 and +0.8 for the tokens below
        layer.router.weight[1] += 0.8 / D_MODEL
    return layer.train()


def skewed_tokens(n: int) -> torch.Tensor:
    return torch.randn(n, D_MODEL) * 0.5 + 1.0


def test_bias_updates_even_out_a_skewed_load():
    layer = skewed_bias_layer()
    x = skewed_tokens(512)
    loads = []
    with torch.no_grad():
        for _ in range(50):
            layer(x)
            loads.append(layer.stats["tokens_per_expert"].float())
            layer.update_bias(rate=0.01)
    busiest = [(load.max() / load.mean()).item() for load in loads]
    quietest = [(load.min() / load.mean()).item() for load in loads]
    assert busiest[0] > 3 and quietest[0] == 0  # expert 0 takes most tokens, some none
    # A fixed step makes the bias oscillate around balance; every late step is near it.
    assert max(busiest[-10:]) < 1.7 and min(quietest[-10:]) > 0.5, (busiest, quietest)
    # The bias only chooses: the gates are still the chosen experts' unbiased probabilities.
    logits, probs, chosen, gates = layer.router(x)
    chosen_probs = probs.gather(-1, chosen)
    torch.testing.assert_close(gates, chosen_probs / chosen_probs.sum(-1, keepdim=True))
    assert not torch.equal(chosen, probs.topk(2, dim=-1).indices)


def test_bias_update_is_the_same_for_two_micro_batches_as_for_one_batch_holding_both():
    accumulated = skewed_bias_layer()
    whole = copy.deepcopy(accumulated)
    first, second = skewed_tokens(96), skewed_tokens(160)
    with torch.no_grad():
        accumulated(first)
        accumulated(second)
        accumulated.eval()(first)  # evaluation is not counted
        whole(torch.cat([first, second]))
    torch.testing.assert_close(accumulated.observed_load, whole.observed_load)
    accumulated.update_bias(rate=0.01)
    whole.update_bias(rate=0.01)
    assert torch.equal(accumulated.router.expert_bias, whole.router.expert_bias)
    assert accumulated.router.expert_bias.abs().sum() > 0
    assert accumulated.observed_load.sum() == 0  # reset for the next step


def test_bias_is_a_checkpointed_buffer_and_update_all_reduces_under_torch_distributed(tmp_path):
    layer = skewed_bias_layer()
    assert "router.expert_bias" in layer.state_dict()
    assert all("bias" not in name for name, _ in layer.named_parameters())
    with torch.no_grad():
        layer(skewed_tokens(64))
    expected = copy.deepcopy(layer)
    expected.update_bias(rate=0.01, all_reduce=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        layer.update_bias(rate=0.01)  # all-reduces: one process, so the same counts
    finally:
        dist.destroy_process_group()
    assert torch.equal(layer.router.expert_bias, expected.router.expert_bias)
    restored = make_layer(n_experts=8, top_k=2, balance="bias")
    restored.load_state_dict(layer.state_dict())
    assert torch.equal(restored.router.expert_bias, layer.router.expert_bias)
    with pytest.raises(UserError, match="balance='bias'"):
        make_layer(balance="aux").update_bias(0.01)


# --- router ---------------------------------------------------------------------------------------


def test_router_runs_in_float32_when_the_layer_is_bfloat16():
    layer = make_layer().to(torch.bfloat16)
    x = torch.randn(2, 8, D_MODEL, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert layer.router_logits.dtype == torch.float32
    assert torch.equal(layer.router_logits, x.view(-1, D_MODEL).float() @ layer.router.weight.float().t())


def test_router_runs_in_float32_under_autocast_and_every_path_agrees():
    layer = make_layer()
    x = torch.randn(2, 16, D_MODEL)
    full = layer(x)
    outs = {}
    for method in ("grouped", "loop", "gather"):
        layer.dispatch = method
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[method] = layer(x)
        assert layer.router_logits.dtype == torch.float32
        torch.testing.assert_close(layer.router_logits, x.view(-1, D_MODEL) @ layer.router.weight.t())
        assert outs[method].dtype == torch.float32 and not torch.equal(outs[method], full)  # bf16 products
        torch.testing.assert_close(outs[method], full, rtol=0.05, atol=0.05)
    torch.testing.assert_close(outs["grouped"], outs["loop"], rtol=1e-2, atol=1e-3)


def test_sigmoid_scoring_chooses_by_score_and_normalises_the_chosen_scores():
    layer = make_layer(n_experts=6, top_k=2, router_scoring="sigmoid")
    x = torch.randn(20, D_MODEL)
    logits, probs, chosen, gates = layer.router(x)
    scores = torch.sigmoid(x @ layer.router.weight.t())
    assert torch.equal(chosen, scores.topk(2, dim=-1).indices)
    chosen_scores = scores.gather(-1, chosen)
    torch.testing.assert_close(gates, chosen_scores / chosen_scores.sum(-1, keepdim=True))
    torch.testing.assert_close(probs, scores / scores.sum(-1, keepdim=True))  # for the losses
    layer.router.norm_topk = False
    torch.testing.assert_close(layer.router(x)[3], chosen_scores)


def test_switch_top1_gates_by_the_probability_and_trains_the_router_through_it():
    layer = make_layer(top_k=1, norm_topk=False)
    x = torch.randn(24, D_MODEL)
    _, probs, chosen, gates = layer.router(x)
    torch.testing.assert_close(gates[:, 0], probs.max(dim=-1).values)  # Switch eq. 2: pᵢ(x)·Eᵢ(x)
    out = layer(x)
    torch.testing.assert_close(out, per_token_reference(layer, x))
    (grad,) = torch.autograd.grad(out.square().sum(), layer.router.weight)
    assert grad.abs().sum() > 0
    # Renormalising a single gate makes it 1: no gradient reaches the router through it (but
    # rounding: ∂(g/g)/∂g = 1/g − g/g² is not exactly 0 in float32).
    layer.router.norm_topk = True
    (normalised_grad,) = torch.autograd.grad(layer(x).square().sum(), layer.router.weight)
    assert normalised_grad.abs().max() < 1e-5 * grad.abs().max()


def test_top2_gates_train_the_router():
    layer = make_layer(top_k=2)
    (grad,) = torch.autograd.grad(layer(torch.randn(24, D_MODEL)).square().sum(), layer.router.weight)
    assert grad.abs().sum() > 0


def test_jitter_noises_the_router_input_only_in_training():
    layer = make_layer(n_experts=1, top_k=1, router_jitter=0.1)
    x = torch.randn(32, D_MODEL)
    clean_logits = x @ layer.router.weight.t()
    expert_only = layer.experts(x, torch.tensor([32]), "loop")
    layer.train()
    out = layer(x)
    assert not torch.allclose(layer.router_logits, clean_logits)
    bound = 0.1 * x.abs() @ layer.router.weight.abs().t()  # |Σ xᵢ·δᵢ·wᵢ| ≤ ε·Σ|xᵢ·wᵢ|
    assert torch.all((layer.router_logits - clean_logits).abs() <= bound + 1e-6)
    torch.testing.assert_close(out, expert_only)  # the experts saw the clean input
    layer.eval()
    layer(x)
    assert torch.equal(layer.router_logits, clean_logits)


# --- shared experts, stats, arguments -------------------------------------------------------------


def test_shared_experts_add_the_sum_of_always_active_experts():
    layer = make_layer(n_shared_experts=2)
    routed_only = make_layer()
    routed_only.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared")})
    x = torch.randn(2, 6, D_MODEL)
    shared = layer.shared_experts
    assert shared.w1.weight.shape == (2 * HIDDEN, D_MODEL)
    # The fused FeedForward is exactly two experts of width HIDDEN side by side.
    halves = []
    for part in (slice(0, HIDDEN), slice(HIDDEN, 2 * HIDDEN)):
        expert = FeedForward(LlamaConfig(d_model=D_MODEL, n_heads=1, ffn_hidden_dim=HIDDEN))
        with torch.no_grad():
            expert.w1.weight.copy_(shared.w1.weight[part])
            expert.w3.weight.copy_(shared.w3.weight[part])
            expert.w2.weight.copy_(shared.w2.weight[:, part])
        halves.append(expert(x))
    torch.testing.assert_close(layer(x), routed_only(x) + halves[0] + halves[1], rtol=1e-5, atol=1e-6)


def test_stats_are_detached_and_the_losses_carry_gradients():
    layer = make_layer(n_experts=4, top_k=2)
    layer(torch.randn(3, 5, D_MODEL))
    assert layer.stats["tokens_per_expert"].sum().item() == 2 * 15
    assert layer.stats["dropped_tokens"].item() == 0 and layer.stats["dropped_fraction"].item() == 0
    assert not any(value.requires_grad for value in layer.stats.values())
    assert layer.load_balancing_loss.requires_grad and layer.z_loss.requires_grad
    assert layer.router_loss.requires_grad
    uniform = MoEFeedForward(D_MODEL, 4, 2, HIDDEN)
    with torch.no_grad():
        uniform.router.weight.zero_()
    uniform(torch.randn(7, D_MODEL))
    torch.testing.assert_close(uniform.stats["router_entropy"], torch.tensor(math.log(4)))


@pytest.mark.parametrize("bad", [
    dict(top_k=5), dict(top_k=0), dict(router_scoring="tanh"), dict(balance="loss"),
    dict(capacity_factor=0.0), dict(router_jitter=1.0), dict(dispatch="fast"),
])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(UserError):
        MoEFeedForward(**{"d_model": D_MODEL, "n_experts": 4, "top_k": 2, "expert_hidden_dim": 8, **bad})
