"""The MoE Llama's speed against Hugging Face's MixtralForCausalLM on this CPU, float32, same weights.

    python bench/bench_moe.py [--quick] [--threads 2] [--out bench/results/moe.json]

Side by side in one run, the `mixtral-tiny` shape (stories15m with 8 experts of width 768, top-2,
2 key/value heads, vocab 32000), random weights (the work per token does not depend on them):

1. Training: one step (forward, backward, AdamW) on an 8×256 batch, each model through its own
   loss API — ours `model(inputs, targets=...)` in training mode (cross-entropy + load-balancing
   loss + z-loss), theirs `labels=` with `output_router_logits=True` (cross-entropy + aux loss).
   Target: ≥ 1.5× their tokens/s.
2. Generation with the KV cache: batch 1, 200 new tokens, greedy, no EOS, against
   `MixtralForCausalLM.generate`, and whether both produce the same tokens. Target: ≥ 3×.
3. Dispatch: one routed feed-forward layer, forward and backward on the 2048 tokens of that
   batch: our sorted dispatch (one grouped product per SwiGLU matrix, `moe/routing.py`), our
   per-expert loop on the sorted slices, and a naive loop that finds each expert's tokens with a
   mask and scatters its outputs back with index_add (Hugging Face's "eager" experts).
4. Experts: our training step at 32 experts against 8 (same top-2, same expert width, so the
   same FLOPs per token and 4× the expert parameters). Target: ≤ 1.3× the time.

The optimizer is the training engine's, torch.optim.AdamW(fused=True) (also Hugging Face Trainer's
default), for both models; `--optimizer foreach` uses the per-tensor kernels for both instead (AdamW's cost
grows with the parameter count, which part 4 multiplies by ~3).

Our model runs with its opt-in fast paths (`fromscratch.moe.accelerate`), as `moe train` and
`moe generate` run it. Each timing is the best of several interleaved repeats (the machine may be
shared); the median is kept too. Timing helpers are bench/harness.py's.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_llama import bench_decode as llama_bench_decode
from harness import interleaved, rates, speedup, write_results

from fromscratch.devices import describe_device
from fromscratch.moe import MoEConfig, MoEFeedForward, MoELlama, accelerate


def huggingface_copy(model: MoELlama):
    """transformers' MixtralForCausalLM holding `model`'s weights, through a saved directory."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        hf = transformers.MixtralForCausalLM.from_pretrained(tmp)
    hf.generation_config.eos_token_id = None  # never stop early
    hf.generation_config.pad_token_id = 0
    return hf


OPTIMIZERS = {"foreach": {}, "fused": {"fused": True}}


def adamw(model, optimizer: str) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, **OPTIMIZERS[optimizer])


def training_step(model, inputs, targets, optimizer):
    """One step of ours: the loss of forward(targets=...), backward, AdamW."""
    def step():
        loss = model(inputs, targets=targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def training_batch(vocab_size: int, batch_size: int, seq_len: int):
    batch = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(0))
    return batch[:, :-1], batch[:, 1:]


def bench_train(model, hf, batch_size: int, seq_len: int, repeats: int, optimizer: str) -> dict:
    inputs, targets = training_batch(model.config.vocab_size, batch_size, seq_len)
    hf_optimizer = adamw(hf, optimizer)
    model.train(), hf.train()
    ours = training_step(model, inputs, targets, adamw(model, optimizer))

    def theirs():  # HF shifts labels itself, so it gets the T inputs as labels
        loss = hf(input_ids=inputs, labels=inputs, output_router_logits=True).loss
        hf_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        hf_optimizer.step()

    times = interleaved({"ours": ours, "theirs": theirs}, repeats, warmup=1)  # AdamW allocates its state
    tokens = batch_size * seq_len
    ours_rate, theirs_rate = rates(tokens, times["ours"]), rates(tokens, times["theirs"])
    return {"batch": [batch_size, seq_len], "optimizer": f"torch.optim.AdamW ({optimizer})",
            "ours_tokens_per_s": ours_rate, "hf_tokens_per_s": theirs_rate, **speedup(ours_rate, theirs_rate)}


def bench_decode(model, hf, new_tokens: int, repeats: int) -> dict:
    """Llama's generation benchmark (`bench_llama.bench_decode`), in eval mode."""
    model.eval(), hf.eval()
    return llama_bench_decode(model, hf, new_tokens, repeats)


def naive_moe(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The same layer computed the naive way: for each expert, a mask finds its tokens, and its
    weighted outputs are scattered back with index_add (Hugging Face's "eager" MixtralExperts)."""
    x_flat = x.reshape(-1, x.size(-1))
    _, _, chosen, gates = layer.router(x_flat)
    out = torch.zeros_like(x_flat)
    w1, w2, w3 = layer.experts.w1, layer.experts.w2, layer.experts.w3
    for e in range(layer.n_experts):
        token, slot = torch.where(chosen == e)
        if len(token):
            rows = x_flat[token]
            y = F.linear(F.silu(F.linear(rows, w1[e])) * F.linear(rows, w3[e]), w2[e])
            out.index_add_(0, token, y * gates[token, slot, None])
    return out.view(x.shape)


def bench_dispatch(config: MoEConfig, n_tokens: int, repeats: int) -> dict:
    torch.manual_seed(0)
    layer = MoEFeedForward(config.d_model, config.n_experts, config.top_k, config.expert_dim).train()
    x = torch.randn(n_tokens, config.d_model)
    grad = torch.randn(n_tokens, config.d_model)

    def forward_backward(fn):
        def run():
            inputs = x.clone().requires_grad_()
            fn(inputs).backward(grad)
        return run

    def dispatch(method):
        def fn(inputs):
            layer.dispatch = method
            return layer(inputs)
        return fn

    candidates = {"sorted, grouped products": dispatch("grouped"), "sorted, a product per expert": dispatch("loop"),
                  "naive per-expert loop (mask + index_add)": lambda inputs: naive_moe(layer, inputs)}
    with torch.no_grad():
        reference = naive_moe(layer, x)
        agree = {name: torch.allclose(fn(x), reference, atol=1e-5, rtol=1e-4) for name, fn in candidates.items()}
    times = interleaved({name: forward_backward(fn) for name, fn in candidates.items()}, repeats, warmup=1)
    result = {"tokens": n_tokens, "shape": f"d_model {config.d_model}, {config.n_experts} experts of {config.expert_dim}, "
                                          f"top-{config.top_k}", "same_output": agree}
    for name, t in times.items():
        result[name] = {"ms_best": round(1e3 * min(t), 1), "ms_median": round(1e3 * statistics.median(t), 1)}
    return result


def bench_experts(batch_size: int, seq_len: int, repeats: int, optimizer: str, counts=(8, 32)) -> dict:
    steps, params = {}, {}
    for n in counts:
        torch.manual_seed(0)
        model = accelerate(MoELlama(MoEConfig.from_preset("mixtral-tiny", n_experts=n))).train()
        inputs, targets = training_batch(model.config.vocab_size, batch_size, seq_len)
        steps[n] = training_step(model, inputs, targets, adamw(model, optimizer))
        params[n] = model.num_parameters()
    times = interleaved(steps, repeats, warmup=1)
    few, many = counts
    result = {"batch": [batch_size, seq_len], "top_k": 2, "optimizer": f"torch.optim.AdamW ({optimizer})"}
    for n in counts:
        result[f"{n}_experts"] = {"parameters": params[n], "s_best": round(min(times[n]), 3),
                                  "s_median": round(statistics.median(times[n]), 3)}
    result["time_ratio_best"] = round(min(times[many]) / min(times[few]), 2)
    result["time_ratio_median"] = round(statistics.median(times[many]) / statistics.median(times[few]), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens, a smaller batch, one repeat (a smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="fused",
                        help="AdamW's kernels for the training steps (default: the engine's, foreach)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe.json"))
    args = parser.parse_args()

    import transformers

    torch.set_num_threads(args.threads)
    new_tokens, (batch_size, seq_len), repeats = (20, (2, 64), 1) if args.quick else (200, (8, 256), 6)
    torch.manual_seed(0)
    config = MoEConfig.from_preset("mixtral-tiny")
    model = MoELlama(config)
    hf = huggingface_copy(model)
    accelerate(model)
    results = {"environment": {
        "cpu": platform.processor() or platform.machine(), "hardware": describe_device("cpu"),
        "cpu_count": os.cpu_count(), "threads": args.threads, "dtype": "float32", "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_experts_implementation": hf.config._experts_implementation, "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "model": "mixtral-tiny (d_model 288, 6 layers, 6 heads, 2 kv heads, 8 experts of 768, top-2, vocab 32000), "
                 "random weights",
        "quick": args.quick,
    }}
    print(f"training on {batch_size}×{seq_len} ...", file=sys.stderr)
    results["train"] = bench_train(model, hf, batch_size, seq_len, repeats, args.optimizer)
    print(f"decoding {new_tokens} tokens ...", file=sys.stderr)
    results["decode"] = bench_decode(model, hf, new_tokens, repeats)
    del hf
    print("dispatch: sorted against a per-expert loop ...", file=sys.stderr)
    results["dispatch"] = bench_dispatch(config, batch_size * seq_len, repeats)
    print("training step at 32 experts against 8 ...", file=sys.stderr)
    results["experts_32_vs_8"] = bench_experts(batch_size, seq_len, repeats, args.optimizer)
    results["environment"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    write_results(results, args.out, echo=True)


if __name__ == "__main__":
    main()
